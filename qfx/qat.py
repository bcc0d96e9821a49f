"""qfx.qat: the KD trainer's public names, kept where the README, examples and user code
import them (``from qfx import qat as kd``). The code lives in :mod:`qfx.train`.

Example::

    >>> from qfx import qat as kd
    >>> student = kd.make_student(teacher, qfx.QuantConfig(4, 4), example_kwargs=batch)
    >>> result = kd.distill(teacher, student, train, dev, kd.TrainConfig(steps=1000))
"""
from qfx.train import (  # noqa: F401
    PRECISIONS,
    EncodedData,
    KDWeights,
    TrainConfig,
    TrainResult,
    distill,
    evaluate,
    finetune,
    init_distributed,
    input_names,
    kd_loss,
    make_student,
    make_teacher,
    world,
)
from qfx.train.ddp import world as _world  # noqa: F401  (scripts written before qfx.train call qat._world())

from qfx.train import __all__  # noqa: E402,F401  (the same public names, listed once)
