"""What the CUTLASS backend can run, and why not: pure Python over shapes and the manifest.

Nothing here launches work or needs a GPU; the planner (qfx.passes.plan) asks
:func:`can_implement` for every integer linear and shows each refusal in the compile report.
The native library is opened only when a question needs it (never at import).
"""
from __future__ import annotations

import torch

import qfx.backends.cutlass._library as _library
from qfx.targets import get_target, mma_operand

from .configs import ARCH_GROUPS

__all__ = ["available", "can_implement", "family_for", "MAX_EXACT_K"]

#: int8 x int8 codes summed over K never overflow int32 below this K
MAX_EXACT_K = (2**31 - 1) // (128 * 128)


def available() -> tuple[bool, str]:
    """(True, "") when the native library is loaded and a CUDA device is present."""
    lib, why = _library.load()
    if lib is None:
        return False, why
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    return True, ""


def family_for(sm: int, built_archs: list[str]) -> tuple[str | None, str]:
    """Kernel family serving compute capability ``sm`` (e.g. 90) given the built archs."""
    if 90 <= sm < 100:
        if "90a" in built_archs:
            return "sm90a", ""
        return None, f"library built for {built_archs}, not 90a: rebuild with QFX_CUDA_ARCHS=90a"
    if 80 <= sm < 90:
        if set(built_archs) & set(ARCH_GROUPS["sm80"]):
            return "sm80", ""  # sm_80 SASS runs on 8.x; compute_80 PTX covers the rest
        return None, (f"library built for {built_archs}, no sm_8x: rebuild with "
                      f"QFX_CUDA_ARCHS including {sm}")
    return None, f"sm_{sm} is not supported by the cutlass backend (sm_80..sm_90 only)"


def target_sm(target) -> int:
    """The compute capability of ``target``: a qfx Target (its ``sm``), an int, or "sm_90"."""
    sm = getattr(target, "sm", None)
    if sm is not None:
        return int(sm)
    if isinstance(target, int):
        return target
    parsed = get_target(str(target)).sm  # the one parser of target names
    if parsed is None:
        raise ValueError(f"target={target!r} is not a GPU target (e.g. 'sm_90')")
    return int(parsed)


def can_implement(m, n: int | None = None, k: int | None = None, w_bits: int = 8,
                  a_bits: int = 8, group: int | None = None, target="sm_90",
                  require_library: bool = True) -> tuple[bool, str]:
    """Whether an int_linear / int_matmul of this shape and precision runs here, and why not.

    Call as ``can_implement(m, n, k, w_bits, a_bits, group, target)`` (``m`` may be None:
    dynamic) or ``can_implement(work, target)`` with a ``qfx.backends.LinearWork``.
    ``group``: weight quantization group size along K (None = per row); only per-row weights
    are supported. ``target``: a ``qfx.targets.Target``, 90, or "sm_90".
    """
    if hasattr(m, "n") and hasattr(m, "k"):  # a LinearWork
        work = m
        target = n if n is not None else target
        m, n, k = None, work.n, work.k
        w_bits, a_bits, group = work.w_bits, work.a_bits, work.group_size
    if group is not None:
        return False, "group-wise weight scales are not supported by the cutlass epilogue"
    if a_bits not in (4, 8):
        return False, f"a_bits={a_bits}: the cutlass backend runs integer activations only"
    if w_bits not in (4, 8):
        return False, f"w_bits={w_bits}: only 4 and 8 bits"
    sm = target_sm(target)
    built = [a for members in ARCH_GROUPS.values() for a in members]
    if require_library:
        lib, why = _library.load()
        if lib is None:
            return False, why
        built = lib.archs
    family, why = family_for(sm, built)
    if family is None:
        return False, why
    if getattr(target, "family", None) not in (None, family):  # a qfx Target carries its family
        return False, f"target {target.name} is kernel family {target.family}, the library serves {family}"
    k_align = 32 if mma_operand(family, w_bits, a_bits) == "s4" else 16
    if k % k_align:
        return False, f"K={k} is not a multiple of {k_align} (16-byte rows of A and B)"
    if n % 8:
        return False, f"N={n} is not a multiple of 8 (16-byte output rows)"
    if k > MAX_EXACT_K:
        return False, f"K={k} could overflow the int32 accumulator (max {MAX_EXACT_K})"
    if m is not None and m < 0:
        return False, f"M={m} < 0"
    return True, ""
