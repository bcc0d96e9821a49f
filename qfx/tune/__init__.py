"""Planning for a target: the per-layer-part autotuner, the cost model for absent GPUs, the
plan report, ``python -m qfx plan`` and the choice ``qfx.compile(..., tune=...)`` applies
(:func:`choose_parts`).

Modules, each importing only those before it: :mod:`~qfx.tune.block_cost` (the block-scaled
promotion term), :mod:`~qfx.tune.cost_model` (modelled times),
:mod:`~qfx.tune.parts` (precisions, scenarios, the layer parts of a model),
:mod:`~qfx.tune.measure` (launchers, timer, on-disk cache), :mod:`~qfx.tune.autotune` (the
plan), :mod:`~qfx.tune.plan_report` (the per-part table, as data and as text),
:mod:`~qfx.tune.select` (the decision ``qfx.compile`` applies).

Example::

    >>> from qfx.tune import tune, Scenario, MODEL_SHAPES, render_plan
    >>> plan = tune(MODEL_SHAPES["bert-base"], "sm_86", Scenario.of(batch=32, seq=128))
    >>> print(render_plan(plan))      # modelled without an sm_8x GPU, and says so
"""
from qfx.tune.autotune import Plan
from qfx.tune.autotune import autotune as tune  # the module qfx.tune.autotune keeps its name
from qfx.tune.cost_model import MODEL_SHAPES, ModelShape, gemm_time, model_latency
from qfx.tune.measure import AutotuneCacheWarning, Launchers, TuneCache, machine_identity, time_us
from qfx.tune.parts import PartSpec, Scenario
from qfx.tune.plan_report import render_plan
from qfx.tune.select import TuneDecision, choose_parts

__all__ = [
    "tune", "Scenario", "PartSpec", "Plan", "Launchers", "TuneCache", "AutotuneCacheWarning", "machine_identity",
    "time_us", "MODEL_SHAPES", "ModelShape", "gemm_time", "model_latency", "render_plan",
    "choose_parts", "TuneDecision",
]
