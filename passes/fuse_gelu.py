"""fuse_bias_gelu: fold an exact GELU into the integer linear that feeds it (L4 -> L5).

Pattern::

    y = qfx::int_linear(..., bias, gelu=False, ...);  z = aten.gelu(y)   (y used only by gelu,
                                                                          approximate="none")
    ->  z = qfx::int_linear(..., bias, gelu=True, ...)

Invariant: the numerics are unchanged: the epilogue applies the same exact-erf GELU to the
same fp32 value (bias added) before the single rounding to the output dtype, which is no
larger an error than rounding before the GELU as the unfused graph does.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from qfx.schema import INT_LINEAR, arg, is_call, set_args

__all__ = ["fuse_bias_gelu"]


def fuse_bias_gelu(gm: GraphModule) -> GraphModule:
    """Fuse every ``int_linear -> gelu`` pair; return ``gm``."""
    for gelu in list(gm.graph.nodes):
        if gelu.op != "call_function" or gelu.target != torch.ops.aten.gelu.default:
            continue
        if gelu.kwargs.get("approximate", "none") != "none" or (len(gelu.args) > 1 and gelu.args[1] != "none"):
            continue
        lin = gelu.args[0]
        if not is_call(lin, INT_LINEAR) or len(lin.users) != 1 or arg(lin, "gelu"):
            continue
        set_args(lin, gelu=True)
        gelu.replace_all_uses_with(lin)
        gm.graph.erase_node(gelu)
        lin.meta["qfx_fused"] = lin.meta.get("qfx_fused", ()) + ("gelu",)
    gm.graph.lint()
    gm.recompile()
    return gm
