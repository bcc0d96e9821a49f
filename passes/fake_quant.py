"""insert_fake_quant: put weight and input-activation fake-quant on quantized linears (L2 -> L3).

Pattern: every ``aten.linear(x, W, b)`` whose ``node.meta["qfx"].spec`` is set. Rewrite::

    linear(x, W, b)  ->  codes = activation_codes(x, act)
                         integer_linear(<name>.act_fq(x, codes), <name>.weight_fq(W), b, codes, W, weight)
    linear(x, W, b)  ->  linear(x, <name>.weight_fq(W), b)          (weight-only: act_bits=16)

:func:`qfx.numerics.fake_quant.integer_linear` computes its forward as the integer path does (codes,
exact accumulation, the fp32 epilogue of qfx.numerics) and its backward as
``linear(x_hat, w_hat, b)``; ``act``/``weight`` are the fake-quant modules' settings.

``codes`` and ``<name>.act_fq`` are shared by linears that read the same tensor with the same
spec (q, k and v read one input: they get one ``layer{i}.qkv.act_fq``), as the integer graph
quantizes that tensor once. Weight-only specs (act_bits=16) get neither.

Block-scaled activations (``spec.act_block = B``): ``act`` carries the block, so the codes are
per token per block of ``B`` input channels and ``integer_linear`` computes the block-scaled
integer linear; a ``B`` that does not divide the linear's K is a ValueError naming it.

Invariant: the linear node keeps its name, metadata and users, and its first three args stay
(input, weight, bias), now read through the fake-quant modules. Its output equals
``linear(x_hat, w_hat, b)`` up to fp32 rounding (the forward is exact where float is not).
"""
from __future__ import annotations

from torch.fx import GraphModule, Node

from qfx.numerics.fake_quant import ActFakeQuant, WeightFakeQuant, activation_codes, integer_linear
from qfx.schema import META_FAKE_QUANT, META_LINEAR, LinearInfo, linear_nodes

__all__ = ["insert_fake_quant", "fake_quant_module_name"]


def fake_quant_module_name(info: LinearInfo, kind: str) -> str:
    """``layer3.ffn_in.weight_fq``; the shared q/k/v input is ``layer3.qkv.act_fq``."""
    base = f"layer{info.layer}.qkv" if (kind == "act_fq" and info.role == "qkv") else info.name
    return f"{base}.{kind}"


def _call_module(gm: GraphModule, target: str, module, args: tuple) -> Node:
    """Insert ``target(*args)`` right after ``args[-1]`` (so it precedes every user of ``args[0]``)."""
    gm.add_submodule(target, module)
    with gm.graph.inserting_after(args[-1]):
        node = gm.graph.call_module(target, args)
    node.meta[META_FAKE_QUANT] = target
    return node


def insert_fake_quant(gm: GraphModule) -> GraphModule:
    """Insert fake-quant modules on every annotated, quantized linear; return ``gm``."""
    act_fq: dict[tuple[Node, object], tuple[Node, Node]] = {}  # (x, act) -> (codes, act_fq)
    for node in linear_nodes(gm):
        info: LinearInfo = node.meta.get(META_LINEAR)
        if info is None or info.spec is None:
            continue
        spec = info.spec
        x, w = node.args[0], node.args[1]
        w_fq = _call_module(gm, fake_quant_module_name(info, "weight_fq"), WeightFakeQuant(spec.weight_bits, spec.group_size), (w,))
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not spec.quantizes_activations:
            node.args = (x, w_fq, bias)
            node.kwargs = {}
            continue
        block = spec.act_block
        if block is not None and info.in_features % block:
            raise ValueError(
                f"QuantConfig(act_block={block}) does not divide K={info.in_features} of linear {info.name}; "
                f"choose a divisor of {info.in_features} (such as 128 for BERT) or act_block=None"
            )
        act = (spec.act_bits, spec.symmetric, spec.act_clip) + (() if block is None else (block,))
        if (x, act) not in act_fq:
            with gm.graph.inserting_after(x):
                codes = gm.graph.call_function(activation_codes, (x, act))
            act_fq[(x, act)] = codes, _call_module(gm, fake_quant_module_name(info, "act_fq"), ActFakeQuant(*act), (x, codes))
        codes, x_hat = act_fq[(x, act)]
        node.target = integer_linear
        node.args = (x_hat, w_fq, bias, codes, w, (spec.weight_bits, spec.group_size))
        node.kwargs = {}
    gm.graph.lint()
    gm.recompile()
    return gm
