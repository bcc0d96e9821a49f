"""Measuring on the GPU present: the kernels to time (:class:`Launchers`), the timer
(:func:`time_us`) and the on-disk cache of measured times (:class:`TuneCache`), valid only for
the GPU, driver and library versions that measured them.

Example::

    >>> cache = TuneCache(identity=machine_identity())
    >>> us = time_us(Launchers.default().gemm["fp16"](4096, 768, 768, False)[0][1])
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qfx._version import __version__

__all__ = ["Launchers", "time_us", "TuneCache", "AutotuneCacheWarning", "machine_identity", "default_cache_dir"]


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
            import qfx.numerics as numerics
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

    parts = [f"qfx {__version__}", f"torch {torch.__version__}", f"cuda {torch.version.cuda}"]
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
