"""qfx: a compiler over torch.fx graphs for W4A4 / W8A8 transformer encoders.

Example::

    >>> import qfx
    >>> qat = qfx.prepare_qat(model, example_kwargs=batch, config=qfx.QuantConfig(4, 4))
    >>> ...train qat with knowledge distillation...
    >>> compiled = qfx.compile(qat, mode="int4", target="cpu")
    >>> print(compiled.report())
"""
from qfx._version import __version__
from qfx import models, numerics, ops  # noqa: F401  (ops registers the torch.library ops)
from qfx import backends  # noqa: F401  (registers the reference implementations)
from qfx.api import PostTrainingQuantizationWarning, compile, is_qat_model, prepare_qat
from qfx.capture import QfxCaptureError, capture
from qfx.config import QuantConfig
from qfx.runtime import Buckets, CompiledModel
from qfx.targets import TARGETS, detect_target, get_target
from qfx.runtime.serialize import load, save
from qfx.runtime import verify  # noqa: F401  (qfx.runtime.verify.compare_linears after a plain import qfx)
from qfx import embeddings  # noqa: F401,E402  (qfx.embeddings.distill etc.; sentence-transformers stays optional)


__all__ = [
    "capture",
    "prepare_qat",
    "compile",
    "QuantConfig",
    "CompiledModel",
    "Buckets",
    "is_qat_model",
    "PostTrainingQuantizationWarning",
    "QfxCaptureError",
    "TARGETS",
    "get_target",
    "detect_target",
    "numerics",
    "save",
    "load",
]
