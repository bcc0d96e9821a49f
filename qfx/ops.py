"""The integer ops of qfx, declared once with torch.library.

Each op takes a ``backend`` name as its last argument. Lowering emits ops with
``backend="reference"`` (target independent, runs anywhere torch runs); planning for a GPU
target rewrites that argument to the backend chosen per linear (``"cutlass"``). Backends
plug their implementations in with :func:`register_impl`; nothing else defines ops.

Every op has a fake (meta) implementation, so lowered graphs can be exported, compiled with
torch.compile and captured in CUDA graphs.

Ops (shapes; ``...`` are leading token dims, flattened to M inside kernels)::

    qfx::quantize(x [..., K] float, bits, symmetric, clip_lo, clip_hi, backend, gelu=False,
                  act_block=None)
        -> (codes [..., K] int8, scale [...] f32, offset [...] f32)
                                     (gelu: the codes of gelu(x), GELU in x's dtype as torch's;
                                      act_block=B: block-scaled, scale/offset [..., K / B])
    qfx::int_matmul(a [M, K] int8, b [N, K] int8, backend) -> [M, N] int32
    qfx::int_linear(a [..., K] int8, a_scale [...], a_offset [...], w, w_bits,
                    w_scale [N, G], w_offset_sum [N], bias [N]?, gelu, out_dtype, a_bits, backend,
                    act_block=None)
        -> [..., N] out_dtype        (w: int8 [N, K], or uint8 [N, K/2] packed when w_bits=4;
                                      a_bits says the codes of a fit 4 bits, so a kernel may
                                      run them on INT4 tensor cores. act_block=B: block-scaled
                                      codes, a_scale/a_offset [..., K / B], and w_offset_sum
                                      holds the block code sums [N, K / B]:
                                      qfx.numerics.int_linear_blocks_reference)

Block-scaled calls (``act_block`` not None) dispatch to the implementations a backend
registers with ``register_impl(op, backend, fn, blocks=True)`` (called with ``act_block`` as
the last argument); a backend without one is an error naming ``act_block``, never a silent
token-wise or float run.
    qfx::weight_only_linear(x [..., K] float, w, w_bits, w_scale [N, G], bias [N]?, backend)
        -> [..., N] x.dtype
    qfx::add_layer_norm_quantize(a [..., K], b [..., K]?, weight [K], bias [K], eps, bits,
                                 symmetric, clip_lo, clip_hi, backend, act_block=None)
        -> (y = layer_norm(a + b) [..., K] a.dtype, codes, scale [...], offset [...])
                                     (the codes are those of quantize(y): a fused producer;
                                      act_block=B: block-scaled, scale/offset [..., K / B])
    qfx::add_layer_norm_rotate_quantize(a, b?, weight, bias, eps, signs [K] f32, block, bits,
                                        symmetric, clip_lo, clip_hi, backend)
        -> (y = layer_norm(a + b), codes, scale, offset)
                                     (the codes are those of quantize(rotate(y, signs, block)):
                                      the fused producer of a rotated LayerNorm reader)

The semantics are those of :mod:`qfx.numerics` (``quantize_activation``,
``int_matmul_reference``, ``int_linear_reference``).

Input rotation (:mod:`qfx.passes.rotate_inputs`), plain torch on every device, no ``backend``::

    qfx::rotate(x [..., K] float, signs [K] f32, block: int) -> [..., K] x.dtype
        x @ R with R = diag(signs) blockdiag(H_block) / sqrt(block) (qfx.numerics.rotate_blocks,
        the same bits at any batch size); trains (its gradient is g @ R^T)

Token layout ops (padding removal, :mod:`qfx.passes.unpad`). They move rows, never change a
value, and are the same plain torch on every device, so they take no ``backend`` and are
implemented here (:func:`token_rows`, :func:`gather_tokens`, :func:`scatter_tokens`; the
runtime binds these functions directly, without the dispatcher)::

    qfx::token_index(attention_mask [B, S], capacity: int?) -> (gather [T'], scatter [T'])
        the flat indices b * S + s of the real tokens (mask != 0) in row-major order. With
        ``capacity=None`` T' = T, the number of real tokens (a data-dependent size: one device
        sync on a GPU), or T' = 1 when T = 0. With ``capacity=C`` (C >= T) T' = C and no sync:
        the C - T extra entries are dummies, ``gather`` = B*S - 1 (any valid row) and
        ``scatter`` = B*S (a trash row that repad drops).
    qfx::pack_tokens(x [B, S, *F], gather [T']) -> [1, T', *F]       x.flatten(0, 1)[gather]
    qfx::repad_tokens(x [1, T', *F], scatter [T'], like [B, S, ...]) -> [B, S, *F]
        zeros, with row scatter[t] = x[0, t] (the trash row B*S is dropped)
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor

from qfx.numerics import rotate_blocks

__all__ = ["register_impl", "registered_backends", "OPS", "BLOCK_OPS", "TOKEN_LAYOUT_OPS", "token_rows", "gather_tokens", "scatter_tokens"]

#: (op name, backend name) -> implementation with the op's signature minus ``backend``.
_IMPLS: dict[tuple[str, str], Callable] = {}
#: (op name, backend name) -> implementation of the block-scaled form (``act_block`` set)
_BLOCK_IMPLS: dict[tuple[str, str], Callable] = {}
#: the ops with a block-scaled form
BLOCK_OPS = ("quantize", "int_linear", "add_layer_norm_quantize")
OPS = ("quantize", "int_matmul", "int_linear", "weight_only_linear", "add_layer_norm_quantize",
       "add_layer_norm_rotate_quantize")
#: the token layout ops (no backend): see the module doc
TOKEN_LAYOUT_OPS = ("token_index", "pack_tokens", "repad_tokens")


def register_impl(op: str, backend: str, fn: Callable, blocks: bool = False) -> None:
    """Make ``fn`` the implementation of ``qfx::<op>`` when called with ``backend`` (``blocks``:
    of its block-scaled form, called with ``act_block`` as the last argument)."""
    if op not in (BLOCK_OPS if blocks else OPS):
        raise ValueError(f"register_impl: unknown op {op!r}{' (blocks=True)' if blocks else ''}; "
                         f"qfx declares {BLOCK_OPS if blocks else OPS}")
    (_BLOCK_IMPLS if blocks else _IMPLS)[(op, backend)] = fn


def registered_backends(op: str, blocks: bool = False) -> list[str]:
    return sorted(b for (o, b) in (_BLOCK_IMPLS if blocks else _IMPLS) if o == op)


def _impl(op: str, backend: str, act_block: int | None = None) -> Callable:
    """The implementation of ``qfx::<op>`` for ``backend`` (of its block-scaled form when
    ``act_block`` is set); a missing one is an error that says what to do instead."""
    blocks = act_block is not None
    try:
        return (_BLOCK_IMPLS if blocks else _IMPLS)[(op, backend)]
    except KeyError:
        if blocks:
            why = (f"qfx::{op} with act_block={act_block} (block-scaled activations) has no implementation for "
                   f"backend={backend!r}; backends with one: {registered_backends(op, blocks=True)}. Plan it on one "
                   "of those, or use QuantConfig(act_block=None) (token-wise) for this backend.")
        else:
            why = (f"qfx::{op} has no implementation for backend={backend!r}; registered: "
                   f"{registered_backends(op)}. Import qfx (it registers 'reference') and, for "
                   "'cutlass', build the native library (see README).")
        raise RuntimeError(why) from None


def _packed_k(w: Tensor, w_bits: int) -> int:
    return w.shape[-1] * 2 if w_bits == 4 else w.shape[-1]


@torch.library.custom_op("qfx::quantize", mutates_args=())
def quantize(
    x: Tensor,
    bits: int,
    symmetric: bool,
    clip_lo: Optional[float],
    clip_hi: Optional[float],
    backend: str,
    gelu: bool = False,
    act_block: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    if act_block is not None:
        return _impl("quantize", backend, act_block)(x, bits, symmetric, clip_lo, clip_hi, gelu, act_block)
    return _impl("quantize", backend)(x, bits, symmetric, clip_lo, clip_hi, gelu)


@quantize.register_fake
def _(x, bits, symmetric, clip_lo, clip_hi, backend, gelu=False, act_block=None):
    lead = x.shape[:-1] if act_block is None else (*x.shape[:-1], x.shape[-1] // act_block)
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty(lead, dtype=torch.float32),
        x.new_empty(lead, dtype=torch.float32),
    )


@torch.library.custom_op("qfx::int_matmul", mutates_args=())
def int_matmul(a: Tensor, b: Tensor, backend: str) -> Tensor:
    return _impl("int_matmul", backend)(a, b)


@int_matmul.register_fake
def _(a, b, backend):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


@torch.library.custom_op("qfx::int_linear", mutates_args=())
def int_linear(
    a: Tensor,
    a_scale: Tensor,
    a_offset: Tensor,
    w: Tensor,
    w_bits: int,
    w_scale: Tensor,
    w_offset_sum: Tensor,
    bias: Optional[Tensor],
    gelu: bool,
    out_dtype: torch.dtype,
    a_bits: int,
    backend: str,
    act_block: Optional[int] = None,
) -> Tensor:
    if act_block is not None:
        return _impl("int_linear", backend, act_block)(
            a, a_scale, a_offset, w, w_bits, w_scale, w_offset_sum, bias, gelu, out_dtype, a_bits, act_block
        )
    return _impl("int_linear", backend)(
        a, a_scale, a_offset, w, w_bits, w_scale, w_offset_sum, bias, gelu, out_dtype, a_bits=a_bits
    )


@int_linear.register_fake
def _(a, a_scale, a_offset, w, w_bits, w_scale, w_offset_sum, bias, gelu, out_dtype, a_bits, backend, act_block=None):
    return a.new_empty((*a.shape[:-1], w.shape[0]), dtype=out_dtype)


@torch.library.custom_op("qfx::weight_only_linear", mutates_args=())
def weight_only_linear(
    x: Tensor,
    w: Tensor,
    w_bits: int,
    w_scale: Tensor,
    bias: Optional[Tensor],
    backend: str,
) -> Tensor:
    return _impl("weight_only_linear", backend)(x, w, w_bits, w_scale, bias)


@weight_only_linear.register_fake
def _(x, w, w_bits, w_scale, bias, backend):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("qfx::add_layer_norm_quantize", mutates_args=())
def add_layer_norm_quantize(
    a: Tensor,
    b: Optional[Tensor],
    weight: Tensor,
    bias: Tensor,
    eps: float,
    bits: int,
    symmetric: bool,
    clip_lo: Optional[float],
    clip_hi: Optional[float],
    backend: str,
    act_block: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if act_block is not None:
        return _impl("add_layer_norm_quantize", backend, act_block)(a, b, weight, bias, eps, bits, symmetric,
                                                                     clip_lo, clip_hi, act_block)
    return _impl("add_layer_norm_quantize", backend)(a, b, weight, bias, eps, bits, symmetric, clip_lo, clip_hi)


def _layer_norm_codes_fake(a: Tensor, act_block: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, codes, scale, offset) of a fused LayerNorm producer over ``a [..., K]``."""
    lead = a.shape[:-1] if act_block is None else (*a.shape[:-1], a.shape[-1] // act_block)
    return (
        torch.empty_like(a),
        a.new_empty(a.shape, dtype=torch.int8),
        a.new_empty(lead, dtype=torch.float32),
        a.new_empty(lead, dtype=torch.float32),
    )


@add_layer_norm_quantize.register_fake
def _(a, b, weight, bias, eps, bits, symmetric, clip_lo, clip_hi, backend, act_block=None):
    return _layer_norm_codes_fake(a, act_block)


@torch.library.custom_op("qfx::add_layer_norm_rotate_quantize", mutates_args=())
def add_layer_norm_rotate_quantize(
    a: Tensor,
    b: Optional[Tensor],
    weight: Tensor,
    bias: Tensor,
    eps: float,
    signs: Tensor,
    block: int,
    bits: int,
    symmetric: bool,
    clip_lo: Optional[float],
    clip_hi: Optional[float],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _impl("add_layer_norm_rotate_quantize", backend)(a, b, weight, bias, eps, signs, block, bits, symmetric,
                                                            clip_lo, clip_hi)


@add_layer_norm_rotate_quantize.register_fake
def _(a, b, weight, bias, eps, signs, block, bits, symmetric, clip_lo, clip_hi, backend):
    return _layer_norm_codes_fake(a)


# -- input rotation (QuaRot-style; passes/rotate_inputs.py) -----------------------------------
# The same function on every device (a fast Walsh-Hadamard transform, qfx.numerics.rotate_blocks;
# on a GPU one Triton kernel of the same additions, qfx.backends.triton.rotation), so it takes no
# backend; differentiable, because the QAT graph trains through it (the gradient of x R is
# g R^T: the same blocks, transposed).


#: The forward of qfx::rotate. The definition (:func:`rotate_blocks`) until a backend registers a
#: kernel of the same bits (qfx.backends registers the Triton one); an extension point, so that
#: this ground-floor module imports no kernel.
_rotate_forward: Callable[[Tensor, Tensor, int], Tensor] = rotate_blocks


def register_rotate_forward(fn: Callable[[Tensor, Tensor, int], Tensor]) -> None:
    """Make ``fn`` (bit-identical to :func:`qfx.numerics.rotate_blocks`) the forward of qfx::rotate."""
    global _rotate_forward
    _rotate_forward = fn


@torch.library.custom_op("qfx::rotate", mutates_args=())
def rotate(x: Tensor, signs: Tensor, block: int) -> Tensor:
    return _rotate_forward(x, signs, block)


@rotate.register_fake
def _(x, signs, block):
    return torch.empty_like(x)


def _rotate_setup(ctx, inputs, output) -> None:
    _, signs, block = inputs
    ctx.save_for_backward(signs)
    ctx.block = block


def _rotate_backward(ctx, grad):
    (signs,) = ctx.saved_tensors
    return rotate_blocks(grad, signs, ctx.block, transpose=True), None, None


rotate.register_autograd(_rotate_backward, setup_context=_rotate_setup)


# -- token layout ops (padding removal) ------------------------------------------------------


def token_rows(attention_mask: Tensor, capacity: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """(gather, scatter): flat row indices of the real tokens; see qfx::token_index."""
    keep = attention_mask.reshape(-1) != 0
    rows = keep.numel()
    if capacity is None:
        index = keep.nonzero().squeeze(1)  # the one host sync of an unbucketed call on a GPU
        if index.numel() > 0:
            return index, index.clone()
        capacity = 1  # no real token at all: one dummy row keeps every kernel's M >= 1
    if capacity < 1:
        raise ValueError(f"token_index: capacity={capacity} must be >= 1 (or None for the exact count)")
    # static shapes only (capturable in a CUDA graph): real token t goes to slot t; padding and
    # tokens beyond the capacity (none when the caller sized it) go to the extra slot `capacity`
    slot = keep.cumsum(0) - 1
    slot = torch.where(keep & (slot < capacity), slot, capacity)
    scatter = torch.full((capacity + 1,), rows, dtype=torch.long, device=attention_mask.device)
    scatter.scatter_(0, slot, torch.arange(rows, device=attention_mask.device))
    scatter = scatter[:capacity]
    gather = scatter.clamp(max=max(rows - 1, 0))
    return gather, scatter.clone()


#: also check the values of token indices (a device sync each on a GPU): QFX_CHECK_INDICES=1
CHECK_INDEX_VALUES = os.environ.get("QFX_CHECK_INDICES", "0") not in ("", "0")


def check_index(op: str, name: str, index: Tensor, length: Optional[int], rows: int) -> None:
    """``index`` must be 1-D int64 (``length`` entries unless None), values in [0, rows] (checked
    when :data:`CHECK_INDEX_VALUES` is on: the shape checks are free, the values cost a sync)."""
    if index.dim() != 1 or index.dtype != torch.int64 or (length is not None and index.numel() != length):
        want = f"[{length}]" if length is not None else "1-D"
        raise ValueError(f"{op}: {name} has shape {tuple(index.shape)} and dtype {index.dtype}; expected {want} int64 "
                         "row indices (what qfx::token_index returns for attention_mask)")
    if CHECK_INDEX_VALUES and index.numel() and not (0 <= int(index.min()) and int(index.max()) <= rows):
        raise ValueError(f"{op}: {name} holds indices outside [0, {rows}]; take it from qfx::token_index")


def gather_tokens(x: Tensor, gather: Tensor) -> Tensor:
    """[B, S, *F] -> [1, T', *F]: the rows ``gather`` of ``x.flatten(0, 1)``."""
    if x.dim() < 2:
        raise ValueError(f"pack_tokens: x has shape {tuple(x.shape)}; expected [batch, seq, ...]")
    check_index("pack_tokens", "gather", gather, None, x.shape[0] * x.shape[1] - 1)
    return x.flatten(0, 1).index_select(0, gather).unsqueeze(0)


def scatter_tokens(x: Tensor, scatter: Tensor, like: Tensor) -> Tensor:
    """[1, T', *F] -> [B, S, *F] (B, S from ``like``): zeros except row ``scatter[t]`` = ``x[0, t]``."""
    if x.dim() < 2 or x.shape[0] != 1 or like.dim() < 2:
        raise ValueError(f"repad_tokens: x has shape {tuple(x.shape)} and like {tuple(like.shape)}; expected "
                         "x [1, T, ...] packed rows and like [batch, seq, ...]")
    check_index("repad_tokens", "scatter", scatter, x.shape[1], like.shape[0] * like.shape[1])
    b, s = like.shape[0], like.shape[1]
    feat = x.shape[2:]
    out = x.new_zeros((b * s + 1, *feat))  # + the trash row dummies write to
    out.index_copy_(0, scatter, x[0])
    return out[: b * s].view(b, s, *feat)


@torch.library.custom_op("qfx::token_index", mutates_args=())
def token_index(attention_mask: Tensor, capacity: Optional[int]) -> tuple[Tensor, Tensor]:
    return token_rows(attention_mask, capacity)


@token_index.register_fake
def _(attention_mask, capacity):
    rows = torch.library.get_ctx().new_dynamic_size() if capacity is None else capacity
    return (attention_mask.new_empty((rows,), dtype=torch.long), attention_mask.new_empty((rows,), dtype=torch.long))


@torch.library.custom_op("qfx::pack_tokens", mutates_args=())
def pack_tokens(x: Tensor, gather: Tensor) -> Tensor:
    return gather_tokens(x, gather)


@pack_tokens.register_fake
def _(x, gather):
    return x.new_empty((1, gather.shape[0], *x.shape[2:]))


@torch.library.custom_op("qfx::repad_tokens", mutates_args=())
def repad_tokens(x: Tensor, scatter: Tensor, like: Tensor) -> Tensor:
    return scatter_tokens(x, scatter, like)


@repad_tokens.register_fake
def _(x, scatter, like):
    return x.new_empty((like.shape[0], like.shape[1], *x.shape[2:]))
