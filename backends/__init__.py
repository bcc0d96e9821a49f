"""Backends that execute qfx's integer ops, in priority order per target.

Each backend answers ``available() -> (ok, reason)`` and
``can_implement(work, target) -> (ok, reason)``; the planner (qfx.passes.plan) asks them in
:func:`backends_for` order and records every answer in the compile report.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from qfx.backends.reference import ReferenceBackend
from qfx.backends.triton import rotation as _triton_rotation
from qfx.ops import register_rotate_forward

# qfx::rotate runs the Triton kernel on a GPU (the same bits as the definition elsewhere)
register_rotate_forward(_triton_rotation.rotate)

__all__ = ["LinearWork", "backends_for", "CutlassBackend", "ReferenceBackend"]


@dataclass(frozen=True)
class LinearWork:
    """One integer linear as a backend sees it (M is dynamic)."""

    name: str
    n: int
    k: int
    w_bits: int
    a_bits: int  # 16: float activations (weight-only)
    symmetric: bool
    group_size: int | None
    gelu: bool


class CutlassBackend:
    """The native CUTLASS library (qfx.backends.cutlass), loaded lazily."""

    name = "cutlass"

    def _module(self):
        try:
            return importlib.import_module("qfx.backends.cutlass"), ""
        except Exception as e:  # a missing or broken native build must not break CPU use
            return None, f"qfx.backends.cutlass failed to import: {e}"

    def available(self) -> tuple[bool, str]:
        mod, why = self._module()
        if mod is None:
            return False, why
        if not hasattr(mod, "available"):
            return False, "qfx.backends.cutlass has no kernels in this build"
        return mod.available()

    def can_implement(self, work: LinearWork, target) -> tuple[bool, str]:
        ok, why = self.available()
        if not ok:
            return False, why
        mod, _ = self._module()
        return mod.can_implement(work, target)


def backends_for(target) -> list:
    """Backends to try for ``target``, fastest first."""
    if target.device == "cpu":
        return [ReferenceBackend()]
    return [CutlassBackend(), ReferenceBackend()]
