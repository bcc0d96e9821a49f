"""Fake-quant modules of the QAT graph (level L3): quantize-dequantize with a straight-through
gradient, computed by :func:`qfx.numerics.fake_quantize` and nothing else."""
from __future__ import annotations

import torch
from torch import nn

from qfx import numerics

__all__ = ["WeightFakeQuant", "ActFakeQuant"]


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
