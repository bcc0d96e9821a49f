r"""Rotate + quantize in one pass (Triton, GPU): the fused forms of the rotated linears' inputs.

With ``QuantConfig(rotation=b)`` each quantized linear reads ``quantize(rotate(x))``
(:func:`qfx.numerics.rotate_blocks`, then the token-wise quantizer of :mod:`qfx.numerics`).
Unfused that is two kernels and a round trip of the rotated tensor through memory per input, and
for the LayerNorm readers it also breaks the add + LayerNorm + quantize fusion
(:mod:`qfx.passes.fuse_norm_quant`): four kernels where one ran without rotation. Two kernels
here put it back to one:

* :func:`rotate_quantize`: ``quantize(rotate(x))``. The codes, scales and offsets are BIT-IDENTICAL
  to ``numerics.quantize_activation(numerics.rotate_blocks(x, signs, b), bits, symmetric, clip)``:
  the same butterfly additions as :mod:`qfx.backends.triton.rotation` in the same order, the rotated value
  rounded to ``x.dtype`` (as the unfused graph stores it), then the quantizer's operations one by
  one (IEEE division ``div_rn``, round half to even, no FMA contraction: launched with
  ``enable_fp_fusion=False``). The compiled graph keeps ``qfx::rotate -> qfx::quantize``; the
  runtime's launch plan binds the pair to :class:`RotateQuantizeLauncher`.
* :func:`add_layer_norm_rotate_quantize`: ``y = layer_norm(a + b)`` stored in ``a.dtype`` and the
  codes of ``rotate(y)``; the codes are exactly ``quantize(rotate(y))`` of the returned ``y``, and
  ``y`` is torch's LayerNorm up to fp32 rounding of the mean and variance (the rule of the
  existing fused add + LayerNorm + quantize kernel, so the pass runs only for fp16 / bf16 float
  parts). This is ``qfx::add_layer_norm_rotate_quantize`` on the ``cutlass`` backend.

Rounding half to even is computed from ``floor`` (exact for the quotients here, |q| < 2^22) so the
same kernel runs under ``TRITON_INTERPRET=1`` (which has no ``rint``): the CPU tests check it
there for fp16 and fp32 (the interpreter's bf16 conversion truncates, so bf16 is checked on the GPU).

One program holds ``BLOCK_M`` whole rows as ``[BLOCK_M, NB, b]`` (``NB`` = K / b rounded up to a
power of two, padding masked), at most :data:`TILE_VALUES` fp32 values per program.
"""
from __future__ import annotations

import torch

from qfx import numerics
from qfx.backends.triton import HAS_TRITON
from qfx.backends.triton.norm_rows import check_norm_operands, clip_bounds, norm_rows
from qfx.numerics import rotation_scale

__all__ = ["HAS_TRITON", "MAX_K", "rotate_quantize", "add_layer_norm_rotate_quantize", "RotateQuantizeLauncher",
           "AddLayerNormRotateQuantizeLauncher", "fits"]

#: Launch configuration (H100 sweep, benchmarks/RESULTS.md "Fused rotate + quantize"): fp32 values one
#: program holds (rows x padded row length; a longer row is held alone), and warps per program for
#: tensors up to / above SMALL_VALUES elements
TILE_VALUES = 1024
SMALL_VALUES = 1 << 18
NUM_WARPS_SMALL, NUM_WARPS_LARGE = 4, 2
#: above SMALL_VALUES: "unfused" (the rotation kernel, then the backend's quantize kernel: faster
#: there) or "held" (this module's kernel at every size)
LARGE = "unfused"
#: warps of the add + LayerNorm + rotate + quantize kernel (one value for every M: see its launcher)
LN_WARPS = 2
#: the longest row a program holds whole (BERT-large's FFN input, 4096, fits with one row)
MAX_K = 4096
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


if HAS_TRITON:  # module level: Triton resolves the helpers a kernel calls among the module's globals
    import triton
    import triton.language as tl

    @triton.jit
    def _fwht_stages(y, ROWS: tl.constexpr, B: tl.constexpr, LOG_B: tl.constexpr):
        """The butterflies of qfx.numerics.rotate_blocks on ``y [ROWS, B]`` fp32, in its order: at stride
        h = 2^stage element j pairs with j + h inside each group of 2h, (u, v) -> (u + v, u - v). The one
        Triton definition (every kernel here calls it), so their sums are the same."""
        for stage in tl.static_range(LOG_B):
            y = tl.reshape(y, (ROWS, B // (2 << stage), 2, 1 << stage))
            u, v = tl.split(tl.permute(y, (0, 1, 3, 2)))
            y = tl.permute(tl.join(u + v, u - v), (0, 1, 3, 2))
            y = tl.reshape(y, (ROWS, B))
        return y

    @triton.jit
    def fwht_rows(x_ptr, s_ptr, y_ptr, M, K, scale, B: tl.constexpr, LOG_B: tl.constexpr, BLOCK: tl.constexpr):
        """qfx::rotate: a [BLOCK, B] tile per program, grid (rows, K / B) (backends/triton/rotation.py)."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.program_id(1) * B + tl.arange(0, B)
        mask = (rows < M)[:, None]
        offs = rows[:, None].to(tl.int64) * K + cols[None, :]
        y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = _fwht_stages(y * tl.load(s_ptr + cols)[None, :], BLOCK, B, LOG_B) * scale
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _row_tile(M, K, B: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr):
        """This program's whole rows as a [BLOCK, NB, B] tile: row ids, column ids [NB, B], masks and offsets."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        blk = tl.arange(0, NB)
        cols = blk[:, None] * B + tl.arange(0, B)[None, :]
        colmask = (blk < K // B)[:, None]
        rowmask = rows < M
        mask = rowmask[:, None, None] & colmask[None, :, :]
        offs = rows[:, None, None].to(tl.int64) * K + cols[None, :, :]
        return rows, cols, colmask, rowmask, mask, offs

    @triton.jit
    def _add_layer_norm_tile(a_ptr, b_ptr, w_ptr, bias_ptr, y_ptr, offs, mask, cols, colmask, K, ln_eps,
                             HAS_B: tl.constexpr):
        """y = layer_norm(a + b) of a :func:`_row_tile` tile, stored at ``y_ptr`` and returned, in a's dtype:
        ``a + b`` rounded to a's dtype (as torch's add), mean and variance in fp32 as two-level tree sums.
        The one LayerNorm of the fused kernels (here and :mod:`qfx.backends.triton.norm_block_quant_kernels`),
        so a row's y is the same whichever quantizer follows."""
        out_t = a_ptr.dtype.element_ty
        s = tl.load(a_ptr + offs, mask=mask, other=0.0)
        if HAS_B:  # a + b rounded to the activation dtype, as torch's add
            s = (s.to(tl.float32) + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(out_t)
        s = s.to(tl.float32)
        mean = tl.sum(tl.sum(s, axis=2), axis=1) / K
        d = tl.where(mask, s - mean[:, None, None], 0.0)
        var = tl.sum(tl.sum(d * d, axis=2), axis=1) / K
        rstd = 1.0 / tl.sqrt(var + ln_eps)
        w = tl.load(w_ptr + cols, mask=colmask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=colmask, other=0.0).to(tl.float32)
        y = (d * rstd[:, None, None] * w[None, :, :] + bias[None, :, :]).to(out_t)
        tl.store(y_ptr + offs, y, mask=mask)
        return y

    @triton.jit
    def _rint(v):
        # round half to even from floor: v - floor(v) is exact for |v| < 2^23
        t = tl.floor(v)
        d = v - t
        up = (d > 0.5) | ((d == 0.5) & ((t - 2.0 * tl.floor(t * 0.5)) != 0.0))
        return tl.where(up, t + 1.0, t)

    @triton.jit
    def _rotate_then_quantize(y, mask, rowmask, s_ptr, cols, colmask, q_ptr, offs, scale_ptr, offset_ptr, rows,
                              rscale, clip_lo, clip_hi, OUT_T: tl.constexpr, EPS: tl.constexpr, B: tl.constexpr,
                              LOG_B: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr,
                              SYMMETRIC: tl.constexpr, HAS_CLIP: tl.constexpr):
        # y: [BLOCK, NB, B] fp32; every (row, block) pair is one row of the butterflies
        y = y * tl.load(s_ptr + cols, mask=colmask, other=0.0)[None, :, :]
        y = _fwht_stages(tl.reshape(y, (BLOCK * NB, B)), BLOCK * NB, B, LOG_B)
        y = tl.reshape(y * rscale, (BLOCK, NB, B))
        y = y.to(OUT_T).to(tl.float32)  # the unfused graph stores the rotated tensor in x.dtype
        if HAS_CLIP:
            y = tl.minimum(tl.maximum(y, clip_lo), clip_hi)
        # the token-wise quantizer of qfx/numerics/ (TokenQuant in quantize_kernels.cu)
        half = 1 << (BITS - 1)
        if SYMMETRIC:
            hi = tl.max(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=2), axis=1)
            scale = tl.div_rn(tl.maximum(hi, EPS), tl.full(hi.shape, half - 1, tl.float32))
            offset = tl.zeros_like(scale)
            c = _rint(tl.div_rn(y, scale[:, None, None]))
        else:
            lo = tl.where(rowmask, tl.min(tl.min(tl.where(mask, y, float("inf")), axis=2), axis=1), 0.0)
            hi = tl.where(rowmask, tl.max(tl.max(tl.where(mask, y, float("-inf")), axis=2), axis=1), 0.0)
            scale = tl.div_rn(tl.maximum(hi - lo, EPS), tl.full(hi.shape, 2 * half - 1, tl.float32))
            offset = lo + half * scale
            zero = offset - half * scale
            c = _rint(tl.div_rn(y - zero[:, None, None], scale[:, None, None])) - half
        c = tl.minimum(tl.maximum(c, 0.0 - half), half - 1.0)
        tl.store(q_ptr + offs, c.to(tl.int8), mask=mask)
        tl.store(scale_ptr + rows, scale, mask=rowmask)
        tl.store(offset_ptr + rows, offset, mask=rowmask)

    @triton.jit
    def _rotate_quantize_rows(x_ptr, s_ptr, q_ptr, scale_ptr, offset_ptr, M, K, rscale, clip_lo, clip_hi,
                              EPS: tl.constexpr, B: tl.constexpr, LOG_B: tl.constexpr, NB: tl.constexpr,
                              BLOCK: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_CLIP: tl.constexpr):
        rows, cols, colmask, rowmask, mask, offs = _row_tile(M, K, B, NB, BLOCK)
        y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _rotate_then_quantize(y, mask, rowmask, s_ptr, cols, colmask, q_ptr, offs, scale_ptr, offset_ptr, rows, rscale,
                              clip_lo, clip_hi, x_ptr.dtype.element_ty, EPS, B, LOG_B, NB, BLOCK, BITS, SYMMETRIC, HAS_CLIP)

    @triton.jit
    def _add_layer_norm_rotate_quantize_rows(a_ptr, b_ptr, w_ptr, bias_ptr, y_ptr, s_ptr, q_ptr, scale_ptr, offset_ptr,
                                             M, K, ln_eps, rscale, clip_lo, clip_hi, HAS_B: tl.constexpr,
                                             EPS: tl.constexpr, B: tl.constexpr, LOG_B: tl.constexpr, NB: tl.constexpr,
                                             BLOCK: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
                                             HAS_CLIP: tl.constexpr):
        rows, cols, colmask, rowmask, mask, offs = _row_tile(M, K, B, NB, BLOCK)
        y = _add_layer_norm_tile(a_ptr, b_ptr, w_ptr, bias_ptr, y_ptr, offs, mask, cols, colmask, K, ln_eps, HAS_B)
        _rotate_then_quantize(y.to(tl.float32), mask, rowmask, s_ptr, cols, colmask, q_ptr, offs, scale_ptr, offset_ptr,
                              rows, rscale, clip_lo, clip_hi, a_ptr.dtype.element_ty, EPS, B, LOG_B, NB, BLOCK, BITS,
                              SYMMETRIC, HAS_CLIP)



def _tile(k: int, block: int) -> tuple[int, int]:
    """(NB, BLOCK_M): blocks per row rounded up to a power of two, rows per program."""
    nb = 1 << max(0, (k // block - 1).bit_length())
    return nb, max(1, min(64, TILE_VALUES // (nb * block)))


def fits(k: int, dtype: torch.dtype, block: int) -> tuple[bool, str]:
    """Whether the fused kernels take rows of ``k`` ``dtype`` values rotated in blocks of ``block``."""
    if not HAS_TRITON:
        return False, "Triton is not installed (it comes with CUDA builds of torch): rotate and quantize run apart"
    if dtype not in _FLOAT_DTYPES:
        return False, f"dtype {dtype}: the fused rotate + quantize kernels read fp16, bf16 or fp32"
    if block <= 0 or block & (block - 1) or k % block:
        return False, f"block={block} must be a power of two dividing K={k}"
    if k > MAX_K:
        return False, f"K={k}: the fused rotate + quantize kernels hold rows up to {MAX_K} values"
    return True, ""


class RotateQuantizeLauncher:
    """``quantize(rotate(x))`` bound at compile time: ``(x) -> (codes, scale, offset)``.
    Lean per call (it runs inside CUDA graphs): the caller made ``x`` (fp16 / bf16 / fp32, K fits).

    ``unfused`` (optional, ``x -> (codes, scale, offset)``): the two-kernel path (the rotation
    kernel, then the backend's quantize kernel) used for tensors above :data:`SMALL_VALUES`
    elements, where it is faster than this kernel (H100: 21.6 vs 29.0 us at 16384 x 384, 137.5 vs
    248.7 us at 16384 x 3072; a streamed variant holding one [rows, b] tile at a time was no faster);
    the codes are the same either way (both equal the numerics definition, tested on the GPU). Below
    it the fused kernel saves a launch and a round trip (3.6 vs 4.4 us at 128 x 384)."""

    def __init__(self, signs: torch.Tensor, block: int, bits: int, symmetric: bool,
                 clip: tuple[float, float] | None, unfused=None) -> None:
        self.unfused = unfused
        self.signs = signs.to(torch.float32).contiguous()
        self.block, self.bits, self.symmetric, self.clip = int(block), int(bits), bool(symmetric), clip
        self._consts = dict(EPS=numerics.EPS, B=self.block, LOG_B=self.block.bit_length() - 1, BITS=self.bits,
                            SYMMETRIC=self.symmetric, HAS_CLIP=clip is not None, enable_fp_fusion=False)
        self._lo, self._hi = clip_bounds(clip)
        self._scale = rotation_scale(self.block)

    def __call__(self, x: torch.Tensor):
        k = x.shape[-1]
        flat = x.reshape(-1, k)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        m = flat.shape[0]
        large = m * k > SMALL_VALUES
        if large and LARGE == "unfused" and self.unfused is not None:
            return self.unfused(x)
        q = torch.empty(flat.shape, dtype=torch.int8, device=x.device)
        scale = torch.empty(m, dtype=torch.float32, device=x.device)
        offset = torch.empty(m, dtype=torch.float32, device=x.device)
        if m:
            nb, bm = _tile(k, self.block)
            warps = NUM_WARPS_SMALL if not large else NUM_WARPS_LARGE
            _rotate_quantize_rows[(triton.cdiv(m, bm),)](flat, self.signs, q, scale, offset, m, k, self._scale, self._lo,
                                                         self._hi, NB=nb, BLOCK=bm, num_warps=warps, **self._consts)
        lead = x.shape[:-1]
        return q.reshape(x.shape), scale.reshape(lead), offset.reshape(lead)


class AddLayerNormRotateQuantizeLauncher:
    """``qfx::add_layer_norm_rotate_quantize`` bound at compile time (eps, signs, block, bits, clip):
    ``(a, b, weight, bias) -> (y, codes, scale, offset)``, one kernel, no checks per call."""

    def __init__(self, eps: float, signs: torch.Tensor, block: int, bits: int, symmetric: bool,
                 clip: tuple[float, float] | None) -> None:
        self.eps = float(eps)
        self.signs = signs.to(torch.float32).contiguous()
        self.block = int(block)
        self._consts = dict(EPS=numerics.EPS, B=self.block, LOG_B=self.block.bit_length() - 1, BITS=int(bits),
                            SYMMETRIC=bool(symmetric), HAS_CLIP=clip is not None, enable_fp_fusion=False)
        self._lo, self._hi = clip_bounds(clip)
        self._scale = rotation_scale(self.block)

    def __call__(self, a, b, weight, bias):
        k = a.shape[-1]
        fa, fb, y, q = norm_rows(a, b)
        m = fa.shape[0]
        scale = torch.empty(m, dtype=torch.float32, device=a.device)
        offset = torch.empty(m, dtype=torch.float32, device=a.device)
        if m:
            # one configuration per K whatever M is, so the reduction layout, and with it the order in which
            # a row's mean and variance are summed, does not change with the bucket (not tested on the GPU)
            nb, bm = _tile(k, self.block)
            _add_layer_norm_rotate_quantize_rows[(triton.cdiv(m, bm),)](
                fa, fa if fb is None else fb, weight, bias, y, self.signs, q, scale, offset, m, k, self.eps, self._scale,
                self._lo, self._hi, HAS_B=fb is not None, NB=nb, BLOCK=bm, num_warps=LN_WARPS, **self._consts)
        lead = a.shape[:-1]
        return y.reshape(a.shape), q.reshape(a.shape), scale.reshape(lead), offset.reshape(lead)


def _check(x: torch.Tensor, name: str, block: int, bits: int) -> None:
    ok, why = fits(x.shape[-1], x.dtype, block)
    if not ok:
        raise ValueError(f"{name}: {why}")
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: the fused rotate + quantize kernels take 4 or 8")


def rotate_quantize(x: torch.Tensor, signs: torch.Tensor, block: int, bits: int, symmetric: bool,
                    clip: tuple[float, float] | None = None):
    """``numerics.quantize_activation(numerics.rotate_blocks(x, signs, block), bits, symmetric, clip)``
    in one kernel (GPU, or CPU under ``TRITON_INTERPRET=1``): (int8 codes, scale, offset)."""
    _check(x, "x", block, bits)
    return RotateQuantizeLauncher(signs.to(x.device), block, bits, symmetric, clip)(x)


def add_layer_norm_rotate_quantize(a, b, weight, bias, eps: float, signs: torch.Tensor, block: int, bits: int,
                                   symmetric: bool, clip: tuple[float, float] | None = None):
    """``y = layer_norm(a + b)`` (``b`` may be None) in ``a.dtype`` and the codes of ``rotate(y)``,
    one kernel: (y, codes, scale, offset); see the module doc for what is exact."""
    _check(a, "a", block, bits)
    check_norm_operands(a, b, weight, bias)
    return AddLayerNormRotateQuantizeLauncher(eps, signs.to(a.device), block, bits, symmetric, clip)(
        a, b, weight.contiguous(), bias.contiguous())
