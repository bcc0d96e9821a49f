"""Fake-quant modules and the quantized linear of the QAT graph (level L3).

* :class:`WeightFakeQuant`, :class:`ActFakeQuant`: quantize-dequantize with a straight-through
  gradient, computed by :func:`qfx.numerics.fake_quantize` and nothing else.
* :func:`activation_codes`: the codes of one activation tensor, computed once per tensor and
  read by its :class:`ActFakeQuant` and by every :func:`integer_linear` on it (q, k and v).
* :func:`integer_linear`: the linear that reads them. Its forward is the integer linear of L4
  itself (codes, the exact int32 accumulator of :func:`qfx.numerics.int_matmul`: int8 tensor
  cores on a GPU, float64 on the CPU; the fp32 epilogue of
  :func:`qfx.numerics.int_linear_reference`); its backward is that of
  ``linear(x_hat, w_hat, bias)``. So what training and the fake-quant "twin" see is exactly
  what the compiled model computes: ``x_hat @ w_hat.T`` in float would sum in another order,
  and a last-bit difference moves a later 4-bit activation across a rounding boundary now and
  then, which is enough to change a few test predictions.

Block-scaled activations (``QuantConfig(act_block=B)``): the same three pieces with one scale
(and offset) per token per block of ``B`` input channels; :func:`integer_linear` then computes
:func:`qfx.numerics.int_linear_blocks_reference` (per-block exact accumulators promoted in the
documented fp32 order), which is what the compiled block-scaled ops compute.
"""
from __future__ import annotations

import torch
from torch import nn

from qfx import numerics

__all__ = ["WeightFakeQuant", "ActFakeQuant", "activation_codes", "integer_linear"]


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
    """Dynamic activation fake-quant (min/max or absmax) per token, or per token per block of
    ``block`` input channels.

    A block-scaled one holds the buffer ``act_block`` so a checkpoint says how it was trained:
    loading a block-scaled state dict into a token-wise model (or the reverse, or another
    block) raises a ValueError naming ``QuantConfig(act_block=...)``.
    """

    def __init__(self, bits: int, symmetric: bool, clip: tuple[float, float] | None, block: int | None = None) -> None:
        super().__init__()
        self.bits, self.symmetric, self.clip, self.block = bits, symmetric, clip, block
        if block is not None:
            self.register_buffer("act_block", torch.tensor(block, dtype=torch.int64))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "act_block")
        saved = None if saved is None else int(saved)
        if saved != getattr(self, "block", None):
            raise ValueError(
                f"{prefix or 'ActFakeQuant.'}: the checkpoint was trained with QuantConfig(act_block={saved}) "
                f"but this model was prepared with act_block={getattr(self, 'block', None)}; prepare the model "
                f"with QuantConfig(..., act_block={saved}) to load it"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, codes: tuple | None = None) -> torch.Tensor:
        """``x_hat`` with the straight-through gradient; from ``codes`` (the output of
        :func:`activation_codes` on ``x``) when the graph has them, so ``x`` is quantized once."""
        block = getattr(self, "block", None)  # modules pickled before act_block are token-wise
        if codes is None:
            return numerics.fake_quantize(x, self.bits, self.symmetric, block, self.clip)
        q, scale, offset = codes
        if block is None:
            scale, offset = scale.unsqueeze(-1), offset.unsqueeze(-1)
        qp = numerics.QParams(scale, None if self.symmetric else offset)
        xc = x if self.clip is None else x.clamp(self.clip[0], self.clip[1])
        x_hat = numerics.dequantize(q, qp, block).to(x.dtype)
        return xc + (x_hat - xc).detach()

    def extra_repr(self) -> str:
        block = getattr(self, "block", None)
        gran = "token-wise" if block is None else f"per token per {block} channels"
        return f"bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}, {gran}, clip={self.clip}"


def activation_codes(x: torch.Tensor, act: tuple) -> tuple:
    """Codes, scales and offsets of ``x`` (no gradient): what ``qfx::quantize`` computes in the
    integer graph. ``act = (bits, symmetric, clip)`` (token-wise) or ``(bits, symmetric, clip,
    block)`` (block-scaled when ``block`` is not None; scales ``[..., K // block]``)."""
    bits, symmetric, clip, *rest = act
    return numerics.quantize_activation(x.detach(), bits, symmetric, clip, block=rest[0] if rest else None)


class _IntegerLinear(torch.autograd.Function):
    """Forward: the L4 integer linear on activation ``codes`` and the codes of ``w``. Backward:
    the gradient of ``linear(x_hat, w_hat, bias)``, which reaches ``x`` and ``w`` through the
    fake-quant modules' straight-through estimators.

    Under autocast (mixed-precision training) the output and the backward GEMMs take the
    autocast dtype, as ``F.linear`` would; the epilogue stays fp32 with one rounding at the
    end, which is what the compiled model does with float parts in that dtype.
    """

    @staticmethod
    def forward(ctx, x_hat, w_hat, bias, codes, w, weight):
        dev = x_hat.device.type
        run_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_hat.dtype
        q_a, s_a, c_a = codes
        w_bits, w_group = weight
        # The epilogue is the reference's fp32 sequence: autocast must not rewrite any of it.
        with torch.autocast(dev, enabled=False):
            q_w, s_w = numerics.quantize_weight(w.detach(), w_bits, w_group)
            k, b = q_a.shape[-1], None if bias is None else bias.detach()
            if s_a.dim() == q_a.dim():  # block-scaled codes: scales [..., K // block]
                blocks = s_a.shape[-1]
                bs = numerics.weight_block_sums(q_w, k // blocks)
                y = numerics.int_linear_blocks_reference(q_a.reshape(-1, k), s_a.reshape(-1, blocks),
                                                         c_a.reshape(-1, blocks), q_w, s_w, bs, b, False, torch.float32)
            else:
                ws = numerics.weight_offset_sum(q_w, s_w)
                y = numerics.int_linear_reference(q_a.reshape(-1, k), s_a.reshape(-1), c_a.reshape(-1), q_w, s_w, ws,
                                                  b, False, torch.float32)
        ctx.save_for_backward(x_hat, w_hat)
        ctx.has_bias = bias is not None
        return y.to(run_dtype).reshape(*q_a.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad):
        # The straight-through GEMMs run in the dtype of the incoming gradient: the run's
        # float dtype (fp32, or the autocast dtype the forward returned).
        x_hat, w_hat = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gx = (g @ w_hat.to(g.dtype)).reshape(x_hat.shape).to(x_hat.dtype) if ctx.needs_input_grad[0] else None
        gw = (g.T @ x_hat.reshape(-1, x_hat.shape[-1]).to(g.dtype)).to(w_hat.dtype) if ctx.needs_input_grad[1] else None
        gb = g.sum(0, dtype=torch.float32) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None


def integer_linear(
    x_hat: torch.Tensor,
    w_hat: torch.Tensor,
    bias: torch.Tensor | None,
    codes: tuple,
    w: torch.Tensor,
    weight: tuple[int, int | None],
) -> torch.Tensor:
    """``linear(x_hat, w_hat, bias)`` computed as the integer path computes it.

    ``x_hat = ActFakeQuant(x, codes)`` and ``w_hat = WeightFakeQuant(w)`` carry the gradients;
    ``codes = activation_codes(x, act)`` are the activation codes behind ``x_hat``, and the
    weight codes are made from ``w`` with ``weight = (bits, group_size)``, the settings of
    ``WeightFakeQuant`` (same :mod:`qfx.numerics` functions, so they are the codes behind ``w_hat``).
    """
    return _IntegerLinear.apply(x_hat, w_hat, bias, codes, w, weight)
