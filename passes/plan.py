"""plan: bind every integer op to the first backend that can implement it (L4 -> L5).

Pattern: each ``qfx::int_linear`` / ``qfx::weight_only_linear`` / ``qfx::quantize`` node.
Backends are asked in :func:`qfx.backends.backends_for` order; every refusal and its reason is
kept in ``node.meta["qfx_plan"]`` for the report, so nothing changes backend silently.

Invariant: only the trailing ``backend`` argument changes; all backends implement the same
op semantics (qfx.ops), so the graph's numbers change only within the stated rounding bound.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from qfx.backends import LinearWork, backends_for
from qfx.ops import registered_backends
from qfx.schema import INTEGER_LINEAR_OPS, INT_LINEAR, META_LINEAR, META_PLAN, QUANTIZE, arg, is_call, set_args

__all__ = ["plan", "PlanChoice"]

_LINEAR_OPS = INTEGER_LINEAR_OPS


@dataclass(frozen=True)
class PlanChoice:
    backend: str
    reason: str
    refused: tuple[tuple[str, str], ...] = ()


def _work(node) -> LinearWork:
    info = node.meta[META_LINEAR]
    spec = info.spec
    gelu = node.target == INT_LINEAR and bool(arg(node, "gelu"))
    return LinearWork(info.name, info.out_features, info.in_features, spec.weight_bits, spec.act_bits, spec.symmetric,
                      spec.group_size, gelu, spec.act_block)


def _with_backend(node, backend: str) -> None:
    set_args(node, backend=backend)


def plan(gm: GraphModule, target) -> GraphModule:
    """Choose a backend per integer op for ``target`` and record why."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _LINEAR_OPS:
            continue
        refused = []
        for backend in backends_for(target):
            ok, why = backend.can_implement(_work(node), target)
            if ok:
                _with_backend(node, backend.name)
                node.meta[META_PLAN] = PlanChoice(backend.name, why, tuple(refused))
                break
            refused.append((backend.name, why))
        else:  # the reference backend implements everything; reaching here is a bug
            raise RuntimeError(f"no backend can implement {node.meta[META_LINEAR].name}: {refused}")
    # Quantize ops go with the backend of their consumers when it has a quantize kernel; block codes for
    # a GPU GEMM backend without a block quantize (the sm_8x CUTLASS block kernel) take the first backend
    # of the target that has one (the Triton block quantize: the same codes, qfx.numerics' definition).
    block_quantizers = [b.name for b in backends_for(target) if b.name in registered_backends("quantize", blocks=True)
                        and b.available()[0]]
    for node in gm.graph.nodes:
        if is_call(node, QUANTIZE):
            users = [u for g in node.users for u in g.users]
            chosen = {arg(u, "backend") for u in users if u.target in _LINEAR_OPS}
            blocks = arg(node, "act_block") is not None
            op_backend = next(iter(chosen)) if len(chosen) == 1 else None
            if op_backend in registered_backends("quantize", blocks=blocks):
                _with_backend(node, op_backend)
            elif blocks and op_backend == "cutlass" and block_quantizers:
                _with_backend(node, block_quantizers[0])
    gm.graph.lint()
    gm.recompile()
    return gm
