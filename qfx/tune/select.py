"""The autotuner inside ``qfx.compile(..., tune=...)``: which layer parts stay fp16.

``qfx.compile`` hands this module the graph its pipeline annotated (every linear's layer, role
and trained spec: ``run_passes(..., stop_after="annotate")``) and the user's scenario; :func:`choose_parts` groups the linears into layer parts, asks
:func:`qfx.tune.autotune.autotune` for every candidate's time in every ``(batch, seq)`` bucket
(measured on a GPU of the target's kernel family, else modelled by :mod:`qfx.tune.cost_model`
and marked so) and returns a :class:`TuneDecision`: the linears to keep in float (written into that graph by
:meth:`TuneDecision.apply_to_graph`, before the rest of the pipeline runs) and, for each, the
reason the report prints.

A part is accounted as the compiled graph will run it:

* ``qkv``: one integer GEMM of N = 3h reading one quantize (``fuse_qkv``), or three fp16
  GEMMs of N = h (the float graph keeps HF's separate q, k, v linears);
* the GELU between ``ffn_in`` and ``ffn_out`` goes where the compiled graph puts it: into an
  integer ``ffn_out``'s quantize (``fuse_gelu_quantize``), else into an integer ``ffn_in``'s
  epilogue (``fuse_bias_gelu``), else a kernel of its own; so the two FFN parts of a layer are
  chosen together, from the four combinations;
* on GPUs with fp16 / bf16 float parts the quantize of ``qkv`` and ``ffn_in`` sits in the
  LayerNorm before them (``fuse_add_layer_norm_quantize``), so quantizing them costs only what
  that fused kernel adds over a plain add + LayerNorm; ``attn_out`` and ``ffn_out`` pay a
  quantize kernel.

Only two precisions can be applied per part: the one it was trained for and fp16 (higher, so
always allowed; a W4A4 part is never re-quantized to W8A8 here). Apart from the FFN pair, parts
are independent (the float parts do not change with the choice), so the plan that minimises
the scenario's summed latency is, per part (per FFN pair), the choice with the smallest time
summed over the buckets; ties keep the trained precision. **One graph per compiled model**: when buckets disagree, the summed
choice wins and the report lists each bucket's own preference (the runtime replays one graph
per bucket shape, but all of them are made from the same planned graph, which keeps it simple).

The report prints the decision as a per-part table (:class:`TuningTable`, kept as plain data in
``compiled.report().tuning``): per part and bucket the GEMM shape, the trained and chosen
precision, the kernel the runtime launches (:func:`runtime_kernel`), every candidate's time
and the speedup over fp16; then per bucket the tuned parts' summed time as chosen, all-fp16
and the other fixed strategies, and what that sum leaves out.

Example::

    >>> decision = choose_parts(annotated_gm, "sm_86", Scenario.of(batch=1, seq=128))
    >>> decision.source, decision.skip[:3]
    ('modelled', ('layer0.q', 'layer0.k', 'layer0.v'))
    >>> print(decision.summary())
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
from torch.fx import GraphModule

from qfx.passes.annotate import keep_float
from qfx.schema import META_CAPTURE
from qfx.targets import Target, get_target
from qfx.tune.autotune import Plan, autotune, dominant_precision, fixed_strategies
from qfx.tune.measure import Launchers, TuneCache
from qfx.tune.parts import LayerPart, Scenario, layer_count, layer_parts
from qfx.tune.plan_report import (  # the table's data types live with its printer; named here too
    FAMILY_DEFAULT, FP16_KERNEL, BucketTotal, PartTiming, TuningTable, runtime_kernel,
)

__all__ = ["LayerPart", "PartDecision", "PartTiming", "BucketTotal", "TuningTable", "TuneDecision", "layer_parts",
           "choose_parts", "scenario_for_compile", "tune_for_compile", "runtime_kernel", "FP16_KERNEL",
           "FAMILY_DEFAULT"]

@dataclass(frozen=True)
class PartDecision:
    """The choice for one layer part: times in microseconds summed over the scenario's buckets
    (each bucket: the fastest kernel of a precision, with the work it brings). For the FFN
    pair, ``ffn_in``'s times are its own with ``ffn_out`` as chosen, ``ffn_out``'s those of the
    pair with ``ffn_in`` as chosen (an integer ``ffn_out`` takes the GELU into its quantize)."""

    layer: int | None
    part: str
    names: tuple[str, ...]
    trained: str
    precision: str
    trained_us: float
    fp16_us: float
    #: per bucket: (batch, seq, preferred precision, trained us, fp16 us)
    per_bucket: tuple[tuple[int, int, str, float, float], ...]


@dataclass(frozen=True)
class TuneDecision:
    """What :func:`choose_parts` decided; ``qfx.compile`` applies it to the annotated graph and the report.

    Attributes:
        plan: the autotuner's plan (every candidate of every part and bucket).
        parts: one :class:`PartDecision` per layer part that had a choice.
        skip: linear names to keep in float (fp16 faster).
        reasons: linear name -> the report's reason (float and quantized linears alike).
        source: ``"measured"`` or ``"modelled"``.
        scenario: the buckets tuned for.
        table: the report's per-part table as data (:class:`TuningTable`).
    """

    plan: Plan
    parts: tuple[PartDecision, ...]
    skip: tuple[str, ...]
    reasons: dict[str, str] = field(hash=False)
    source: str
    scenario: Scenario
    #: per layer with a coupled FFN pair: ``{(ffn_in precision, ffn_out precision): us}``
    #: summed over the buckets
    ffn_pairs: dict[int | None, dict[tuple[str, str], float]] = field(default_factory=dict, hash=False)
    #: the same per bucket (scenario order)
    ffn_pair_buckets: dict[int | None, tuple[dict[tuple[str, str], float], ...]] = field(default_factory=dict, hash=False)
    table: TuningTable | None = None

    def bucket_preferences(self) -> dict[tuple[int, int], dict[str, str]]:
        """Per bucket, the precision each part would get if that bucket alone were tuned for
        (``{(1, 128): {"qkv": "fp16", ...}}``; parts merged over layers, the first layer's)."""
        out: dict[tuple[int, int], dict[str, str]] = {}
        for d in self.parts:
            for b, s, pref, _, _ in d.per_bucket:
                out.setdefault((b, s), {}).setdefault(d.part, pref)
        return out

    def chosen(self) -> dict[str, str]:
        """The compiled precision per part (first layer's; every layer of one shape agrees)."""
        out: dict[str, str] = {}
        for d in self.parts:
            out.setdefault(d.part, d.precision)
        return out

    def total_us(self, precisions: dict[str, str] | None = None, bucket: int | None = None) -> float:
        """The tuned parts' time summed over layers and buckets (or in one ``bucket``, an index
        into the scenario), microseconds: the decision's own (``None``) or a fixed strategy's
        (``{part: "fp16" | trained}``, e.g. from :func:`qfx.tune.autotune.fixed_strategies`; a
        part runs fp16 unless its trained precision is asked for). Float parts are left out:
        no choice changes them."""
        def runs(d: PartDecision) -> str:
            if precisions is None:
                return d.precision
            return d.trained if precisions.get(d.part) == d.trained else "fp16"

        total = 0.0
        ffn = {(d.layer, d.part): d for d in self.parts
               if d.layer in self.ffn_pairs and d.part in ("ffn_in", "ffn_out")}
        for d in self.parts:
            if (d.layer, d.part) not in ffn:
                if bucket is None:
                    total += d.fp16_us if runs(d) == "fp16" else d.trained_us
                else:
                    total += d.per_bucket[bucket][4 if runs(d) == "fp16" else 3]
        for layer, table in self.ffn_pairs.items():
            table = table if bucket is None else self.ffn_pair_buckets[layer][bucket]
            total += table[(runs(ffn[(layer, "ffn_in")]), runs(ffn[(layer, "ffn_out")]))]
        return total

    def summary(self) -> str:
        """One paragraph for the report: origin, the plan, each bucket's own preference."""
        plan = ", ".join(f"{p} {prec}" for p, prec in self.chosen().items()) or "nothing to choose"
        lines = [f"autotuner ({self.plan.origin}): {plan} for scenario {_scenario_text(self.scenario)}"]
        prefs = self.bucket_preferences()
        if len(prefs) > 1:
            per = "; ".join(f"{b}x{s}: " + ", ".join(f"{p} {v}" for p, v in want.items()) for (b, s), want in prefs.items())
            agree = all(want == self.chosen() for want in prefs.values())
            lines.append(f"per-bucket preference: {per}" + ("" if agree else
                         " (buckets disagree: one graph per compiled model, the summed latency decides)"))
        return "\n".join(lines)

    def apply_to_graph(self, gm: GraphModule) -> GraphModule:
        """Keep the ``skip`` linears of the annotated graph ``gm`` in float, each with its reason
        (:func:`qfx.passes.annotate.keep_float`: no second annotation); return ``gm``."""
        return keep_float(gm, {name: self.reasons[name] for name in self.skip})

    def apply_to_report(self, report) -> None:
        """Write the reasons into a :class:`qfx.runtime.report.CompileReport` (float parts and notes of
        the integer linears), the summary into its plan origin and the per-part table into
        ``report.tuning``."""
        report.plan_origin = self.summary()
        report.tuning = self.table
        rows = []
        for r in report.linears:
            why = self.reasons.get(r.name)
            if why is not None:
                r = replace(r, note=why if r.backend == "float" else "; ".join(x for x in (r.note, why) if x))
            rows.append(r)
        report.linears[:] = rows
        report.float_parts[:] = [(name, self.reasons.get(name, why)) for name, why in report.float_parts]


def _scenario_text(scenario: Scenario) -> str:
    return " + ".join(f"{b}x{s}" for b, s in scenario.buckets)


def _best(plan: Plan, bucket: int, spec: PartSpec, precision: str) -> float:
    """The fastest candidate of ``precision`` for ``spec`` in one bucket, microseconds."""
    c = next(c for c in plan.buckets[bucket].choices if c.spec == spec)
    return min(x.us for x in c.candidates if x.precision == precision)


def _why(winner: str, loser: str, us: float, other_us: float, where: str, source: str, what: str = "") -> str:
    return f"autotuner: {winner} faster at {where} ({what}{us:.1f} us vs {other_us:.1f} us {loser}, {source})"


def choose_parts(
    parts: "GraphModule | Sequence[LayerPart]",
    target: "Target | str",
    scenario: Scenario,
    *,
    float_dtype: torch.dtype = torch.float16,
    measure: bool | None = None,
    launchers: Launchers | None = None,
    cache: "TuneCache | bool | None" = True,
    timer: Callable[[Callable[[], object]], float] | None = None,
    progress: bool = True,
    max_seq: int | None = None,
) -> TuneDecision:
    """Decide, per layer part, trained precision or fp16 for ``scenario`` on ``target``.

    Args:
        parts: an annotated graph (see :func:`layer_parts`) or its layer parts.
        target: a GPU target (``"sm_86"``, a :class:`qfx.targets.Target`).
        scenario: the ``(batch, seq)`` buckets; the decision minimises their summed latency.
        float_dtype: what the float parts run in (decides whether quantizes fold into LayerNorms).
        measure / launchers / cache / timer / progress: as :func:`qfx.tune.autotune.autotune`
            (measured only on a GPU of the target's family; else modelled).
        max_seq: the model's longest sequence; a longer bucket is refused.

    Returns:
        a :class:`TuneDecision`.
    """
    target = get_target(target)
    if not target.is_gpu:
        raise ValueError(f"tune=... with target={target.name!r}: the CPU runs the exact reference backend and has "
                         "nothing to tune; compile for a GPU target (e.g. target='sm_86') or drop tune")
    if not isinstance(scenario, Scenario):
        raise ValueError(f"tune={scenario!r}: use True (the example call's batch x seq) or a qfx.tune.Scenario")
    _check_limits(scenario, max_seq)
    groups = layer_parts(parts, target, float_dtype) if isinstance(parts, GraphModule) else list(parts)
    if not groups:
        raise ValueError("tune=...: no layer part is quantized (every qkv/attn_out/ffn_in/ffn_out linear is already "
                         "float), so there is nothing to tune; drop tune or compile with mode='int4'/'int8'")
    if launchers is None and measure is not False and torch.cuda.is_available():
        launchers = Launchers.default()  # used only if the GPU present is of the target's family
    if launchers is not None:  # only the precisions a decision can apply are worth timing
        wanted = {g.spec.trained for g in groups} | {"fp16"}
        launchers = Launchers({p: f for p, f in launchers.gemm.items() if p in wanted}, launchers.quantize,
                              launchers.gelu, launchers.norm_quantize)
    # the FFN pair of a layer whose GELU an integer ffn_out's quantize takes: ffn_in is also
    # timed without its GELU (what it runs when ffn_out is integer)
    by_part = {(g.layer, g.part): g for g in groups}
    ffn_pairs = {g.layer: (by_part[(g.layer, "ffn_in")], g) for g in groups
                 if g.part == "ffn_out" and g.spec.quantize_gelu and (g.layer, "ffn_in") in by_part}
    bare = {layer: replace(fin.spec, gelu=False) for layer, (fin, _) in ffn_pairs.items()}
    model_layers = layer_count(parts if isinstance(parts, GraphModule) else groups)
    plan = autotune(None, target, scenario, parts=[g.spec for g in groups] + list(bare.values()), measure=measure,
                    launchers=launchers, cache=cache, timer=timer, progress=progress)
    where, source = _scenario_text(scenario), plan.source
    buckets = list(enumerate(scenario.buckets))
    decided: dict[tuple[int | None, str], PartDecision] = {}
    reasons: dict[str, str] = {}
    timings: dict[tuple[int | None, str], list[PartTiming]] = {}

    def tabulate(g: LayerPart, precision: str, times_per_bucket: list[dict[str, float]]) -> None:
        """The report's rows of one part, with the kernel the runtime launches per bucket."""
        n = g.spec.n // g.spec.fp16_gemms if precision == "fp16" else g.spec.n  # fp16: HF's separate q, k, v
        timings[(g.layer, g.part)] = [
            PartTiming(g.layer, g.part, b, s, g.spec.n, g.spec.k, g.spec.trained, precision,
                       runtime_kernel(target, precision, b * s, n, g.spec.k, g.spec.fp16_gemms, g.spec.act_block), times)
            for (b, s), times in zip(scenario.buckets, times_per_bucket)]

    for g in groups:
        if g.layer in ffn_pairs and g.part in ("ffn_in", "ffn_out"):
            continue
        trained, per = g.spec.trained, []
        for i, (b, s) in buckets:
            t_us, f_us = _best(plan, i, g.spec, trained), _best(plan, i, g.spec, "fp16")
            per.append((b, s, "fp16" if f_us < t_us else trained, t_us, f_us))
        t_sum, f_sum = sum(p[3] for p in per), sum(p[4] for p in per)
        precision = "fp16" if f_sum < t_sum else trained  # ties keep the trained precision
        decided[(g.layer, g.part)] = PartDecision(g.layer, g.part, g.names, trained, precision, t_sum, f_sum, tuple(per))
        tabulate(g, precision, [{trained: p[3], "fp16": p[4]} for p in per])
        why = (_why("fp16", trained, f_sum, t_sum, where, source) if precision == "fp16"
               else _why(trained, "fp16", t_sum, f_sum, where, source))
        reasons.update({name: why for name in g.names})
    pair_tables, pair_bucket_tables = {}, {}
    for layer, (fin, fout) in ffn_pairs.items():
        t_in, t_out = fin.spec.trained, fout.spec.trained
        combos = [(t_in, t_out), (t_in, "fp16"), ("fp16", t_out), ("fp16", "fp16")]  # ties: the first

        def pair_us(i: int, p_in: str, p_out: str) -> tuple[float, float]:
            # an integer ffn_out's quantize applies the GELU; else ffn_in's choice carries it
            spec_in = bare[layer] if p_out != "fp16" else fin.spec
            return _best(plan, i, spec_in, p_in), _best(plan, i, fout.spec, p_out)

        per_bucket_tables = tuple({c: sum(pair_us(i, *c)) for c in combos} for i, _ in buckets)
        pair_bucket_tables[layer] = per_bucket_tables
        table = {c: sum(t[c] for t in per_bucket_tables) for c in combos}
        pair_tables[layer] = table
        p_in, p_out = min(combos, key=table.__getitem__)
        prefs = [min(combos, key=lambda c: sum(pair_us(i, *c))) for i, _ in buckets]
        per_in = tuple((b, s, prefs[i][0], pair_us(i, t_in, p_out)[0], pair_us(i, "fp16", p_out)[0]) for i, (b, s) in buckets)
        per_out = tuple((b, s, prefs[i][1], sum(pair_us(i, p_in, t_out)), sum(pair_us(i, p_in, "fp16"))) for i, (b, s) in buckets)
        for g, prec, per in ((fin, p_in, per_in), (fout, p_out, per_out)):
            t_sum, f_sum = sum(p[3] for p in per), sum(p[4] for p in per)
            decided[(g.layer, g.part)] = PartDecision(g.layer, g.part, g.names, g.spec.trained, prec, t_sum, f_sum, per)
            what = "" if g is fin else "ffn_in + ffn_out, an integer ffn_out's quantize applying the GELU: "
            why = (_why("fp16", g.spec.trained, f_sum, t_sum, where, source, what) if prec == "fp16"
                   else _why(g.spec.trained, "fp16", t_sum, f_sum, where, source, what))
            reasons.update({name: why for name in g.names})
        # the table: ffn_in as in its PartDecision; ffn_out what the pair adds to ffn_in as chosen
        in_chosen = [pair_us(i, p_in, p_out)[0] for i, _ in buckets]
        tabulate(fin, p_in, [{t_in: p[3], "fp16": p[4]} for p in per_in])
        tabulate(fout, p_out, [{t_out: p[3] - in_chosen[i], "fp16": p[4] - in_chosen[i]} for i, p in enumerate(per_out)])
    parts = tuple(decided[(g.layer, g.part)] for g in groups)
    skip = tuple(name for d in parts if d.precision == "fp16" for name in d.names)
    decision = TuneDecision(plan, parts, skip, reasons, source, scenario, pair_tables, pair_bucket_tables)
    in_order = [t for g in groups for t in timings[(g.layer, g.part)]]
    return replace(decision, table=_tuning_table(decision, target, in_order, model_layers))


def _tuning_table(decision: TuneDecision, target: Target, timings: list[PartTiming], layers: int) -> TuningTable:
    """The report's table: the timings and, per bucket, the decision's total next to the fixed
    strategies' under the same times (:meth:`TuneDecision.total_us`)."""
    strategies = fixed_strategies(dominant_precision(decision.parts))  # as the plan's, from the lowest trained precision
    totals = tuple(BucketTotal(b, s, decision.total_us(bucket=i),
                               {name: decision.total_us(rule, bucket=i) for name, rule in strategies.items()})
                   for i, (b, s) in enumerate(decision.scenario.buckets))
    return TuningTable(target.name, decision.source, decision.plan.origin, layers, tuple(timings), totals,
                       ffn_coupled=bool(decision.ffn_pairs))


def _check_limits(scenario: Scenario, max_seq: int | None) -> None:
    for b, s in scenario.buckets:
        if max_seq is not None and s > max_seq:
            raise ValueError(f"tune: scenario bucket (batch={b}, seq={s}) is longer than the model takes "
                             f"({max_seq} tokens, max_position_embeddings); use seq <= {max_seq}")


def scenario_for_compile(tune: Any, capture) -> Scenario:
    """``tune=True``: the example call's ``(batch, seq)`` (from the captured token ids / mask);
    a :class:`Scenario`: itself. Anything else is refused naming ``tune``."""
    if isinstance(tune, Scenario):
        return tune
    if tune is not True:
        raise ValueError(f"tune={tune!r}: use None (no tuning), True (the example call's batch x seq) or "
                         "qfx.tune.Scenario.of(batch=..., seq=...) / Scenario.of(buckets=[...])")
    for name, dims in capture.dims.items():
        value = capture.example_kwargs.get(name)
        if isinstance(value, torch.Tensor) and tuple(dims[:2]) == ("batch", "seq"):
            return Scenario.of(batch=int(value.shape[0]), seq=int(value.shape[1]))
    raise ValueError("tune=True takes batch x seq from the example call, but no [batch, seq] input was found in it; "
                     "pass tune=qfx.tune.Scenario.of(batch=..., seq=...)")


def tune_for_compile(annotated: GraphModule, tune: Any, target: Target, config,
                     float_dtype: torch.dtype) -> TuneDecision:
    """What ``qfx.compile(..., tune=...)`` calls on the graph its pipeline annotated with the
    compile's config and skip: :func:`choose_parts` (the graph is read, not changed;
    :meth:`TuneDecision.apply_to_graph` writes the decision)."""
    if config is None:
        raise ValueError(f"tune={tune!r} with mode='fp16': nothing is quantized, so there is nothing to tune; "
                         "drop tune or compile with mode='int4'/'int8'")
    capture = annotated.meta[META_CAPTURE]
    scenario = scenario_for_compile(tune, capture)
    _check_limits(scenario, capture.max_seq_len)
    return choose_parts(annotated, target, scenario, float_dtype=float_dtype, max_seq=capture.max_seq_len)
