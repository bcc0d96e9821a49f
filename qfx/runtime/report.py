"""The compile report: every linear with its role, precision and backend; every float part
with the reason it stays float; where the plan came from; for a tuned compile
(``qfx.compile(..., tune=...)``) the per-part table of the autotuner (``report.tuning``)."""
from __future__ import annotations

import io
import operator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from rich.console import Console
from rich.table import Table
from torch.fx import GraphModule

from qfx.schema import (INTEGER_LINEAR_OPS, INT_LINEAR, META_FUSED, META_LINEAR, META_PARTS, META_PLAN, META_UNPAD, QUANTIZE, ROTATE,
                        LinearInfo, arg, is_call, linear_nodes)


class ReportSection(Protocol):
    """An extra section the report prints as it is handed (e.g. a tuned compile's per-part table,
    :class:`qfx.tune.plan_report.TuningTable`); the report knows nothing of what made it."""

    def print_to(self, con: Console) -> None: ...


__all__ = ["CompileReport", "LinearRow", "build_report"]

_INT_OPS = INTEGER_LINEAR_OPS


@dataclass(frozen=True)
class LinearRow:
    name: str
    layer: int | None
    role: str
    shape: str  # "N x K"
    precision: str  # e.g. "W4A4 sym", or the float dtype
    backend: str
    note: str = ""


@dataclass
class CompileReport:
    mode: str
    target: str
    execution: str
    origin: str  # "QAT" or "post-training quantization"
    run_dtype: str
    linears: list[LinearRow] = field(default_factory=list)
    float_parts: list[tuple[str, str]] = field(default_factory=list)
    plan_origin: str = "rule: first backend in priority order that can implement the op"
    #: a tuned compile's per-part table as data (set by ``TuneDecision.apply_to_report``); None untuned
    tuning: ReportSection | None = None
    #: what padding removal did (``remove_padding``, passes/unpad.py); the path of each call is in
    #: ``CompiledModel.runtime_report()``
    padding_removal: str = ""

    @property
    def quantized(self) -> list[LinearRow]:
        return [r for r in self.linears if r.backend != "float"]

    def render(self, width: int = 140) -> str:
        buf = io.StringIO()
        con = Console(file=buf, width=width, force_terminal=False, color_system=None)
        con.print(f"qfx compile report: mode={self.mode} target={self.target} ({self.execution})")
        con.print(f"weights from: {self.origin}; float parts run in {self.run_dtype}; plan: {self.plan_origin}")
        if self.padding_removal:
            con.print(f"padding removal: {self.padding_removal} (each call's path: compiled.runtime_report())")
        t = Table("linear", "layer", "role", "N x K", "precision", "backend", "note")
        for r in self.linears:
            t.add_row(r.name, "-" if r.layer is None else str(r.layer), r.role, r.shape, r.precision, r.backend, r.note)
        con.print(t)
        if self.float_parts:
            f = Table("left in float", "reason")
            for name, why in self.float_parts:
                f.add_row(name, why)
            con.print(f)
        if self.tuning is not None:
            self.tuning.print_to(con)
        return buf.getvalue()

    def __str__(self) -> str:
        return self.render()


def _input_quantizer_has_gelu(node) -> bool:
    """True when the codes this integer linear reads come from a quantizer that applied GELU."""
    if not is_call(node, INT_LINEAR):
        return False
    codes = arg(node, "a")  # getitem(quantize(...), 0)
    quant = codes.args[0] if is_call(codes, operator.getitem) else None
    return is_call(quant, QUANTIZE) and bool(arg(quant, "gelu"))


def build_report(gm: GraphModule, *, mode: str, target, origin: str, run_dtype: torch.dtype) -> CompileReport:
    rep = CompileReport(mode, target.name, target.int4_execution, origin, str(run_dtype).removeprefix("torch."),
                        padding_removal=str(gm.meta.get(META_UNPAD, "off (remove_padding=False)")))
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and (n.target in _INT_OPS or n in set(linear_nodes(gm)))]
    for node in nodes:
        info: LinearInfo = node.meta[META_LINEAR]
        if node.target in _INT_OPS:
            choice = node.meta.get(META_PLAN)
            backend = arg(node, "backend")
            notes = []
            if "gelu" in node.meta.get(META_FUSED, ()):
                notes.append("bias+GELU fused")
            if _input_quantizer_has_gelu(node):
                notes.append("GELU of its input fused into the quantizer")
            parts = node.meta.get(META_PARTS, (info,))
            if len(parts) > 1:
                notes.append(f"one GEMM {info.name} ({info.out_features} x {info.in_features})")
            if choice is not None and choice.refused:
                notes.append("; ".join(f"not {b}: {why}" for b, why in choice.refused))
            for part in parts:
                shape = f"{part.out_features} x {part.in_features}"
                # ALBERT-style shared layers: one parameter, one spec, so the same codes everywhere
                shared = [f"weight shared with {', '.join(part.shared_with)} (same codes)"] if getattr(part, "shared_with", ()) else []
                rep.linears.append(LinearRow(part.name, part.layer, part.role, shape, part.spec.precision, backend, "; ".join(notes + shared)))
        else:
            shape = f"{info.out_features} x {info.in_features}"
            rep.linears.append(LinearRow(info.name, info.layer, info.role, shape, rep.run_dtype, "float", info.float_reason))
            rep.float_parts.append((info.name, info.float_reason))
    # which kernels / instruction set each chosen backend runs on (e.g. the CPU backend's ISA line)
    chosen = {c.backend: c.reason for n in nodes if (c := n.meta.get("qfx_plan")) is not None}
    rep.plan_origin += "".join(f"; {b}: {why}" for b, why in sorted(chosen.items()))
    rep.float_parts.append(("embeddings, LayerNorm, softmax/attention, residual adds", f"not quantized by qfx (run in {rep.run_dtype})"))
    rotations = [n for n in gm.graph.nodes if is_call(n, ROTATE)]
    if rotations:
        blocks = sorted({n.args[2] for n in rotations})
        rep.float_parts.append((
            f"input rotations ({len(rotations)} qfx::rotate)",
            f"block-Hadamard rotation (blocks of {', '.join(map(str, blocks))}) of the linears' inputs before they are "
            f"quantized (QuantConfig(rotation=...)); computed in fp32, stored in {rep.run_dtype}",
        ))
    return rep
