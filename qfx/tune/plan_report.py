"""The per-part table: what each GEMM runs in and why, for a :class:`qfx.tune.autotune.Plan`
(``python -m qfx plan``) and for a tuned compile (``compiled.report()``); one printer for both.

One row per layer part (layers with identical shapes and choices are merged, e.g. ``0-11``):
layer, part, GEMM shape (M x N x K), trained and chosen precision, kernel, the time of each
candidate precision (measured or modelled, with the quantize / epilogue / GELU work the choice
brings) and the chosen one's speedup over fp16; then the predicted latency next to the fixed
strategies (all-fp16, all-int, q3-only) under the same accounting.

Example::

    >>> print(render_plan(plan))
    qfx plan: bert-base on sm_86 (NVIDIA RTX A6000), batch 32 x seq 128 -- MODELLED, not measured
    ...
    >>> print(compiled.report())     # a tuned compile ends with print_tuning's table
"""
from __future__ import annotations

import io
from typing import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from qfx.targets import get_target
from qfx.tune.autotune import PRECISIONS, Plan, PartChoice
from qfx.tune.select import FAMILY_DEFAULT, TuningTable, runtime_kernel

__all__ = ["render_plan", "plan_rows", "part_table", "print_tuning", "layers_text"]


def layers_text(layers: list[int | None]) -> str:
    """Layer indices as text: ``"0-11"``, ``"3"``, ``"0,2,5"`` (``"-"``: none known)."""
    known = sorted(x for x in layers if x is not None)
    if not known:
        return "-"
    if known == list(range(known[0], known[-1] + 1)):
        return str(known[0]) if len(known) == 1 else f"{known[0]}-{known[-1]}"
    return ",".join(map(str, known))


def plan_rows(plan: Plan, bucket: int = 0, per_layer: bool = False) -> list[dict]:
    """The table's rows as dicts (layer, part, m, n, k, trained, precision, kernel, times, us,
    fp16_us, speedup, extra_us), merging layers with the same shape and choice unless
    ``per_layer``. ``times``: the fastest candidate of each precision, microseconds.
    ``kernel``: the chosen candidate's when it names a backend config, else what the runtime
    would launch for it (:func:`qfx.tune.select.runtime_kernel`)."""
    from qfx.backends.cutlass.configs import CONFIGS

    target, configs = get_target(plan.target), {cfg.name for cfg in CONFIGS}
    groups: dict[tuple, list[PartChoice]] = {}
    for c in plan.buckets[bucket].choices:
        key = (c.spec.layer,) if per_layer else ()
        key += (c.spec.part, c.m, c.spec.n, c.spec.k, c.spec.trained, c.precision, c.kernel)
        groups.setdefault(key, []).append(c)
    rows = []
    for cs in groups.values():
        c = cs[0]
        chosen = next(x for x in c.candidates if x.precision == c.precision and x.kernel == c.kernel)
        times = {p: min(x.us for x in c.candidates if x.precision == p)
                 for p in PRECISIONS if any(x.precision == p for x in c.candidates)}
        times[c.precision] = c.us  # the chosen kernel (the fastest of its precision unless a margin kept it)
        rows.append(dict(layer=layers_text([x.spec.layer for x in cs]), part=c.spec.part, m=c.m, n=c.spec.n, k=c.spec.k,
                         trained=c.spec.trained, precision=c.precision, times=times, us=c.us,
                         kernel=c.kernel if c.kernel in configs else runtime_kernel(
                             target, c.precision, c.m, c.spec.n // (c.spec.fp16_gemms if c.precision == "fp16" else 1),
                             c.spec.k, c.spec.fp16_gemms),
                         extra_us=chosen.extra_us, fp16_us=c.fp16_us, speedup=c.speedup))
    return rows


def part_table(rows: Sequence[dict], source: str) -> Table:
    """The per-part table of ``rows`` (:func:`plan_rows` or ``TuningTable.rows()``): a column
    per candidate precision present, times in microseconds marked ``source``; a ``batch x seq``
    column when the rows span several buckets, the chosen time's quantize / epilogue / GELU
    share when they carry it (``extra_us``)."""
    buckets = len({(r["batch"], r["seq"]) for r in rows if "batch" in r}) > 1
    precisions = [p for p in PRECISIONS if any(p in r["times"] for r in rows)]
    extra = bool(rows) and all("extra_us" in r for r in rows)
    # no vertical rules, one space between columns: the report's 140 columns hold a config name
    # and ten columns; everything is read (and grepped) whole, only headers take two lines
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for header in ("layer", "part", *(["batch\nx seq"] if buckets else []), "GEMM M x N x K", "trained", "chosen", "kernel"):
        t.add_column(header, no_wrap=True)
    for header in (*[f"{p} us\n{source}" for p in precisions], *(["incl. quant\n/epi/gelu"] if extra else []),
                   "speedup\nvs fp16"):
        t.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        times = [f"{r['times'][p]:.1f}" if p in r["times"] else "-" for p in precisions]
        t.add_row(r["layer"], r["part"], *([f"{r['batch']} x {r['seq']}"] if buckets else []),
                  f"{r['m']} x {r['n']} x {r['k']}", r["trained"], r["precision"], r["kernel"], *times,
                  *([f"{r['extra_us']:.1f}"] if extra else []), f"{r['speedup']:.2f}x")
    return t


#: the legend under every per-part table
SPEEDUP_LEGEND = ("times: one layer's part, microseconds, each with the quantize / epilogue / GELU work it brings; "
                  "speedup vs fp16: the fp16 time over the chosen time")


def _family_default_note(con: Console, rows: Sequence[dict], target: str) -> None:
    if any(r["kernel"].endswith(FAMILY_DEFAULT) for r in rows):
        con.print(f"{FAMILY_DEFAULT.strip()} no native library for {target}'s kernel family is loaded here: the config the "
                  "backend's table gives that shape and M (what a library built for it runs)")


def _console(buf: io.StringIO, width: int) -> Console:
    return Console(file=buf, width=width, force_terminal=False, color_system=None)


def render_plan(plan: Plan, bucket: int | None = None, per_layer: bool = False, width: int = 150) -> str:
    """The plan as text (every bucket unless ``bucket`` is given)."""
    buf = io.StringIO()
    con = _console(buf, width)
    tag = "MEASURED" if plan.source == "measured" else "MODELLED, not measured"
    which = range(len(plan.buckets)) if bucket is None else [bucket]
    for i in which:
        b = plan.buckets[i]
        con.print(f"qfx plan: {plan.model} on {plan.target} ({plan.gpu}), batch {b.batch} x seq {b.seq} -- {tag}")
        con.print(f"times: {plan.origin}")
        rows = plan_rows(plan, i, per_layer)
        con.print(part_table(rows, plan.source))
        con.print(SPEEDUP_LEGEND)
        _family_default_note(con, rows, plan.target)
        best_fixed = min(b.fixed_us.items(), key=lambda kv: kv[1]) if b.fixed_us else None
        line = f"predicted whole-model latency: {b.latency_us / 1000:.3f} ms ({plan.source} GEMMs, modelled float parts)"
        if best_fixed:
            others = ", ".join(f"{k} {v / 1000:.3f} ms" for k, v in b.fixed_us.items())
            line += f"; fixed strategies: {others}; best fixed {best_fixed[0]}: {best_fixed[1] / b.latency_us:.2f}x this plan's time"
        con.print(line)
    return buf.getvalue()


def print_tuning(con: Console, table: TuningTable) -> None:
    """A tuned compile's section of ``compiled.report()``: the per-part table (one row per
    merged layer group, part and bucket), then per bucket the predicted latency of the tuned
    parts as chosen vs all-fp16 and the other fixed strategies, and what that sum leaves out."""
    tag = "MEASURED" if table.source == "measured" else "MODELLED, not measured"
    scenario = " + ".join(f"{t.batch}x{t.seq}" for t in table.totals)
    con.print(f"autotuner per-part plan for {table.target}, scenario {scenario} (batch x seq) -- {tag}; times: {table.origin}")
    rows = table.rows()
    con.print(part_table(rows, table.source))
    con.print(SPEEDUP_LEGEND)
    _family_default_note(con, rows, table.target)
    if table.ffn_coupled:
        con.print("ffn_in and ffn_out are chosen together: an integer ffn_out's quantize applies the GELU, else "
                  "ffn_in's epilogue or a kernel of its own does; ffn_in's times are its own with ffn_out as chosen, "
                  "ffn_out's what the pair adds to them (the GELU moves with ffn_out's choice)")
    for t in table.totals:
        others = ", ".join(f"{name} {us:.1f} us" for name, us in t.strategies.items() if name != "all-fp16")
        con.print(f"predicted latency of the tuned parts at {t.batch} x {t.seq} (summed over layers, {table.source}): "
                  f"{t.chosen_us:.1f} us as chosen vs {t.fp16_us:.1f} us all-fp16 ({t.speedup:.2f}x); {others}")
    if len(table.totals) > 1:
        chosen, fp16 = sum(t.chosen_us for t in table.totals), sum(t.fp16_us for t in table.totals)
        con.print(f"over the scenario (the sum the tuner minimises): {chosen:.1f} us as chosen vs {fp16:.1f} us all-fp16 "
                  f"({fp16 / chosen:.2f}x)")
    con.print(f"left out of these sums: {table.left_out}")
