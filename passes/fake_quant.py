"""insert_fake_quant: put weight and input-activation fake-quant on quantized linears (L2 -> L3).

Pattern: every ``aten.linear(x, W, b)`` whose ``node.meta["qfx"].spec`` is set. Rewrite::

    linear(x, W, b)  ->  linear(<name>.act_fq(x), <name>.weight_fq(W), b)

``<name>.act_fq`` is shared by linears that read the same tensor with the same spec (q, k
and v read one input: they get one ``layer{i}.qkv.act_fq``), as the integer graph quantizes
that tensor once. Weight-only specs (act_bits=16) get no act_fq.

Invariant: only call_module nodes are added; with the fake-quant modules replaced by the
identity the graph computes exactly what it computed before. Metadata stays on the linears.
"""
from __future__ import annotations

from torch.fx import GraphModule, Node

from qfx.fake_quant import ActFakeQuant, WeightFakeQuant
from qfx.passes.annotate import LinearInfo, linear_nodes

__all__ = ["insert_fake_quant", "fake_quant_module_name"]


def fake_quant_module_name(info: LinearInfo, kind: str) -> str:
    """``layer3.ffn_in.weight_fq``; the shared q/k/v input is ``layer3.qkv.act_fq``."""
    base = f"layer{info.layer}.qkv" if (kind == "act_fq" and info.role == "qkv") else info.name
    return f"{base}.{kind}"


def _call_module(gm: GraphModule, target: str, module, arg: Node) -> Node:
    """Insert ``target(arg)`` right after ``arg`` (so it precedes every user of ``arg``)."""
    gm.add_submodule(target, module)
    with gm.graph.inserting_after(arg):
        node = gm.graph.call_module(target, (arg,))
    node.meta["qfx_fq"] = target
    return node


def insert_fake_quant(gm: GraphModule) -> GraphModule:
    """Insert fake-quant modules on every annotated, quantized linear; return ``gm``."""
    act_fq: dict[tuple[Node, object], Node] = {}
    for node in linear_nodes(gm):
        info: LinearInfo = node.meta.get("qfx")
        if info is None or info.spec is None:
            continue
        spec = info.spec
        x, w = node.args[0], node.args[1]
        w_fq = _call_module(gm, fake_quant_module_name(info, "weight_fq"), WeightFakeQuant(spec.weight_bits, spec.group_size), w)
        new_x = x
        if spec.quantizes_activations:
            key = (x, (spec.act_bits, spec.symmetric, spec.act_clip))
            if key not in act_fq:
                act_fq[key] = _call_module(gm, fake_quant_module_name(info, "act_fq"), ActFakeQuant(spec.act_bits, spec.symmetric, spec.act_clip), x)
            new_x = act_fq[key]
        node.args = (new_x, w_fq, *node.args[2:])
    gm.graph.lint()
    gm.recompile()
    return gm

