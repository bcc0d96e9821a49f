"""Planning for a target: the per-layer-part autotuner, the cost model for absent GPUs, the
plan report, ``python -m qfx plan`` and the choice ``qfx.compile(..., tune=...)`` applies
(:func:`choose_parts`).

Example::

    >>> from qfx.tune import tune, Scenario, MODEL_SHAPES, render_plan
    >>> plan = tune(MODEL_SHAPES["bert-base"], "sm_86", Scenario.of(batch=32, seq=128))
    >>> print(render_plan(plan))      # modelled without an sm_8x GPU, and says so
"""
from qfx.tune.autotune import (
    AutotuneCacheWarning, Launchers, PartSpec, Plan, Scenario, TuneCache, machine_identity, time_us,
)
from qfx.tune.autotune import autotune as tune  # the module qfx.tune.autotune keeps its name
from qfx.tune.cost_model import MODEL_SHAPES, ModelShape, gemm_time, model_latency
from qfx.tune.plan_report import render_plan
from qfx.tune.select import TuneDecision, choose_parts

__all__ = [
    "tune", "Scenario", "PartSpec", "Plan", "Launchers", "TuneCache", "AutotuneCacheWarning", "machine_identity",
    "time_us", "MODEL_SHAPES", "ModelShape", "gemm_time", "model_latency", "render_plan",
    "choose_parts", "TuneDecision",
]
