r"""The input rotation of :func:`qfx.numerics.rotate_blocks` as one Triton kernel (GPU).

:func:`qfx.numerics.rotate_blocks` is the definition: per token and block of ``b`` channels,
``y = fwht(x * s) * (1/sqrt(b))`` in fp32, log2(b) butterfly stages ``(u, v) -> (u + v, u - v)``
at strides 1, 2, 4, ..., then one rounding to the input dtype. In torch ops that is ~4 kernels
per stage over the whole tensor in fp32 (a BERT-base bucket of 128 x 128 tokens paid ~90 ms for
its 48 rotations). Here one program loads a ``[BLOCK_M, b]`` tile once, runs every stage in
registers and stores once: the same additions in the same order, so the result equals the torch
definition bit for bit (tested on the GPU) and, like it, does not depend on the number of rows.

Triton is optional (it comes with CUDA builds of torch): without it, or on the CPU,
:func:`rotate` is :func:`qfx.numerics.rotate_blocks`.
"""
from __future__ import annotations

import torch

from qfx.backends.triton import HAS_TRITON
from qfx.numerics import rotate_blocks, rotation_scale

__all__ = ["HAS_TRITON", "rotate", "rotate_triton"]

_KERNEL = None
#: rows per program: 32 rows x 128 fp32 channels = 16 KiB of registers per program over 4 warps
BLOCK_M = 32


def _kernel():
    """The Triton kernel, imported on first use (qfx.backends.triton.rotation_quant holds every rotation kernel
    at module level, where Triton finds the butterflies they share)."""
    global _KERNEL
    if _KERNEL is None:
        from qfx.backends.triton.rotation_quant import fwht_rows

        _KERNEL = fwht_rows
    return _KERNEL


def rotate_triton(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """:func:`qfx.numerics.rotate_blocks` (forward) in one Triton kernel; ``x`` [..., K] fp16,
    bf16 or fp32 (on a GPU, or on the CPU under ``TRITON_INTERPRET=1``)."""
    k = x.shape[-1]
    if block <= 0 or block & (block - 1) or k % block:
        raise ValueError(f"block={block!r} must be a power of two dividing the last dim {k}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x.dtype={x.dtype}: the kernel takes fp16, bf16 or fp32 (fp64 runs rotate_blocks)")
    flat = x.reshape(-1, k).contiguous()
    out = torch.empty_like(flat)
    m = flat.shape[0]
    if m:
        grid = (-(-m // BLOCK_M), k // block)
        _kernel()[grid](flat, signs.to(device=x.device, dtype=torch.float32).contiguous(), out, m, k,
                        rotation_scale(block), B=block, LOG_B=block.bit_length() - 1, BLOCK=BLOCK_M)
    return out.reshape(x.shape)


def rotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """``x @ R`` by the kernel on a GPU (when Triton is there), else by :func:`rotate_blocks`:
    the same bits either way."""
    if x.is_cuda and HAS_TRITON and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return rotate_triton(x, signs, block)
    return rotate_blocks(x, signs, block)
