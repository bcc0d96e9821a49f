"""Launch plans: a compiled graph whose integer ops call launchers bound at compile time.

The target graph (L5) calls ``torch.ops.qfx.int_linear(..., backend)`` & co.: general ops that
go through the torch dispatcher and the custom-op wrapper, look the backend up, and validate
every tensor, at about 0.2 ms of host time per call. For execution the runtime makes a second
graph over the same modules (:func:`bind_launchers`) in which

* every integer op the backend can bind (``backend.bind(node, gm)`` returns a callable) calls
  that launcher directly with only its activation arguments: weights, fp32 bias, argument
  struct, kernel family and per-M config were fixed when the launcher was made;
* export's run-time guards (``_guards_fn``, ``aten._assert_tensor_metadata``) are dropped: the
  runtime checks the caller's inputs once (:func:`qfx.capture.normalize_inputs`) before the
  graph runs.
* the token layout ops of padding removal (:mod:`qfx.passes.unpad`) call their plain torch
  functions (:mod:`qfx.ops`) on every backend; ``qfx::token_index`` is bound to one
  :class:`TokenIndex` per plan, whose ``capacity`` the CUDA-graph pool sets while it captures
  a token bucket (fixed shapes, no host sync inside the graph).
* the input rotation ``qfx::rotate`` (:mod:`qfx.passes.rotate_inputs`) calls
  :func:`qfx.backends.triton.rotation.rotate` directly; a rotation read only by a ``cutlass``
  ``qfx::quantize`` is bound with it as one kernel (:class:`qfx.backends.triton.rotation_quant.RotateQuantizeLauncher`:
  the same codes as the two ops, bit for bit), and ``qfx::add_layer_norm_rotate_quantize`` to
  its Triton launcher.

The L5 graph itself is kept unchanged (it is what ``report``, ``verify`` and ``torch.export``
see); the lean graph shares its parameters and buffers.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.fx import GraphModule

from qfx.backends.triton.rotation import rotate as rotate_tokens
from qfx.ops import gather_tokens, scatter_tokens, token_rows
from qfx.passes.attention import PACKED_ATTENTION, packed_attention_impl
from qfx.schema import (
    ATTENTION_OPS, INT_LINEAR, META_ATTENTION, META_LINEAR, PACK_TOKENS, QUANTIZE, REPAD_TOKENS, ROTATE,
    TOKEN_INDEX, arg, is_call, op_buffer,
)

__all__ = ["LaunchPlan", "TokenIndex", "bind_launchers"]

_GUARD_OPS = {torch.ops.aten._assert_tensor_metadata.default}
_ADD_LN_QUANTIZE = torch.ops.qfx.add_layer_norm_quantize.default
_ADD_LN_ROTATE_QUANTIZE = torch.ops.qfx.add_layer_norm_rotate_quantize.default
#: op -> the activation arguments its launcher takes per call (the rest is bound once)
_CALL_ARGS = {QUANTIZE: ("x",), INT_LINEAR: ("a", "a_scale", "a_offset"),
              _ADD_LN_QUANTIZE: ("a", "b", "weight", "bias"), _ADD_LN_ROTATE_QUANTIZE: ("a", "b", "weight", "bias")}


@dataclass
class LaunchPlan:
    """The lean graph and what was bound (op name -> launcher kind), or why not."""

    module: GraphModule
    #: the same graph with every attention unmasked (only when the mask is a key-padding bias);
    #: exact for calls whose attention_mask is all ones (token packing there is a view)
    dense_module: GraphModule | None = None
    bound: dict[str, str] = field(default_factory=dict)
    unbound: dict[str, str] = field(default_factory=dict)
    #: the bound qfx::token_index (padding removal), None when the graph packs no tokens
    token_index: "TokenIndex | None" = None


@dataclass(eq=False)
class TokenIndex:
    """``qfx::token_index`` as the lean graph calls it: the exact real-token count
    (``capacity=None``: one host sync on a GPU) or ``capacity`` rows, real tokens first and
    dummies after (set by :class:`qfx.runtime.graphs.GraphPool` around a capture)."""

    capacity: int | None = None

    def __call__(self, attention_mask: torch.Tensor, _capacity=None):
        return token_rows(attention_mask, self.capacity)


def _cutlass_binder(gm: GraphModule, node) -> Callable | None:
    from qfx.backends.cutlass.launch import AddLayerNormQuantizeLauncher, LinearLauncher, QuantizeLauncher

    if is_call(node, INT_LINEAR) and arg(node, "act_block") is not None:  # the sm_80-family block kernel
        from qfx.runtime.block_binding import cutlass_block_linear

        return cutlass_block_linear(gm, node)
    if is_call(node, QUANTIZE) and arg(node, "act_block") is not None:
        return None  # the token-wise launcher would write token scales (block quantizers run on Triton)

    if is_call(node, _ADD_LN_ROTATE_QUANTIZE):
        from qfx.backends.triton.rotation_quant import AddLayerNormRotateQuantizeLauncher

        clip = arg(node, "clip_lo")
        clip = None if clip is None else (clip, arg(node, "clip_hi"))
        return AddLayerNormRotateQuantizeLauncher(arg(node, "eps"), op_buffer(gm, node, "signs"), arg(node, "block"),
                                                  arg(node, "bits"), arg(node, "symmetric"), clip).__call__
    if is_call(node, _ADD_LN_QUANTIZE):
        clip = arg(node, "clip_lo")
        clip = None if clip is None else (clip, arg(node, "clip_hi"))
        return AddLayerNormQuantizeLauncher(arg(node, "eps"), arg(node, "bits"), arg(node, "symmetric"), clip).__call__
    if is_call(node, QUANTIZE):
        clip = arg(node, "clip_lo")
        clip = None if clip is None else (clip, arg(node, "clip_hi"))
        launcher = QuantizeLauncher(arg(node, "bits"), arg(node, "symmetric"), clip, bool(arg(node, "gelu")))
        return launcher.__call__
    if is_call(node, INT_LINEAR):
        launcher = LinearLauncher(
            op_buffer(gm, node, "w"), arg(node, "w_bits"), op_buffer(gm, node, "w_scale"),
            op_buffer(gm, node, "w_offset_sum"), op_buffer(gm, node, "bias"), arg(node, "gelu"),
            arg(node, "out_dtype"), arg(node, "a_bits"))
        return launcher.__call__
    return None


def _triton_binder(gm: GraphModule, node) -> Callable | None:
    from qfx.runtime.block_binding import binder

    return binder(gm, node)


def _cpu_binder(gm: GraphModule, node) -> Callable | None:
    from qfx.runtime.cpu_binding import bind

    return bind(gm, node)


#: backend name -> function(gm, node) -> launcher or None
BINDERS: dict[str, Callable] = {"cutlass": _cutlass_binder, "triton": _triton_binder, "cpu": _cpu_binder}


def _bind_rotate_quantize(gm: GraphModule, graph, plan: "LaunchPlan") -> None:
    """Pattern: ``r = qfx::rotate(x, signs, b)`` read only by ``qfx::quantize(r, ..., "cutlass",
    gelu=False)`` -> the quantize calls ``RotateQuantizeLauncher(x)`` (one Triton kernel for small
    tensors, the rotation and quantize kernels for large ones: the same codes bit for bit); the
    rotate is left dead. Only where the kernel takes the row."""
    from qfx.backends.triton.rotation_quant import RotateQuantizeLauncher, fits

    for node in list(graph.nodes):
        if not (is_call(node, QUANTIZE) and arg(node, "backend") == "cutlass" and not arg(node, "gelu")):
            continue
        rot = arg(node, "x")
        if not (is_call(rot, ROTATE) and len(rot.users) == 1):
            continue
        x, block = arg(rot, "x"), arg(rot, "block")
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor) or not fits(val.shape[-1], val.dtype, block)[0]:
            continue
        clip = arg(node, "clip_lo")
        clip = None if clip is None else (clip, arg(node, "clip_hi"))
        signs = op_buffer(gm, rot, "signs")
        try:  # the two-kernel path, for large tensors (None where the native library is missing)
            quantize = _cutlass_binder(gm, node)
            unfused = lambda t, q=quantize, s=signs, b=block: q(rotate_tokens(t, s, b))  # noqa: E731
        except (RuntimeError, OSError):
            unfused = None
        launcher = RotateQuantizeLauncher(signs, block, arg(node, "bits"), arg(node, "symmetric"), clip, unfused=unfused)
        name = node.meta[META_LINEAR].name if META_LINEAR in node.meta else node.name
        node.target, node.args, node.kwargs = launcher.__call__, (x,), {}
        plan.bound[name] = "cutlass+rotate"


def bind_launchers(gm: GraphModule) -> LaunchPlan:
    """A copy of ``gm``'s graph (same modules) with integer ops bound to launchers."""
    graph = copy.deepcopy(gm.graph)
    plan = LaunchPlan(module=None)  # type: ignore[arg-type]
    _bind_rotate_quantize(gm, graph, plan)
    from qfx.runtime.block_binding import bind_producers

    for name in bind_producers(gm, graph):  # block-scaled FFN-in GEMM + GELU + quantize: one kernel
        plan.bound[name] = "triton+quantize"
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
            continue
        if is_call(node, _GUARD_OPS):
            graph.erase_node(node)
            continue
        if is_call(node, TOKEN_INDEX):
            plan.token_index = plan.token_index or TokenIndex()
            node.target = plan.token_index.__call__  # a bound method: fx names it in the code
            continue
        if is_call(node, ROTATE):  # the function itself, without the dispatcher
            node.target = rotate_tokens
            continue
        if is_call(node, (PACK_TOKENS, REPAD_TOKENS)):
            node.target = gather_tokens if node.target == PACK_TOKENS else scatter_tokens
            continue
        if is_call(node, PACKED_ATTENTION):
            node.target = packed_attention_impl
            continue
        if not is_call(node, tuple(_CALL_ARGS)):
            continue
        backend = arg(node, "backend")
        binder = BINDERS.get(backend)
        name = node.meta[META_LINEAR].name if META_LINEAR in node.meta else node.name
        if binder is None:
            plan.unbound[name] = f"backend {backend!r} has no launcher (runs through qfx::{node.target._opname})"
            continue
        fn = binder(gm, node)
        if fn is None:
            plan.unbound[name] = f"backend {backend!r} cannot bind {node.target}"
            continue
        node.args, node.kwargs = tuple(arg(node, a) for a in _CALL_ARGS[node.target]), {}
        node.target = fn
        plan.bound[name] = backend
    lean = module_over(gm, graph, "QfxLaunchPlan")
    plan.module = lean
    if str(gm.meta.get(META_ATTENTION, "")).startswith("key-padding bias"):
        plan.dense_module = _unmasked(lean)
    return plan


def module_over(source: GraphModule, graph, class_name: str) -> GraphModule:
    """``graph`` (an edited copy of ``source``'s) as a module over ``source``'s submodules,
    parameters and buffers (shared, not copied), after dead-code elimination. ``source``'s
    pytree specs come along: a captured graph is called with the model's keyword arguments,
    and the specs are what flatten them to the placeholders."""
    graph.eliminate_dead_code()
    module = GraphModule(source, graph, class_name=class_name)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(source, attr):
            setattr(module, attr, getattr(source, attr))
    return module


def _pack_all(x: torch.Tensor, _gather: torch.Tensor) -> torch.Tensor:
    """gather_tokens when every token is real (gather = 0 .. B*S-1): a view."""
    return x.flatten(0, 1).unsqueeze(0)


def _repad_all(x: torch.Tensor, _scatter: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """scatter_tokens when every token is real: a view."""
    return x.reshape(like.shape[0], like.shape[1], *x.shape[2:])


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, _cu, _max, _gather, _scatter,
                     like: torch.Tensor, _mask=None, scale: float | None = None) -> torch.Tensor:
    """packed_attention when every token is real: [1, B*S, F] is [B, S, F], attention unmasked."""
    b, s = like.shape
    f = q.shape[-1]
    y = torch.nn.functional.scaled_dot_product_attention(
        *(x.view(b, s, heads, f // heads).transpose(1, 2) for x in (q, k, v)), scale=scale)
    return y.transpose(1, 2).reshape(1, b * s, f)


def _unmasked(lean: GraphModule) -> GraphModule:
    """``lean`` with ``attn_mask=None`` on every SDPA (the launchers are shared, not copied);
    with padding removal, packing and repadding become views (every token is real), and the
    token index is dropped."""
    graph = copy.deepcopy(lean.graph)
    for node in graph.nodes:
        if is_call(node, ATTENTION_OPS):
            if "attn_mask" in node.kwargs:
                node.update_kwarg("attn_mask", None)
            elif len(node.args) > 3:
                node.update_arg(3, None)
        elif node.op == "call_function" and node.target is gather_tokens:
            node.target, node.args = _pack_all, (node.args[0], None)
        elif node.op == "call_function" and node.target is scatter_tokens:
            node.target, node.args = _repad_all, (node.args[0], None, node.args[2])
        elif node.op == "call_function" and node.target is packed_attention_impl:
            node.target, node.args = _dense_attention, (*node.args[:4], None, None, None, None, *node.args[8:9], None,
                                                         *node.args[10:])
    return module_over(lean, graph, "QfxLaunchPlanDense")
