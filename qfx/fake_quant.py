"""Fake-quant modules and the quantized linear of the QAT graph (level L3).

* :class:`WeightFakeQuant`, :class:`ActFakeQuant`: quantize-dequantize with a straight-through
  gradient, computed by :func:`qfx.numerics.fake_quantize` and nothing else.
* :func:`integer_linear`: the linear that reads them. Its forward is the integer linear of L4
  itself (codes, exact int32 accumulation, the fp32 epilogue of
  :func:`qfx.numerics.int_linear_reference`); its backward is that of
  ``linear(x_hat, w_hat, bias)``. So what training and the fake-quant "twin" see is exactly
  what the compiled model computes: ``x_hat @ w_hat.T`` in float would sum in another order,
  and a last-bit difference moves a later 4-bit activation across a rounding boundary now and
  then, which is enough to change a few test predictions.
"""
from __future__ import annotations

import torch
from torch import nn

from qfx import numerics

__all__ = ["WeightFakeQuant", "ActFakeQuant", "integer_linear"]


class WeightFakeQuant(nn.Module):
    """Symmetric weight fake-quant per output row or per group of ``group_size`` along K."""

    def __init__(self, bits: int, group_size: int | None) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return numerics.fake_quantize(w, self.bits, True, self.group_size)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group={'row' if self.group_size is None else self.group_size}"


class ActFakeQuant(nn.Module):
    """Token-wise dynamic activation fake-quant (min/max or absmax per token)."""

    def __init__(self, bits: int, symmetric: bool, clip: tuple[float, float] | None) -> None:
        super().__init__()
        self.bits, self.symmetric, self.clip = bits, symmetric, clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return numerics.fake_quantize(x, self.bits, self.symmetric, None, self.clip)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}, token-wise, clip={self.clip}"


class _IntegerLinear(torch.autograd.Function):
    """Forward: the L4 integer linear on the codes of ``x`` and ``w``. Backward: the gradient of
    ``linear(x_hat, w_hat, bias)``, which reaches ``x`` and ``w`` through the fake-quant
    modules' straight-through estimators."""

    @staticmethod
    def forward(ctx, x_hat, w_hat, bias, x, w, act, weight):
        a_bits, a_symmetric, clip = act
        w_bits, w_group = weight
        k = x.shape[-1]
        q_a, s_a, c_a = numerics.quantize_activation(x.reshape(-1, k), a_bits, a_symmetric, clip)
        q_w, s_w = numerics.quantize_weight(w.detach(), w_bits, w_group)
        ws = numerics.weight_offset_sum(q_w, s_w)
        y = numerics.int_linear_reference(q_a, s_a, c_a, q_w, s_w, ws, None if bias is None else bias.detach(), False, torch.float32)
        ctx.save_for_backward(x_hat, w_hat)
        ctx.has_bias = bias is not None
        return y.to(x_hat.dtype).reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x_hat, w_hat = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gx = (g @ w_hat.to(g.dtype)).reshape(x_hat.shape) if ctx.needs_input_grad[0] else None
        gw = (g.T @ x_hat.reshape(-1, x_hat.shape[-1]).to(g.dtype)).to(w_hat.dtype) if ctx.needs_input_grad[1] else None
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None, None


def integer_linear(
    x_hat: torch.Tensor,
    w_hat: torch.Tensor,
    bias: torch.Tensor | None,
    x: torch.Tensor,
    w: torch.Tensor,
    act: tuple[int, bool, tuple[float, float] | None],
    weight: tuple[int, int | None],
) -> torch.Tensor:
    """``linear(x_hat, w_hat, bias)`` computed as the integer path computes it.

    ``x_hat = ActFakeQuant(x)`` and ``w_hat = WeightFakeQuant(w)`` carry the gradients;
    ``act = (bits, symmetric, clip)`` and ``weight = (bits, group_size)`` are those modules'
    settings, from which the codes of ``x`` and ``w`` are recomputed (deterministically, by the
    same :mod:`qfx.numerics` functions, so they are the codes behind ``x_hat`` and ``w_hat``).
    """
    return _IntegerLinear.apply(x_hat, w_hat, bias, x, w, act, weight)
