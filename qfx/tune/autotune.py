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
import hashlib
import json
import os
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from qfx.targets import Target, family_of, get_target
from qfx.tune import cost_model
from qfx.tune.cost_model import ModelShape

__all__ = [
    "PRECISIONS", "allowed_precisions", "Scenario", "PartSpec", "Candidate", "PartChoice", "BucketPlan",
    "Plan", "Launchers", "TuneCache", "AutotuneCacheWarning", "machine_identity", "time_us", "autotune",
    "part_specs", "part_specs_from_graph", "fixed_strategies",
]

#: precisions from lowest to highest
PRECISIONS = ("int4", "int8", "fp16")
_BITS = {"int4": 4, "int8": 8}


def allowed_precisions(trained: str) -> tuple[str, ...]:
    """Precisions a part trained in ``trained`` may run in: never lower, higher always."""
    if trained not in PRECISIONS:
        raise ValueError(f"trained precision {trained!r}: use one of {PRECISIONS}")
    return PRECISIONS[PRECISIONS.index(trained):]


@dataclass(frozen=True)
class Scenario:
    """The input sizes to tune for: ``(batch, seq)`` buckets (M = batch x seq per GEMM).

    Example::

        >>> Scenario.of(batch=32, seq=128).buckets
        ((32, 128),)
        >>> Scenario.of(buckets=[(1, 128), (32, 384)]).buckets
        ((1, 128), (32, 384))
    """

    buckets: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, batch: int | None = None, seq: int | None = None,
           buckets: Iterable[tuple[int, int]] | None = None) -> "Scenario":
        if buckets is not None:
            if batch is not None or seq is not None:
                raise ValueError("Scenario: give either batch and seq, or buckets, not both")
            items = tuple((int(b), int(s)) for b, s in buckets)
        else:
            if batch is None or seq is None:
                raise ValueError(f"Scenario: batch={batch!r}, seq={seq!r}: give both (e.g. batch=32, seq=128) or buckets")
            items = ((int(batch), int(seq)),)
        if not items:
            raise ValueError("Scenario(buckets=[]): give at least one (batch, seq) bucket")
        for b, s in items:
            if b < 1 or s < 1:
                raise ValueError(f"Scenario bucket (batch={b}, seq={s}): both must be >= 1")
        return cls(items)

    def check(self, shape: ModelShape) -> None:
        """Raise when a bucket exceeds the model's limits (sequence longer than its positions)."""
        for b, s in self.buckets:
            if s > shape.max_seq:
                raise ValueError(
                    f"scenario bucket (batch={b}, seq={s}): {shape.name} takes at most {shape.max_seq} tokens "
                    f"(max_position_embeddings); use seq <= {shape.max_seq}"
                )


@dataclass(frozen=True)
class PartSpec:
    """One GEMM of the model as the tuner sees it (M comes from the scenario).

    ``layer``: encoder layer index; ``trained``: the precision the weights were trained for
    ("int4", "int8", or "fp16" for a part left in float).
    """

    layer: int | None
    part: str
    n: int
    k: int
    trained: str
    #: the float graph runs this part as this many GEMMs of N / fp16_gemms each (HF's separate
    #: q, k, v linears); fuse_qkv makes the integer part one GEMM of N, reading one quantize
    fp16_gemms: int = 1
    #: the input quantize is folded into the LayerNorm before the part (the GPU pass
    #: fuse_add_layer_norm_quantize), so an integer choice costs only what that kernel adds
    quantize_in_norm: bool = False
    #: the part's output goes through GELU here: fused into the integer epilogue, a kernel of
    #: its own in fp16. None: the part is ``ffn_in``. False: the GELU is counted elsewhere
    #: (in the next part's quantize, ``quantize_gelu``)
    gelu: bool | None = None
    #: the input quantize also applies the GELU of the part before (fuse_gelu_quantize)
    quantize_gelu: bool = False

    @property
    def has_gelu(self) -> bool:
        return self.part == "ffn_in" if self.gelu is None else self.gelu


def part_specs_from_graph(gm) -> list[PartSpec]:
    """The GEMMs of a lowered (L4) or planned (L5) qfx graph, from each linear's ``LinearInfo``:
    integer linears keep their trained precision (W4A4 -> ``"int4"``, W8A8 / W4A8 -> ``"int8"``);
    float and weight-only linears of the four roles are ``"fp16"`` (no integer candidate).

    Example::

        >>> specs = part_specs_from_graph(compiled.graph_module)
        >>> plan = autotune(None, "sm_90", Scenario.of(batch=32, seq=128), parts=specs)
    """
    from qfx.schema import INTEGER_LINEAR_OPS, LINEAR_OPS, is_call

    out = []
    for node in gm.graph.nodes:
        info = node.meta.get("qfx")
        if info is None or not (is_call(node, INTEGER_LINEAR_OPS) or is_call(node, LINEAR_OPS)):
            continue
        if info.role not in ("qkv", "attn_out", "ffn_in", "ffn_out"):
            continue
        spec = info.spec if is_call(node, INTEGER_LINEAR_OPS) else None
        if spec is None or not spec.quantizes_activations:
            trained = "fp16"
        else:
            trained = "int4" if spec.weight_bits == spec.act_bits == 4 else "int8"
        part = info.role  # unfused q, k, v: three "qkv" GEMMs of N = h each
        out.append(PartSpec(info.layer, part, info.out_features, info.in_features, trained))
    return out


def part_specs(shape: ModelShape, trained: str | dict[str, str]) -> list[PartSpec]:
    """Every GEMM of ``shape``'s layers, q/k/v as one (fuse_qkv). ``trained``: one precision
    or ``{part: precision}`` (parts absent stay fp16)."""
    per_part = {p: trained for p, _, _ in shape.parts()} if isinstance(trained, str) else dict(trained)
    return [PartSpec(layer, part, n, k, per_part.get(part, "fp16"))
            for layer in range(shape.layers) for part, n, k in shape.parts()]


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


# ----------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Launchers:
    """How to run each candidate on the GPU present: factories returning zero-argument callables
    that launch the kernel once on preallocated inputs (the tuner times them).

    Attributes:
        gemm: ``precision -> (m, n, k, gelu) -> [(kernel_name, fn), ...]``; the integer ones
            include their dequant epilogue (fused or not), the fp16 one its bias.
        quantize: ``(m, k, bits) -> fn``: the activation quantize kernel; called with
            ``gelu=True`` for a quantize that applies GELU first (``PartSpec.quantize_gelu``).
        gelu: ``(m, n) -> fn``: a standalone GELU (what an fp16 FFN-in adds).

    :meth:`default` gives fp16 through ``torch.nn.functional.linear`` and, when the
    ``cutlass`` backend is registered, int8/int4, quantize and add + LayerNorm + quantize through
    the launchers a compiled model binds (``qfx.backends.cutlass.launch``; the GEMM's kernel
    choice per M is the backend's, named ``"cutlass"``); a backend can add one entry per config.
    """

    gemm: dict[str, Callable[[int, int, int, bool], list[tuple[str, Callable[[], object]]]]] = field(default_factory=dict)
    quantize: Callable[[int, int, int], Callable[[], object]] | None = None
    gelu: Callable[[int, int], Callable[[], object]] | None = None
    #: ``(m, k, bits) -> (fused, plain)``: add + LayerNorm + quantize in one kernel, and the
    #: add + LayerNorm it replaces; an integer part whose quantize sits in the LayerNorm
    #: (``PartSpec.quantize_in_norm``) costs the difference. Without it such a part is charged
    #: the separate quantize kernel (an upper bound).
    norm_quantize: Callable[[int, int, int], tuple[Callable[[], object], Callable[[], object]]] | None = None

    @classmethod
    def default(cls, device: str = "cuda") -> "Launchers":
        import torch
        import torch.nn.functional as F

        def fp16(m, n, k, gelu):
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            w = torch.randn(n, k, device=device, dtype=torch.float16)
            b = torch.randn(n, device=device, dtype=torch.float16)
            return [("cublas", lambda: F.linear(x, w, b))]

        def act_gelu(m, n):
            y = torch.randn(m, n, device=device, dtype=torch.float16)
            return lambda: F.gelu(y)

        out = cls(gemm={"fp16": fp16}, gelu=act_gelu)
        from qfx.ops import registered_backends

        if "cutlass" in registered_backends("int_linear"):
            # the launchers the runtime binds (qfx/runtime/launch_plan.py): weight operand and
            # fp32 bias made once, kernel config chosen once per M: what a compiled model runs
            from qfx import numerics
            from qfx.backends.cutlass.launch import AddLayerNormQuantizeLauncher, LinearLauncher, QuantizeLauncher

            def integer(bits):
                def make(m, n, k, gelu):
                    a = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (m, k), device=device, dtype=torch.int8)
                    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), dtype=torch.int8)
                    w = (numerics.pack_int4(q) if bits == 4 else q).to(device)
                    sa = torch.rand(m, device=device) + 0.5
                    sw = torch.rand(n, device=device) + 0.5
                    b = torch.randn(n, device=device, dtype=torch.float16)
                    linear = LinearLauncher(w, bits, sw, None, b, gelu, torch.float16, bits)
                    return [("cutlass", lambda: linear(a, sa, None))]  # symmetric activations (the default)
                return make

            out.gemm["int8"] = integer(8)
            out.gemm["int4"] = integer(4)

            def quant(m, k, bits, gelu=False):
                x = torch.randn(m, k, device=device, dtype=torch.float16)
                launcher = QuantizeLauncher(bits, True, None, gelu=gelu)
                return lambda: launcher(x)
            out.quantize = quant

            def norm_quant(m, k, bits):
                a = torch.randn(m, k, device=device, dtype=torch.float16)
                b = torch.randn(m, k, device=device, dtype=torch.float16)
                g = torch.rand(k, device=device, dtype=torch.float16) + 0.5
                beta = torch.randn(k, device=device, dtype=torch.float16)
                launcher = AddLayerNormQuantizeLauncher(1e-12, bits, True, None)
                fused = lambda: launcher(a, b, g, beta)  # noqa: E731
                plain = lambda: F.layer_norm(a + b, (k,), g, beta, 1e-12)  # noqa: E731
                return fused, plain
            out.norm_quantize = norm_quant
        return out


def time_us(fn: Callable[[], object], iters: int = 20, warmup: int = 3, cuda_graph: bool = True) -> float:
    """Median time of ``fn()`` on the current CUDA stream, microseconds.

    With ``cuda_graph`` the call is captured once in a CUDA graph and the graph replayed (what
    a compiled model runs: no launch overhead from Python); without, CUDA events around eager
    calls. Falls back to eager when capture fails (a kernel that cannot be captured).
    """
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run = fn
    if cuda_graph:
        try:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                fn()
            run = graph.replay
        except Exception:  # noqa: BLE001 - any capture failure: time eagerly instead
            run = fn
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# The on-disk cache


class AutotuneCacheWarning(UserWarning):
    """An autotune cache file was ignored (another GPU / driver / library, or corrupt)."""


def _driver_version() -> str:
    try:
        from cuda.bindings import driver

        err, version = driver.cuDriverGetVersion()
        if int(err) == 0:
            return f"{version // 1000}.{(version % 1000) // 10}"
    except Exception:  # noqa: BLE001 - cuda-python missing or no driver: try nvidia-smi
        pass
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        pass
    return "unknown"


def _library_version() -> str:
    """qfx, torch and CUDA versions plus a digest of the native library's manifest and file."""
    import torch

    import qfx

    parts = [f"qfx {getattr(qfx, '__version__', '?')}", f"torch {torch.__version__}", f"cuda {torch.version.cuda}"]
    here = Path(__file__).resolve().parents[2] / "backends" / "cutlass"
    digest = hashlib.sha256()
    for name in ("qfx_cutlass_manifest.json", "libqfx_cutlass.so"):
        p = here / name
        if p.exists():
            st = p.stat()
            digest.update(f"{name}:{st.st_size}:{int(st.st_mtime)}".encode())
            if name.endswith(".json"):
                digest.update(p.read_bytes())
    parts.append(f"native {digest.hexdigest()[:12]}")
    return ", ".join(parts)


def machine_identity() -> dict[str, str]:
    """``{"gpu", "driver", "library"}`` of the GPU present: what a cache entry is valid for."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("machine_identity needs a CUDA GPU; modelled plans are not cached")
    return {"gpu": torch.cuda.get_device_name(), "driver": _driver_version(), "library": _library_version()}


_CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$QFX_CACHE_DIR`` or ``~/.cache/qfx/autotune`` (read when called, never at import)."""
    return Path(os.environ.get("QFX_CACHE_DIR", Path.home() / ".cache" / "qfx")) / "autotune"


class TuneCache:
    """Measured candidate times on disk, one JSON file per GPU name.

    The file holds its identity (GPU name, driver, library version) and entries keyed by
    ``precision|kernel|M|N|K|gelu`` (and ``quantize|bits|M|K``). A file made under another
    identity, or one that does not parse, is ignored with an :class:`AutotuneCacheWarning`
    naming the file and the reason, and replaced on the next save.

    Example::

        >>> cache = TuneCache(identity=machine_identity())
        >>> cache.get("int8|cutlass|4096|768|768|0")   # None until measured
    """

    def __init__(self, directory: str | os.PathLike | None = None, identity: dict[str, str] | None = None) -> None:
        if identity is None:
            identity = machine_identity()
        self.identity = dict(identity)
        slug = "".join(ch if ch.isalnum() else "_" for ch in self.identity["gpu"]).strip("_").lower() or "gpu"
        self.path = Path(directory) if directory is not None else default_cache_dir()
        self.path = self.path / f"{slug}.json"
        self.entries: dict[str, float] = {}
        self.ignored: str | None = None
        self._load()

    def _ignore(self, why: str) -> None:
        self.ignored = why
        warnings.warn(f"qfx autotune cache {self.path}: {why}; ignoring it (it will be rewritten)", AutotuneCacheWarning,
                      stacklevel=3)

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
                raise ValueError("no 'entries' table")
            entries = {str(k): float(v) for k, v in data["entries"].items()}
        except (ValueError, TypeError, OSError, UnicodeDecodeError) as e:
            self._ignore(f"corrupt ({type(e).__name__}: {e})")
            return
        if data.get("format") != _CACHE_FORMAT:
            self._ignore(f"format {data.get('format')!r}, this qfx writes {_CACHE_FORMAT}")
            return
        for key in ("gpu", "driver", "library"):
            if data.get(key) != self.identity[key]:
                self._ignore(f"made for {key} {data.get(key)!r}, this machine has {self.identity[key]!r}")
                return
        self.entries = entries

    def get(self, key: str) -> float | None:
        return self.entries.get(key)

    def put(self, key: str, us: float) -> None:
        self.entries[key] = float(us)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"format": _CACHE_FORMAT, **self.identity, "entries": self.entries}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)  # atomic: a crash never leaves a half-written cache


# ----------------------------------------------------------------------------------------------
# Choosing


def _modelled_candidates(target: Target, spec: PartSpec, m: int, fused_quantize: bool,
                         fused_epilogue: bool | None) -> list[Candidate]:
    out = []
    for prec in allowed_precisions(spec.trained):
        gemms = spec.fp16_gemms if prec == "fp16" else 1
        est = cost_model.part_time(target, spec.part, m, spec.n // gemms, spec.k, prec, gelu=spec.has_gelu,
                                   fused_quantize=fused_quantize or spec.quantize_in_norm, fused_epilogue=fused_epilogue)
        kernel = est.gemm.kernel + (f" x{gemms}" if gemms > 1 else "")
        if prec == "int4" and not target.int4_tensor_cores:
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
        f"all-{trained}": {p: trained for p in ("qkv", "attn_out", "ffn_in", "ffn_out")},
        "q3-only": {"qkv": "fp16", "attn_out": "fp16", "ffn_in": trained, "ffn_out": "fp16"},
        "all-fp16": {p: "fp16" for p in ("qkv", "attn_out", "ffn_in", "ffn_out")},
    }


def _latency(target: Target, shape: ModelShape | None, batch: int, seq: int, choices: Sequence[PartChoice]) -> float:
    """Whole-model time: the chosen parts' times (measured or modelled) + the modelled float parts."""
    gemm_total = sum(c.us for c in choices)
    if shape is None or not target.is_gpu:
        return gemm_total
    float_only, parts = cost_model.model_latency(target, shape, batch, seq, "fp16")
    return gemm_total + float_only - shape.layers * sum(p.us for p in parts)


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

    Returns:
        a :class:`Plan` whose ``source`` is ``"measured"`` or ``"modelled"``.
    """
    target = get_target(target)
    if shape is None and parts is None:
        raise ValueError("autotune needs shape (a ModelShape) or parts (a list of PartSpec)")
    if shape is not None:
        scenario.check(shape)
    specs = list(parts) if parts is not None else part_specs(shape, trained)
    for s in specs:
        allowed_precisions(s.trained)
    present = _present_family()
    if measure is None:
        measure = target.is_gpu and present is not None and present == target.family
    if measure:
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
        origin = (f"modelled for {target.name} ({target.gpu}): roofline from published peaks and bandwidth, "
                  "efficiencies fitted on the H100 (qfx.tune.cost_model); not measured")

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
            for name, rule in fixed_strategies(_dominant(specs)).items():
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


def _dominant(specs: Sequence[PartSpec]) -> str:
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
