"""The integer ops of qfx, declared once with torch.library.

Each op takes a ``backend`` name as its last argument. Lowering emits ops with
``backend="reference"`` (target independent, runs anywhere torch runs); planning for a GPU
target rewrites that argument to the backend chosen per linear (``"cutlass"``). Backends
plug their implementations in with :func:`register_impl`; nothing else defines ops.

Every op has a fake (meta) implementation, so lowered graphs can be exported, compiled with
torch.compile and captured in CUDA graphs.

Ops (shapes; ``...`` are leading token dims, flattened to M inside kernels)::

    qfx::quantize(x [..., K] float, bits, symmetric, clip_lo, clip_hi, backend)
        -> (codes [..., K] int8, scale [...] f32, offset [...] f32)
    qfx::int_matmul(a [M, K] int8, b [N, K] int8, backend) -> [M, N] int32
    qfx::int_linear(a [..., K] int8, a_scale [...], a_offset [...], w, w_bits,
                    w_scale [N, G], w_offset_sum [N], bias [N]?, gelu, out_dtype, a_bits, backend)
        -> [..., N] out_dtype        (w: int8 [N, K], or uint8 [N, K/2] packed when w_bits=4;
                                      a_bits says the codes of a fit 4 bits, so a kernel may
                                      run them on INT4 tensor cores)
    qfx::weight_only_linear(x [..., K] float, w, w_bits, w_scale [N, G], bias [N]?, backend)
        -> [..., N] x.dtype
    qfx::add_layer_norm_quantize(a [..., K], b [..., K]?, weight [K], bias [K], eps, bits,
                                 symmetric, clip_lo, clip_hi, backend)
        -> (y = layer_norm(a + b) [..., K] a.dtype, codes, scale [...], offset [...])
                                     (the codes are those of quantize(y): a fused producer)

The semantics are those of :mod:`qfx.numerics` (``quantize_activation``,
``int_matmul_reference``, ``int_linear_reference``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["register_impl", "registered_backends", "OPS"]

#: (op name, backend name) -> implementation with the op's signature minus ``backend``.
_IMPLS: dict[tuple[str, str], Callable] = {}
OPS = ("quantize", "int_matmul", "int_linear", "weight_only_linear", "add_layer_norm_quantize")


def register_impl(op: str, backend: str, fn: Callable) -> None:
    """Make ``fn`` the implementation of ``qfx::<op>`` when called with ``backend``."""
    if op not in OPS:
        raise ValueError(f"register_impl: unknown op {op!r}; qfx declares {OPS}")
    _IMPLS[(op, backend)] = fn


def registered_backends(op: str) -> list[str]:
    return sorted(b for (o, b) in _IMPLS if o == op)


def _impl(op: str, backend: str) -> Callable:
    try:
        return _IMPLS[(op, backend)]
    except KeyError:
        raise RuntimeError(
            f"qfx::{op} has no implementation for backend={backend!r}; registered: "
            f"{registered_backends(op)}. Import qfx (it registers 'reference') and, for "
            "'cutlass', build the native library (see README)."
        ) from None


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
) -> tuple[Tensor, Tensor, Tensor]:
    return _impl("quantize", backend)(x, bits, symmetric, clip_lo, clip_hi)


@quantize.register_fake
def _(x, bits, symmetric, clip_lo, clip_hi, backend):
    lead = x.shape[:-1]
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
) -> Tensor:
    return _impl("int_linear", backend)(
        a, a_scale, a_offset, w, w_bits, w_scale, w_offset_sum, bias, gelu, out_dtype, a_bits=a_bits
    )


@int_linear.register_fake
def _(a, a_scale, a_offset, w, w_bits, w_scale, w_offset_sum, bias, gelu, out_dtype, a_bits, backend):
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _impl("add_layer_norm_quantize", backend)(a, b, weight, bias, eps, bits, symmetric, clip_lo, clip_hi)


@add_layer_norm_quantize.register_fake
def _(a, b, weight, bias, eps, bits, symmetric, clip_lo, clip_hi, backend):
    lead = a.shape[:-1]
    return (
        torch.empty_like(a),
        a.new_empty(a.shape, dtype=torch.int8),
        a.new_empty(lead, dtype=torch.float32),
        a.new_empty(lead, dtype=torch.float32),
    )
