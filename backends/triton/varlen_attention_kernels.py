"""The Triton kernel of :mod:`qfx.backends.triton.varlen_attention` (attention over packed real
tokens with short query tiles): the contract and the reason for short tiles are there. Imported on
first use (whether Triton interprets on the CPU, ``TRITON_INTERPRET=1``, is fixed when it is first
imported)."""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["varlen_attention_kernel"]


@triton.jit
def varlen_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, q_row, k_row, v_row, o_row, qk_scale_log2,
                            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: query rows [tile * BLOCK_M, +BLOCK_M) of sequence ``seq``, head ``head``;
    online softmax in base 2 over key blocks of BLOCK_N, fp32 statistics and accumulator, the
    products on tensor cores in the input dtype. Programs past a sequence's end return at once."""
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_ptr + seq)
    length = tl.load(cu_ptr + seq + 1) - start
    if tile * BLOCK_M < length:
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, HEAD_DIM)
        row_ok = rows < length
        base = start.to(tl.int64)
        q = tl.load(q_ptr + (base + rows)[:, None] * q_row + head * HEAD_DIM + cols[None, :], mask=row_ok[:, None],
                    other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for key0 in range(0, length, BLOCK_N):
            keys = key0 + tl.arange(0, BLOCK_N)
            key_ok = keys < length
            k = tl.load(k_ptr + (base + keys)[:, None] * k_row + head * HEAD_DIM + cols[None, :], mask=key_ok[:, None],
                        other=0.0)
            v = tl.load(v_ptr + (base + keys)[:, None] * v_row + head * HEAD_DIM + cols[None, :], mask=key_ok[:, None],
                        other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale_log2
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + (base + rows)[:, None] * o_row + head * HEAD_DIM + cols[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
