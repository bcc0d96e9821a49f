"""The CPU backend: qfx's integer ops on the CPU's int8 instructions, bit for bit the reference.

``qfx.compile(..., target="cpu")`` plans every integer linear on this backend when the CPU
can run it fast (:func:`qfx.backends.cpu.isa.int8_path`: oneDNN with AMX-INT8, AVX512-VNNI or
AVX-VNNI), else on the reference backend, and the report says why. The reference
(backends/reference, int32 accumulators computed in float64) stays the oracle the tests
compare against; ``qfx.compile(..., backend="reference")``-style selection is the planner's
``backends_for`` order (see qfx.backends).

What runs (:mod:`qfx.backends.cpu.kernels`): exact int32 GEMMs through ``torch._int_mm``
(int4 codes as int8), the fp32 epilogue in the reference's operation order and the token-wise
quantizer compiled by Inductor (no fma, no reassociation: the same bits), GELU / LayerNorm by
ATen as in the twin. Block-scaled linears (``QuantConfig(act_block=B)``, B a multiple of 8): one
exact GEMM per activation block on weights prepared per block, then the reference's promotion
(:func:`qfx.numerics.int_linear_blocks_epilogue`). So on the CPU the compiled model equals its QAT
twin bit for bit, as the reference did, only faster.

Example::

    >>> import qfx
    >>> cm = qfx.compile(model, mode="int8", target="cpu", example_kwargs=batch)
    >>> print(cm.report())    # backend "cpu" per linear; the ISA line names AMX-INT8 / VNNI
"""
from __future__ import annotations

from qfx import numerics
from qfx.backends.cpu import kernels
from qfx.backends.cpu.isa import Int8Path, int8_path
from qfx.ops import register_impl

__all__ = ["CpuBackend", "NAME", "Int8Path", "int8_path"]

NAME = "cpu"

register_impl("quantize", NAME, kernels.quantize)
register_impl("int_matmul", NAME, kernels.int_matmul)
register_impl("int_linear", NAME, kernels.int_linear)
register_impl("add_layer_norm_quantize", NAME, kernels.add_layer_norm_quantize)
register_impl("add_layer_norm_rotate_quantize", NAME, kernels.add_layer_norm_rotate_quantize)
register_impl("quantize", NAME, kernels.quantize_blocks, blocks=True)
register_impl("int_linear", NAME, kernels.int_linear_blocks, blocks=True)
register_impl("add_layer_norm_quantize", NAME, kernels.add_layer_norm_quantize_blocks, blocks=True)

#: block-scaled linears: blocks of at least this many codes (and a multiple of it), the int8 GEMM's
#: K granularity (oneDNN / torch._int_mm); smaller blocks run on the reference backend
MIN_ACT_BLOCK = 8


class CpuBackend:
    """Integer linears with integer activations (W4/W8 x A4/A8) on the CPU's int8 GEMM."""

    name = NAME

    def available(self) -> tuple[bool, str]:
        path = int8_path()
        return path.isa is not None, path.why

    def can_implement(self, work, target) -> tuple[bool, str]:
        ok, why = self.available()
        if not ok:
            return False, why
        if work.a_bits not in (4, 8):
            return False, (f"{work.name}: weight-only (A{work.a_bits}, float activations) has no integer GEMM; "
                           "it runs on the reference backend")
        if work.act_block is not None and work.act_block % MIN_ACT_BLOCK:
            return False, (f"{work.name}: act_block={work.act_block} is not a multiple of {MIN_ACT_BLOCK} (the int8 "
                           "GEMM's K granularity); it runs on the reference backend")
        if work.k > numerics.max_exact_k(8, 8):
            return False, f"{work.name}: K={work.k} could overflow the int32 accumulator"
        return True, f"{kernels.GEMM} (exact int32 accumulation): {why}; epilogue and quantizer: {kernels.EPILOGUE}"
