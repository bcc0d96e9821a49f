"""The reference backend: exact integer ops in plain torch, on any device (CPU is the oracle).

int32 accumulation is computed in float64, which is exact for every K qfx accepts (see
:func:`qfx.numerics.int_matmul_reference`). This backend is the oracle the GPU kernels are
tested against, and the CPU execution path of ``qfx.compile(..., target="cpu")``.
"""
from __future__ import annotations

import torch

from qfx import numerics
from qfx.ops import register_impl

__all__ = ["ReferenceBackend"]

NAME = "reference"


def _unpacked(w: torch.Tensor, w_bits: int) -> torch.Tensor:
    return numerics.unpack_int4(w) if w_bits == 4 else w


def _quantize(x, bits, symmetric, clip_lo, clip_hi, gelu=False):
    clip = None if clip_lo is None else (clip_lo, clip_hi)
    return numerics.quantize_activation(x, bits, symmetric, clip, gelu)


def _int_matmul(a, b):
    return numerics.int_matmul_reference(a, b)


def _int_linear(a, a_scale, a_offset, w, w_bits, w_scale, w_offset_sum, bias, gelu, out_dtype, a_bits=8):
    lead = a.shape[:-1]
    y = numerics.int_linear_reference(
        a.reshape(-1, a.shape[-1]),
        a_scale.reshape(-1),
        a_offset.reshape(-1),
        _unpacked(w, w_bits),
        w_scale,
        w_offset_sum,
        bias,
        gelu,
        out_dtype,
    )
    return y.reshape(*lead, y.shape[-1])


def _quantize_blocks(x, bits, symmetric, clip_lo, clip_hi, gelu, act_block):
    clip = None if clip_lo is None else (clip_lo, clip_hi)
    return numerics.quantize_activation(x, bits, symmetric, clip, gelu, block=act_block)


def _int_linear_blocks(a, a_scale, a_offset, w, w_bits, w_scale, w_block_sums, bias, gelu, out_dtype, a_bits, act_block):
    lead, k = a.shape[:-1], a.shape[-1]
    if a_scale.shape[-1] * act_block != k:
        raise ValueError(f"qfx::int_linear(act_block={act_block}): a_scale has {a_scale.shape[-1]} blocks, K={k}")
    blocks = k // act_block
    y = numerics.int_linear_blocks_reference(
        a.reshape(-1, k), a_scale.reshape(-1, blocks), a_offset.reshape(-1, blocks), _unpacked(w, w_bits),
        w_scale, w_block_sums, bias, gelu, out_dtype,
    )
    return y.reshape(*lead, y.shape[-1])


def _weight_only_linear(x, w, w_bits, w_scale, bias):
    q = _unpacked(w, w_bits)
    groups = w_scale.shape[-1]
    w_hat = numerics.dequantize(q, numerics.QParams(w_scale, None), q.shape[-1] // groups if groups > 1 else None)
    return torch.nn.functional.linear(x, w_hat.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _add_layer_norm(a, b, weight, bias, eps):
    """The fused producers' y: torch's LayerNorm of ``a + b`` (``b`` may be None)."""
    s = a if b is None else a + b
    return torch.nn.functional.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def _add_layer_norm_quantize(a, b, weight, bias, eps, bits, symmetric, clip_lo, clip_hi):
    y = _add_layer_norm(a, b, weight, bias, eps)
    return (y, *_quantize(y, bits, symmetric, clip_lo, clip_hi))


def _add_layer_norm_quantize_blocks(a, b, weight, bias, eps, bits, symmetric, clip_lo, clip_hi, act_block):
    y = _add_layer_norm(a, b, weight, bias, eps)
    return (y, *_quantize_blocks(y, bits, symmetric, clip_lo, clip_hi, False, act_block))


def _add_layer_norm_rotate_quantize(a, b, weight, bias, eps, signs, block, bits, symmetric, clip_lo, clip_hi):
    y = _add_layer_norm(a, b, weight, bias, eps)
    return (y, *_quantize(numerics.rotate_blocks(y, signs, block), bits, symmetric, clip_lo, clip_hi))


register_impl("quantize", NAME, _quantize)
register_impl("add_layer_norm_rotate_quantize", NAME, _add_layer_norm_rotate_quantize)
register_impl("add_layer_norm_quantize", NAME, _add_layer_norm_quantize)
register_impl("int_matmul", NAME, _int_matmul)
register_impl("int_linear", NAME, _int_linear)
register_impl("weight_only_linear", NAME, _weight_only_linear)
register_impl("quantize", NAME, _quantize_blocks, blocks=True)
register_impl("int_linear", NAME, _int_linear_blocks, blocks=True)
register_impl("add_layer_norm_quantize", NAME, _add_layer_norm_quantize_blocks, blocks=True)


class ReferenceBackend:
    """Implements every integer op exactly; slow on GPU, so planned last there."""

    name = NAME

    def available(self) -> tuple[bool, str]:
        return True, "pure torch"

    def can_implement(self, work, target) -> tuple[bool, str]:
        return True, "exact torch reference (float64 accumulation)"
