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
walked in 128-wide steps of the same int32 accumulator). The kernels live in
:mod:`qfx.backends.triton.block_gemm_kernels`, imported (with Triton) on first use.

Speed (benchmarks/RESULTS.md, H200): ~20 % of the INT8 peak at M >= 8192 with the tuned tiles,
0.3-0.6x the token-wise CUTLASS kernel. The promotion, not the MMA, bounds it: per output element
and K block, 6 CUDA-core operations in the definition's order (int -> fp32 as an integer add and an
fp32 subtract, the scale, the offset term's multiply and add, the accumulate) cost ~1.8x the
block's int8 wgmma time at peak, and ``tl.dot`` is waited on before its promotion, so the two never
overlap. A warp-specialised kernel (two consumer warpgroups, one promoting while the other's wgmma
runs) is bounded near 50 % (asymmetric) / 70 % (symmetric, 4 operations) by that count.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.weak import WeakIdKeyDictionary

from qfx import numerics
from qfx.backends.triton import HAS_TRITON, TunedTables

__all__ = ["HAS_TRITON", "CONFIGS", "BlockConfig", "config_for", "load_tuned", "erf_form", "int_linear_blocks", "int_linear_blocks_quantize",
           "quantize_blocks", "can_implement", "register", "TritonBlockBackend", "BlockLinearLauncher",
           "BlockLinearQuantizeLauncher"]

NAME = "triton"


@dataclass(frozen=True)
class BlockConfig:
    """One tile configuration: serves every M up to ``max_m`` (the last entry: any larger M)."""

    max_m: int
    block_m: int
    block_n: int
    warps: int
    stages: int
    #: tile rows launched together per column group (L2 reuse of the weight tiles)
    group_m: int = 8


#: tile configurations by M (first whose max_m >= M); BLOCK_K is the activation block. Small M: a
#: narrower tile keeps more CTAs busy; large M: 128 x 128 x 128 int8 tiles, 3 stages (96 KiB smem).
#: The fallback where no tuned entry (:data:`TUNED_FILES`) covers a shape.
CONFIGS = (
    BlockConfig(max_m=256, block_m=64, block_n=128, warps=4, stages=3),
    BlockConfig(max_m=1 << 62, block_m=128, block_n=128, warps=8, stages=3),
)
#: the widest K step of one tl.dot; a larger activation block takes several into one int32 accumulator
MAX_BLOCK_K = 128


#: measured per-shape choices (data written by ``benchmarks/gemm.py --block 128 --tuned-out``), by the
#: compute capability they were measured on; other GPUs (and the CPU interpreter) use :data:`CONFIGS`
TUNED_FILES = {(9, 0): Path(__file__).resolve().parent / "tuned_block_sm90.json"}
#: the kernels whose tiles are tuned: the plain block linear and the FFN-in producer (GEMM + quantize)
KINDS = ("linear", "quantize")


def load_tuned(path: Path) -> dict[tuple[str, int, int], list[BlockConfig]]:
    """A tuned table: ``{(kind, N, K): [BlockConfig by ascending max_m]}``; ValueError naming the entry
    that a kernel could not launch (a tile that is not a power of two, a kind that does not exist)."""
    table: dict[tuple[str, int, int], list[BlockConfig]] = {}
    for i, e in enumerate(json.loads(Path(path).read_text())["entries"]):
        cfg = BlockConfig(max_m=int(e["max_m"]), block_m=int(e["block_m"]), block_n=int(e["block_n"]),
                          warps=int(e["warps"]), stages=int(e["stages"]), group_m=int(e.get("group_m", 8)))
        if e["kind"] not in KINDS or any(v <= 0 or v & (v - 1) for v in (cfg.block_m, cfg.block_n, cfg.warps)):
            raise ValueError(f"{path}: entry {i} ({e}) is not a launchable block-kernel config: kind in {KINDS}, "
                             "block_m / block_n / warps powers of two")
        table.setdefault((e["kind"], int(e["n"]), int(e["k"])), []).append(cfg)
    return {key: sorted(cfgs, key=lambda c: c.max_m) for key, cfgs in table.items()}


#: the tuned tables, read once per device
_TUNED = TunedTables(TUNED_FILES, load_tuned, {})


def config_for(m: int, n: int | None = None, k: int | None = None, kind: str = "linear", device=None) -> BlockConfig:
    """The tile config for an ``[m, k] x [k, n]`` block GEMM of ``kind`` on ``device``: the tuned entry of
    that shape measured at the smallest M >= m (the largest measured M beyond), else :data:`CONFIGS` by M."""
    tuned = _TUNED.for_device(device).get((kind, n, k))
    if tuned:
        return next((c for c in tuned if m <= c.max_m), tuned[-1])
    return next(c for c in CONFIGS if m <= c.max_m)


def _kernels():
    """The kernel module (imports Triton on first use)."""
    if not HAS_TRITON:
        raise RuntimeError("block-scaled kernels need Triton (it comes with CUDA builds of torch); "
                           "on the CPU use the 'reference' backend")
    from qfx.backends.triton import block_gemm_kernels

    return block_gemm_kernels


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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


_ERF_FORMS: dict[tuple[str, int | None], int] = {}


def erf_form(device: torch.device) -> int:
    """The erf the GELU kernels compute on ``device`` (their ``ERF`` constexpr): the one torch's own
    ``erf`` / ``gelu`` computes there, found once per device by running both written-out forms of
    CUDA's erff (block_gemm_kernels) against ``torch.erf`` on inputs of both polynomial branches.
    Triton's own ``tl.math.erf`` is the libdevice Triton bundles, which need not be the one torch
    was built with (Triton 3.8's differs from nvcc 13.0's for |x| >= 1.003: the GELU of an fp32
    output then differed from the twin's in its last bit). On the CPU (Triton's interpreter) 0."""
    if device.type != "cuda":
        return 0
    key = (device.type, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _ERF_FORMS:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("block-scaled GELU kernels: the erf probe must run before CUDA-graph capture; "
                               "call the model once outside capture first")
        kernels = _kernels()
        x = torch.cat([torch.linspace(-8.0, 8.0, 1 << 16, device=device), torch.randn(1 << 16, device=device) * 3])
        want, got = torch.erf(x), torch.empty_like(x)
        for form in (1, 2):
            kernels.erf_probe_kernel[(_cdiv(x.numel(), 1024),)](x, got, x.numel(), ERF=form, BLOCK=1024,
                                                                enable_fp_fusion=False)
            if torch.equal(got, want):
                _ERF_FORMS[key] = form
                break
        else:
            raise RuntimeError(f"torch.erf on {device} is neither known form of CUDA's erff, so the block-scaled "
                               "GELU kernels cannot reproduce torch's GELU bit for bit; compile without act_block, "
                               "or report the torch / CUDA versions to qfx")
    return _ERF_FORMS[key]


def int_linear_blocks(a, a_scale, a_offset, w, w_bits, w_scale, w_block_sums, bias, gelu, out_dtype, a_bits, act_block,
                      symmetric: bool = False, config: BlockConfig | None = None):
    """``qfx::int_linear(..., act_block=B)`` on the GPU: equals
    :func:`qfx.numerics.int_linear_blocks_reference` bit for bit (``symmetric=True`` skips the offset
    term, which is exact when ``a_offset`` is zeros: the op itself always computes it). ``config``
    (the tuner's) replaces :func:`config_for`'s tile choice; tiles never change the result."""
    kernels = _kernels()
    a2, wq, sa, ca, sw, bs, block_k, sub, blocks, groups = _gemm_args(a, a_scale, a_offset, w, w_bits, w_scale,
                                                                      w_block_sums, act_block)
    m, n, k = a2.shape[0], wq.shape[0], a2.shape[1]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m:
        cfg = config or config_for(m, n, k, "linear", a.device)
        grid = (_cdiv(m, cfg.block_m) * _cdiv(n, cfg.block_n),)
        kernels.block_linear_kernel[grid](a2, wq, sa, ca, sw, bs, sw if bias is None else bias, out, m, n, k, blocks, groups,
                                   BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, SUB=sub,
                                   HAS_OFFSET=not symmetric, GROUPED=groups > 1, HAS_BIAS=bias is not None, GELU=bool(gelu),
                                   STAGES=cfg.stages, GROUP_M=cfg.group_m, ERF=erf_form(a.device) if gelu else 0,
                                   num_warps=cfg.warps, enable_fp_fusion=False)
    return out.reshape(*a.shape[:-1], n)


def int_linear_blocks_quantize(a, a_scale, a_offset, w, w_bits, w_scale, w_block_sums, bias, out_dtype, act_block,
                               bits: int, q_symmetric: bool, clip=None, gelu: bool = True, q_block: int | None = None,
                               symmetric: bool = False, config: BlockConfig | None = None):
    """The FFN-in producer: the codes of ``gelu(int_linear(...))`` (``gelu=False``: of the linear's
    output itself) in blocks of ``q_block`` (default ``act_block``) output columns, without
    writing the output: (codes [..., N] int8, scale [..., N / q_block], offset [..., N / q_block]).
    Equals ``quantize_activation(gelu(y), bits, q_symmetric, clip, block=q_block)`` of
    ``y = int_linear_blocks_reference(...).to(out_dtype)`` bit for bit."""
    kernels = _kernels()
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
        cfg = config or config_for(m, n, k, "quantize", a.device)
        lo, hi = (0.0, 0.0) if clip is None else (float(clip[0]), float(clip[1]))
        kernels.block_linear_quantize_kernel[(_cdiv(m, cfg.block_m) * (n // q_block),)](
            a2, wq, sa, ca, sw, bs, sw if bias is None else bias, codes, scale, offset, m, n, k, blocks, groups, lo, hi,
            OUT_T=kernels.TL_DTYPES[out_dtype], BLOCK_M=cfg.block_m, BLOCK_N=q_block, BLOCK_K=block_k, SUB=sub,
            HAS_OFFSET=not symmetric, GROUPED=groups > 1, HAS_BIAS=bias is not None, STAGES=cfg.stages,
            Q_GELU=bool(gelu), HAS_CLIP=clip is not None, BITS=int(bits), SYMMETRIC=bool(q_symmetric),
            EPS=numerics.EPS, GROUP_M=cfg.group_m, ERF=erf_form(a.device) if gelu else 0, num_warps=cfg.warps,
            enable_fp_fusion=False)
    lead = a.shape[:-1]
    return codes.reshape(*lead, n), scale.reshape(*lead, -1), offset.reshape(*lead, -1)


def quantize_blocks(x, bits, symmetric, clip_lo, clip_hi, gelu, act_block):
    """``qfx::quantize(..., act_block=B)`` on the GPU: equals ``numerics.quantize_activation(x, bits,
    symmetric, clip, gelu, block=B)`` bit for bit."""
    kernels = _kernels()
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
        kernels.quantize_blocks_kernel[(_cdiv(m, bm), k // act_block)](
            x2, codes, scale, offset, m, k, 0.0 if clip_lo is None else float(clip_lo),
            0.0 if clip_hi is None else float(clip_hi), BLOCK_M=bm, B=act_block, GELU=bool(gelu),
            HAS_CLIP=clip_lo is not None, BITS=int(bits), SYMMETRIC=bool(symmetric), EPS=numerics.EPS,
            ERF=erf_form(x.device) if gelu else 0, num_warps=4, enable_fp_fusion=False)
    lead = x.shape[:-1]
    return codes.reshape(x.shape), scale.reshape(*lead, -1), offset.reshape(*lead, -1)


def can_implement(work, target) -> tuple[bool, str]:
    """Whether these kernels run ``work`` (a :class:`qfx.backends.LinearWork`) on ``target``."""
    block = work.act_block
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


class BlockLinearLauncher:
    """``qfx::int_linear(..., act_block=B)`` bound at compile time: ``(a, a_scale, a_offset) -> y``
    (weights unpacked once; ``symmetric`` codes skip the offset term, exact for their zero offsets)."""

    def __init__(self, w, w_bits, w_scale, w_block_sums, bias, gelu, out_dtype, act_block, symmetric=False):
        self.w, self.w_scale = _int8_weight(w, w_bits), w_scale.float().contiguous()
        self.w_block_sums, self.bias = w_block_sums.float().contiguous(), bias
        self.gelu, self.out_dtype, self.act_block, self.symmetric = bool(gelu), out_dtype, int(act_block), bool(symmetric)

    def __call__(self, a, a_scale, a_offset):
        return int_linear_blocks(a, a_scale, a_offset, self.w, 8, self.w_scale, self.w_block_sums, self.bias, self.gelu,
                                 self.out_dtype, 8, self.act_block, symmetric=self.symmetric)


class BlockLinearQuantizeLauncher(BlockLinearLauncher):
    """The FFN-in producer bound at compile time: ``(a, a_scale, a_offset) -> (codes, scale, offset)`` of
    ``quantize(int_linear(...), ...)`` (:func:`int_linear_blocks_quantize`: the output is never written)."""

    def __init__(self, linear: BlockLinearLauncher, bits, q_symmetric, clip, q_gelu, q_block):
        self.__dict__.update(linear.__dict__)
        self.bits, self.q_symmetric, self.clip, self.q_gelu, self.q_block = int(bits), bool(q_symmetric), clip, bool(q_gelu), int(q_block)

    def __call__(self, a, a_scale, a_offset):
        return int_linear_blocks_quantize(a, a_scale, a_offset, self.w, 8, self.w_scale, self.w_block_sums, self.bias,
                                          self.out_dtype, self.act_block, self.bits, self.q_symmetric, self.clip,
                                          self.q_gelu, self.q_block, symmetric=self.symmetric)


def register() -> None:
    """Register the block-scaled forms of ``qfx::int_linear`` and ``qfx::quantize`` as backend 'triton'."""
    from qfx.ops import register_impl

    register_impl("int_linear", NAME, int_linear_blocks, blocks=True)
    register_impl("quantize", NAME, quantize_blocks, blocks=True)
