"""The Triton kernels of :mod:`qfx.backends.triton.block_gemm` (block-scaled integer linears): the
definitions and exactness notes are there. Imported on first use of a kernel (whether Triton
interprets on the CPU, ``TRITON_INTERPRET=1``, is fixed when it is first imported)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qfx.backends.triton.rotation_quant import _rint

__all__ = ["block_linear_kernel", "block_linear_quantize_kernel", "quantize_blocks_kernel", "erf_probe_kernel", "TL_DTYPES"]

#: M_SQRT1_2 (math.sqrt(0.5)), rounded to fp32 in the kernel as in torch's GELU; a constexpr, as
#: Triton requires of the globals a kernel reads
_SQRT1_2 = tl.constexpr(0.7071067811865476)


#: erf forms (ERF constexpr): 0 = ``tl.math.erf`` (Triton's bundled libdevice; the interpreter's own
#: erf on the CPU), 1 / 2 = CUDA's ``erff`` written out: the same two fp32 polynomials in the same
#: fma order, split at |x| = 1.00296, whose large-|x| coefficients differ between nvcc 13.0's
#: libdevice (1) and the libdevice Triton 3.8 bundles (2, the form ``tl.math.erf`` compiles to there).
#: torch's GELU calls the erff of the nvcc torch was built with, so block_gemm.erf_form() asks torch
#: on the device which of 1 and 2 it computes (a one-off probe) and the kernels use that one.
_ERF_SMALL = (8.483494457323104e-05, -0.0008213091641664505, 0.005213488824665546, -0.026868773624300957,
              0.11284004896879196, -0.37612664699554443, 0.12837915122509003)
_ERF_LARGE = {1: (0.00011219871521461755, -0.0013275252422317863, 0.00839653518050909, -0.04024658352136612,
                  0.15950430929660797, 0.9129176735877991, 0.6290600299835205),
              2: (1.6425845387857407e-05, -0.0004680210549850017, 0.0052647641859948635, -0.034303076565265656,
                  0.1532936990261078, 0.9163130521774292, 0.6282998323440552)}
_ES0, _ES1, _ES2, _ES3, _ES4, _ES5, _ES6 = (tl.constexpr(c) for c in _ERF_SMALL)
_EA0, _EA1, _EA2, _EA3, _EA4, _EA5, _EA6 = (tl.constexpr(c) for c in _ERF_LARGE[1])
_EB0, _EB1, _EB2, _EB3, _EB4, _EB5, _EB6 = (tl.constexpr(c) for c in _ERF_LARGE[2])


@triton.jit
def _erf(a, ERF: tl.constexpr):
    """erf of the fp32 ``a`` in form ``ERF`` (see _ERF_LARGE): bit for bit the erff it names."""
    if ERF == 0:
        return tl.math.erf(a)
    ax = tl.abs(a)
    big = ax >= 1.002959966659546
    t = tl.where(big, ax, a * a)
    # the large-|x| coefficients of form ERF (a compile-time choice), the small-|x| ones shared
    p = tl.where(big, _EA0 if ERF == 1 else _EB0, _ES0)
    p = tl.fma(p, t, tl.where(big, _EA1 if ERF == 1 else _EB1, _ES1))
    p = tl.fma(p, t, tl.where(big, _EA2 if ERF == 1 else _EB2, _ES2))
    p = tl.fma(p, t, tl.where(big, _EA3 if ERF == 1 else _EB3, _ES3))
    p = tl.fma(p, t, tl.where(big, _EA4 if ERF == 1 else _EB4, _ES4))
    p = tl.fma(p, t, tl.where(big, _EA5 if ERF == 1 else _EB5, _ES5))
    p = tl.fma(p, t, tl.where(big, _EA6 if ERF == 1 else _EB6, _ES6))
    u = tl.where(big, -t, a)
    r = tl.fma(p, u, u)
    # large branch: 1 - 2^r with a's sign (|r| >= 1 there, so ex2's denormal flushing cannot matter)
    one_minus = 1.0 - tl.math.exp2(r)
    return tl.where(big, tl.where(a < 0, -one_minus, one_minus), r)


@triton.jit
def erf_probe_kernel(x_ptr, out_ptr, n, ERF: tl.constexpr, BLOCK: tl.constexpr):
    """``out = erf(x)`` in form ERF (block_gemm.erf_form compares it with torch.erf)."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + r, _erf(tl.load(x_ptr + r, mask=r < n, other=0.0), ERF), mask=r < n)


@triton.jit
def _promoted_accumulator(a_ptr, w_ptr, sa_ptr, ca_ptr, sw_ptr, bs_ptr, M, N, K, J, G, rm, rn,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr,
                          HAS_OFFSET: tl.constexpr, GROUPED: tl.constexpr, STAGES: tl.constexpr):
    """sum over blocks j of t_j (the definition's p): fp32 [BLOCK_M, BLOCK_N]."""
    ra = rm % M  # rows / columns past the end read a valid row; their results are not stored
    rw = rn % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + ra[:, None].to(tl.int64) * K + rk[None, :]
    w_ptrs = w_ptr + rw[None, :].to(tl.int64) * K + rk[:, None]
    p = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for j in tl.range(0, J, num_stages=STAGES):
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        for s in tl.static_range(SUB):
            acc = tl.dot(tl.load(a_ptrs), tl.load(w_ptrs), acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if BLOCK_K * SUB <= 256:
            # |acc| <= 256 * 128 * 127 < 2^22: the float of acc is exactly the fp32 whose bits are
            # acc + bits(1.5 * 2^23), less 1.5 * 2^23 (an integer add and an fp32 subtract, both
            # full-rate on the CUDA cores, where the int32 -> fp32 conversion instruction runs at
            # a quarter of the fp32 rate or less; the promotion of every K block is the block
            # kernel's CUDA-core work)
            acc_f = (acc + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        else:
            acc_f = acc.to(tl.float32)
        t = acc_f * tl.load(sa_ptr + ra * J + j)[:, None]
        if HAS_OFFSET:
            t = t + tl.load(ca_ptr + ra * J + j)[:, None] * tl.load(bs_ptr + rw * J + j)[None, :]
        if GROUPED:
            t = t * tl.load(sw_ptr + rw * G + (j * G) // J)[None, :]
        p = p + t
    return p

@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of this program on a 1-D grid, GROUP_M tile rows at a time down each
    column group, so the CTAs running together share weight tiles in L2."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


@triton.jit
def _epilogue(p, sw_ptr, bias_ptr, rn, N, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, GELU: tl.constexpr,
              ERF: tl.constexpr):
    rw = rn % N
    y = p if GROUPED else p * tl.load(sw_ptr + rw)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rw).to(tl.float32)[None, :]
    if GELU:
        y = y * 0.5 * (1.0 + _erf(y * _SQRT1_2, ERF))
    return y

@triton.jit
def _block_codes(v, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, EPS: tl.constexpr):
    """numerics.quantize_activation of each row of the fp32 tile ``v`` [R, B] (one block per row):
    (codes as fp32, scale [R], offset [R]); IEEE divisions, round half to even, no fma."""
    half = 1 << (BITS - 1)
    if SYMMETRIC:
        scale = tl.div_rn(tl.maximum(tl.max(tl.abs(v), axis=1), EPS), tl.full((v.shape[0],), half - 1, tl.float32))
        offset = tl.zeros_like(scale)
        codes = _rint(tl.div_rn(v, scale[:, None]))
    else:
        lo = tl.min(v, axis=1)
        scale = tl.div_rn(tl.maximum(tl.max(v, axis=1) - lo, EPS), tl.full((v.shape[0],), 2 * half - 1, tl.float32))
        offset = lo + half * scale
        codes = _rint(tl.div_rn(v - (offset - half * scale)[:, None], scale[:, None])) - half
    return tl.minimum(tl.maximum(codes, 0.0 - half), half - 1.0), scale, offset

@triton.jit
def _gelu_clip(v, OUT_T: tl.constexpr, GELU: tl.constexpr, HAS_CLIP: tl.constexpr, clip_lo, clip_hi, ERF: tl.constexpr):
    """What the quantizer reads: ``v`` (fp32 of an OUT_T value), GELU'd and rounded to OUT_T as torch's
    gelu on an OUT_T tensor, then clipped."""
    if GELU:
        v = (v * 0.5 * (1.0 + _erf(v * _SQRT1_2, ERF))).to(OUT_T).to(tl.float32)
    if HAS_CLIP:
        v = tl.minimum(tl.maximum(v, clip_lo), clip_hi)
    return v

@triton.jit
def block_linear_kernel(a_ptr, w_ptr, sa_ptr, ca_ptr, sw_ptr, bs_ptr, bias_ptr, out_ptr, M, N, K, J, G,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr,
                         HAS_OFFSET: tl.constexpr, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
                         GELU: tl.constexpr, STAGES: tl.constexpr, GROUP_M: tl.constexpr, ERF: tl.constexpr):
    tm, tn = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    p = _promoted_accumulator(a_ptr, w_ptr, sa_ptr, ca_ptr, sw_ptr, bs_ptr, M, N, K, J, G, rm, rn, BLOCK_M, BLOCK_N,
                              BLOCK_K, SUB, HAS_OFFSET, GROUPED, STAGES)
    y = _epilogue(p, sw_ptr, bias_ptr, rn, N, HAS_BIAS, GROUPED, GELU, ERF)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)

@triton.jit
def block_linear_quantize_kernel(a_ptr, w_ptr, sa_ptr, ca_ptr, sw_ptr, bs_ptr, bias_ptr, q_ptr, qs_ptr, qc_ptr,
                                  M, N, K, J, G, clip_lo, clip_hi, OUT_T: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr,
                                  HAS_OFFSET: tl.constexpr, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  STAGES: tl.constexpr, Q_GELU: tl.constexpr, HAS_CLIP: tl.constexpr,
                                  BITS: tl.constexpr, SYMMETRIC: tl.constexpr, EPS: tl.constexpr, GROUP_M: tl.constexpr,
                                  ERF: tl.constexpr):
    """As block_linear_kernel, then the codes of its [BLOCK_M, BLOCK_N] tile (one block per row)."""
    tm, tn = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    p = _promoted_accumulator(a_ptr, w_ptr, sa_ptr, ca_ptr, sw_ptr, bs_ptr, M, N, K, J, G, rm, rn, BLOCK_M, BLOCK_N,
                              BLOCK_K, SUB, HAS_OFFSET, GROUPED, STAGES)
    y = _epilogue(p, sw_ptr, bias_ptr, rn, N, HAS_BIAS, GROUPED, False, ERF).to(OUT_T).to(tl.float32)
    codes, scale, offset = _block_codes(_gelu_clip(y, OUT_T, Q_GELU, HAS_CLIP, clip_lo, clip_hi, ERF), BITS, SYMMETRIC,
                                        EPS)
    rows = rm < M
    tl.store(q_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], codes.to(tl.int8), mask=rows[:, None])
    qj = N // BLOCK_N
    tl.store(qs_ptr + rm * qj + tn, scale, mask=rows)
    tl.store(qc_ptr + rm * qj + tn, offset, mask=rows)

@triton.jit
def quantize_blocks_kernel(x_ptr, q_ptr, qs_ptr, qc_ptr, M, K, clip_lo, clip_hi, BLOCK_M: tl.constexpr,
                            B: tl.constexpr, GELU: tl.constexpr, HAS_CLIP: tl.constexpr, BITS: tl.constexpr,
                            SYMMETRIC: tl.constexpr, EPS: tl.constexpr, ERF: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * B + tl.arange(0, B)
    rows = rm < M
    offs = rm[:, None].to(tl.int64) * K + rk[None, :]
    v = tl.load(x_ptr + offs, mask=rows[:, None], other=0.0).to(tl.float32)
    codes, scale, offset = _block_codes(_gelu_clip(v, x_ptr.dtype.element_ty, GELU, HAS_CLIP, clip_lo, clip_hi, ERF),
                                        BITS, SYMMETRIC, EPS)
    tl.store(q_ptr + offs, codes.to(tl.int8), mask=rows[:, None])
    tl.store(qs_ptr + rm * (K // B) + tl.program_id(1), scale, mask=rows)
    tl.store(qc_ptr + rm * (K // B) + tl.program_id(1), offset, mask=rows)


#: torch output dtype -> the Triton dtype a kernel rounds to
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
