r"""Weight-only 4-bit linears for decoding: ``y = x @ W_hat^T + b`` with ``W_hat`` decoded from
packed 4-bit codes, either by a fused Triton kernel or by an unfused dequantize + matmul.

Storage (what :class:`qfx.decoders.QuantizedLinear` holds, :mod:`qfx.numerics` layout):
``codes [N, K/2]`` uint8, code ``2i`` in the low nibble and ``2i+1`` in the high nibble;
``scale [N, K/g]`` fp32 per block of ``g`` input channels; for ``int4_asym`` also ``offset``
``[N, K/g]``. Every format decodes as

    W_hat[n, k] = table[nibble(n, k)] * scale[n, k // g]  (+ offset[n, k // g])

with ``table`` [16] fp32 (:func:`code_table`): the two's-complement values ``0..7, -8..-1`` for
int4 / int4_asym (qfx's signed codes), the NF4 / FP4 tables for nf4 / fp4. That single fp32
product (plus the offset) is exactly what :func:`qfx.numerics.decode_weight` computes, so the
weight tile a kernel multiplies with equals ``QuantizedLinear.weight_hat`` cast to the input's
dtype bit for bit; only the order of the K summation differs (tested).

* :func:`dequantize_packed`: the unfused path in torch ops (any device): decode the whole weight
  to the activation dtype, then ``F.linear`` (cuBLAS on a GPU). Its cost is one extra pass over a
  full-size fp16 weight per call: slower than fp16 at decode, the honest fallback.
* :func:`weight_only_linear`: one Triton kernel that reads the 4-bit codes and the block scales,
  decodes a ``[BLOCK_N, BLOCK_K]`` tile in registers and feeds ``tl.dot`` (fp32 accumulation):
  the weight crosses memory at ~4.5 bits per parameter, which is what can beat fp16 at decode
  (M = 1..64, memory-bound). On CPU tensors it runs under Triton's interpreter (tests only).

Triton is optional: without it :data:`HAS_TRITON` is False and :func:`weight_only_linear` raises
with the fix; nothing else here needs it.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from qfx import numerics as nx
from qfx.backends.triton import HAS_TRITON

triton = tl = None  # bound by _import_triton()

__all__ = ["HAS_TRITON", "code_table", "dequantize_packed", "weight_only_linear", "benchmark_weight_only_linear",
           "LAUNCH_CONFIGS"]


def code_table(fmt: str) -> torch.Tensor:
    """``[16]`` fp32: the value of each 4-bit code of ``fmt`` before scaling (see the module docstring)."""
    nx.formats._check_format(fmt)
    if fmt in ("int4", "int4_asym"):
        return torch.tensor([float(v) for v in range(8)] + [float(v) for v in range(-8, 0)])
    return nx.nf4_code() if fmt == "nf4" else nx.fp4_code()


def _check_packed(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, k: int) -> int:
    """Validate the packed layout; returns the block size ``g``."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes must be packed [N, K/2] uint8, got {tuple(codes.shape)} {codes.dtype}")
    n = codes.shape[0]
    if codes.shape[1] * 2 != k:
        raise ValueError(f"codes [N, K/2] = {tuple(codes.shape)} do not match K={k}")
    if scale.dim() != 2 or scale.shape[0] != n or k % scale.shape[1]:
        raise ValueError(f"scale must be [N, K/g] = [{n}, K/g] with g dividing K={k}, got {tuple(scale.shape)}")
    g = k // scale.shape[1]
    if g % 2:
        raise ValueError(f"block size g={g} must be even: two codes share a byte and a block")
    if offset is not None and offset.shape != scale.shape:
        raise ValueError(f"offset {tuple(offset.shape)} must have the shape of scale {tuple(scale.shape)}")
    return g


def dequantize_packed(codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor,
                      offset: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W_hat [N, K]`` in ``dtype`` from packed codes ``[N, K/2]``, ``table [16]`` and block parameters.

    Equals ``qfx.numerics.dequantize_weight_4bit(...).to(dtype)`` exactly (tested).

    Example::

        >>> wq = nx.quantize_weight_4bit(torch.randn(8, 64), "nf4")
        >>> w = dequantize_packed(nx.pack_uint4(wq.codes), code_table("nf4"), wq.scale)
        >>> torch.equal(w, nx.dequantize_weight_4bit(wq))
        True
    """
    k = codes.shape[-1] * 2
    g = _check_packed(codes, scale, offset, k)
    nib = torch.stack((codes & 0x0F, codes >> 4), dim=-1).reshape(codes.shape[0], k // g, g)
    vals = table.to(codes.device)[nib.int()] * scale.float().unsqueeze(-1)
    if offset is not None:
        vals = vals + offset.float().unsqueeze(-1)
    return vals.reshape(codes.shape[0], k).to(dtype)


# ----------------------------------------------------------------------------- the fused kernel
# Launch configurations by the largest M each serves (data, not code). Decode (M <= 16) is
# memory-bound: narrow N tiles (32) give 128 programs at N = 4096, enough to keep an H100's 132
# SMs streaming codes; a long K tile (256 codes = 128 bytes per row) makes each load one full
# cache line. The M <= 64 row still fits tl.dot's 16-row minimum; beyond it the fused kernel
# works but the unfused dequantize + cuBLAS path is the better choice (compute-bound).
LAUNCH_CONFIGS: tuple[tuple[int, dict], ...] = (
    (16, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4)),
    (64, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4)),
    (1 << 62, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8)),
)


def _w4_linear_kernel(x_ptr, codes_ptr, table_ptr, scale_ptr, offset_ptr, bias_ptr, y_ptr,
                      M, N, K, n_groups, group_size, stride_xm, stride_ym,
                      HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, SIGNED_INT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # x is split into its even and odd input channels so that each packed byte's low nibble
    # (code 2i) meets x[:, 2i] and its high nibble (code 2i+1) meets x[:, 2i+1]: no interleave.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, BLOCK_K // 2)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_even = k0 + 2 * rj
        k_ok = k_even < K
        w_ok = n_ok[:, None] & k_ok[None, :]
        packed = tl.load(codes_ptr + rn[:, None] * (K // 2) + (k_even // 2)[None, :], mask=w_ok, other=0)
        lo = (packed & 0xF).to(tl.int32)
        hi = (packed >> 4).to(tl.int32)
        block = rn[:, None] * n_groups + (k_even // group_size)[None, :]  # codes 2i and 2i+1 share a block (g even)
        s = tl.load(scale_ptr + block, mask=w_ok, other=0.0)
        if SIGNED_INT:  # int4 codes: two's-complement nibbles, sign-extended without a table lookup
            w_lo = ((lo ^ 8) - 8).to(tl.float32) * s
            w_hi = ((hi ^ 8) - 8).to(tl.float32) * s
        else:
            w_lo = tl.load(table_ptr + lo) * s
            w_hi = tl.load(table_ptr + hi) * s
        if HAS_OFFSET:
            c = tl.load(offset_ptr + block, mask=w_ok, other=0.0)
            w_lo = w_lo + c
            w_hi = w_hi + c
        x_ok = m_ok[:, None] & k_ok[None, :]
        x_even = tl.load(x_ptr + rm[:, None] * stride_xm + k_even[None, :], mask=x_ok, other=0.0)
        x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + (k_even + 1)[None, :], mask=x_ok, other=0.0)
        w_lo = w_lo.to(x_even.dtype)
        w_hi = w_hi.to(x_even.dtype)
        if IEEE:
            acc += tl.dot(x_even, tl.trans(w_lo), input_precision="ieee")
            acc += tl.dot(x_odd, tl.trans(w_hi), input_precision="ieee")
        else:
            acc += tl.dot(x_even, tl.trans(w_lo))
            acc += tl.dot(x_odd, tl.trans(w_hi))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


_COMPILED: list = []


def _kernel():
    """``triton.jit(_w4_linear_kernel)``, built once (interpreted when TRITON_INTERPRET=1 was set
    before Triton was first imported)."""
    if not _COMPILED:
        _COMPILED.append(triton.jit(_w4_linear_kernel))
    return _COMPILED[0]


def _import_triton() -> None:
    global triton, tl
    if not HAS_TRITON:
        raise RuntimeError("weight_only_linear needs Triton (pip install triton; it ships with CUDA builds of "
                           "torch); use QuantizedLinear's weight_path='dequant' (dequantize + matmul) instead")
    import triton
    import triton.language as tl


def weight_only_linear(x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, scale: torch.Tensor,
                       offset: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       signed_int: bool = False) -> torch.Tensor:
    """Fused ``x @ W_hat^T + bias`` (Triton): ``x [..., K]`` fp16 / bf16 / fp32 -> ``[..., N]`` in x's dtype.

    ``codes [N, K/2]`` uint8, ``table [16]`` fp32 (:func:`code_table`), ``scale`` / ``offset``
    ``[N, K/g]`` fp32 on x's device. fp32 inputs are multiplied in IEEE fp32 (no TF32).
    ``signed_int=True`` (int4 / int4_asym) decodes the codes as two's-complement nibbles instead of
    looking them up in ``table`` (the same values: :func:`code_table`; one gather fewer per code).

    Example::

        >>> y = weight_only_linear(x16, layer.codes, layer.code_table, layer.block_scale)
    """
    _import_triton()
    k = x.shape[-1]
    g = _check_packed(codes, scale, offset, k)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    devices = {t.device for t in (x, codes, table, scale, offset, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"x, codes, table, scale, offset and bias must be on one device, got {sorted(map(str, devices))}")
    n = codes.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    cfg = next(c for limit, c in LAUNCH_CONFIGS if m <= limit)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        raise ValueError(f"weight_only_linear on {x.device.type} tensors runs only under Triton's interpreter: set "
                         f"TRITON_INTERPRET=1 before triton is first imported (tests), or move the tensors to a GPU")
    scale32 = scale.float().contiguous()
    _kernel()[grid](
        x2, codes.contiguous(), table.float().contiguous(), scale32,
        scale32 if offset is None else offset.float().contiguous(),  # unread unless HAS_OFFSET
        y if bias is None else bias.contiguous(), y,                 # unread unless HAS_BIAS
        m, n, k, k // g, g, x2.stride(0), y.stride(0),
        HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        SIGNED_INT=bool(signed_int), **cfg)
    return y.reshape(*x.shape[:-1], n)


def _time_cuda(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    """Median seconds of one call of ``fn`` (``triton.testing.do_bench``: the L2 cache is flushed
    before each timed call, so the weights come from HBM as in a real decode step, and the flush
    hides the host's launch overhead)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=repeats, return_mode="median") / 1e3


def benchmark_weight_only_linear(shapes: Sequence[tuple[int, int, int]], fmt: str = "nf4", block_size: int = 64,
                                 repeats: int = 50, device: str = "cuda") -> list[dict]:
    """Time ``[M, K] x [N, K]^T`` (fp16) three ways on a GPU: fp16 ``F.linear`` (cuBLAS), unfused
    dequantize + ``F.linear``, and the fused Triton kernel (``repeats``: milliseconds of timed calls
    per measurement, :func:`triton.testing.do_bench`'s ``rep``). Returns one dict per (M, N, K) with
    microseconds, GB/s of weight traffic and the fused kernel's max abs error against the
    dequantize + matmul result (same weights).

    Example::

        >>> benchmark_weight_only_linear([(1, 4096, 4096), (16, 4096, 4096)])
    """
    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        raise RuntimeError("benchmark_weight_only_linear times CUDA kernels: run it on a machine with a GPU")
    _import_triton()
    table = code_table(fmt).to(device)
    rows = []
    for m, n, k in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        w = torch.randn(n, k, device=device, generator=gen) * 0.02
        x = torch.randn(m, k, device=device, generator=gen).half()
        wq = nx.quantize_weight_4bit(w, fmt, block_size)
        codes = nx.pack_int4(wq.codes) if wq.codes.dtype == torch.int8 else nx.pack_uint4(wq.codes)
        scale, offset = wq.scale, wq.offset
        w16 = w.half()
        t_fp16 = _time_cuda(lambda: F.linear(x, w16), repeats)
        t_deq = _time_cuda(lambda: F.linear(x, dequantize_packed(codes, table, scale, offset, torch.float16)), repeats)
        signed = fmt.startswith("int4")
        t_fused = _time_cuda(lambda: weight_only_linear(x, codes, table, scale, offset, signed_int=signed), repeats)
        ref = F.linear(x, dequantize_packed(codes, table, scale, offset, torch.float16)).float()
        err = (weight_only_linear(x, codes, table, scale, offset, signed_int=signed).float() - ref).abs().max().item()
        q_bytes = codes.numel() + 4 * scale.numel() * (1 if offset is None else 2)
        rows.append({"M": m, "N": n, "K": k, "fmt": fmt, "fp16_us": t_fp16 * 1e6, "dequant_matmul_us": t_deq * 1e6,
                     "fused_us": t_fused * 1e6, "fused_speedup_vs_fp16": t_fp16 / t_fused,
                     "fp16_weight_GBps": 2 * n * k / t_fp16 / 1e9, "fused_weight_GBps": q_bytes / t_fused / 1e9,
                     "fused_max_abs_err": err, "ref_max_abs": ref.abs().max().item()})
    return rows
