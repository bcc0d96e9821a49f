"""The cost model's block-scaled term (``QuantConfig(act_block=B)``): what promoting every K block's
int32 accumulator costs on the CUDA cores, per target. Used by :func:`qfx.tune.cost_model.gemm_time`
(and re-exported there); checked by tests/units/test_cost_model_blocks.py (the formula) and
tests/units/test_cost_model.py (the H200 rows)."""
from __future__ import annotations

from qfx.targets import Target

__all__ = ["SM_RATES", "OFFSET_TERM_COST", "block_kernel_name", "promotion_ops", "promotion_cost", "promotion_us"]


#: Block-scaled activations (``QuantConfig(act_block=B)``, backends/cutlass/EPILOGUES.md): each K block's
#: int32 accumulator is promoted on the CUDA cores (the exact conversion of the Triton kernel, an int32 add
#: and an fp32 subtract, then :func:`promotion_ops` fp32 operations per output element and block, no fma)
#: by the warps that issue the MMAs (no overlap: measured so, see :data:`OFFSET_TERM_COST`). Per SM and
#: clock: dense INT8 tensor-core ops (architecture whitepapers), fp32 add / mul results, int32 add results
#: (CUDA C Programming Guide's throughput table); the clock is the INT8 peak over the first. Checked on
#: sm_90 only (qfx/tune/data/h200_block_gemm.json, tests/units/test_cost_model.py); other targets modelled.
SM_RATES: dict[str, tuple[int, int, int]] = {
    "sm_80": (4096, 64, 64), "sm_86": (2048, 128, 64), "sm_89": (2048, 128, 64), "sm_90": (8192, 128, 64),
}


def block_kernel_name(target: Target, bits: int, act_block: int) -> str:
    """The kernel a block-scaled GEMM runs, as plans name it: sm80 family, backends/cutlass/block_linear.py's; else Triton's."""
    return f"{'cutlass sm80' if target.family == 'sm80' else 'triton'} block {target.mma_operand(bits, bits)} (act_block={act_block})"


#: The asymmetric offset term's cost per output element and block, in fp32 operations: its multiply and add
#: plus, in the kernel, the per-block loads of the activation offsets and the weights' block code sums in
#: the MMA's register layout. Fitted to the H200 rows of ``gemm.py --block 128`` (2026-12-07, M >= 2048):
#: counting the 2 operations alone the model is 24 % fast on average (35 % worst); 7 gives a mean error
#: of ~0 and a worst of 17 %. Symmetric rows fit as counted (worst 17 %). A fit of the Triton kernel: the
#: sm80 family's CUDA block kernel (never timed here) keeps the counted 2.
OFFSET_TERM_COST = 7.0


def promotion_ops(symmetric: bool, grouped: bool = False) -> int:
    """fp32 operations per output element per activation block: scale, accumulate; the offset
    term (multiply, add) when asymmetric; the group scale with grouped weights."""
    return 2 + (0 if symmetric else 2) + int(grouped)


def promotion_cost(symmetric: bool, grouped: bool = False, fitted: bool = True) -> float:
    """:func:`promotion_ops` as timed: with ``fitted`` (the Triton kernel) the offset term weighs
    :data:`OFFSET_TERM_COST`, else its 2 counted operations."""
    return 2 + (0 if symmetric else OFFSET_TERM_COST if fitted else 2) + int(grouped)


def promotion_us(target: Target, elements_blocks: float, symmetric: bool = True) -> float:
    """CUDA-core time of one SM promoting ``elements_blocks`` (output elements x K blocks), microseconds."""
    if target.name not in SM_RATES:
        raise ValueError(f"target {target.name}: the cost model has no CUDA-core rates for block-scaled activations")
    int8_clk, fp32_clk, int_add_clk = SM_RATES[target.name]
    clocks_per_us = target.peak_for("int8") * 1e6 / (target.sm_count * int8_clk)
    cost = promotion_cost(symmetric, fitted=target.family != "sm80")  # the fit is the Triton kernel's
    return elements_blocks * (1 / int_add_clk + (1 + cost) / fp32_clk) / clocks_per_us
