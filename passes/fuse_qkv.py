"""fuse_qkv: integer linears that read one quantized input become one GEMM (L4 -> L5).

Pattern (q, k and v of every attention block; any group of one layer's linears sharing an input)::

    q, s, c = qfx::quantize(x)
    y_i = qfx::int_linear(q, s, c, W_i, ...same bits, dtype, backend, no GELU...)   i = 1..n
    ->  y = qfx::int_linear(q, s, c, cat(W_i), cat(s_w_i), cat(ws_i), cat(b_i), ...)
        y_1, ..., y_n = split(y, [N_1, ..., N_n], dim=-1)

One launch of the wider GEMM (N = 3h for BERT's QKV) instead of n narrow ones.

Invariant: bit-identical outputs. Every output element has the same int32 accumulator (rows of
the concatenated weight are the original rows) and the same elementwise fp32 epilogue with the
same per-row scale, offset sum and bias. The fused node keeps the original linears'
``LinearInfo`` in ``node.meta["qfx_parts"]`` so the report and lockstep checks still see them.
"""
from __future__ import annotations

import operator
from dataclasses import replace

import torch
from torch.fx import GraphModule, Node

from qfx.passes._attrs import drop_unused_attrs, submodule_at
from qfx.schema import INT_LINEAR, META_LINEAR, META_PARTS, QUANTIZE, arg, is_call, op_buffer, set_args

__all__ = ["fuse_qkv"]

#: the stored tensors of an int_linear (argument name -> buffer name of the fused op)
_STORED = (("w", "w_codes"), ("w_scale", "w_scale"), ("w_offset_sum", "w_offset_sum"), ("bias", "bias"))
#: arguments that must agree across the fused linears
_SAME = ("w_bits", "gelu", "out_dtype", "a_bits", "backend")


def _groups(gm: GraphModule) -> list[list[Node]]:
    """Same-input, same-kind integer linears, each group in graph order (q, k, v)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups = []
    for qnode in (n for n in gm.graph.nodes if is_call(n, QUANTIZE)):
        readers = {u for g in qnode.users for u in g.users if is_call(u, INT_LINEAR)}
        readers = sorted(readers, key=order.__getitem__)
        by_key: dict[tuple, list[Node]] = {}
        for lin in readers:
            scale_cols = op_buffer(gm, lin, "w_scale").shape[-1]
            # never across layers: skip="layer3" and the report keep a layer's linears apart
            key = (tuple(arg(lin, a) for a in _SAME), scale_cols, arg(lin, "bias") is None, lin.meta["qfx"].layer)
            by_key.setdefault(key, []).append(lin)
        groups += [g for g in by_key.values() if len(g) > 1 and not arg(g[0], "gelu")]
    return groups


def _fused_name(parts: list) -> str:
    """``layer3.qkv``; ``layer0.qkv1`` for the second q/k/v of a layer that has two (LiLT's
    streams: ``layer0.q1``, ``layer0.k1``, ``layer0.v1``), ``layer0.kv0`` for k and v alone
    (Canine's chunks); else the parts' names joined by ``+``."""
    layer, slots = parts[0].layer, {p.part for p in parts}
    suffixes = {p.name.removeprefix(f"layer{layer}.{p.part}") for p in parts}
    if all(p.role == "qkv" for p in parts) and slots <= set("qkv") and layer is not None and len(suffixes) == 1:
        return f"layer{layer}.{''.join(s for s in 'qkv' if s in slots)}{suffixes.pop()}"
    return "+".join(p.name for p in parts)


def fuse_qkv(gm: GraphModule) -> GraphModule:
    """Fuse every group of same-input integer linears into one; return ``gm``."""
    graph = gm.graph
    for group in _groups(gm):
        parts = [n.meta[META_LINEAR] for n in group]
        name = _fused_name(parts)
        holder = submodule_at(gm, name)
        widths = [p.out_features for p in parts]
        stored = [(a, attr) for a, attr in _STORED if arg(group[0], a) is not None]
        for a, attr in stored:
            holder.register_buffer(attr, torch.cat([op_buffer(gm, n, a).detach() for n in group], dim=0))
        first = group[0]
        with graph.inserting_before(first):
            stored_nodes = {a: graph.get_attr(f"{name}.{attr}") for a, attr in stored}
            fused = graph.call_function(INT_LINEAR, first.args, dict(first.kwargs))
            set_args(fused, **stored_nodes)
            split = graph.call_function(torch.ops.aten.split_with_sizes.default, (fused, widths, -1))
            outs = [graph.call_function(operator.getitem, (split, i)) for i in range(len(group))]
        fused._rename(name.replace(".", "_").replace("+", "_"))
        fused.meta[META_LINEAR] = replace(parts[0], name=name, part="+".join(p.part for p in parts), weight="", out_features=sum(widths))
        fused.meta[META_PARTS] = tuple(parts)
        for old, new in zip(group, outs):
            new.meta["val"] = old.meta.get("val")
            old.replace_all_uses_with(new)
            graph.erase_node(old)
    graph.eliminate_dead_code()
    drop_unused_attrs(gm, frozenset({"w_codes", "w_scale", "w_offset_sum", "bias"}))
    graph.lint()
    gm.recompile()
    return gm

