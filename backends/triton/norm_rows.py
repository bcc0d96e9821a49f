"""Host side shared by the fused add + LayerNorm + quantize launchers of
:mod:`qfx.backends.triton.rotation_quant` (rotated, token-wise) and :mod:`qfx.backends.triton.norm_block_quant`
(block-scaled): their operand rule, their row views and outputs, their clip arguments.

Written once so that both launchers hand their kernels the same rows (their one LayerNorm,
``rotation_quant._add_layer_norm_tile``, then sees the same values). No Triton here: both modules
import it, and the kernel modules import ``rotation_quant`` (an import of either from the other
would be a circle).
"""
from __future__ import annotations

import torch

__all__ = ["norm_rows", "clip_bounds", "check_norm_operands"]


def clip_bounds(clip: tuple[float, float] | None) -> tuple[float, float]:
    """The kernels' ``clip_lo, clip_hi`` arguments: the bounds as floats, (0, 0) when ``HAS_CLIP`` is off
    (the kernel never reads them then, but every argument needs a value)."""
    return (float(clip[0]), float(clip[1])) if clip is not None else (0.0, 0.0)


def norm_rows(a: torch.Tensor, b: torch.Tensor | None):
    """What a fused add + LayerNorm + quantize launcher starts with: ``a`` and ``b`` (or None) as
    contiguous [M, K] rows, and the kernel's ``y`` (a's dtype) and int8 codes outputs of that shape."""
    k = a.shape[-1]
    fa = a.reshape(-1, k).contiguous()
    fb = None if b is None else b.reshape(-1, k).contiguous()
    return fa, fb, torch.empty_like(fa), torch.empty(fa.shape, dtype=torch.int8, device=a.device)


def check_norm_operands(a: torch.Tensor, b: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """The fused LayerNorm kernels' operand rule: ``b`` (optional) like ``a``, ``weight`` / ``bias`` of shape (K,)."""
    k = a.shape[-1]
    if b is not None and (b.shape != a.shape or b.dtype != a.dtype):
        raise ValueError(f"b: shape {tuple(b.shape)} {b.dtype}; expected a's {tuple(a.shape)} {a.dtype}")
    if tuple(weight.shape) != (k,) or tuple(bias.shape) != (k,):
        raise ValueError(f"weight / bias have shapes {tuple(weight.shape)} / {tuple(bias.shape)}; expected ({k},)")
