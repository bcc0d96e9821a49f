"""The per-part table of a :class:`qfx.tune.autotune.Plan`: what each GEMM runs in and why.

One row per layer part (layers with identical shapes and choices are merged, e.g. ``0-11``):
layer, part, GEMM shape (M x N x K), trained and chosen precision, kernel, time (measured or
modelled, with the quantize / epilogue work the choice brings), fp16 time and the speedup
over it; then the predicted whole-model latency next to the fixed strategies (all-fp16,
all-int, q3-only) under the same accounting.

Example::

    >>> print(render_plan(plan))
    qfx plan: bert-base on sm_86 (NVIDIA RTX A6000), batch 32 x seq 128 -- MODELLED, not measured
    ...
"""
from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from qfx.tune.autotune import Plan, PartChoice

__all__ = ["render_plan", "plan_rows"]


def _layers(layers: list[int | None]) -> str:
    known = sorted(x for x in layers if x is not None)
    if not known:
        return "-"
    if known == list(range(known[0], known[-1] + 1)):
        return str(known[0]) if len(known) == 1 else f"{known[0]}-{known[-1]}"
    return ",".join(map(str, known))


def plan_rows(plan: Plan, bucket: int = 0, per_layer: bool = False) -> list[dict]:
    """The table's rows as dicts (layer, part, m, n, k, trained, precision, kernel, us, fp16_us,
    speedup, extra_us), merging layers with the same shape and choice unless ``per_layer``."""
    groups: dict[tuple, list[PartChoice]] = {}
    for c in plan.buckets[bucket].choices:
        key = (c.spec.layer,) if per_layer else ()
        key += (c.spec.part, c.m, c.spec.n, c.spec.k, c.spec.trained, c.precision, c.kernel)
        groups.setdefault(key, []).append(c)
    rows = []
    for cs in groups.values():
        c = cs[0]
        chosen = next(x for x in c.candidates if x.precision == c.precision and x.kernel == c.kernel)
        rows.append(dict(layer=_layers([x.spec.layer for x in cs]), part=c.spec.part, m=c.m, n=c.spec.n, k=c.spec.k,
                         trained=c.spec.trained, precision=c.precision, kernel=c.kernel, us=c.us,
                         extra_us=chosen.extra_us, fp16_us=c.fp16_us, speedup=c.speedup))
    return rows


def render_plan(plan: Plan, bucket: int | None = None, per_layer: bool = False, width: int = 150) -> str:
    """The plan as text (every bucket unless ``bucket`` is given)."""
    buf = io.StringIO()
    con = Console(file=buf, width=width, force_terminal=False, color_system=None)
    tag = "MEASURED" if plan.source == "measured" else "MODELLED, not measured"
    which = range(len(plan.buckets)) if bucket is None else [bucket]
    for i in which:
        b = plan.buckets[i]
        con.print(f"qfx plan: {plan.model} on {plan.target} ({plan.gpu}), batch {b.batch} x seq {b.seq} -- {tag}")
        con.print(f"times: {plan.origin}")
        t = Table("layer", "part", "GEMM M x N x K", "trained", "chosen", "kernel",
                  f"{plan.source} us", "incl. quant/epi/gelu", "fp16 us", "speedup vs fp16")
        for r in plan_rows(plan, i, per_layer):
            t.add_row(r["layer"], r["part"], f"{r['m']} x {r['n']} x {r['k']}", r["trained"], r["precision"], r["kernel"],
                      f"{r['us']:.1f}", f"{r['extra_us']:.1f}", f"{r['fp16_us']:.1f}", f"{r['speedup']:.2f}x")
        con.print(t)
        best_fixed = min(b.fixed_us.items(), key=lambda kv: kv[1]) if b.fixed_us else None
        line = f"predicted whole-model latency: {b.latency_us / 1000:.3f} ms ({plan.source} GEMMs, modelled float parts)"
        if best_fixed:
            others = ", ".join(f"{k} {v / 1000:.3f} ms" for k, v in b.fixed_us.items())
            line += f"; fixed strategies: {others}; best fixed {best_fixed[0]}: {best_fixed[1] / b.latency_us:.2f}x this plan's time"
        con.print(line)
    return buf.getvalue()
