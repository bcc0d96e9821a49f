"""lower_to_integer: fake-quant linears become integer ops on packed weights (L3 -> L4).

Pattern (on use-def edges; the modules are recognised by their class)::

    linear(ActFakeQuant(x), WeightFakeQuant(W), b)
      ->  q, s, c = qfx::quantize(x, ...)            (one per distinct ActFakeQuant)
          y = qfx::int_linear(q, s, c, W_codes, w_bits, s_w, ws, b, gelu=False, out_dtype, a_bits)
    linear(x, WeightFakeQuant(W), b)                 (weight-only, act_bits=16)
      ->  y = qfx::weight_only_linear(x, W_codes, bits, s_w, b)

``W_codes`` (packed two per byte for 4 bits), ``s_w`` and ``ws`` are computed once here by
:mod:`qfx.numerics` from the fp32 master weights and stored as buffers
``<name>.w_codes``, ``<name>.w_scale``, ``<name>.w_offset_sum``; the float weight is dropped.

Block-scaled activations (``spec.act_block = B``): the quantize and int_linear nodes get the
keyword ``act_block=B`` (token-wise graphs are unchanged), and ``<name>.w_offset_sum`` holds the
block code sums ``[N, K / B]`` (:func:`qfx.numerics.weight_block_sums`), the weight factor of
the per-block offset term.

Invariant: every op emitted uses ``backend="reference"`` (L4 is target independent and runs
on the CPU); each int_linear output equals the fake-quant linear's output up to the fp32
rounding bound stated in :mod:`qfx.numerics`. ``node.meta["qfx"]`` moves to the new node.
"""
from __future__ import annotations

import operator

import torch
from torch import nn
from torch.fx import GraphModule, Node

import qfx.numerics as numerics
from qfx.numerics.fake_quant import ActFakeQuant, WeightFakeQuant
from qfx.passes._attrs import drop_unused_attrs, param_or_buffer, submodule_at
from qfx.schema import META_LINEAR, LinearInfo, linear_nodes

__all__ = ["lower_to_integer"]

REFERENCE = "reference"


def _module(gm: GraphModule, node: Node, cls) -> nn.Module | None:
    if isinstance(node, Node) and node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, cls):
            return m
    return None


def _store_weight(gm: GraphModule, info: LinearInfo, w: torch.Tensor, bits: int, group: int | None,
                  act_block: int | None) -> tuple[str, str, str]:
    if not torch.isfinite(w).all():
        raise ValueError(f"weight {info.weight} (linear {info.name}) contains NaN or Inf; fix the model before compiling")
    # Codes are made on the CPU, the oracle, whatever device the graph runs on.
    q_w, s_w = numerics.quantize_weight(w.detach().float().cpu(), bits, group)
    ws = numerics.weight_offset_sum(q_w, s_w) if act_block is None else numerics.weight_block_sums(q_w, act_block)
    codes = numerics.pack_int4(q_w) if bits == 4 else q_w
    holder = submodule_at(gm, info.name)
    device = w.device
    for attr, value in (("w_codes", codes), ("w_scale", s_w.float()), ("w_offset_sum", ws)):
        holder.register_buffer(attr, value.to(device).contiguous())
    return f"{info.name}.w_codes", f"{info.name}.w_scale", f"{info.name}.w_offset_sum"


def lower_to_integer(gm: GraphModule, master_weights: dict[str, torch.Tensor] | None = None) -> GraphModule:
    """Lower every fake-quant linear; ``master_weights`` (qualified name -> fp32 tensor) give
    the weights to quantize when the graph's own are a lower-precision copy."""
    graph = gm.graph
    quantized: dict[Node, Node] = {}  # ActFakeQuant node -> qfx::quantize node
    # A weight several linears read (ALBERT's shared layers) is quantized once: its later uses
    # read the first use's codes (same parameter, same spec, so the same codes).
    stored: dict[tuple, tuple[str, str, str]] = {}
    for node in linear_nodes(gm):
        info: LinearInfo | None = node.meta.get(META_LINEAR)
        w_mod = _module(gm, node.args[1], WeightFakeQuant)
        if info is None or info.spec is None or w_mod is None:
            continue
        spec = info.spec
        w_param = param_or_buffer(gm, info.weight)
        w_src = w_param if master_weights is None else master_weights[info.weight].to(w_param.device)
        block = spec.act_block
        block_kw = {} if block is None else {"act_block": block}
        key = (info.weight, spec.weight_bits, spec.group_size, block)
        if key not in stored:
            stored[key] = _store_weight(gm, info, w_src, spec.weight_bits, spec.group_size, block)
        codes, scale, offset_sum = stored[key]
        bias = node.args[2] if len(node.args) > 2 else None
        out_dtype = node.meta["val"].dtype if "val" in node.meta else w_param.dtype
        x_node = node.args[0]
        with graph.inserting_before(node):
            w_nodes = [graph.get_attr(t) for t in (codes, scale, offset_sum)]
            act_mod = _module(gm, x_node, ActFakeQuant)
            if act_mod is None:
                new = graph.call_function(
                    torch.ops.qfx.weight_only_linear.default,
                    (x_node, w_nodes[0], spec.weight_bits, w_nodes[1], bias, REFERENCE),
                )
            else:
                if x_node not in quantized:
                    with graph.inserting_after(x_node):
                        clip = act_mod.clip or (None, None)
                        qnode = graph.call_function(
                            torch.ops.qfx.quantize.default,
                            (x_node.args[0], act_mod.bits, act_mod.symmetric, clip[0], clip[1], REFERENCE),
                            block_kw,
                        )
                    qnode._rename(str(x_node.target).replace(".", "_").replace("act_fq", "quantize"))
                    quantized[x_node] = qnode
                qnode = quantized[x_node]
                parts = [graph.call_function(operator.getitem, (qnode, i)) for i in range(3)]
                new = graph.call_function(
                    torch.ops.qfx.int_linear.default,
                    (*parts, w_nodes[0], spec.weight_bits, w_nodes[1], w_nodes[2], bias, False, out_dtype, spec.act_bits, REFERENCE),
                    block_kw,
                )
        new.meta = dict(node.meta)
        new._rename(info.name.replace(".", "_"))  # the graph's namespace keeps names unique
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    # The fake-quant modules and the float weights they read are now dead.
    for node in list(graph.nodes):
        if node.op == "call_module" and _module(gm, node, (ActFakeQuant, WeightFakeQuant)) is not None and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    drop_unused_attrs(gm)
    graph.lint()
    gm.recompile()
    return gm

