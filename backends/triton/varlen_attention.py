"""Attention over packed real tokens (``cu_seqlens`` segments) with short query tiles, for short sequences.

The contract is :func:`qfx.passes.attention.packed_attention`'s: row ``t`` of sequence ``b`` (rows
``cu_seqlens[b] .. cu_seqlens[b+1] - 1``) attends to every row of its sequence and nothing else; rows
past ``cu_seqlens[-1]`` are left unwritten. fp16 / bf16, a float part like any attention kernel:
compared with the padded model's SDPA within fp16 rounding, never claimed bit for bit.

Why a kernel of our own beside FlashAttention-2's varlen path: FA2 gives every sequence a whole
128-row query tile and one program per (sequence, head), so a BERT batch of sequences of 32-128
tokens pays nearly what the padded batch pays (benchmarks/RESULTS.md, the pad sweep's profile:
0.48-0.65 ms per forward against the padded cuDNN kernel's 0.55). Here the query tile is
``BLOCK_M`` rows (64 in the measured tables): a sequence of L tokens takes ceil(L / BLOCK_M) programs per head, each
of which reads its sequence's keys and values once, and the programs past a sequence's end exit on
their first instruction. Which kernel runs which ``max_seqlen`` is data: a table per GPU
(:data:`TUNED_FILES`) written by ``python benchmarks/attention.py --varlen --tuned-out``, which times
the tiles against FlashAttention's varlen kernel per sequence length (:data:`CHOICES` elsewhere).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch

from qfx.backends.triton import HAS_TRITON, TunedTables

__all__ = ["HAS_TRITON", "Tiles", "CHOICES", "TUNED_FILES", "load_tuned", "choose", "flash_only", "can_run", "varlen_attention"]

_KERNEL = None


class Tiles(NamedTuple):
    """One launch of the kernel: query rows, key rows per step, warps."""

    block_m: int
    block_n: int
    warps: int

    def __repr__(self) -> str:
        return f"m{self.block_m}n{self.block_n}w{self.warps}"


#: (largest max_seqlen, tiles or None): the first row whose bound holds decides (None: FlashAttention's varlen
#: kernel); a call past every row runs FlashAttention's. The fallback where no tuned table
#: (:data:`TUNED_FILES`) covers the GPU: short sequences take 64-row query tiles.
CHOICES: tuple[tuple[int, Tiles | None], ...] = ((128, Tiles(64, 64, 4)),)
#: measured choices (data written by ``benchmarks/attention.py --varlen --tuned-out``), by the compute
#: capability they were measured on
TUNED_FILES = {(9, 0): Path(__file__).resolve().parent / "tuned_varlen_sm90.json"}
_FLASH_ONLY = [False]
_DTYPES = (torch.float16, torch.bfloat16)


def load_tuned(path: Path) -> tuple[tuple[int, Tiles | None], ...]:
    """A tuned table as :data:`CHOICES` rows, ascending by bound; ValueError naming an entry the kernel
    could not launch."""
    rows = []
    for i, e in enumerate(json.loads(Path(path).read_text())["entries"]):
        if e["kernel"] == "flash":
            rows.append((int(e["max_seqlen"]), None))
            continue
        tiles = Tiles(int(e["block_m"]), int(e["block_n"]), int(e["warps"]))
        if e["kernel"] != "short" or any(v <= 0 or v & (v - 1) for v in tiles) or min(tiles[:2]) < 16:
            raise ValueError(f"{path}: entry {i} ({e}) is not a launchable choice: kernel 'short' or 'flash', "
                             "block_m / block_n powers of two >= 16, warps a power of two")
        rows.append((int(e["max_seqlen"]), tiles))
    return tuple(sorted(rows, key=lambda r: r[0]))


#: the tuned tables, read once per device (CHOICES where none covers it)
_TUNED = TunedTables(TUNED_FILES, load_tuned, CHOICES)


def choose(max_seqlen: int, device=None) -> Tiles | None:
    """The tiles that run a call of this ``max_seqlen`` on ``device`` (None: FlashAttention's varlen kernel)."""
    if _FLASH_ONLY[0]:
        return None
    return next((tiles for bound, tiles in _TUNED.for_device(device) if max_seqlen <= bound), None)


@contextlib.contextmanager
def flash_only():
    """Within: every call runs FlashAttention's varlen kernel (to measure the choice against it; a CUDA
    graph captured within keeps that kernel)."""
    saved, _FLASH_ONLY[0] = _FLASH_ONLY[0], True
    try:
        yield
    finally:
        _FLASH_ONLY[0] = saved


def can_run(q: torch.Tensor, head_dim: int) -> tuple[bool, str]:
    """(ok, reason) for packed ``q`` of this dtype and device with heads of ``head_dim``."""
    d = head_dim
    if not HAS_TRITON:
        return False, "Triton is not installed"
    if q.dtype not in _DTYPES:
        return False, f"dtype {q.dtype}: the kernel takes fp16 / bf16"
    if d < 16 or d > 128 or d & (d - 1):
        return False, f"head dim {d}: the kernel takes a power of two in [16, 128]"
    if not (q.is_cuda or (q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        return False, "the kernel runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1)"
    return True, ""


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        from qfx.backends.triton.varlen_attention_kernels import varlen_attention_kernel

        _KERNEL = varlen_attention_kernel
    return _KERNEL


def _rows(x: torch.Tensor, d: int) -> torch.Tensor:
    """``x`` as [T, H, D] whose heads are contiguous within a row (any row stride: a slice of a
    fused q/k/v GEMM output is taken as it is)."""
    if x.stride(-1) != 1 or x.stride(-2) != d:
        x = x.contiguous()
    return x


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     scale: float | None = None, tiles: Tiles | None = None) -> torch.Tensor:
    """[T, H, D] attention within each ``cu_seqlens`` segment (int32 [B + 1]; segment lengths at most
    ``max_seqlen``); ``tiles`` default to :func:`choose`'s. Returns a new [T, H, D] tensor."""
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v have shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}; expected the same "
                         "[T, heads, head_dim]")
    t, heads, d = q.shape
    ok, why = can_run(q, d)
    if not ok:
        raise ValueError(f"varlen_attention: {why}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: expected one")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens: {tuple(cu_seqlens.shape)} {cu_seqlens.dtype} on {cu_seqlens.device}; expected "
                         f"[batch + 1] int32 on {q.device}")
    batch = cu_seqlens.numel() - 1
    if batch > 65535:
        raise ValueError(f"cu_seqlens holds {batch} sequences; the kernel's grid takes at most 65535 per call")
    tiles = tiles or choose(max_seqlen, q.device) or Tiles(64, 64, 4)
    q, k, v = (_rows(x, d) for x in (q, k, v))
    out = torch.empty((t, heads, d), dtype=q.dtype, device=q.device)
    if t == 0 or batch == 0 or max_seqlen == 0:
        return out
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    block_m, block_n, warps = tiles
    grid = (-(-max_seqlen // block_m), batch, heads)
    _kernel()[grid](q, k, v, out, cu_seqlens, q.stride(0), k.stride(0), v.stride(0), out.stride(0),
                    scale * math.log2(math.e), HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return out
