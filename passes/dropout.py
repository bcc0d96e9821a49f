"""Dropout passes: export bakes the train flag of ``aten.dropout`` into the graph.

* ``dropout_to_modules`` (QAT graphs): ``aten.dropout(x, p, train)`` -> ``nn.Dropout(p)``
  call_module, so ``gm.train()`` / ``gm.eval()`` switch it like in the source model.
  (Attention-probability dropout inside SDPA was captured in eval mode and stays off.)
* ``remove_dropout`` (inference graphs): ``aten.dropout(x, ...)`` -> ``x``.

Invariant: in eval mode both graphs compute exactly what they computed before.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

__all__ = ["dropout_to_modules", "remove_dropout"]

_DROPOUT = {torch.ops.aten.dropout.default}


def _dropouts(gm: GraphModule):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _DROPOUT]


def dropout_to_modules(gm: GraphModule) -> GraphModule:
    """Replace each ``aten.dropout`` with a ``dropout{i}`` ``nn.Dropout`` submodule call."""
    for i, node in enumerate(_dropouts(gm)):
        target = f"dropout{i}"
        gm.add_submodule(target, nn.Dropout(float(node.args[1])))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(target, (node.args[0],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def remove_dropout(gm: GraphModule) -> GraphModule:
    """Drop every ``aten.dropout`` node and every ``nn.Dropout`` call (inference)."""
    for node in list(gm.graph.nodes):
        is_module = node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Dropout)
        if (node.op == "call_function" and node.target in _DROPOUT) or is_module:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm
