r"""Block-scaled integer linears on the GPU (Triton): ``QuantConfig(act_block=B)``, exact.

The numerics are those of :func:`qfx.numerics.int_linear_blocks_reference` (the definition and its
fp32 order: qfx/numerics/affine.py, backends/cutlass/EPILOGUES.md "Block-scaled activations"),
computed here operation for operation, so on one GPU the kernels' outputs EQUAL the reference run
there with torch ops (tests/kernels/test_block_gemm.py checks whole outputs with ``torch.equal``):

* the main loop walks K in the activation blocks; each block's int8 x int8 products are summed
  exactly in an int32 accumulator by ``tl.dot`` (``wgmma`` s8 on sm_90; int4 codes are int8 values
  in [-8, 7], so W4A4 runs on INT8 tensor cores: Hopper has no INT4 ones), then promoted to the
  fp32 accumulator with that block's activation scale (and offset term, and group scale) in the
  documented order; the kernels launch with ``enable_fp_fusion=False`` so no ``a * b + c`` is
  contracted into an fma (whose single rounding the definition does not have);
* the epilogue applies the row-wise weight scale, the bias and torch's exact-erf GELU, then either
  stores ``y`` in the output dtype (:func:`int_linear_blocks`) or, for a producer whose only reader
  quantizes it (the FFN-in GEMM: GELU then the FFN-out's codes), quantizes each row of its
  ``[BLOCK_M, B]`` tile into codes + one scale / offset per (row, block) and never writes ``y``
  (:func:`int_linear_blocks_quantize`): its codes are exactly ``quantize_activation(gelu(y), ...,
  block=B)`` of the ``y`` the unfused graph would store;
* :func:`quantize_blocks` is ``qfx::quantize(..., act_block=B)`` (optionally of ``gelu(x)``).

int4 weights arrive packed (two per byte, :func:`qfx.numerics.pack_int4`); the launchers unpack
them once to int8 codes and keep that copy (the kernels then read int8 weights). Tile shapes are
data (:data:`CONFIGS`); ``BLOCK_K`` is the activation block (at most 128; a larger block is
walked in 128-wide steps of the same int32 accumulator).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from qfx import numerics
from qfx.backends.triton import HAS_TRITON

__all__ = ["HAS_TRITON", "CONFIGS", "BlockConfig", "config_for", "int_linear_blocks", "int_linear_blocks_quantize",
           "quantize_blocks", "can_implement", "register", "rebind_block_ops", "TritonBlockBackend"]

NAME = "triton"


@dataclass(frozen=True)
class BlockConfig:
    """One tile configuration: serves every M up to ``max_m`` (the last entry: any larger M)."""

    max_m: int
    block_m: int
    block_n: int
    warps: int
    stages: int


#: tile configurations by M (first whose max_m >= M); BLOCK_K is the activation block. Small M: a
#: narrower tile keeps more CTAs busy; large M: 128 x 128 x 128 int8 tiles, 3 stages (96 KiB smem).
CONFIGS = (
    BlockConfig(max_m=256, block_m=64, block_n=128, warps=4, stages=3),
    BlockConfig(max_m=1 << 62, block_m=128, block_n=128, warps=8, stages=3),
)
#: the widest K step of one tl.dot; a larger activation block takes several into one int32 accumulator
MAX_BLOCK_K = 128
_SQRT1_2 = 0.7071067811865476  # M_SQRT1_2 (math.sqrt(0.5)), rounded to fp32 in the kernel as in torch's GELU


def config_for(m: int) -> BlockConfig:
    return next(c for c in CONFIGS if m <= c.max_m)


if HAS_TRITON:  # module level: Triton resolves the helpers a kernel calls among the module's globals
    import triton
    import triton.language as tl

    from qfx.backends.triton.rotation_quant import _rint

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
            t = acc.to(tl.float32) * tl.load(sa_ptr + ra * J + j)[:, None]
            if HAS_OFFSET:
                t = t + tl.load(ca_ptr + ra * J + j)[:, None] * tl.load(bs_ptr + rw * J + j)[None, :]
            if GROUPED:
                t = t * tl.load(sw_ptr + rw * G + (j * G) // J)[None, :]
            p = p + t
        return p

    @triton.jit
    def _epilogue(p, sw_ptr, bias_ptr, rn, N, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, GELU: tl.constexpr):
        rw = rn % N
        y = p if GROUPED else p * tl.load(sw_ptr + rw)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rw).to(tl.float32)[None, :]
        if GELU:
            y = y * 0.5 * (1.0 + tl.math.erf(y * _SQRT1_2))
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
    def _gelu_clip(v, OUT_T: tl.constexpr, GELU: tl.constexpr, HAS_CLIP: tl.constexpr, clip_lo, clip_hi):
        """What the quantizer reads: ``v`` (fp32 of an OUT_T value), GELU'd and rounded to OUT_T as torch's
        gelu on an OUT_T tensor, then clipped."""
        if GELU:
            v = (v * 0.5 * (1.0 + tl.math.erf(v * _SQRT1_2))).to(OUT_T).to(tl.float32)
        if HAS_CLIP:
            v = tl.minimum(tl.maximum(v, clip_lo), clip_hi)
        return v

    @triton.jit
    def _block_linear_kernel(a_ptr, w_ptr, sa_ptr, ca_ptr, sw_ptr, bs_ptr, bias_ptr, out_ptr, M, N, K, J, G,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr,
                             HAS_OFFSET: tl.constexpr, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
                             GELU: tl.constexpr, STAGES: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        p = _promoted_accumulator(a_ptr, w_ptr, sa_ptr, ca_ptr, sw_ptr, bs_ptr, M, N, K, J, G, rm, rn, BLOCK_M, BLOCK_N,
                                  BLOCK_K, SUB, HAS_OFFSET, GROUPED, STAGES)
        y = _epilogue(p, sw_ptr, bias_ptr, rn, N, HAS_BIAS, GROUPED, GELU)
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        tl.store(out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _block_linear_quantize_kernel(a_ptr, w_ptr, sa_ptr, ca_ptr, sw_ptr, bs_ptr, bias_ptr, q_ptr, qs_ptr, qc_ptr,
                                      M, N, K, J, G, clip_lo, clip_hi, OUT_T: tl.constexpr, BLOCK_M: tl.constexpr,
                                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr,
                                      HAS_OFFSET: tl.constexpr, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
                                      STAGES: tl.constexpr, Q_GELU: tl.constexpr, HAS_CLIP: tl.constexpr,
                                      BITS: tl.constexpr, SYMMETRIC: tl.constexpr, EPS: tl.constexpr):
        """As _block_linear_kernel, then the codes of its [BLOCK_M, BLOCK_N] tile (one block per row)."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        p = _promoted_accumulator(a_ptr, w_ptr, sa_ptr, ca_ptr, sw_ptr, bs_ptr, M, N, K, J, G, rm, rn, BLOCK_M, BLOCK_N,
                                  BLOCK_K, SUB, HAS_OFFSET, GROUPED, STAGES)
        y = _epilogue(p, sw_ptr, bias_ptr, rn, N, HAS_BIAS, GROUPED, False).to(OUT_T).to(tl.float32)
        codes, scale, offset = _block_codes(_gelu_clip(y, OUT_T, Q_GELU, HAS_CLIP, clip_lo, clip_hi), BITS, SYMMETRIC, EPS)
        rows = rm < M
        tl.store(q_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], codes.to(tl.int8), mask=rows[:, None])
        qj = N // BLOCK_N
        tl.store(qs_ptr + rm * qj + tl.program_id(1), scale, mask=rows)
        tl.store(qc_ptr + rm * qj + tl.program_id(1), offset, mask=rows)

    @triton.jit
    def _quantize_blocks_kernel(x_ptr, q_ptr, qs_ptr, qc_ptr, M, K, clip_lo, clip_hi, BLOCK_M: tl.constexpr,
                                B: tl.constexpr, GELU: tl.constexpr, HAS_CLIP: tl.constexpr, BITS: tl.constexpr,
                                SYMMETRIC: tl.constexpr, EPS: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.program_id(1) * B + tl.arange(0, B)
        rows = rm < M
        offs = rm[:, None].to(tl.int64) * K + rk[None, :]
        v = tl.load(x_ptr + offs, mask=rows[:, None], other=0.0).to(tl.float32)
        codes, scale, offset = _block_codes(_gelu_clip(v, x_ptr.dtype.element_ty, GELU, HAS_CLIP, clip_lo, clip_hi),
                                            BITS, SYMMETRIC, EPS)
        tl.store(q_ptr + offs, codes.to(tl.int8), mask=rows[:, None])
        tl.store(qs_ptr + rm * (K // B) + tl.program_id(1), scale, mask=rows)
        tl.store(qc_ptr + rm * (K // B) + tl.program_id(1), offset, mask=rows)


def _need_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("block-scaled kernels need Triton (it comes with CUDA builds of torch); "
                           "on the CPU use the 'reference' backend")


#: packed int4 weight -> its int8 codes (made once per weight tensor, dropped with it)
_UNPACKED = WeakIdKeyDictionary()


def _int8_weight(w: torch.Tensor, w_bits: int) -> torch.Tensor:
    if w_bits != 4:
        return w.contiguous()
    codes = _UNPACKED.get(w)
    if codes is None:
        codes = _UNPACKED[w] = numerics.unpack_int4(w).contiguous()
    return codes


def _check_block(k: int, act_block: int, what: str) -> tuple[int, int]:
    """(BLOCK_K, SUB) for an activation block; ValueError naming act_block where a kernel cannot take it."""
    if k % act_block:
        raise ValueError(f"{what}: act_block={act_block} does not divide K={k}")
    block_k = min(act_block, MAX_BLOCK_K)
    if act_block % block_k or block_k < 32 or block_k & (block_k - 1):
        raise ValueError(f"{what}: act_block={act_block}: the Triton kernels take a power of two >= 32 "
                         f"(or a multiple of {MAX_BLOCK_K}); use QuantConfig(act_block=128)")
    return block_k, act_block // block_k


def _gemm_args(a, a_scale, a_offset, w, w_bits, w_scale, w_block_sums, act_block):
    k = a.shape[-1]
    block_k, sub = _check_block(k, act_block, "int_linear_blocks")
    blocks = k // act_block
    a2 = a.reshape(-1, k).contiguous()
    wq = _int8_weight(w, w_bits)
    if wq.shape[-1] != k:
        raise ValueError(f"int_linear_blocks: weight K={wq.shape[-1]} but a has K={k}")
    groups = w_scale.shape[-1]
    if groups > 1 and blocks % groups:
        raise ValueError(f"int_linear_blocks: {groups} weight groups do not hold whole act_block={act_block} blocks")
    sa = a_scale.reshape(-1, blocks).contiguous()
    ca = a_offset.reshape(-1, blocks).contiguous()
    return a2, wq, sa, ca, w_scale.float().contiguous(), w_block_sums.float().contiguous(), block_k, sub, blocks, groups


def int_linear_blocks(a, a_scale, a_offset, w, w_bits, w_scale, w_block_sums, bias, gelu, out_dtype, a_bits, act_block,
                      symmetric: bool = False):
    """``qfx::int_linear(..., act_block=B)`` on the GPU: equals
    :func:`qfx.numerics.int_linear_blocks_reference` bit for bit (``symmetric=True`` skips the offset
    term, which is exact when ``a_offset`` is zeros: the op itself always computes it)."""
    _need_triton()
    a2, wq, sa, ca, sw, bs, block_k, sub, blocks, groups = _gemm_args(a, a_scale, a_offset, w, w_bits, w_scale,
                                                                      w_block_sums, act_block)
    m, n, k = a2.shape[0], wq.shape[0], a2.shape[1]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m:
        cfg = config_for(m)
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
        _block_linear_kernel[grid](a2, wq, sa, ca, sw, bs, sw if bias is None else bias, out, m, n, k, blocks, groups,
                                   BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, SUB=sub,
                                   HAS_OFFSET=not symmetric, GROUPED=groups > 1, HAS_BIAS=bias is not None, GELU=bool(gelu),
                                   STAGES=cfg.stages, num_warps=cfg.warps, enable_fp_fusion=False)
    return out.reshape(*a.shape[:-1], n)


def int_linear_blocks_quantize(a, a_scale, a_offset, w, w_bits, w_scale, w_block_sums, bias, out_dtype, act_block,
                               bits: int, q_symmetric: bool, clip=None, gelu: bool = True, q_block: int | None = None,
                               symmetric: bool = False):
    """The FFN-in producer: the codes of ``gelu(int_linear(...))`` (``gelu=False``: of the linear's
    output itself) in blocks of ``q_block`` (default ``act_block``) output columns, without
    writing the output: (codes [..., N] int8, scale [..., N / q_block], offset [..., N / q_block]).
    Equals ``quantize_activation(gelu(y), bits, q_symmetric, clip, block=q_block)`` of
    ``y = int_linear_blocks_reference(...).to(out_dtype)`` bit for bit."""
    _need_triton()
    q_block = act_block if q_block is None else q_block
    a2, wq, sa, ca, sw, bs, block_k, sub, blocks, groups = _gemm_args(a, a_scale, a_offset, w, w_bits, w_scale,
                                                                      w_block_sums, act_block)
    m, n, k = a2.shape[0], wq.shape[0], a2.shape[1]
    if n % q_block or q_block & (q_block - 1) or q_block < 16:
        raise ValueError(f"int_linear_blocks_quantize: the consumer's act_block={q_block} must be a power of two "
                         f">= 16 dividing N={n}")
    codes = torch.empty(m, n, dtype=torch.int8, device=a.device)
    scale = torch.empty(m, n // q_block, dtype=torch.float32, device=a.device)
    offset = torch.empty_like(scale)
    if m:
        cfg = config_for(m)
        lo, hi = (0.0, 0.0) if clip is None else (float(clip[0]), float(clip[1]))
        _block_linear_quantize_kernel[(triton.cdiv(m, cfg.block_m), n // q_block)](
            a2, wq, sa, ca, sw, bs, sw if bias is None else bias, codes, scale, offset, m, n, k, blocks, groups, lo, hi,
            OUT_T=_TL_DTYPES[out_dtype], BLOCK_M=cfg.block_m, BLOCK_N=q_block, BLOCK_K=block_k, SUB=sub,
            HAS_OFFSET=not symmetric, GROUPED=groups > 1, HAS_BIAS=bias is not None, STAGES=cfg.stages,
            Q_GELU=bool(gelu), HAS_CLIP=clip is not None, BITS=int(bits), SYMMETRIC=bool(q_symmetric),
            EPS=numerics.EPS, num_warps=cfg.warps, enable_fp_fusion=False)
    lead = a.shape[:-1]
    return codes.reshape(*lead, n), scale.reshape(*lead, -1), offset.reshape(*lead, -1)


def quantize_blocks(x, bits, symmetric, clip_lo, clip_hi, gelu, act_block):
    """``qfx::quantize(..., act_block=B)`` on the GPU: equals ``numerics.quantize_activation(x, bits,
    symmetric, clip, gelu, block=B)`` bit for bit."""
    _need_triton()
    k = x.shape[-1]
    if k % act_block or act_block & (act_block - 1) or act_block < 16:
        raise ValueError(f"quantize_blocks: act_block={act_block} must be a power of two >= 16 dividing K={k}")
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    codes = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, k // act_block, dtype=torch.float32, device=x.device)
    offset = torch.empty_like(scale)
    if m:
        bm = max(1, min(64, 4096 // act_block))
        _quantize_blocks_kernel[(triton.cdiv(m, bm), k // act_block)](
            x2, codes, scale, offset, m, k, 0.0 if clip_lo is None else float(clip_lo),
            0.0 if clip_hi is None else float(clip_hi), BLOCK_M=bm, B=act_block, GELU=bool(gelu),
            HAS_CLIP=clip_lo is not None, BITS=int(bits), SYMMETRIC=bool(symmetric), EPS=numerics.EPS, num_warps=4,
            enable_fp_fusion=False)
    lead = x.shape[:-1]
    return codes.reshape(x.shape), scale.reshape(*lead, -1), offset.reshape(*lead, -1)


_TL_DTYPES = {}
if HAS_TRITON:
    _TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def can_implement(work, target) -> tuple[bool, str]:
    """Whether these kernels run ``work`` (a :class:`qfx.backends.LinearWork`) on ``target``."""
    block = getattr(work, "act_block", None)
    if block is None:
        return False, "token-wise activations: the block-scaled Triton kernels take act_block only"
    if not HAS_TRITON:
        return False, "Triton is not installed (it comes with CUDA builds of torch)"
    if getattr(target, "device", "cuda") != "cuda":
        return False, f"target {getattr(target, 'name', target)} is not a GPU"
    if work.a_bits >= 16:
        return False, "weight-only linears have no activation blocks"
    try:
        _check_block(work.k, block, work.name)
    except ValueError as e:
        return False, str(e)
    return True, f"Triton block-scaled int8 tensor-core GEMM (act_block={block}, per-block fp32 promotion)"


class TritonBlockBackend:
    """The block-scaled Triton kernels as a planner backend (qfx.backends.backends_for)."""

    name = NAME

    def available(self) -> tuple[bool, str]:
        return (True, "Triton") if HAS_TRITON else (False, "Triton is not installed")

    def can_implement(self, work, target) -> tuple[bool, str]:
        return can_implement(work, target)


def rebind_block_ops(gm) -> int:
    """Bind every block-scaled ``qfx::int_linear`` / ``qfx::quantize`` of a planned graph to these
    kernels (``backend='triton'``) and unpack its int4 weights now (not inside a CUDA-graph
    capture); returns how many ops it bound. The interim planner step until ``qfx.passes.plan``
    asks ``LinearWork.act_block`` (then :class:`TritonBlockBackend` is chosen there)."""
    from qfx.schema import INT_LINEAR, QUANTIZE, arg, is_call, op_buffer, set_args

    bound = 0
    for node in gm.graph.nodes:
        if is_call(node, (INT_LINEAR, QUANTIZE)) and arg(node, "act_block") is not None:
            set_args(node, backend=NAME)
            if is_call(node, INT_LINEAR):
                _int8_weight(op_buffer(gm, node, "w"), arg(node, "w_bits"))
            bound += 1
    gm.recompile()
    return bound


def register() -> None:
    """Register the block-scaled forms of ``qfx::int_linear`` and ``qfx::quantize`` as backend 'triton'."""
    from qfx.ops import register_impl

    register_impl("int_linear", NAME, int_linear_blocks, blocks=True)
    register_impl("quantize", NAME, quantize_blocks, blocks=True)
