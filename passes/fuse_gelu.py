"""GELU fusions (L4 -> L5): into the quantizer that reads it, else into the linear that feeds it.

fuse_gelu_quantize (first)::

    z = aten.gelu(y);  codes = qfx::quantize(z, ..., gelu=False)     (z used only by quantize,
                                                                     approximate="none")
    ->  codes = qfx::quantize(y, ..., gelu=True)

Invariant: bit-identical codes, scales and offsets in every dtype: the quantizer applies the
same exact-erf GELU to the same input and rounds it to the input's dtype, as the gelu node
did (qfx.numerics.quantize_activation). Why here rather than in the GEMM epilogue: the
FFN-in epilogue's GELU doubled that GEMM's time on the H100 (181 vs 85 us at BERT-base
128 x 128, benchmarks/gemm_in_model.py: the epilogue warps are few and the erf is ~30
instructions an element), while the quantize kernel, memory-bound with a full SM of warps,
hides it; and the GELU output is never written out.

fuse_bias_gelu (what is left)::

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

from qfx.schema import INT_LINEAR, META_FUSED, QUANTIZE, arg, is_call, set_args

__all__ = ["fuse_gelu_quantize", "fuse_bias_gelu"]


def _exact_gelu(node) -> bool:
    if node.op != "call_function" or node.target != torch.ops.aten.gelu.default:
        return False
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return approximate == "none"


def fuse_gelu_quantize(gm: GraphModule) -> GraphModule:
    """Fold every exact ``gelu`` whose only user is a ``qfx::quantize`` into it; return ``gm``."""
    for gelu in list(gm.graph.nodes):
        if not _exact_gelu(gelu) or len(gelu.users) != 1:
            continue
        quant = next(iter(gelu.users))
        if not is_call(quant, QUANTIZE) or arg(quant, "x") is not gelu or arg(quant, "gelu"):
            continue
        quant.replace_input_with(gelu, gelu.args[0])
        quant.kwargs = {**quant.kwargs, "gelu": True}
        gm.graph.erase_node(gelu)
        quant.meta[META_FUSED] = quant.meta.get(META_FUSED, ()) + ("gelu",)
    gm.graph.lint()
    gm.recompile()
    return gm


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
        lin.meta[META_FUSED] = lin.meta.get(META_FUSED, ()) + ("gelu",)
    gm.graph.lint()
    gm.recompile()
    return gm
