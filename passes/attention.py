"""key_padding_attention: give SDPA a mask a fused attention kernel takes (L4 -> L5, GPU).

HF builds a boolean ``[B, 1, S, S]`` mask from ``attention_mask`` and expands it with stride 0;
every fused SDPA kernel (flash, mem-efficient, cuDNN) refuses that layout, so attention falls
back to the fp32 math kernel (HARDWARE.md: 2.6 ms + 6 ms of copies at BERT-base 128 x 128).

Pattern::

    M = f(attention_mask)                     (any sub-graph of the attention_mask input alone:
                                               placeholders, shapes, arange/index/compare/expand)
    y_l = aten.scaled_dot_product_attention(q_l, k_l, v_l, M, ...)     for every layer l
    ->
    bias = where(attention_mask != 0, 0, finfo(dtype).min)[:, None, None, :]   once, [B, 1, 1, S]
    y_l = aten.scaled_dot_product_attention(q_l, k_l, v_l, bias, ...)

The match is checked by evaluation, not by node names or op spellings (HF changes how it builds
masks between releases): the sub-graph of ``M`` is copied out and run at compile time on a probe
``attention_mask`` with padded and unpadded rows; it must equal the key-padding mask
``M[b, 0, i, j] == attention_mask[b, j] != 0`` for every query ``i``. Otherwise the graph is left
as it is and the reason is recorded in ``gm.meta["qfx_attention"]`` for the report.

Invariant: every token that has at least one unmasked key gets the same attention weights up
to the kernel's rounding (a masked key gets weight exp(min - max) = 0, as with the boolean
mask). A row whose mask is all zero attends uniformly to all keys (HF's eager behaviour with
its finfo.min bias) instead of producing NaN.

Runs only when the float parts are fp16 / bf16: in fp32 the twin's math kernel is kept so the
compiled model stays bit-identical to its QAT twin.
"""
from __future__ import annotations

import torch
from torch.fx import Graph, GraphModule, Node

from qfx.schema import ATTENTION_OPS, ancestors, is_call, sdpa_mask

__all__ = ["key_padding_attention"]

aten = torch.ops.aten
_MASK_INPUT = "attention_mask"  # the HF input convention: 1 = attend, 0 = padding
_PROBE = ((1, 1, 1, 1, 1, 1), (1, 1, 1, 0, 0, 0), (0, 1, 1, 1, 1, 0))


def _is_key_padding(gm: GraphModule, mask: Node, placeholders: dict[str, Node]) -> tuple[bool, str]:
    """Evaluate ``mask``'s sub-graph on a probe and compare with the key-padding form."""
    nodes = ancestors(mask)
    if any(n.op in ("call_module", "get_attr") for n in nodes):
        return False, "the mask depends on module state, not only on attention_mask"
    sub = Graph()
    env: dict[Node, Node] = {}
    used = [n for n in nodes if n.op == "placeholder"]
    for n in nodes:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(env[mask])
    device = placeholders[_MASK_INPUT].meta["val"].device
    probe = torch.tensor(_PROBE, device=device)
    args = []
    for p in used:
        val = p.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return False, f"input {p.name} is not a tensor"
        args.append(probe.to(val.dtype) if p.name == _MASK_INPUT else torch.zeros(probe.shape, dtype=val.dtype, device=device))
    try:
        got = GraphModule(torch.nn.Module(), sub)(*args)
    except Exception as e:  # noqa: BLE001 - an unevaluable mask is simply not rewritten
        return False, f"the mask sub-graph did not evaluate on a probe ({type(e).__name__})"
    b, s = probe.shape
    if not isinstance(got, torch.Tensor) or tuple(got.shape) not in ((b, 1, s, s), (b, 1, 1, s)):
        return False, f"mask shape {tuple(getattr(got, 'shape', ()))} is not [B, 1, S, S]"
    keep = (probe != 0)[:, None, None, :].expand(b, 1, got.shape[2], s)
    allowed = got if got.dtype == torch.bool else got > torch.finfo(got.dtype).min / 2
    if not torch.equal(allowed, keep):
        return False, "the mask is not a key-padding mask of attention_mask (causal, sliding or per-query)"
    return True, ""


def key_padding_attention(gm: GraphModule, dtype: torch.dtype) -> GraphModule:
    """Rewrite HF's expanded boolean mask into a ``[B, 1, 1, S]`` additive bias; see module doc."""
    sdpas = [n for n in gm.graph.nodes if is_call(n, ATTENTION_OPS)]
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    gm.meta["qfx_attention"] = "no attention op"
    if not sdpas:
        return gm
    if dtype not in (torch.float16, torch.bfloat16):
        gm.meta["qfx_attention"] = f"kept as captured: float parts run in {dtype} (the twin's kernel)"
        return gm
    if _MASK_INPUT not in placeholders:
        gm.meta["qfx_attention"] = "kept as captured: the model takes no attention_mask"
        return gm
    masks = {m for m in (sdpa_mask(n) for n in sdpas) if m is not None}
    if not masks:
        gm.meta["qfx_attention"] = "no mask: fused kernels take it as captured"
        return gm
    for m in masks:
        ok, why = _is_key_padding(gm, m, placeholders)
        if not ok:
            gm.meta["qfx_attention"] = f"kept as captured: {why}"
            return gm
    graph = gm.graph
    src = placeholders[_MASK_INPUT]
    with graph.inserting_after(src):
        ok_node = graph.call_function(aten.ne.Scalar, (src, 0))
    with graph.inserting_after(ok_node):
        zero = graph.call_function(aten.scalar_tensor.default, (0.0,), {"dtype": dtype, "device": src.meta["val"].device})
    with graph.inserting_after(zero):
        bias2 = graph.call_function(aten.where.ScalarOther, (ok_node, zero, torch.finfo(dtype).min))
    with graph.inserting_after(bias2):
        bias3 = graph.call_function(aten.unsqueeze.default, (bias2, 1))
    with graph.inserting_after(bias3):
        bias = graph.call_function(aten.unsqueeze.default, (bias3, 1))
    bias.name = "key_padding_bias"
    for n in sdpas:
        if sdpa_mask(n) is None:
            continue
        if "attn_mask" in n.kwargs:
            n.update_kwarg("attn_mask", bias)
        else:
            n.update_arg(3, bias)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    gm.meta["qfx_attention"] = f"key-padding bias [B, 1, 1, S] ({dtype}): fused SDPA kernels eligible"
    return gm
