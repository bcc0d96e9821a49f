"""Loads libqfx_cutlass.so with ctypes and mirrors its C ABI (csrc/qfx_abi.h).

Nothing here launches work by itself; ``__init__.py`` validates inputs and calls
:func:`call`. The library is found next to this file (where ``pip install -e .`` builds it) or
at ``$QFX_CUTLASS_LIB``.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import warnings
from pathlib import Path

import torch

__all__ = ["Library", "load", "pdl", "plain_launches", "erf_mismatch", "QfxGemmArgs", "STATUS", "DTYPE_CODES", "ABI_VERSION"]

ABI_VERSION = 3  # csrc/qfx_abi.h QFX_ABI_VERSION
LIB_NAME = "libqfx_cutlass.so"
MANIFEST_NAME = "qfx_cutlass_manifest.json"

STATUS = {
    0: "ok",
    1: "CUTLASS can_implement() refused the problem",
    2: "kernel parameter setup failed",
    3: "the kernel launch returned a CUDA error",
    4: "the workspace given is smaller than the kernel needs",
    5: "bad argument",
}
DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2}


class QfxGemmArgs(ctypes.Structure):
    _fields_ = [
        ("a", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("d", ctypes.c_void_p),
        ("a_scale", ctypes.c_void_p),
        ("a_offset", ctypes.c_void_p),
        ("w_scale", ctypes.c_void_p),
        ("w_offset_sum", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("m", ctypes.c_int),
        ("n", ctypes.c_int),
        ("k", ctypes.c_int),
        ("gelu", ctypes.c_int),
        ("out_dtype", ctypes.c_int),
        ("sm_count", ctypes.c_int),
        ("splits", ctypes.c_int),
        ("workspace", ctypes.c_void_p),
        ("workspace_bytes", ctypes.c_size_t),
        ("stream", ctypes.c_void_p),
    ]


def erf_mismatch(built: str, torch_cuda: str | None) -> str:
    """Why the library's GELU epilogue may differ from torch's, or "": it calls the erff of the nvcc
    that built it, torch's GELU the erff of the CUDA torch was built with, and erff's polynomials
    changed between CUDA releases (backends/cutlass/EPILOGUES.md, "Which erf")."""
    def major_minor(v):
        return tuple(v.split(".")[:2]) if v else None

    if not built or not torch_cuda or major_minor(built) == major_minor(torch_cuda):
        return ""
    return (f"qfx's native library was built with CUDA {built}, torch with CUDA {torch_cuda}: their erf may "
            "differ in the last bit, and with it every GELU the integer epilogues compute, so a compiled model "
            "can differ from its QAT twin after a GELU; rebuild the library with the CUDA torch uses "
            "(pip install -e . with that nvcc)")


class Library:
    """The loaded library: its manifest (built configs, archs) and typed entry points."""

    def __init__(self, path: Path):
        self.path = path
        self.cdll = ctypes.CDLL(str(path))
        self.cdll.qfx_abi_version.restype = ctypes.c_int
        abi = self.cdll.qfx_abi_version()
        if abi != ABI_VERSION:
            raise RuntimeError(f"{path} has ABI {abi}, Python expects {ABI_VERSION}: rebuild "
                               "the native library (pip install -e .)")
        manifest = path.parent / MANIFEST_NAME
        self.manifest = json.loads(manifest.read_text()) if manifest.exists() else {}
        self.archs: list[str] = self.manifest.get("archs", [])
        self.configs: set[str] = set(self.manifest.get("configs", []))
        self._fns: dict[str, ctypes._CFuncPtr] = {}
        #: the nvcc version that built the kernels ("" for a library built before it was recorded)
        self.cuda: str = self.manifest.get("cuda", "")
        note = erf_mismatch(self.cuda, torch.version.cuda)
        if note:
            warnings.warn(note, stacklevel=2)
        #: programmatic dependent launch (csrc/qfx_launch.cuh): (on, why)
        self.pdl = self._set_pdl()

    def _set_pdl(self) -> tuple[bool, str]:
        """PDL on for an sm_90 device (each qfx kernel's launch overlaps the tail of the kernel
        before it; they wait for it before touching memory), unless ``QFX_PDL=0``."""
        if not self.has("qfx_set_pdl"):
            return False, "the library predates programmatic dependent launch"
        if os.environ.get("QFX_PDL", "1").strip() == "0":
            on, why = False, "off (QFX_PDL=0)"
        elif not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
            on, why = False, "off (needs sm_90: griddepcontrol)"
        else:
            on, why = True, "on (sm_90; QFX_PDL=0 turns it off)"
        self.set_pdl(on)
        return on, why

    def set_pdl(self, on: bool) -> None:
        """Launch qfx's kernels with PDL (``on``) or plainly from the next launch on; ``self.pdl`` keeps
        the policy (:func:`plain_launches` switches it off for a while and back)."""
        self.fn("qfx_set_pdl", None, [ctypes.c_int])(int(on))

    def has(self, symbol: str) -> bool:
        return hasattr(self.cdll, symbol)

    def fn(self, symbol: str, restype=ctypes.c_int, argtypes: list | None = None):
        """The typed entry point ``symbol``; its signature is set once, on first use."""
        f = self._fns.get(symbol)
        if f is None:
            f = getattr(self.cdll, symbol)
            f.restype = restype
            if argtypes is not None:
                f.argtypes = argtypes
            self._fns[symbol] = f
        return f


def _candidates() -> list[Path]:
    env = os.environ.get("QFX_CUTLASS_LIB")
    if env:
        return [Path(env)]
    return [Path(__file__).resolve().parent / LIB_NAME]


@functools.lru_cache(maxsize=1)
def load() -> tuple[Library | None, str]:
    """(library, "") or (None, why it is unavailable). Cached: loaded once per process."""
    for path in _candidates():
        if path.exists():
            try:
                return Library(path), ""
            except (OSError, RuntimeError) as e:
                return None, f"could not load {path}: {e}"
    return None, (f"{LIB_NAME} not built (looked in {[str(p) for p in _candidates()]}); "
                  "run `pip install -e .` on a machine with nvcc, or set QFX_CUTLASS_LIB")


def pdl() -> str:
    """Whether qfx's kernels are launched with programmatic dependent launch, and why (the runtime
    report's line; loads the library)."""
    lib, why = load()
    return lib.pdl[1] if lib is not None else f"off ({why})"


@contextlib.contextmanager
def plain_launches():
    """Within: qfx's kernels launch without PDL (to measure it, or to check it changes no bit; CUDA graphs
    captured within keep plain launches). A library without PDL: nothing to switch."""
    lib, _ = load()
    if lib is None or not lib.has("qfx_set_pdl"):
        yield
        return
    lib.set_pdl(False)
    try:
        yield
    finally:
        lib.set_pdl(lib.pdl[0])


def check(status: int, what: str) -> None:
    """Raise RuntimeError naming the entry point when the C call failed."""
    if status != 0:
        raise RuntimeError(f"qfx cutlass: {what} failed: {STATUS.get(status, status)}")
