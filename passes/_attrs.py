"""Helpers shared by the passes that add or remove module attributes of a GraphModule."""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

__all__ = ["submodule_at", "drop_unused_attrs", "param_or_buffer"]


def param_or_buffer(gm: GraphModule, name: str) -> torch.Tensor:
    """The parameter called ``name`` (a linear's weight), or the buffer of that name (captures of
    frozen models hold weights as buffers); looked up by path, without listing every parameter."""
    try:
        return gm.get_parameter(name)
    except AttributeError:
        return gm.get_buffer(name)


def submodule_at(gm: GraphModule, path: str) -> nn.Module:
    """The submodule at dotted ``path``, created (empty) where missing."""
    mod = gm
    for part in path.split("."):
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    return mod


def drop_unused_attrs(gm: GraphModule, buffer_names: frozenset[str] = frozenset()) -> None:
    """Delete parameters, and buffers whose leaf name is in ``buffer_names``, that no
    ``get_attr`` node reads any more (weights a lowering or fusion replaced)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        is_param = leaf in mod._parameters
        if name in used or not (is_param or leaf in buffer_names):
            continue
        delattr(mod, leaf)
