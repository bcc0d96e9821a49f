"""The metadata contract between qfx's passes, backends, runtime and report: one module.

* What ``annotate`` records on a linear node (``node.meta["qfx"]``): :class:`LinearInfo` with
  its frozen :class:`QuantSpec`.
* The op sets every pass matches on (:data:`LINEAR_OPS`, :data:`ATTENTION_OPS`, ...).
* Named access to the arguments of qfx's integer ops. Positions come from the op schemas
  declared once in :mod:`qfx.ops` (``torch.library``), so no pass, backend or report reads an
  argument by a hard-coded index::

      >>> arg(node, "gelu")                    # node is a qfx::int_linear call
      False
      >>> set_args(node, gelu=True, backend="cutlass")
      >>> weight_owner(node)                   # the module holding w_codes / w_scale / ...
      'layer3.ffn_in'
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

import qfx.ops as _ops  # noqa: F401  (declares torch.ops.qfx.*)
from qfx.config import precision_tag
from qfx.numerics.fake_quant import integer_linear

__all__ = [
    "QuantSpec", "LinearInfo", "LINEAR_OPS", "ATTENTION_OPS", "ACTIVATION_OPS",
    "INT_LINEAR", "QUANTIZE", "WEIGHT_ONLY_LINEAR", "ROTATE", "INTEGER_LINEAR_OPS", "ADD_LAYER_NORM_QUANTIZE",
    "ADD_LAYER_NORM_ROTATE_QUANTIZE",
    "TOKENWISE_OPS", "ELEMENTWISE_OPS", "FEATURE_SPLIT_OPS", "TOKEN_INDEX", "PACK_TOKENS", "REPAD_TOKENS",
    "linear_nodes", "arg", "set_args", "arg_index", "weight_owner", "op_buffer", "is_call",
    "ancestors", "sdpa_mask",
    "META_LINEAR", "META_PARTS", "META_PLAN", "META_FUSED", "META_FAKE_QUANT", "META_TOKENS", "META_CAPTURE",
    "META_STAGE", "META_CONFIG", "META_SKIP", "META_ROTATED", "META_PASSES", "META_ATTENTION", "META_UNPAD", "META_UNPAD_MIN_PADDING",
    "META_UNPAD_SYNC_MIN_POSITIONS",
    "META_FUSED_NORMS", "META_FUSED_ROTATED_NORMS",
]

aten = torch.ops.aten

INT_LINEAR = torch.ops.qfx.int_linear.default
QUANTIZE = torch.ops.qfx.quantize.default
WEIGHT_ONLY_LINEAR = torch.ops.qfx.weight_only_linear.default
#: the lowered linears of L4/L5 (integer activations or weight-only)
INTEGER_LINEAR_OPS = frozenset({INT_LINEAR, WEIGHT_ONLY_LINEAR})
#: a float linear (L1, L2) and the quantized linear of the QAT graph (L3), same leading args (x, W, b)
LINEAR_OPS = frozenset({aten.linear.default, integer_linear})
ATTENTION_OPS = frozenset({aten.scaled_dot_product_attention.default})
ACTIVATION_OPS = frozenset({aten.gelu.default, aten.relu.default, aten.silu.default})
ADD_LAYER_NORM_QUANTIZE = torch.ops.qfx.add_layer_norm_quantize.default
#: its rotated form: the codes are those of rotate(layer_norm(a + b)) (passes/fuse_norm_quant.py)
ADD_LAYER_NORM_ROTATE_QUANTIZE = torch.ops.qfx.add_layer_norm_rotate_quantize.default
#: the online input rotation (passes/rotate_inputs.py): token-wise, float in and out
ROTATE = torch.ops.qfx.rotate.default

# -- metadata keys: every key qfx writes into ``node.meta`` / ``gm.meta``, declared once here ------
# (the values' types are documented where they are written; serialize keeps every "qfx*" key)
#: node.meta of a linear: its :class:`LinearInfo` (passes/annotate.py)
META_LINEAR = "qfx"
#: node.meta of a fused linear: the :class:`LinearInfo` of each linear it computes (passes/fuse_qkv.py)
META_PARTS = "qfx_parts"
#: node.meta of an integer op: the backend the planner bound and the ones it refused (passes/plan.py)
META_PLAN = "qfx_plan"
#: node.meta: what a fusion folded into the op, e.g. ``("gelu",)`` (passes/fuse_gelu.py)
META_FUSED = "qfx_fused"
#: node.meta of a fake-quantized linear: the fake-quant module's target (passes/fake_quant.py)
META_FAKE_QUANT = "qfx_fq"
#: node.meta: ``"packed"`` on a node that runs on the real tokens only (passes/unpad.py)
META_TOKENS = "qfx_tokens"
#: gm.meta: the :class:`qfx.capture.CaptureInfo`
META_CAPTURE = "qfx_capture"
#: gm.meta of a QAT model: the stage tag, its QuantConfig and its skip list (qfx.api.prepare_qat)
META_STAGE = "qfx_stage"
META_CONFIG = "qfx_config"
META_SKIP = "qfx_skip"
#: gm.meta: the weights whose linears read a rotated input, by block (passes/rotate_inputs.py)
META_ROTATED = "qfx_rotated"
#: gm.meta: the names of the passes run, in order (qfx.pipeline.run_passes)
META_PASSES = "qfx_passes"
#: gm.meta: the attention path taken, or why it was kept (passes/attention.py)
META_ATTENTION = "qfx_attention"
#: gm.meta: padding removal done, or why not (passes/unpad.py)
META_UNPAD = "qfx_unpad"
#: gm.meta: the padding fraction below which a packed model runs a padded call padded
#: (remove_padding="auto": qfx.runtime.packed.AUTO_MIN_PADDING; True: 0.0)
META_UNPAD_MIN_PADDING = "qfx_unpad_min_padding"
#: gm.meta: the fewest positions (B x S) of a call whose GPU attention_mask a packed model reads back
#: (one device sync) to choose its path; smaller calls run padded, unread
#: (remove_padding="auto": qfx.runtime.packed.AUTO_SYNC_MIN_POSITIONS; True: 0)
META_UNPAD_SYNC_MIN_POSITIONS = "qfx_unpad_sync_min_positions"
#: gm.meta: ``(fused, why others not)`` and the rotated count (passes/fuse_norm_quant.py)
META_FUSED_NORMS = "qfx_fused_norms"
META_FUSED_ROTATED_NORMS = "qfx_fused_rotated_norms"

# -- token-wise ops: what padding removal (passes/unpad.py) may run on packed tokens -------------
# An op is token-wise when each token's output row depends only on that token's input rows
# (leading dims are tokens, the last dim(s) features), so it computes the same numbers on
# [B, S, F] and on the real tokens packed as [1, T, F].

#: the ops worth packing for (GEMMs, quantize, LayerNorm) -> their token operands (argument
#: names of qfx ops, positions of aten ops); every other argument is a parameter (weights,
#: scales, bias, eps) that does not depend on the token
TOKENWISE_OPS: dict[Any, tuple[str | int, ...]] = {
    QUANTIZE: ("x",),
    INT_LINEAR: ("a", "a_scale", "a_offset"),
    WEIGHT_ONLY_LINEAR: ("x",),
    ADD_LAYER_NORM_QUANTIZE: ("a", "b"),
    ADD_LAYER_NORM_ROTATE_QUANTIZE: ("a", "b"),
    ROTATE: ("x",),
    aten.linear.default: (0,),
    aten.layer_norm.default: (0,),
}
#: elementwise ops: every tensor argument is a token operand or broadcasts over the tokens
ELEMENTWISE_OPS = frozenset({
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar,
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default,
    aten.erf.default, aten.neg.default, aten.clone.default, aten.contiguous.default,
    aten.pow.Tensor_Scalar, aten.exp.default, aten.sqrt.default, aten.rsqrt.default, aten.abs.default,
    aten.to.dtype, aten._to_copy.default,
})
#: splits along a feature dim (argument 2; tokens untouched): (tensor, sizes or chunks, dim)
FEATURE_SPLIT_OPS = frozenset({aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default})
#: the token layout ops padding removal inserts (qfx/ops.py)
TOKEN_INDEX = torch.ops.qfx.token_index.default
PACK_TOKENS = torch.ops.qfx.pack_tokens.default
REPAD_TOKENS = torch.ops.qfx.repad_tokens.default


@dataclass(frozen=True)
class QuantSpec:
    """How one linear is quantized: frozen, validated against its shape by ``annotate``."""

    weight_bits: int
    act_bits: int  # 16: float activations (weight-only)
    symmetric: bool
    group_size: int | None
    act_clip: tuple[float, float] | None
    #: block size of the online input rotation (passes/rotate_inputs.py), None: not rotated
    rotation: int | None = None
    #: block-scaled activations: one scale per token per block of this many input channels
    #: (QuantConfig(act_block=...)), None: token-wise
    act_block: int | None = None

    @classmethod
    def from_config(cls, cfg) -> "QuantSpec":
        return cls(cfg.weight_bits, cfg.act_bits, cfg.symmetric, cfg.group_size, cfg.act_clip, cfg.rotation,
                   cfg.act_block)

    @property
    def quantizes_activations(self) -> bool:
        return self.act_bits < 16

    @property
    def precision(self) -> str:
        return precision_tag(self.weight_bits, self.act_bits, self.symmetric, self.group_size, rotation=self.rotation,
                             act_block=self.act_block)


@dataclass(frozen=True)
class LinearInfo:
    """What annotate records on a linear node (``node.meta["qfx"]``)."""

    name: str  # readable path, e.g. "layer3.ffn_in" or "layer0.q" or "classifier"
    layer: int | None
    role: str  # qkv | attn_out | ffn_in | ffn_out | other
    part: str  # q | k | v for qkv, else the role
    weight: str  # qualified name of the weight parameter
    in_features: int
    out_features: int
    spec: QuantSpec | None  # None: stays float
    float_reason: str = ""  # why it stays float
    #: the other linears that read the same weight parameter (ALBERT: every layer applies one
    #: layer's weights); each use quantizes it with the same spec, so all get the same codes
    shared_with: tuple[str, ...] = ()


def is_call(node: Any, targets) -> bool:
    """``node`` is a call_function of one of ``targets`` (an op or a set of ops)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    return node.target in targets if isinstance(targets, (set, frozenset, tuple)) else node.target == targets


def linear_nodes(gm: GraphModule) -> list[Node]:
    """Every float (L1/L2) or QAT (L3) linear of ``gm``, in graph order."""
    return [n for n in gm.graph.nodes if is_call(n, LINEAR_OPS)]


@functools.lru_cache(maxsize=None)
def _positions(op) -> dict[str, int]:
    return {a.name: i for i, a in enumerate(op._schema.arguments)}


def arg_index(op, name: str) -> int:
    """Position of argument ``name`` in ``op``'s schema (KeyError naming the valid ones)."""
    pos = _positions(op)
    if name not in pos:
        raise KeyError(f"{op} has no argument {name!r}; it takes {list(pos)}")
    return pos[name]


def arg(node: Node, name: str) -> Any:
    """The argument ``name`` of a call to a qfx op (positional or keyword)."""
    if name in node.kwargs:
        return node.kwargs[name]
    i = arg_index(node.target, name)
    if i < len(node.args):
        return node.args[i]
    default = node.target._schema.arguments[i].default_value
    return default


def set_args(node: Node, **values: Any) -> None:
    """Replace the named arguments of a call to a qfx op (kept positional)."""
    args = list(node.args)
    for name, value in values.items():
        i = arg_index(node.target, name)
        if i >= len(args):
            raise ValueError(f"{node.name}: argument {name!r} (position {i}) was not given positionally")
        args[i] = value
    node.args = tuple(args)


def weight_owner(node: Node) -> str:
    """Qualified name of the module holding an integer linear's buffers (w_codes, w_scale, ...)."""
    codes = arg(node, "w")
    if not (isinstance(codes, Node) and codes.op == "get_attr"):
        raise ValueError(f"{node.name}: weight codes are not a module buffer")
    return str(codes.target).rpartition(".")[0]


def op_buffer(gm: GraphModule, node: Node, name: str) -> torch.Tensor | None:
    """The tensor an argument of an integer op reads through ``get_attr`` (None if absent)."""
    src = arg(node, name)
    if src is None:
        return None
    if not (isinstance(src, Node) and src.op == "get_attr"):
        raise ValueError(f"{node.name}: argument {name!r} is computed, not a stored tensor")
    owner, _, leaf = str(src.target).rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    return getattr(mod, leaf)


def ancestors(node: Node) -> list[Node]:
    """``node`` and every node it depends on, in graph order."""
    seen, stack = {node}, [node]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return [n for n in node.graph.nodes if n in seen]


def sdpa_mask(sdpa: Node) -> Node | None:
    """The ``attn_mask`` node of an ``aten.scaled_dot_product_attention`` call (None: no mask)."""
    mask = sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)
    return mask if isinstance(mask, Node) else None
