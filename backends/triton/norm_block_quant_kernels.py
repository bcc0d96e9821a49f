"""The Triton kernel of :mod:`qfx.backends.triton.norm_block_quant` (residual add + LayerNorm +
block-scaled quantize): the definition and the exactness contract are there. Imported on first use
(whether Triton interprets on the CPU, ``TRITON_INTERPRET=1``, is fixed when it is first imported)."""
from __future__ import annotations

import triton
import triton.language as tl

from qfx.backends.triton.block_gemm_kernels import _block_codes, _gelu_clip
from qfx.backends.triton.rotation_quant import _add_layer_norm_tile, _row_tile

__all__ = ["add_layer_norm_block_quantize_kernel"]


@triton.jit
def add_layer_norm_block_quantize_kernel(a_ptr, b_ptr, w_ptr, bias_ptr, y_ptr, q_ptr, qs_ptr, qc_ptr, M, K, ln_eps,
                                         clip_lo, clip_hi, HAS_B: tl.constexpr, B: tl.constexpr, NB: tl.constexpr,
                                         BLOCK: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
                                         HAS_CLIP: tl.constexpr, EPS: tl.constexpr):
    """``BLOCK`` whole rows as a ``[BLOCK, NB, B]`` tile (``NB`` = K / B rounded up to a power of two,
    padding masked): y = layer_norm(a + b) stored in a's dtype, then the codes of each (row, block)
    of that stored y, one scale / offset per (row, block)."""
    rows, cols, colmask, rowmask, mask, offs = _row_tile(M, K, B, NB, BLOCK)
    out_t = a_ptr.dtype.element_ty
    # the LayerNorm of the token-wise fused kernels (rotation_quant), in fp32: one definition, the same y
    y = _add_layer_norm_tile(a_ptr, b_ptr, w_ptr, bias_ptr, y_ptr, offs, mask, cols, colmask, K, ln_eps, HAS_B)
    # the block quantizer of qfx/numerics/ on what the graph stores (y in its dtype), one block per tile row
    v = _gelu_clip(tl.reshape(y.to(tl.float32), (BLOCK * NB, B)), out_t, False, HAS_CLIP, clip_lo, clip_hi, 0)
    codes, scale, offset = _block_codes(v, BITS, SYMMETRIC, EPS)
    tl.store(q_ptr + offs, tl.reshape(codes, (BLOCK, NB, B)).to(tl.int8), mask=mask)
    blk = tl.arange(0, NB)
    j = K // B
    soffs = rows[:, None].to(tl.int64) * j + blk[None, :]
    smask = rowmask[:, None] & (blk < j)[None, :]
    tl.store(qs_ptr + soffs, tl.reshape(scale, (BLOCK, NB)), mask=smask)
    tl.store(qc_ptr + soffs, tl.reshape(offset, (BLOCK, NB)), mask=smask)
