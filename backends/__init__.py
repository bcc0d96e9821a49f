"""Backends that execute qfx's integer ops, in priority order per target.

Each backend answers ``available() -> (ok, reason)`` and
``can_implement(work, target) -> (ok, reason)``; the planner (qfx.passes.plan) asks them in
:func:`backends_for` order and records every answer in the compile report.

CPU: ``cpu`` (torch._int_mm on the CPU's int8 instructions, qfx.backends.cpu), then
``reference`` (exact float64 accumulation, the oracle). GPU: ``cutlass``, then ``reference``.
:func:`only` narrows the list for the compiles inside it, e.g. to run the oracle::

    >>> with qfx.backends.only("reference"):
    ...     ref = qfx.compile(model, mode="int8", target="cpu", example_kwargs=batch)
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
from dataclasses import dataclass

from qfx.backends.cpu import CpuBackend
from qfx.backends.reference import ReferenceBackend
from qfx.backends.triton import block_gemm as _triton_blocks
from qfx.backends.triton import norm_block_quant as _triton_norm_blocks
from qfx.backends.triton import rotation as _triton_rotation
from qfx.ops import register_rotate_forward

# qfx::rotate runs the Triton kernel on a GPU (the same bits as the definition elsewhere)
register_rotate_forward(_triton_rotation.rotate)
# the block-scaled forms of qfx::int_linear / qfx::quantize (act_block set) on a GPU
_triton_blocks.register()
_triton_norm_blocks.register()  # and of qfx::add_layer_norm_quantize (the fused LayerNorm producer)
TritonBlockBackend = _triton_blocks.TritonBlockBackend

__all__ = ["LinearWork", "backends_for", "only", "CpuBackend", "CutlassBackend", "TritonBlockBackend", "ReferenceBackend"]


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
    #: block-scaled activations (QuantConfig(act_block=...)): one scale per token per this many
    #: input channels; None: token-wise. Backends without a block-scaled kernel refuse it.
    act_block: int | None = None


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
        if work.act_block is not None:  # the sm_80/86/89 block kernel; sm_90 leaves them to Triton
            return mod.can_implement_blocks(work, target)
        return mod.can_implement(work, target)


#: the backend names :func:`only` allows (None: all)
_ONLY: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("qfx_backends_only", default=None)


@contextlib.contextmanager
def only(*names: str):
    """Plan the compiles inside this block on the backends ``names`` only (in their usual order).

    ``only("reference")`` runs the float64 oracle on the CPU. A name that is no backend, or a
    target none of the named backends serves, is a ValueError.
    """
    known = {b.name for b in (CpuBackend(), CutlassBackend(), TritonBlockBackend(), ReferenceBackend())}
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ValueError(f"only({', '.join(map(repr, names))}): name one or more of {sorted(known)}")
    token = _ONLY.set(tuple(names))
    try:
        yield
    finally:
        _ONLY.reset(token)


def backends_for(target) -> list:
    """Backends to try for ``target``, fastest first (the reference last, always)."""
    order = [CpuBackend(), ReferenceBackend()] if target.device == "cpu" else [CutlassBackend(), TritonBlockBackend(), ReferenceBackend()]
    allowed = _ONLY.get()
    if allowed is None:
        return order
    picked = [b for b in order if b.name in allowed]
    if not picked:
        raise ValueError(f"qfx.backends.only{allowed}: none of these backends serves target {target.name!r} "
                         f"(its backends: {', '.join(b.name for b in order)})")
    return picked
