"""What qfx knows about each target, in one place: the one object ``compile`` hands to the
planner, the autotuner, the cost model, the kernels and the report.

A :class:`Target` carries the name (``"sm_86"``), the device kind, the compute capability, the
kernel family of the CUTLASS backend that serves it (``"sm80"`` for sm_80/86/89, ``"sm90a"``
for sm_90, ``None`` for the CPU), whether INT4 tensor cores exist, the dense peaks per precision
and the memory bandwidth of a representative GPU (the vendor's data sheet), the SM count and a
per-kernel launch overhead. :func:`get_target` parses every spelling once; nothing downstream
re-derives an sm number from a string.

Example::

    >>> from qfx.targets import get_target
    >>> t = get_target("SM86")
    >>> t.name, t.family, t.int4_tensor_cores, t.gpu, t.peak["int4"]
    ('sm_86', 'sm80', True, 'NVIDIA RTX A6000', 619.3)
    >>> t.check_device(torch.device("cuda"))   # raises on an H100: family sm90a, not sm80
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Sequence

__all__ = ["Target", "GPU", "TARGETS", "GPUS", "get_target", "detect_target", "family_of", "mma_operand",
           "INT4_MMA_FAMILIES"]


@dataclass(frozen=True)
class GPU:
    """One product's published numbers (dense tensor-core peaks, no sparsity).

    Attributes:
        name: the product name as ``torch.cuda.get_device_name`` prints it.
        peak: TFLOP/s (float) or TOPS (integer) per precision: ``fp16`` (fp32 accumulate, what
            cuBLAS uses for torch fp16 GEMMs), ``int8``, ``int4`` where the tensor cores have it,
            ``fp8`` where they have it.
        bandwidth_gbs: DRAM bandwidth in GB/s.
        sm_count: streaming multiprocessors.
        source: where the numbers come from.
    """

    name: str
    peak: dict[str, float] = field(hash=False)
    bandwidth_gbs: float
    sm_count: int
    source: str = ""


#: Representative GPUs per target, the first one being the target's default. Dense peaks from
#: the vendors' data sheets / architecture whitepapers (the paper's A6000 numbers: INT8 309.7,
#: INT4 619.3 TOPS). GeForce cards run fp16 with fp32 accumulation at half rate.
GPUS: dict[str, tuple[GPU, ...]] = {
    "sm_80": (
        *(GPU(f"NVIDIA A100-{model}", {"fp16": 312.0, "int8": 624.0, "int4": 1248.0}, bandwidth, 108,
              f"A100 data sheet ({sheet})")  # the A100s differ only in memory: one row per memory
          for model, bandwidth, sheet in (("SXM4-80GB", 2039.0, "SXM4 80GB"), ("PCIE-40GB", 1555.0, "PCIe 40GB"),
                                          ("SXM4-40GB", 1555.0, "SXM4 40GB"))),
        GPU("NVIDIA A30", {"fp16": 165.0, "int8": 330.0, "int4": 661.0}, 933.0, 56, "A30 data sheet"),
    ),
    "sm_86": (
        GPU("NVIDIA RTX A6000", {"fp16": 154.8, "int8": 309.7, "int4": 619.3}, 768.0, 84,
            "RTX A6000 data sheet; the paper's Figure 1 GPU"),
        GPU("NVIDIA GeForce RTX 3090", {"fp16": 71.0, "int8": 284.0, "int4": 568.0}, 936.0, 82,
            "GA102 whitepaper (fp16 with fp32 accumulate at half rate on GeForce)"),
        GPU("NVIDIA A10", {"fp16": 125.0, "int8": 250.0, "int4": 500.0}, 600.0, 72, "A10 data sheet"),
    ),
    "sm_89": (
        GPU("NVIDIA L4", {"fp16": 121.0, "int8": 242.5, "int4": 485.0, "fp8": 242.5}, 300.0, 58,
            "L4 data sheet (dense = sparse / 2); INT4 from the Ada whitepaper's per-SM rate"),
        GPU("NVIDIA GeForce RTX 4090", {"fp16": 82.6, "int8": 660.6, "int4": 1321.2, "fp8": 660.6}, 1008.0, 128,
            "Ada whitepaper (fp16 with fp32 accumulate at half rate on GeForce)"),
        GPU("NVIDIA L40S", {"fp16": 362.05, "int8": 733.0, "int4": 1466.0, "fp8": 733.0}, 864.0, 142,
            "L40S data sheet (dense = sparse / 2)"),
    ),
    "sm_90": (
        GPU("NVIDIA H100 80GB HBM3", {"fp16": 989.4, "int8": 1978.9, "fp8": 1978.9}, 3350.0, 132,
            "H100 SXM5 data sheet; no INT4 tensor cores"),
    ),
}

#: per-kernel fixed cost (launch + prologue/epilogue latency inside a CUDA graph), microseconds:
#: a latency, not a throughput; the cost model's own fixed costs are fitted per kernel family
#: (:mod:`qfx.tune.cost_model` ``FIT``).
_LAUNCH_US = 3.0


#: kernel families whose tensor cores multiply int4 operands natively (``mma ... s4``); the
#: others run int4 codes sign-extended on int8 MMA (bit-identical int32 accumulators)
INT4_MMA_FAMILIES = frozenset({"sm80"})


def mma_operand(family: str | None, w_bits: int, a_bits: int) -> str:
    """The integer MMA operand (``"s4"`` or ``"s8"``) a W{w_bits}A{a_bits} GEMM runs on in
    ``family``: native s4 only where the family has INT4 tensor cores *and* both operands are
    4-bit codes (an s4 x s8 MMA does not exist); s8 otherwise. The one owner of this rule."""
    return "s4" if family in INT4_MMA_FAMILIES and w_bits == a_bits == 4 else "s8"


def family_of(sm: int | None) -> str | None:
    """Kernel family of the CUTLASS backend for compute capability ``sm`` (86 -> ``"sm80"``),
    ``None`` when no family serves it (or for the CPU)."""
    if sm is None:
        return None
    if 80 <= sm < 90:
        return "sm80"
    if 90 <= sm < 100:
        return "sm90a"
    return None


@dataclass(frozen=True)
class Target:
    """One compile target, with the numbers of one representative GPU.

    ``int4_tensor_cores``: the GPU executes ``mma ... s4`` natively (Ampere/Ada). Hopper does
    not (HARDWARE.md: s4 mma is emulated ~18x slower than s8), so on sm_90 qfx runs int4
    codes on INT8 tensor cores: sign-extended codes give bit-identical int32 accumulators.

    Attributes:
        name: ``"cpu"`` or ``"sm_80"`` / ``"sm_86"`` / ``"sm_89"`` / ``"sm_90"``.
        device: ``"cpu"`` or ``"cuda"``.
        sm: compute capability as an int (86), None for the CPU.
        int4_tensor_cores: native INT4 MMA.
        peak: dense peaks (TFLOP/s / TOPS) per precision of :attr:`gpu`.
        bandwidth_gbs: DRAM bandwidth of :attr:`gpu`, GB/s.
        family: CUTLASS kernel family (``"sm80"``, ``"sm90a"``), None for the CPU.
        arch: the CUDA arch the family's SASS is built for (``"86"``, ``"90a"``).
        gpu: the product the numbers describe (``GPUS[name]`` lists the others).
        sm_count: SMs of :attr:`gpu`.
        launch_overhead_us: fixed cost per kernel inside a CUDA graph (cost model).
    """

    name: str
    device: str  # "cpu" or "cuda"
    sm: int | None = None
    int4_tensor_cores: bool = False
    #: dense peaks from the vendor's sheet, TFLOP/s or TOPS, for the cost model and reports
    peak: dict[str, float] = field(default_factory=dict, hash=False)
    bandwidth_gbs: float | None = None
    family: str | None = None
    arch: str | None = None
    gpu: str | None = None
    sm_count: int | None = None
    launch_overhead_us: float = 0.0

    @property
    def int4_execution(self) -> str:
        if self.device == "cpu":
            return ("integer GEMMs on the CPU's int8 instructions where it has them, else the exact float64 "
                    "reference (the plan line says which)")
        return "native INT4 tensor cores" if self.int4_tensor_cores else "INT8 tensor cores (int4 codes sign-extended)"

    @property
    def is_gpu(self) -> bool:
        return self.device == "cuda"

    def mma_operand(self, w_bits: int, a_bits: int) -> str:
        """:func:`mma_operand` of this target's kernel family."""
        return mma_operand(self.family, w_bits, a_bits)

    def execution_precision(self, precision: str) -> str:
        """The tensor-core precision that runs ``precision`` here: ``"int4"`` -> ``"int8"`` on
        targets without INT4 tensor cores (same codes, sign-extended); otherwise unchanged."""
        if precision == "int4" and not self.int4_tensor_cores:
            return "int8"
        return precision

    def peak_for(self, precision: str) -> float:
        """Dense peak (TFLOP/s or TOPS) that ``precision`` ("fp16", "int8", "int4") runs at."""
        key = self.execution_precision(precision)
        if key not in self.peak:
            raise ValueError(f"target {self.name} ({self.gpu}) has no published {key} peak; it knows {sorted(self.peak)}")
        return self.peak[key]

    def with_gpu(self, gpu: str) -> "Target":
        """The same target with the numbers of another product of :data:`GPUS` (case-insensitive
        substring match, e.g. ``"3090"``, ``"A10"``).

        Example::

            >>> get_target("sm_86").with_gpu("3090").bandwidth_gbs
            936.0
        """
        options = GPUS.get(self.name, ())
        exact = [g for g in options if g.name.lower() == gpu.lower()]
        hits = exact or [g for g in options if gpu.lower() in g.name.lower()]
        if len(hits) != 1:
            raise ValueError(
                f"gpu={gpu!r} for target {self.name}: {'ambiguous' if hits else 'unknown'}; "
                f"choose one of {[g.name for g in options]}"
            )
        g = hits[0]
        return replace(self, peak=dict(g.peak), bandwidth_gbs=g.bandwidth_gbs, gpu=g.name, sm_count=g.sm_count)

    def check_device(self, device, capability: tuple[int, int] | None = None, device_name: str | None = None) -> None:
        """Raise a clear error when ``device`` cannot run kernels compiled for this target.

        ``device``: a ``torch.device`` (or string). For CUDA devices the compute capability is
        read from the GPU unless ``capability`` is given (tests pass it to simulate a GPU).
        A GPU target on a GPU of another kernel family (an sm_86 plan on an H100) is refused:
        its INT4 kernels would be emulated or missing. Within a family (sm_86 plan on an sm_89
        GPU) the kernels run; only the plan's timings were made for another GPU.

        Example::

            >>> get_target("sm_86").check_device("cuda", capability=(9, 0))
            Traceback (most recent call last):
            RuntimeError: target sm_86 (kernel family sm80) cannot run on cuda (NVIDIA ..., sm_90, family sm90a) ...
        """
        import torch

        device = torch.device(device)
        if self.device == "cpu":
            if device.type != "cpu":
                raise RuntimeError(
                    f"target {self.name!r} was compiled for the CPU reference backend, but the model is asked to run "
                    f"on {device}; compile with target='{'sm_%d' % (10 * capability[0] + capability[1]) if capability else 'sm_XX'}' "
                    "for the GPU"
                )
            return
        if device.type != "cuda":
            raise RuntimeError(
                f"target {self.name!r} needs a CUDA GPU of family {self.family}, but the device is {device}; "
                "compile with target='cpu' to run on the CPU"
            )
        if capability is None:
            if not torch.cuda.is_available():
                raise RuntimeError(f"target {self.name!r} needs a CUDA GPU and none is visible; compile with target='cpu'")
            capability = torch.cuda.get_device_capability(device)
            device_name = device_name or torch.cuda.get_device_name(device)
        sm = 10 * capability[0] + capability[1]
        present = family_of(sm)
        if present != self.family:
            fits = [f"sm_{sm}"] if f"sm_{sm}" in TARGETS else _targets_of_family(present)
            fix = f"recompile with target={fits[0]!r}" if fits else "no qfx target serves this GPU"
            raise RuntimeError(
                f"target {self.name} (kernel family {self.family}) cannot run on {device} "
                f"({device_name or 'GPU'}, sm_{sm}, family {present}): {fix}, or run on an "
                f"{'/'.join(_targets_of_family(self.family))} GPU"
            )

    def check_built(self, built_archs: Sequence[str]) -> None:
        """Raise when the native library was built without this target's arch.

        ``built_archs``: the archs the library reports (e.g. ``["80", "86", "89", "90a"]``).
        The sm80 family's compute_80 PTX would JIT on sm_86/89, but only SASS is timed and
        shipped, so the exact arch or sm_80 SASS (binary compatible within 8.x) must be there.
        """
        if self.device == "cpu":
            return
        ok = self.arch in built_archs or (self.family == "sm80" and "80" in built_archs)
        if not ok:
            raise RuntimeError(
                f"target {self.name}: the native library was built for {list(built_archs)}, not {self.arch}; "
                f"rebuild with QFX_CUDA_ARCHS including {self.arch} (pip install -e .)"
            )


def _targets_of_family(family: str | None) -> list[str]:
    return [t.name for t in TARGETS.values() if t.family == family and family is not None]


def _gpu_target(sm: int, int4: bool, arch: str) -> Target:
    name = f"sm_{sm}"
    g = GPUS[name][0]
    return Target(
        name, "cuda", sm, int4, dict(g.peak), g.bandwidth_gbs, family_of(sm), arch, g.name, g.sm_count, _LAUNCH_US
    )


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("cpu", "cpu"),
        _gpu_target(80, True, "80"),
        _gpu_target(86, True, "86"),
        _gpu_target(89, True, "89"),
        _gpu_target(90, False, "90a"),
    )
}

_SM_SPELLING = re.compile(r"^sm_?(\d{2,3})a?$")


def get_target(spec: "str | int | Target", gpu: str | None = None) -> Target:
    """The one parser of target spellings.

    Args:
        spec: a :class:`Target` (returned as is), ``"cpu"``, ``"sm_86"`` / ``"sm86"`` /
            ``"SM_86"`` / ``"sm_90a"``, or the compute capability as an int (``86``).
        gpu: optionally another product of the same target (``"3090"``), see
            :meth:`Target.with_gpu`.

    Raises:
        ValueError: unknown target, listing the valid ones.

    Example::

        >>> get_target(86) is get_target("sm86") is get_target("SM_86")
        True
    """
    if isinstance(spec, Target):
        target = spec
    else:
        key = None
        if isinstance(spec, int) and not isinstance(spec, bool):
            key = f"sm_{spec}"
        elif isinstance(spec, str):
            s = spec.strip().lower()
            m = _SM_SPELLING.match(s)
            key = f"sm_{m.group(1)}" if m else s
        if key not in TARGETS:
            raise ValueError(
                f"target={spec!r} is unknown; choose one of {sorted(TARGETS)} "
                "(also spelled 'sm86', 'SM_86', 86, or a qfx.targets.Target)"
            )
        target = TARGETS[key]
    return target.with_gpu(gpu) if gpu is not None else target


def detect_target() -> Target:
    """The target of the visible GPU (by compute capability), or ``cpu`` without one."""
    import torch

    if not torch.cuda.is_available():
        return TARGETS["cpu"]
    major, minor = torch.cuda.get_device_capability()
    name = f"sm_{major}{minor}"
    if name not in TARGETS:
        raise ValueError(f"the visible GPU is {name}; qfx supports {sorted(k for k in TARGETS if k != 'cpu')}")
    target = TARGETS[name]
    present = torch.cuda.get_device_name()
    known = [g.name for g in GPUS[name] if g.name.lower() == present.lower()]
    return target.with_gpu(known[0]) if known else target
