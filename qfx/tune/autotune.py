"""Per-layer-part autotuner: which precision and kernel each GEMM of an encoder runs in.

For a target and a scenario (one ``batch x seq``, or several buckets), every layer part
(``qkv``, ``attn_out``, ``ffn_in``, ``ffn_out``) of every GEMM shape gets the candidate that is
fastest *with the work it brings*: an integer GEMM needs its input quantized (a quantize kernel,
shared by q/k/v) and, on backends without a fused epilogue, a dequant kernel; an fp16 FFN-in
runs GELU as its own kernel where the integer one fuses it. A part never runs below the
precision it was trained for (int4 < int8 < fp16); higher is always allowed (the paper, 4.2:
"using a higher-bit computation data type for a QAT model does not degrade the inference
accuracy"); the trained precision is kept on ties (or within ``margin``).

Times come from the GPU present (``source="measured"``) when it is of the target's kernel
family, else from :mod:`qfx.tune.cost_model` (``source="modelled"``): a plan for an absent
target is never presented as measured. Measuring takes callables (:class:`Launchers`), so the
backend plugs its own kernels in; fp16 is ``torch.nn.functional.linear``. Measured times are
cached on disk (:class:`TuneCache`) keyed by GPU name, driver, library version and shape; a
cache from another GPU or version, or a corrupt one, is ignored with a warning.

Example::

    >>> from qfx.tune import tune, MODEL_SHAPES, Scenario
    >>> plan = tune(MODEL_SHAPES["bert-base"], "sm_86", Scenario.of(batch=32, seq=128))
    >>> plan.source, [c.precision for c in plan.buckets[0].choices][:4]
    ('modelled', ['int4', 'int4', 'int4', 'int4'])
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

import qfx.tune.cost_model as cost_model
from qfx.targets import Target, family_of, get_target
import qfx.tune.evidence as evidence
from qfx.tune.cost_model import ModelShape
from qfx.tune.measure import AutotuneCacheWarning, Launchers, TuneCache, machine_identity, time_us
from qfx.tune.parts import (
    PRECISIONS, TUNED_ROLES, PartSpec, Scenario, allowed_precisions, part_specs, part_specs_from_graph,
)

__all__ = [
    "PRECISIONS", "allowed_precisions", "Scenario", "PartSpec", "Candidate", "PartChoice", "BucketPlan",
    "Plan", "Launchers", "TuneCache", "AutotuneCacheWarning", "machine_identity", "time_us", "autotune",
    "part_specs", "part_specs_from_graph", "fixed_strategies", "dominant_precision",
]

_BITS = {"int4": 4, "int8": 8}


@dataclass(frozen=True)
class Candidate:
    """One timed way to run a part: the GEMM and the work it brings, microseconds."""

    precision: str
    kernel: str
    gemm_us: float
    extra_us: float = 0.0  # quantize / unfused epilogue / unfused GELU

    @property
    def us(self) -> float:
        return self.gemm_us + self.extra_us


@dataclass(frozen=True)
class PartChoice:
    """The tuner's answer for one part at one M."""

    spec: PartSpec
    m: int
    precision: str
    kernel: str
    us: float
    fp16_us: float
    candidates: tuple[Candidate, ...]

    @property
    def speedup(self) -> float:
        return self.fp16_us / self.us


@dataclass(frozen=True)
class BucketPlan:
    batch: int
    seq: int
    choices: tuple[PartChoice, ...]
    latency_us: float  # predicted whole-model forward (float parts modelled)
    fixed_us: dict[str, float] = field(default_factory=dict)  # the fixed strategies, same accounting

    def choice(self, layer: int | None, part: str) -> PartChoice:
        for c in self.choices:
            if c.spec.layer == layer and c.spec.part == part:
                return c
        raise KeyError(f"no choice for layer {layer} part {part!r}")


@dataclass(frozen=True)
class Plan:
    """What runs where: per bucket, per part; ``source`` is "measured" or "modelled"."""

    target: str
    gpu: str
    source: str
    model: str
    buckets: tuple[BucketPlan, ...]
    origin: str  # one line: "measured on NVIDIA H100 ..." / "modelled for sm_86 (NVIDIA RTX A6000) ..."

    def precisions(self, bucket: int = 0) -> dict[tuple[int | None, str], str]:
        return {(c.spec.layer, c.spec.part): c.precision for c in self.buckets[bucket].choices}


def _modelled_candidates(target: Target, spec: PartSpec, m: int, fused_quantize: bool,
                         fused_epilogue: bool | None) -> list[Candidate]:
    out = []
    for prec in allowed_precisions(spec.trained):
        gemms = spec.fp16_gemms if prec == "fp16" else 1
        est = cost_model.part_time(target, spec.part, m, spec.n // gemms, spec.k, prec, gelu=spec.has_gelu,
                                   fused_quantize=fused_quantize or spec.quantize_in_norm, fused_epilogue=fused_epilogue,
                                   act_block=spec.act_block, symmetric=spec.symmetric)
        kernel = est.gemm.kernel + (f" x{gemms}" if gemms > 1 else "")
        if prec == "int4" and target.mma_operand(4, 4) == "s8":
            kernel += " (int4 codes on INT8 tensor cores)"
        out.append(Candidate(prec, kernel, gemms * est.gemm.us, gemms * (est.us - est.gemm.us)))
    return out


def _measured_candidates(target: Target, spec: PartSpec, m: int, launchers: Launchers, cache: TuneCache | None,
                         timer: Callable[[Callable[[], object]], float], progress) -> list[Candidate]:
    gelu = spec.has_gelu

    def timed(key: str, make: Callable[[], Callable[[], object]]) -> float:
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            return hit
        us = timer(make())
        if cache is not None:
            cache.put(key, us)
        return us

    out = []
    for prec in allowed_precisions(spec.trained):
        factory = launchers.gemm.get(prec)
        if factory is None:
            continue  # the backend offers no kernel for it here: not a candidate
        extra = 0.0
        gemms = spec.fp16_gemms if prec == "fp16" else 1
        n = spec.n // gemms
        if prec != "fp16":
            bits = _BITS[prec]
            if spec.quantize_in_norm and launchers.norm_quantize is not None:
                fused = timed(f"norm_quantize|{bits}|{m}|{spec.k}", lambda: launchers.norm_quantize(m, spec.k, bits)[0])
                plain = timed(f"norm|{m}|{spec.k}", lambda: launchers.norm_quantize(m, spec.k, bits)[1])
                extra = max(0.0, fused - plain)
            else:
                if launchers.quantize is None:
                    raise ValueError(f"Launchers.quantize is missing: {prec} candidates need the quantize kernel timed")
                if spec.quantize_gelu:
                    extra = timed(f"quantize|{bits}|{m}|{spec.k}|gelu", lambda: launchers.quantize(m, spec.k, bits, gelu=True))
                else:
                    extra = timed(f"quantize|{bits}|{m}|{spec.k}", lambda: launchers.quantize(m, spec.k, bits))
        elif gelu and launchers.gelu is not None:
            extra = timed(f"gelu|{m}|{spec.n}", lambda: launchers.gelu(m, spec.n))
        kernels = None
        names = [k for k in (cache.entries if cache is not None else {}) if k.startswith(f"{prec}|") and k.endswith(f"|{m}|{n}|{spec.k}|{int(gelu)}")]
        if names:  # everything of this shape is cached: no need to build inputs
            kernels = [(k.split("|")[1], cache.get(k)) for k in names]
        else:
            kernels = [(name, timed(f"{prec}|{name}|{m}|{n}|{spec.k}|{int(gelu)}", lambda fn=fn: fn))
                       for name, fn in factory(m, n, spec.k, gelu)]
        for name, us in kernels:
            out.append(Candidate(prec, name + (f" x{gemms}" if gemms > 1 else ""), gemms * us, extra))
        progress.update(1)
    if not any(c.precision == "fp16" for c in out):
        raise ValueError("Launchers.gemm has no 'fp16' entry: the tuner needs the fp16 baseline")
    return out


def _choose(candidates: Sequence[Candidate], trained: str, margin: float) -> Candidate:
    trained_best = min((c for c in candidates if c.precision == trained), key=lambda c: c.us, default=None)
    best = min(candidates, key=lambda c: c.us)
    if trained_best is not None and best.us >= trained_best.us * (1 - margin):
        return trained_best  # switch away from the trained precision only for a clear gain
    return best


def fixed_strategies(trained: str) -> dict[str, dict[str, str]]:
    """The paper's fixed strategies for a model trained in ``trained``: all parts quantized
    ("qall"), only FFN-in ("q3", the paper's best at small bs x seq) and all-fp16."""
    return {
        f"all-{trained}": {p: trained for p in TUNED_ROLES},
        "q3-only": {"qkv": "fp16", "attn_out": "fp16", "ffn_in": trained, "ffn_out": "fp16"},
        "all-fp16": {p: "fp16" for p in TUNED_ROLES},
    }


def _latency(target: Target, shape: ModelShape | None, batch: int, seq: int, choices: Sequence[PartChoice]) -> float:
    """Whole-model time: the chosen parts' times (measured or modelled) + the modelled float parts."""
    gemm_total = sum(c.us for c in choices)
    if shape is None or not target.is_gpu:
        return gemm_total
    # the float parts are priced in the parts' own activation form (one block and scheme per model:
    # QuantConfig's), so the accounting stays model_latency's if it ever charges the block there
    act_block, symmetric = _activation_form([c.spec for c in choices])
    float_only, parts = cost_model.model_latency(target, shape, batch, seq, "fp16", act_block=act_block,
                                                 symmetric=symmetric)
    return gemm_total + float_only - shape.layers * sum(p.us for p in parts)


def _activation_form(specs: Sequence[PartSpec]) -> tuple[int | None, bool]:
    """The integer parts' ``(act_block, symmetric)``: token-wise and symmetric when none is integer;
    a model quantizes every part one way (one QuantConfig), so more than one form is refused."""
    forms = {(s.act_block, s.symmetric) for s in specs if s.trained != "fp16"}
    if len(forms) > 1:
        raise ValueError(f"parts: the integer parts mix activation forms {sorted(forms, key=repr)} "
                         "((act_block, symmetric)); plan a model quantized one way (one QuantConfig)")
    return forms.pop() if forms else (None, True)


def autotune(
    shape: ModelShape | None,
    target: "Target | str",
    scenario: Scenario,
    trained: str | dict[str, str] = "int4",
    *,
    parts: Sequence[PartSpec] | None = None,
    measure: bool | None = None,
    launchers: Launchers | None = None,
    cache: TuneCache | None | bool = True,
    timer: Callable[[Callable[[], object]], float] | None = None,
    margin: float = 0.0,
    progress: bool = True,
    fused_quantize: bool = False,
    fused_epilogue: bool | None = None,
    act_block: int | None = None,
    symmetric: bool = True,
) -> Plan:
    """Choose precision and kernel per layer part for ``target`` and ``scenario``.

    Args:
        shape: the encoder's dimensions (:data:`qfx.tune.MODEL_SHAPES` or
            :meth:`ModelShape.from_config`); gives the parts and the scenario limits.
        target: where the model will run (``"sm_86"``, a :class:`qfx.targets.Target`).
        scenario: the ``(batch, seq)`` buckets.
        trained: the precision the model was trained for, one or per part.
        parts: the GEMMs to plan instead of ``shape``'s (e.g. read from a compiled graph).
        measure: ``None``: measure when a GPU of the target's kernel family is present, else
            model; ``True``: measure or raise; ``False``: always model.
        launchers: the kernels to time (default :meth:`Launchers.default`).
        cache: ``True`` (the default directory), a :class:`TuneCache`, or ``False``/``None``.
        timer: ``fn -> microseconds`` (default :func:`time_us`).
        margin: leave the trained precision only for a gain larger than this fraction (0:
            any gain; then the plan is never slower than a fixed strategy under the same times).
        progress: show a tqdm progress bar while measuring.
        fused_quantize: (modelled plans) cost each quantize as folded into the kernel before it,
            as in the paper's pipeline, instead of qfx's separate quantize kernel of today.
        fused_epilogue: (modelled plans) None: the backend of today (fused on sm_90, int32
            output + a dequant kernel on sm_80/86/89); True: the dequant fused everywhere.
        act_block, symmetric: with ``shape``, the integer parts' activations (a model trained with
            ``QuantConfig(act_block=B, symmetric=...)``); ``parts`` carry their own. A block-scaled
            plan is modelled (the launchers time token-wise kernels) and its origin says so.

    Returns:
        a :class:`Plan` whose ``source`` is ``"measured"`` or ``"modelled"``.
    """
    target = get_target(target)
    if shape is None and parts is None:
        raise ValueError("autotune needs shape (a ModelShape) or parts (a list of PartSpec)")
    if shape is not None:
        scenario.check(shape)
    if parts is not None and (act_block is not None or not symmetric):
        raise ValueError("autotune(act_block=..., symmetric=...) with parts=...: the parts carry their own "
                         "(PartSpec.act_block / .symmetric, read from the graph); drop those arguments")
    specs = list(parts) if parts is not None else part_specs(shape, trained, act_block, symmetric)
    for s in specs:
        allowed_precisions(s.trained)
    block, _ = _activation_form(specs)
    present = _present_family()
    if measure is None:  # the launchers time token-wise kernels: a block-scaled plan is modelled, and says so
        measure = target.is_gpu and present is not None and present == target.family and block is None
    if measure:
        if block is not None:
            raise ValueError(f"measure=True with block-scaled parts (act_block={block}): the tuner's launchers time "
                             "token-wise kernels only; use measure=False (or None) for a modelled plan")
        if not target.is_gpu:
            raise ValueError(f"target={target.name!r}: only GPU targets are measured; use measure=False")
        if present != target.family:
            raise ValueError(
                f"measure=True for target {target.name} (kernel family {target.family}), but the GPU present is "
                f"{'none' if present is None else 'of family ' + present}; use measure=False for a modelled plan"
            )
    elif not target.is_gpu:
        raise ValueError(f"target={target.name!r}: the CPU runs the exact reference backend; plan a GPU target such as 'sm_86'")

    gpu, tune_cache, origin = target.gpu or target.name, None, ""
    if measure:
        import torch
        from tqdm.auto import tqdm

        launchers = launchers or Launchers.default()
        timer = timer or time_us
        if cache is True:
            tune_cache = TuneCache()
        elif isinstance(cache, TuneCache):
            tune_cache = cache
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else gpu
        origin = f"measured on {gpu} (GEMM + quantize/epilogue kernels); float parts modelled"
    else:
        origin = (f"modelled for {target.name} ({target.gpu}), not measured: roofline from published peaks and "
                  f"bandwidth" + (f"; block-scaled activations (act_block={block}): per-block promotion at "
                                  f"CUDA-core rates (cost_model.SM_RATES), checked on sm_90 only" if block is not None else "")
                  + (f"; trust: {evidence.trust_statement(target)}" if target.is_gpu else ""))

    unique = sorted({dataclasses.replace(s, layer=None) for s in specs}, key=repr)  # one timing per GEMM kind
    bar = None
    if measure:
        total = len(scenario.buckets) * sum(len([p for p in allowed_precisions(u.trained) if p in launchers.gemm]) for u in unique)
        bar = tqdm(total=total, desc=f"qfx autotune {target.name}", disable=not progress, unit="cand")
    buckets = []
    try:
        for batch, seq in scenario.buckets:
            m = batch * seq
            by_shape: dict[PartSpec, tuple[Candidate, tuple[Candidate, ...], float]] = {}
            for spec in unique:
                tr = spec.trained
                cands = (_measured_candidates(target, spec, m, launchers, tune_cache, timer, bar) if measure
                         else _modelled_candidates(target, spec, m, fused_quantize, fused_epilogue))
                fp16 = min((c.us for c in cands if c.precision == "fp16"), default=float("nan"))
                by_shape[spec] = (_choose(cands, tr, margin), tuple(cands), fp16)
            choices = []
            for s in specs:
                best, cands, fp16 = by_shape[dataclasses.replace(s, layer=None)]
                choices.append(PartChoice(s, m, best.precision, best.kernel, best.us, fp16, cands))
            fixed = {}
            for name, rule in fixed_strategies(dominant_precision(specs)).items():
                fixed_choices = []
                for c in choices:
                    want = rule.get(c.spec.part, "fp16")
                    want = want if want in allowed_precisions(c.spec.trained) else c.spec.trained
                    pick = min((x for x in c.candidates if x.precision == want), key=lambda x: x.us, default=None)
                    fixed_choices.append(dataclasses.replace(c, precision=want, us=pick.us if pick else c.us))
                fixed[name] = _latency(target, shape, batch, seq, fixed_choices)
            buckets.append(BucketPlan(batch, seq, tuple(choices), _latency(target, shape, batch, seq, choices), fixed))
    finally:
        if bar is not None:
            bar.close()
        if tune_cache is not None:
            tune_cache.save()
    return Plan(target.name, gpu, "measured" if measure else "modelled", shape.name if shape else "graph", tuple(buckets), origin)


def dominant_precision(specs: Sequence[PartSpec]) -> str:
    """The lowest precision any part was trained for (``"fp16"`` when none is quantized): what
    the fixed strategies quantize to."""
    quantized = [s.trained for s in specs if s.trained != "fp16"]
    return min(quantized, key=PRECISIONS.index) if quantized else "fp16"


def _present_family() -> str | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability()
        return family_of(10 * major + minor)
    except Exception:  # noqa: BLE001 - a broken CUDA setup counts as no GPU
        return None
