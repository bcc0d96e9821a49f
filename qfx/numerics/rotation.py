"""Block-Hadamard input rotation (QuaRot-style, online), written once: the rotation pass, the
Triton kernels and the tests import these."""
from __future__ import annotations

import functools
import math

import torch

__all__ = ["rotation_signs", "hadamard_matrix", "rotation_matrix", "rotation_scale", "rotate_blocks"]

# -- input rotation (QuaRot-style, online) ----------------------------------------------------------
#
# A quantized linear may read its input rotated: ``y = quant(x R) @ quant(W R)^T + b``, which
# equals ``x W^T + b`` in exact arithmetic for any orthogonal ``R`` (``R R^T = I``). What changes
# is the distribution of the quantized tensors: a BERT LayerNorm output carries a few outlier
# channels that make token-wise 4-bit codes of every other channel collapse to 0 or +-1; the
# rotation spreads each outlier over its block, so the token's range shrinks and the codes carry
# information again (QuaRot, Ashkboos et al. 2024; here online, because a post-LN encoder's
# residual stream passes through LayerNorms that do not commute with a rotation).
#
#     R = diag(s) . blockdiag(H_b, ..., H_b) / sqrt(b)      [K, K], K % b == 0
#
# ``s`` in {-1, +1}^K is a fixed pseudo-random sign vector (a function of K alone, the same on
# every machine and torch version: splitmix64), ``H_b`` Sylvester's Hadamard matrix of a power
# of two ``b`` (entries +-1). Online, per token and block, by the fast Walsh-Hadamard transform:
# log2(b) stages of pairwise sums and differences in fp32 (fp64 for fp64 inputs), then one
# multiplication by ``1/sqrt(b)`` (fp32) and one rounding to the input's dtype. Why not a GEMM
# by ``H_b``: a GEMM's summation order depends on the kernel the library picks for the number
# of rows, so the same token would round differently in the QAT graph (its batch) and in the
# compiled graph (a padded bucket). The transform is a fixed sequence of IEEE additions: one
# token's result is the same bits at any batch size, on the CPU and on a GPU.

_SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
_U64 = (1 << 64) - 1


def rotation_signs(k: int) -> torch.Tensor:
    """The sign vector ``s`` [k] (fp32, entries +-1) of the input rotation of width ``k``:
    deterministic (splitmix64 seeded by ``k``), so a model rotated at ``prepare_qat`` time and
    the graph ``compile`` rebuilds use the same rotation."""
    if k <= 0:
        raise ValueError(f"k={k!r}: a rotation needs a positive width")
    state = (_SPLITMIX_GAMMA * (k + 1)) & _U64
    out = []
    for _ in range(k):
        state = (state + _SPLITMIX_GAMMA) & _U64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
        z ^= z >> 31
        out.append(1.0 if z >> 63 else -1.0)
    return torch.tensor(out, dtype=torch.float32)


def hadamard_matrix(b: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix ``H_b`` [b, b] in fp64 (entries +-1, ``H H^T = b I``, symmetric),
    ``b`` a power of two."""
    if b <= 0 or b & (b - 1):
        raise ValueError(f"b={b!r}: a Sylvester Hadamard matrix needs a power-of-two size")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotation_matrix(k: int, block: int) -> torch.Tensor:
    """The dense orthogonal ``R`` [k, k] (fp64) that :func:`rotate_blocks` applies: what the
    weights are multiplied by (``W <- W R``) and what tests compare against."""
    if k % block:
        raise ValueError(f"rotation block {block} does not divide K={k}")
    h = hadamard_matrix(block) / math.sqrt(block)
    return rotation_signs(k).double().unsqueeze(1) * torch.block_diag(*([h] * (k // block)))


@functools.lru_cache(maxsize=None)
def rotation_scale(block: int) -> float:
    """``1/sqrt(block)`` rounded to fp32 (returned as the Python float of that fp32 value): the
    one normalisation both :func:`rotate_blocks` and the GPU kernel multiply by."""
    return float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32))


def _walsh_hadamard(y: torch.Tensor, b: int) -> torch.Tensor:
    """``H_b`` applied to every consecutive block of ``b`` in the last dim (unnormalized), by
    log2(b) butterfly stages: at stride ``h`` the pair ``(u, v)`` becomes ``(u + v, u - v)``."""
    shape = y.shape
    rows = y.reshape(-1, shape[-1] // b, b)
    h = 1
    while h < b:
        pairs = rows.unflatten(-1, (b // (2 * h), 2, h))
        u, v = pairs[..., 0, :], pairs[..., 1, :]
        rows = torch.stack((u + v, u - v), dim=-2).flatten(-3)
        h *= 2
    return rows.reshape(shape)


def rotate_blocks(x: torch.Tensor, signs: torch.Tensor, block: int, transpose: bool = False) -> torch.Tensor:
    """``x @ R`` (or ``x @ R^T`` with ``transpose``) over the last dim, returned in ``x``'s dtype:
    ``signs`` = :func:`rotation_signs` (fp32), ``block`` the power-of-two ``b``. Computed in fp32
    (fp64 for fp64 ``x``) by the fast Walsh-Hadamard transform, so each token's result does not
    depend on how many tokens are rotated with it (see the section comment). The one
    implementation: the QAT graph and every compiled graph run it (``qfx::rotate``)."""
    if block <= 0 or block & (block - 1) or x.shape[-1] % block:
        raise ValueError(f"block={block!r} must be a power of two dividing the last dim {x.shape[-1]}")
    work = torch.promote_types(x.dtype, torch.float32)
    s = signs.to(work)
    scale = rotation_scale(block)  # an fp32 value: exact in fp32 and in fp64
    y = x.to(work)
    if transpose:
        y = _walsh_hadamard(y, block) * scale * s
    else:
        y = _walsh_hadamard(y * s, block) * scale
    return y.to(x.dtype)


