"""The per-part table: what each GEMM runs in and why, for a :class:`qfx.tune.autotune.Plan`
(``python -m qfx plan``) and for a tuned compile (``compiled.report()``); one printer for both.
A tuned compile's table is kept as plain data (:class:`TuningTable`) and handed to the report,
which prints it through :meth:`TuningTable.print_to` without importing the tuner.

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
from dataclasses import dataclass, field
from typing import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

import qfx.backends.cutlass._library as _library  # the manifest of the built configs, without a GPU
from qfx.backends.cutlass.configs import CONFIGS
from qfx.backends.cutlass.dispatch import choose
from qfx.targets import Target, get_target
from qfx.tune.autotune import PRECISIONS, Plan, PartChoice
from qfx.tune.cost_model import block_kernel_name

__all__ = ["render_plan", "plan_rows", "part_table", "print_tuning", "layers_text", "PartTiming", "BucketTotal",
           "TuningTable", "runtime_kernel", "FP16_KERNEL", "FAMILY_DEFAULT", "LEFT_OUT"]


def layers_text(layers: list[int | None]) -> str:
    """Layer indices as text: ``"0-11"``, ``"3"``, ``"0,2,5"`` (``"-"``: none known)."""
    known = sorted(x for x in layers if x is not None)
    if not known:
        return "-"
    if known == list(range(known[0], known[-1] + 1)):
        return str(known[0]) if len(known) == 1 else f"{known[0]}-{known[-1]}"
    return ",".join(map(str, known))


class _VersusFp16:
    """A chosen time (``chosen_us``) beside the time of the same work in fp16 (``fp16_us``)."""

    @property
    def speedup(self) -> float:
        """The fp16 time over the chosen time (1.0 when fp16 is chosen)."""
        return self.fp16_us / self.chosen_us


@dataclass(frozen=True)
class PartTiming(_VersusFp16):
    """One layer part in one scenario bucket, as the report's tuning table shows it.

    ``times``: microseconds per candidate (the trained precision and fp16), each with the work
    it brings (quantize, GELU), measured or modelled (:attr:`TuningTable.source`). For the
    FFN pair (``TuneDecision.ffn_pairs``), ``ffn_in``'s times are its own with ``ffn_out`` as
    chosen, and ``ffn_out``'s the pair's time minus ``ffn_in``'s as chosen: ffn_out's choice
    also moves the GELU (into its quantize, or back to ffn_in), so that work is counted with it.
    Either way the chosen times of a bucket add up to the tuner's total for that bucket.
    ``kernel``: what the runtime launches for the chosen precision at this M
    (:func:`runtime_kernel`).
    """

    layer: int | None
    part: str
    batch: int
    seq: int
    n: int
    k: int
    trained: str
    precision: str
    kernel: str
    times: dict[str, float] = field(hash=False)

    @property
    def chosen_us(self) -> float:
        """The chosen precision's time."""
        return self.times[self.precision]

    @property
    def fp16_us(self) -> float:
        return self.times["fp16"]

    @property
    def m(self) -> int:
        return self.batch * self.seq


@dataclass(frozen=True)
class BucketTotal(_VersusFp16):
    """The tuned parts' summed time in one bucket, microseconds: the decision's (``chosen_us``)
    and each fixed strategy's under the same times (``strategies``: ``"all-fp16"``,
    ``"all-int4"`` / ``"all-int8"``, ``"q3-only"``; :func:`qfx.tune.autotune.fixed_strategies`)."""

    batch: int
    seq: int
    chosen_us: float
    strategies: dict[str, float] = field(hash=False)
    fp16_us = property(lambda self: self.strategies["all-fp16"], doc="The all-fp16 strategy's time.")


#: what an fp16 part runs (the float graph's linears; cuBLAS under the hood on a GPU)
FP16_KERNEL = "cuBLAS (torch.nn.functional.linear)"

#: marks a kernel named from the config table, no library for the target's family being loaded here
FAMILY_DEFAULT = " *"

#: what the tuning table leaves out of the predicted latency: work the choice does not change
LEFT_OUT = ("embeddings, LayerNorms (a quantize folded into one is counted: only what it adds), attention "
            "(scores, softmax, context), residual adds, the linears outside the tuned parts (pooler, classifier, "
            "skipped parts), and host time outside a CUDA graph: the same in every plan, so the whole model's "
            "ratio to all-fp16 is nearer 1 than this")


@dataclass(frozen=True)
class TuningTable:
    """What a tuned compile's report prints, as plain data: ``compiled.report().tuning``.

    Example::

        >>> t = compiled.report().tuning
        >>> for r in t.rows():   # one per part and bucket, layers merged ("all 12 layers")
        ...     print(r["layer"], r["part"], r["m"], r["precision"], r["kernel"], f"{r['speedup']:.2f}x")
        >>> t.totals[0].chosen_us, t.totals[0].fp16_us   # the tuned parts' summed time: as chosen, all-fp16

    Attributes:
        target: the target tuned for (``"sm_90"``).
        source: ``"measured"`` or ``"modelled"`` (every time in the table).
        origin: one line on where the times come from.
        layers: the model's encoder layers (rows merge layers that agree: "all 12 layers").
        timings: one :class:`PartTiming` per layer part and bucket.
        totals: one :class:`BucketTotal` per bucket.
        ffn_coupled: the FFN pair was chosen together (see :class:`PartTiming`).
        left_out: what the predicted latency does not include.
    """

    target: str
    source: str
    origin: str
    layers: int
    timings: tuple[PartTiming, ...]
    totals: tuple[BucketTotal, ...]
    ffn_coupled: bool = False
    left_out: str = LEFT_OUT

    def print_to(self, con: Console) -> None:
        """Print this table as a section of ``compiled.report()`` (:func:`print_tuning`): the
        report renders the section it is handed and knows nothing of the tuner."""
        print_tuning(con, self)

    def rows(self, per_layer: bool = False) -> list[dict]:
        """One dict per (layer group, part, bucket), in layer-part order then bucket order.
        Layers whose part has the same shape, choice, kernels and times in every bucket are
        merged (``layer``: ``"all 12 layers"``, ``"0-5"``, ``"3"``) unless ``per_layer``.
        Keys: layer, part, batch, seq, m, n, k, trained, precision, kernel, times, us,
        fp16_us, speedup (the keys of :func:`plan_rows`)."""
        per_part: dict[tuple[int | None, str], list[PartTiming]] = {}
        for t in self.timings:
            per_part.setdefault((t.layer, t.part), []).append(t)
        groups: dict[tuple, list[tuple[int | None, list[PartTiming]]]] = {}
        for (layer, part), ts in per_part.items():
            key = (part, tuple((t.n, t.k, t.trained, t.precision, t.kernel, tuple(sorted(t.times.items()))) for t in ts))
            groups.setdefault((layer,) + key if per_layer else key, []).append((layer, ts))
        out = []
        for members in groups.values():
            layers = [layer for layer, _ in members]
            known = sorted(x for x in layers if x is not None)
            label = (f"all {self.layers} layers" if self.layers > 1 and known == list(range(self.layers))
                     else layers_text(layers))
            for t in members[0][1]:
                out.append(dict(layer=label, part=t.part, batch=t.batch, seq=t.seq, m=t.m, n=t.n, k=t.k,
                                trained=t.trained, precision=t.precision, kernel=t.kernel, times=dict(t.times),
                                us=t.chosen_us, fp16_us=t.fp16_us, speedup=t.speedup))
        return out


def runtime_kernel(target: Target, precision: str, m: int, n: int, k: int, fp16_gemms: int = 1,
                   act_block: int | None = None) -> str:
    """The kernel a compiled model runs for one GEMM of a part at ``m`` rows (``act_block``: a
    block-scaled integer part runs the Triton block kernel, :func:`qfx.tune.cost_model.block_kernel_name`).

    fp16: :data:`FP16_KERNEL` (``x3`` for HF's separate q, k, v). Integer: the CUTLASS config
    the launch layer picks (:func:`qfx.backends.cutlass.dispatch.choose`, tuned table first)
    among the configs of the loaded library when it was built for the target's kernel family;
    otherwise among every config of the family in the table (what a library built for it would
    pick, marked with :data:`FAMILY_DEFAULT`); ``"modelled"`` when no config fits.
    """
    if precision == "fp16":
        return FP16_KERNEL + (f" x{fp16_gemms}" if fp16_gemms > 1 else "")
    family = target.family
    bits = 4 if precision == "int4" else 8
    if act_block is not None:
        return block_kernel_name(target, bits, act_block)
    operand = target.mma_operand(bits, bits)  # LinearLauncher's operand
    of_family = {c.name for c in CONFIGS if c.arch == family and c.operand == operand}
    lib, _ = _library.load()
    built = of_family & lib.configs if lib is not None else set()
    cfg = choose(family, operand, m, n, k, built or of_family)
    if cfg is None:
        return "modelled"
    return cfg.name if built else cfg.name + FAMILY_DEFAULT


def plan_rows(plan: Plan, bucket: int = 0, per_layer: bool = False) -> list[dict]:
    """The table's rows as dicts (layer, part, m, n, k, trained, precision, kernel, times, us,
    fp16_us, speedup, extra_us), merging layers with the same shape and choice unless
    ``per_layer``. ``times``: the fastest candidate of each precision, microseconds.
    ``kernel``: the chosen candidate's when it names a backend config, else what the runtime
    would launch for it (:func:`runtime_kernel`)."""
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
                             c.spec.k, c.spec.fp16_gemms, c.spec.act_block),
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
