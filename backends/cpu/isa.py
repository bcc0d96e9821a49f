"""Which int8 instructions this CPU gives torch._int_mm, and whether the fast path can use them.

``torch._int_mm`` on the CPU calls oneDNN's s8 x s8 -> s32 GEMM, which picks the widest int8
dot-product instructions the CPU has: AMX-INT8 tiles (Sapphire Rapids and later), AVX512-VNNI
(Cascade Lake and later) or AVX-VNNI (Alder Lake and later). Every one accumulates in int32,
so the result is exact whatever runs. Without any of them oneDNN still answers, exactly, but
through multiply-add sequences that are no faster than the float64 reference; and a torch
built without oneDNN (or with it switched off) runs ``_int_mm`` as a scalar loop. In both cases
the CPU backend refuses (:func:`int8_path`), so the planner keeps the reference and the report
says why.

Example::

    >>> from qfx.backends.cpu.isa import int8_path
    >>> int8_path()
    Int8Path(isa='AMX-INT8', why='oneDNN 3.12.0 s8 GEMM on AMX-INT8 (also AVX512-VNNI), 2 torch thread(s)')
"""
from __future__ import annotations

import functools
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Int8Path", "int8_path", "cpu_flags", "INT8_ISAS"]

#: (name, /proc/cpuinfo flags that must all be present), widest first: what oneDNN prefers
INT8_ISAS: tuple[tuple[str, frozenset[str]], ...] = (
    ("AMX-INT8", frozenset({"amx_int8", "amx_tile"})),
    ("AVX512-VNNI", frozenset({"avx512_vnni"})),
    ("AVX-VNNI", frozenset({"avx_vnni"})),
)


@dataclass(frozen=True)
class Int8Path:
    """The int8 instructions the fast path runs on (``isa``; None: it cannot run) and why."""

    isa: str | None
    why: str


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (None where there is no such file)."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return None
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return None


def _onednn_version() -> str:
    """"oneDNN 3.12.0" as torch's build configuration names it (its MKL-DNN line)."""
    found = re.search(r"MKL-DNN v(\S+)", torch.__config__.show())
    return f"oneDNN {found.group(1)}" if found else "oneDNN"


def int8_path(flags: frozenset[str] | None = None) -> Int8Path:
    """Whether ``torch._int_mm`` runs on int8 dot-product instructions here, and which.

    ``flags``: the CPU's feature flags (default: :func:`cpu_flags`; tests pass others).
    """
    if not hasattr(torch, "_int_mm"):
        return Int8Path(None, f"torch {torch.__version__} has no torch._int_mm")
    if not torch.backends.mkldnn.is_available():
        return Int8Path(None, "this torch is built without oneDNN: torch._int_mm would be a scalar loop")
    if not torch.backends.mkldnn.enabled:
        return Int8Path(None, "oneDNN is switched off (torch.backends.mkldnn.enabled = False): "
                              "torch._int_mm would be a scalar loop")
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return Int8Path(None, f"cannot read the CPU's int8 instructions on {platform.system()} "
                              "(no /proc/cpuinfo); the fast path is checked on x86-64 Linux only")
    found = [name for name, need in INT8_ISAS if need <= flags]
    if not found:
        return Int8Path(None, "this CPU has no int8 dot-product instructions (AMX-INT8, AVX512-VNNI or AVX-VNNI): "
                              "oneDNN's int8 GEMM would be no faster than the float64 reference")
    also = f" (also {', '.join(found[1:])})" if len(found) > 1 else ""
    return Int8Path(found[0], f"{_onednn_version()} s8 GEMM on {found[0]}{also}; threads: torch intra-op ({torch.get_num_threads()} at compile time)")
