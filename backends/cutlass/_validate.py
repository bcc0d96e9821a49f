"""Input checks run before any launch: each error names the tensor and says how to fix it.

Pure Python over tensor metadata (no device sync), so the CPU-only test suite covers it.
"""
from __future__ import annotations

import torch

__all__ = ["BadInput", "check_tensor", "check_same_device", "check_multiple", "TMA_ALIGN_BYTES"]

# TMA (sm_90) and cp.async (sm_80) move 16-byte chunks: base pointers must be 16-byte aligned.
TMA_ALIGN_BYTES = 16


class BadInput(ValueError):
    """An input the CUTLASS kernels cannot take; raised before any launch."""


def check_tensor(t, name: str, dtypes: tuple[torch.dtype, ...], ndim: int | None = None,
                 shape: tuple[int, ...] | None = None, aligned: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise BadInput(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise BadInput(f"{name} is on {t.device}; the cutlass backend needs CUDA tensors "
                       f"(move it with {name}.cuda())")
    if t.dtype not in dtypes:
        raise BadInput(f"{name} has dtype {t.dtype}; expected one of "
                       f"{[str(d) for d in dtypes]}")
    if ndim is not None and t.dim() != ndim:
        raise BadInput(f"{name} has shape {tuple(t.shape)}; expected {ndim} dims")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise BadInput(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    if not t.is_contiguous():
        raise BadInput(f"{name} is not contiguous (strides {t.stride()}); pass "
                       f"{name}.contiguous() (K must be the fastest dimension)")
    if aligned and t.data_ptr() % TMA_ALIGN_BYTES:
        raise BadInput(f"{name}.data_ptr() is not {TMA_ALIGN_BYTES}-byte aligned (a view at an "
                       f"odd offset?); pass {name}.clone()")


def check_same_device(**tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise BadInput(f"tensors are on different devices: {devices}; move them to one GPU")
    return first


def check_multiple(value: int, multiple: int, what: str, why: str) -> None:
    if value % multiple:
        raise BadInput(f"{what}={value} is not a multiple of {multiple} ({why}); pad it to "
                       f"{(value + multiple - 1) // multiple * multiple}")
