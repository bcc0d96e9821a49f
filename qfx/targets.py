"""What qfx knows about each target, in one place (used by lowering, planning and reports)."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Target", "TARGETS", "get_target", "detect_target"]


@dataclass(frozen=True)
class Target:
    """One compile target.

    ``int4_tensor_cores``: the GPU executes ``mma ... s4`` natively (Ampere/Ada). Hopper does
    not (HARDWARE.md: s4 mma is emulated ~18x slower than s8), so on sm_90 qfx runs int4
    codes on INT8 tensor cores: sign-extended codes give bit-identical int32 accumulators.
    """

    name: str
    device: str  # "cpu" or "cuda"
    sm: int | None = None
    int4_tensor_cores: bool = False
    #: dense peaks from the vendor's sheet, TFLOP/s or TOPS, for the cost model and reports
    peak: dict[str, float] = field(default_factory=dict)
    bandwidth_gbs: float | None = None

    @property
    def int4_execution(self) -> str:
        if self.device == "cpu":
            return "reference (exact, float64 accumulation)"
        return "native INT4 tensor cores" if self.int4_tensor_cores else "INT8 tensor cores (int4 codes sign-extended)"


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("cpu", "cpu"),
        Target("sm_80", "cuda", 80, True, {"fp16": 312, "int8": 624, "int4": 1248}, 2039),
        Target("sm_86", "cuda", 86, True, {"fp16": 155, "int8": 310, "int4": 619}, 768),
        Target("sm_89", "cuda", 89, True, {"fp16": 181, "int8": 362, "int4": 724}, 864),
        Target("sm_90", "cuda", 90, False, {"fp16": 989, "int8": 1979, "fp8": 1979}, 3350),
    )
}


def get_target(name: str) -> Target:
    """Look a target up by name (``"cpu"``, ``"sm_80"``, ``"sm_86"``, ``"sm_89"``, ``"sm_90"``)."""
    key = name.replace("sm90a", "sm_90").replace("sm", "sm_").replace("sm__", "sm_") if name.startswith("sm") else name
    if key not in TARGETS:
        raise ValueError(f"target={name!r} is unknown; choose one of {sorted(TARGETS)}")
    return TARGETS[key]


def detect_target() -> Target:
    """The target of the visible GPU (by compute capability), or ``cpu`` without one."""
    import torch

    if not torch.cuda.is_available():
        return TARGETS["cpu"]
    major, minor = torch.cuda.get_device_capability()
    name = f"sm_{major}{minor}"
    if name not in TARGETS:
        raise ValueError(f"the visible GPU is {name}; qfx supports {sorted(k for k in TARGETS if k != 'cpu')}")
    return TARGETS[name]
