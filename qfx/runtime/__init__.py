"""The runtime of compiled models: shape buckets, CUDA graphs, launch plans.

* :mod:`.compiled`: :class:`CompiledModel`, what ``qfx.compile`` returns;
* :mod:`.buckets`: the (batch, seq) buckets calls are padded into;
* :mod:`.graphs`: one CUDA graph per bucket, captured on first use;
* :mod:`.launch_plan`: the lean graph whose integer ops call launchers bound at compile time.
"""
from qfx.runtime.buckets import Buckets
from qfx.runtime.compiled import CompiledModel

__all__ = ["CompiledModel", "Buckets"]
