"""What the tuner chooses between, read from a model: precisions, scenarios and layer parts.

A *layer part* is one GEMM of an encoder layer as the compiled graph runs it (``qkv``,
``attn_out``, ``ffn_in``, ``ffn_out``; :class:`PartSpec`), with the work the later passes fold
around it: the input quantize in the LayerNorm before it (``fuse_add_layer_norm_quantize``, asked
of the kernel's own row rule: :mod:`qfx.backends.cutlass.launch` token-wise,
:mod:`qfx.backends.triton.norm_block_quant` block-scaled) and the GELU in the quantize
(``fuse_gelu_quantize``, recognised by graph structure). A part of a ``QuantConfig(act_block=B)``
model carries its block (and its activation scheme), so the cost model prices the block-scaled
kernels and quantizes (:func:`qfx.tune.cost_model.part_time`). :func:`layer_parts` reads them from an
annotated graph, :func:`part_specs` from a :class:`qfx.tune.cost_model.ModelShape`.

Example::

    >>> [p.part for p in layer_parts(annotated_gm, get_target("sm_86"))][:4]
    ['qkv', 'attn_out', 'ffn_in', 'ffn_out']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch.fx import GraphModule, Node

from qfx.backends.cutlass.launch import ADD_LN_DTYPES, add_layer_norm_row_fits
from qfx.backends.triton.norm_block_quant import row_fits as block_norm_row_fits
from qfx.schema import INTEGER_LINEAR_OPS, LINEAR_OPS, META_LINEAR, QuantSpec, is_call, linear_nodes
from qfx.targets import Target
from qfx.tune.cost_model import ModelShape

__all__ = [
    "PRECISIONS", "TUNED_ROLES", "allowed_precisions", "trained_precision", "Scenario", "PartSpec",
    "part_specs", "part_specs_from_graph", "check_act_block", "LayerPart", "layer_parts", "layer_count",
]

#: the layer parts the tuner chooses a precision for
TUNED_ROLES = ("qkv", "attn_out", "ffn_in", "ffn_out")


def trained_precision(spec: QuantSpec | None) -> str:
    """The precision a linear was trained for, as the tuner names it: W4A4 -> ``"int4"``,
    W8A8 / W4A8 -> ``"int8"``, float or weight-only (no integer candidate) -> ``"fp16"``."""
    if spec is None or not spec.quantizes_activations:
        return "fp16"
    return "int4" if spec.weight_bits == spec.act_bits == 4 else "int8"


#: precisions from lowest to highest
PRECISIONS = ("int4", "int8", "fp16")


def allowed_precisions(trained: str) -> tuple[str, ...]:
    """Precisions a part trained in ``trained`` may run in: never lower, higher always."""
    if trained not in PRECISIONS:
        raise ValueError(f"trained precision {trained!r}: use one of {PRECISIONS}")
    return PRECISIONS[PRECISIONS.index(trained):]


@dataclass(frozen=True)
class Scenario:
    """The input sizes to tune for: ``(batch, seq)`` buckets (M = batch x seq per GEMM).

    Example::

        >>> Scenario.of(batch=32, seq=128).buckets
        ((32, 128),)
        >>> Scenario.of(buckets=[(1, 128), (32, 384)]).buckets
        ((1, 128), (32, 384))
    """

    buckets: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, batch: int | None = None, seq: int | None = None,
           buckets: Iterable[tuple[int, int]] | None = None) -> "Scenario":
        if buckets is not None:
            if batch is not None or seq is not None:
                raise ValueError("Scenario: give either batch and seq, or buckets, not both")
            items = tuple((int(b), int(s)) for b, s in buckets)
        else:
            if batch is None or seq is None:
                raise ValueError(f"Scenario: batch={batch!r}, seq={seq!r}: give both (e.g. batch=32, seq=128) or buckets")
            items = ((int(batch), int(seq)),)
        if not items:
            raise ValueError("Scenario(buckets=[]): give at least one (batch, seq) bucket")
        for b, s in items:
            if b < 1 or s < 1:
                raise ValueError(f"Scenario bucket (batch={b}, seq={s}): both must be >= 1")
        return cls(items)

    def check(self, shape: ModelShape) -> None:
        """Raise when a bucket exceeds the model's limits (sequence longer than its positions)."""
        for b, s in self.buckets:
            if s > shape.max_seq:
                raise ValueError(
                    f"scenario bucket (batch={b}, seq={s}): {shape.name} takes at most {shape.max_seq} tokens "
                    f"(max_position_embeddings); use seq <= {shape.max_seq}"
                )


@dataclass(frozen=True)
class PartSpec:
    """One GEMM of the model as the tuner sees it (M comes from the scenario).

    ``layer``: encoder layer index; ``trained``: the precision the weights were trained for
    ("int4", "int8", or "fp16" for a part left in float).
    """

    layer: int | None
    part: str
    n: int
    k: int
    trained: str
    #: the float graph runs this part as this many GEMMs of N / fp16_gemms each (HF's separate
    #: q, k, v linears); fuse_qkv makes the integer part one GEMM of N, reading one quantize
    fp16_gemms: int = 1
    #: the input quantize is folded into the LayerNorm before the part (the GPU pass
    #: fuse_add_layer_norm_quantize), so an integer choice costs only what that kernel adds
    quantize_in_norm: bool = False
    #: the part's output goes through GELU here: fused into the integer epilogue, a kernel of
    #: its own in fp16. None: the part is ``ffn_in``. False: the GELU is counted elsewhere
    #: (in the next part's quantize, ``quantize_gelu``)
    gelu: bool | None = None
    #: the input quantize also applies the GELU of the part before (fuse_gelu_quantize)
    quantize_gelu: bool = False
    #: block-scaled activations (``QuantConfig(act_block=B)``): one scale (and offset) per token per
    #: block of this many input channels; None: token-wise. Integer candidates are priced as the
    #: block kernels (per-block promotion, block scales); the fp16 one is the same either way
    act_block: int | None = None
    #: the activation scheme: asymmetric codes add an offset term per block to the promotion
    symmetric: bool = True

    @property
    def has_gelu(self) -> bool:
        return self.part == "ffn_in" if self.gelu is None else self.gelu


def _blocks(spec: QuantSpec | None) -> dict[str, Any]:
    """A :class:`PartSpec`'s ``act_block`` and ``symmetric`` from a linear's spec (token-wise and
    symmetric, the cost model's defaults, when the linear is float or weight-only)."""
    if spec is None or not spec.quantizes_activations:
        return {}
    return {"act_block": spec.act_block, "symmetric": spec.symmetric}


def part_specs_from_graph(gm) -> list[PartSpec]:
    """The GEMMs of a lowered (L4) or planned (L5) qfx graph, from each linear's ``LinearInfo``:
    integer linears keep their trained precision (W4A4 -> ``"int4"``, W8A8 / W4A8 -> ``"int8"``),
    activation block and scheme; float and weight-only linears of the four roles are ``"fp16"``
    (no integer candidate).

    Example::

        >>> specs = part_specs_from_graph(compiled.graph_module)
        >>> plan = autotune(None, "sm_90", Scenario.of(batch=32, seq=128), parts=specs)
    """
    out = []
    for node in gm.graph.nodes:
        info = node.meta.get(META_LINEAR)
        if info is None or not (is_call(node, INTEGER_LINEAR_OPS) or is_call(node, LINEAR_OPS)):
            continue
        if info.role not in TUNED_ROLES:
            continue
        spec = info.spec if is_call(node, INTEGER_LINEAR_OPS) else None
        part = info.role  # unfused q, k, v: three "qkv" GEMMs of N = h each
        out.append(PartSpec(info.layer, part, info.out_features, info.in_features, trained_precision(spec),
                            **_blocks(spec)))
    return out


def check_act_block(act_block: Any, ks: Iterable[int], where: str = "act_block") -> None:
    """Refuse a block the model's quantized linears cannot take (``QuantConfig``'s rule: a
    positive int, here >= 2, dividing every quantized linear's K); ``where`` names the parameter."""
    if act_block is None:
        return
    if isinstance(act_block, bool) or not isinstance(act_block, int) or act_block < 2:
        raise ValueError(f"{where}={act_block!r}: use a block size such as 128 (an int >= 2 dividing every quantized "
                         "linear's input dimension K), or leave it out for token-wise activations")
    bad = sorted({k for k in ks if k % act_block})
    if bad:
        raise ValueError(f"{where}={act_block} does not divide K={bad} of the model's GEMMs; use a block that divides "
                         f"every K (e.g. one dividing {min(bad)})")


def part_specs(shape: ModelShape, trained: str | dict[str, str], act_block: int | None = None,
               symmetric: bool = True) -> list[PartSpec]:
    """Every GEMM of ``shape``'s layers, q/k/v as one (fuse_qkv). ``trained``: one precision
    or ``{part: precision}`` (parts absent stay fp16). ``act_block`` / ``symmetric``: the
    activations of the integer parts (a model trained with ``QuantConfig(act_block=B)``); the
    block must divide every K."""
    check_act_block(act_block, [k for _, _, k in shape.parts()])
    per_part = {p: trained for p, _, _ in shape.parts()} if isinstance(trained, str) else dict(trained)
    out = []
    for layer in range(shape.layers):
        for part, n, k in shape.parts():
            prec = per_part.get(part, "fp16")
            blocks = {} if prec == "fp16" else {"act_block": act_block, "symmetric": symmetric}
            out.append(PartSpec(layer, part, n, k, prec, **blocks))
    return out


aten = torch.ops.aten
#: ops between a LayerNorm and the linear reading it that leave the values as they are
#: (dropout is the identity in eval and removed before planning)
_PASS_THROUGH = frozenset({aten.dropout.default, aten.clone.default, aten.alias.default, aten.contiguous.default,
                           aten._to_copy.default, aten.to.dtype, aten.view.default, aten.reshape.default})


@dataclass(frozen=True)
class LayerPart:
    """The linears of one layer part (``layer0.q/k/v`` -> part ``qkv``) and their GEMM."""

    layer: int | None
    part: str
    names: tuple[str, ...]
    spec: PartSpec


def _through(node: Any) -> Any:
    while is_call(node, _PASS_THROUGH):
        node = node.args[0]
    return node


def _quantize_in_norm(lin: Node, k: int, target: Target, float_dtype: torch.dtype, spec: QuantSpec) -> bool:
    """Whether ``fuse_add_layer_norm_quantize`` will fold this linear's input quantize into the
    LayerNorm that produces its input (GPU, fp16 / bf16 float parts, a row the kernel takes)."""
    if not target.is_gpu or not is_call(_through(lin.args[0]), aten.layer_norm.default):
        return False
    block = spec.act_block
    if block is None:
        return add_layer_norm_row_fits(k, float_dtype)[0]  # the kernel's own rule (dtype, row length)
    # block-scaled: the Triton kernel's row rule, not its fits(), which also asks whether Triton is
    # installed *here* (the plan is for the target, whose CUDA torch ships it); the pass fuses only
    # with fp16 / bf16 float parts and never a rotated block quantize (no such fused kernel)
    return (float_dtype in ADD_LN_DTYPES and spec.rotation is None
            and block_norm_row_fits(k, float_dtype, block)[0])


def _quantize_takes_gelu(lin: Node) -> bool:
    """Whether ``fuse_gelu_quantize`` will fold the exact GELU this linear reads into its
    input quantize (when the linear is integer): the GELU's only reader is this linear, and
    it is exact (the pass's pattern, matched on the graph's structure)."""
    gelu = _through(lin.args[0])
    if not is_call(gelu, aten.gelu.default) or len(gelu.users) != 1:
        return False
    approximate = gelu.kwargs.get("approximate", gelu.args[1] if len(gelu.args) > 1 else "none")
    return approximate == "none"


def layer_parts(gm: GraphModule, target: Target, float_dtype: torch.dtype = torch.float16) -> list[LayerPart]:
    """The layer parts of an annotated graph (L2 or later: ``node.meta["qfx"]`` on every linear)
    that have a choice: every linear of the part quantizes weights and activations with the
    same bits. Parts with a linear already in float (``skip``, roles not quantized) or
    weight-only have no integer candidate and are left out."""
    groups: dict[tuple[int | None, str], list[Node]] = {}
    for node in linear_nodes(gm):
        info = node.meta.get(META_LINEAR)
        if info is None:
            raise ValueError("layer_parts needs an annotated graph (qfx.passes.annotate): a linear has no qfx metadata")
        if info.role in TUNED_ROLES and info.layer is not None:
            groups.setdefault((info.layer, info.role), []).append(node)
    out = []
    for (layer, role), nodes in groups.items():
        infos = [n.meta[META_LINEAR] for n in nodes]
        specs = {(i.spec.weight_bits, i.spec.act_bits, i.spec.act_block, i.spec.symmetric)
                 if i.spec is not None and i.spec.quantizes_activations else None for i in infos}
        ks = {i.in_features for i in infos}
        if None in specs or len(specs) != 1 or len(ks) != 1:
            continue
        first = infos[0].spec  # one (w_bits, a_bits, act_block, symmetric) for the whole part
        k = ks.pop()
        spec = PartSpec(layer, role, sum(i.out_features for i in infos), k, trained_precision(first),
                        fp16_gemms=len(infos), quantize_in_norm=_quantize_in_norm(nodes[0], k, target, float_dtype, first),
                        quantize_gelu=role == "ffn_out" and _quantize_takes_gelu(nodes[0]), **_blocks(first))
        out.append(LayerPart(layer, role, tuple(i.name for i in infos), spec))
    return out


def layer_count(parts: "GraphModule | Sequence[LayerPart]") -> int:
    """The model's encoder layers: every layer index of an annotated graph's linears (tuned or
    not), or of the parts given."""
    if isinstance(parts, GraphModule):
        layers = {n.meta[META_LINEAR].layer for n in linear_nodes(parts) if META_LINEAR in n.meta}
    else:
        layers = {p.layer for p in parts}
    known = [x for x in layers if x is not None]
    return max(known) + 1 if known else 0
