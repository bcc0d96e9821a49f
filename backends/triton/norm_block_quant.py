r"""Residual add + LayerNorm + block-scaled quantize in one kernel (Triton, GPU):
``qfx::add_layer_norm_quantize(..., act_block=B)``, the LayerNorm producer of ``QuantConfig(act_block=B)``.

Each program holds ``BLOCK`` whole rows (at most :data:`MAX_K` values a row), so the LayerNorm's
mean and variance are one reduction over the row, and each row's ``B``-wide blocks are quantized
in registers: one pass reads ``a`` and ``b`` and writes ``y`` (the residual stream reads it), the
int8 codes and one fp32 scale / offset per (token, block) — the [tokens, K / B] scales of the
consumer GEMM (:mod:`qfx.backends.triton.block_gemm`). Unfused that is three kernels (add,
LayerNorm, :func:`~qfx.backends.triton.block_gemm.quantize_blocks`).

What is exact (the contract of the token-wise fused kernel, backends/cutlass/EPILOGUES.md, and of
:func:`qfx.backends.triton.rotation_quant.add_layer_norm_rotate_quantize`, whose LayerNorm this
kernel computes in the same order):

* the codes, scales and offsets are BIT-IDENTICAL to
  ``numerics.quantize_activation(y, bits, symmetric, clip, block=B)`` of the ``y`` it returns:
  ``y`` is rounded to ``a.dtype`` first (what the graph stores), then the quantizer of
  :mod:`qfx.numerics` runs operation for operation (IEEE divisions, round half to even, no FMA
  contraction: launched with ``enable_fp_fusion=False``);
* ``a + b`` is rounded to ``a.dtype`` before the LayerNorm, as torch's add;
* ``y`` is torch's LayerNorm up to fp32 rounding of the mean and variance (another summation
  order: two-level tree sums, torch's CUDA kernel uses Welford). So the pass
  (:mod:`qfx.passes.fuse_norm_quant`) fuses only where the float parts are fp16 / bf16, where the
  compiled model is the QAT twin up to float-part rounding already; with fp32 float parts the graph
  keeps torch's LayerNorm and the separate block quantize, and compiled == twin bit for bit.

One launch configuration per K whatever M is (rows per program :func:`_tile`, :data:`WARPS`), so
a row's reductions do not change with the token bucket: ``y`` of a token is the same at any batch.
"""
from __future__ import annotations

import torch

from qfx import numerics
from qfx.backends.triton import HAS_TRITON
from qfx.backends.triton.norm_rows import check_norm_operands, clip_bounds, norm_rows

__all__ = ["HAS_TRITON", "MAX_K", "fits", "row_fits", "add_layer_norm_quantize_blocks", "AddLayerNormBlockQuantizeLauncher",
           "register"]

NAME = "triton"
#: the longest row a program holds whole (BERT-large's hidden size 1024 with room to spare)
MAX_K = 4096
#: fp32 values one program holds (rows x padded row length; a longer row is held alone)
TILE_VALUES = 1024
#: warps per program (one value for every M: see the module doc)
WARPS = 2
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _tile(k: int, block: int) -> tuple[int, int]:
    """(NB, BLOCK): blocks per row rounded up to a power of two, rows per program."""
    nb = 1 << max(0, (k // block - 1).bit_length())
    return nb, max(1, min(64, TILE_VALUES // (nb * block)))


def fits(k: int, dtype: torch.dtype, block: int) -> tuple[bool, str]:
    """Whether the kernel takes rows of ``k`` ``dtype`` values quantized in blocks of ``block`` here:
    Triton is importable and :func:`row_fits`; ``(False, why)`` names what does not fit."""
    if not HAS_TRITON:
        return False, ("act_block: the fused add + LayerNorm + block quantize kernel needs Triton (it comes with CUDA "
                       "builds of torch); LayerNorm and quantize run apart")
    return row_fits(k, dtype, block)


def row_fits(k: int, dtype: torch.dtype, block: int) -> tuple[bool, str]:
    """The kernel's row rule alone, whatever is installed here: what a planner asks for a GPU it is
    not running on (qfx.tune.parts; the target's CUDA build of torch ships Triton)."""
    if dtype not in _FLOAT_DTYPES:
        return False, f"dtype {dtype}: the fused add + LayerNorm + block quantize kernel reads fp16, bf16 or fp32"
    if block < 16 or block & (block - 1) or k % block:
        return False, f"act_block={block}: the fused LayerNorm kernel takes a power of two >= 16 dividing K={k}"
    if k > MAX_K:
        return False, f"K={k}: the fused add + LayerNorm + block quantize kernel holds rows up to {MAX_K} values"
    return True, ""


class AddLayerNormBlockQuantizeLauncher:
    """``qfx::add_layer_norm_quantize(..., act_block=B)`` bound at compile time (eps, bits, clip, B):
    ``(a, b, weight, bias) -> (y, codes, scale [..., K / B], offset [..., K / B])``, one kernel, no
    checks per call (the caller made ``a`` / ``b`` fit: :func:`fits`)."""

    def __init__(self, eps: float, bits: int, symmetric: bool, clip: tuple[float, float] | None, act_block: int) -> None:
        self.eps, self.act_block = float(eps), int(act_block)
        self._consts = dict(EPS=numerics.EPS, B=self.act_block, BITS=int(bits), SYMMETRIC=bool(symmetric),
                            HAS_CLIP=clip is not None, num_warps=WARPS, enable_fp_fusion=False)
        self._lo, self._hi = clip_bounds(clip)

    def __call__(self, a, b, weight, bias):
        from qfx.backends.triton import norm_block_quant_kernels as kernels  # imports Triton on first use

        k = a.shape[-1]
        fa, fb, y, q = norm_rows(a, b)
        m = fa.shape[0]
        scale = torch.empty(m, k // self.act_block, dtype=torch.float32, device=a.device)
        offset = torch.empty_like(scale)
        if m:
            nb, rows = _tile(k, self.act_block)
            kernels.add_layer_norm_block_quantize_kernel[(-(-m // rows),)](
                fa, fa if fb is None else fb, weight, bias, y, q, scale, offset, m, k, self.eps, self._lo, self._hi,
                HAS_B=fb is not None, NB=nb, BLOCK=rows, **self._consts)
        lead = a.shape[:-1]
        return y.reshape(a.shape), q.reshape(a.shape), scale.reshape(*lead, -1), offset.reshape(*lead, -1)


def add_layer_norm_quantize_blocks(a, b, weight, bias, eps, bits, symmetric, clip_lo, clip_hi, act_block):
    """``qfx::add_layer_norm_quantize(..., act_block=B)`` on backend 'triton' (GPU, or the CPU under
    ``TRITON_INTERPRET=1``): ``(y, codes, scale, offset)``; see the module doc for what is exact."""
    k = a.shape[-1]
    ok, why = fits(k, a.dtype, act_block)
    if not ok:
        raise ValueError(f"add_layer_norm_quantize: {why}")
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: the fused add + LayerNorm + block quantize kernel takes 4 or 8")
    check_norm_operands(a, b, weight, bias)
    clip = None if clip_lo is None else (clip_lo, clip_hi)
    return AddLayerNormBlockQuantizeLauncher(eps, bits, symmetric, clip, act_block)(
        a, b, weight.contiguous(), bias.contiguous())


def register() -> None:
    """Register the block-scaled form of ``qfx::add_layer_norm_quantize`` as backend 'triton'."""
    from qfx.ops import register_impl

    register_impl("add_layer_norm_quantize", NAME, add_layer_norm_quantize_blocks, blocks=True)
