"""qfx.train: quantization-aware training with layer-wise knowledge distillation (the paper's 3.1).

The student is ``qfx.prepare_qat(teacher)`` (fake-quant weights and activations, integer
forward, straight-through backward); the teacher is the fp32 model captured with
:func:`qfx.capture`. Both then run the training pipeline (:data:`qfx.pipeline.TRAIN_PASSES`,
whose last pass is :func:`qfx.passes.expose_features`) so the loss can read each layer's
hidden states and attention (:mod:`qfx.train.losses`).

Modules: :mod:`~qfx.train.data` (examples, batch schedule, prefetching collation),
:mod:`~qfx.train.losses` (Logit / Att / Rep / CE), :mod:`~qfx.train.config` (the config base every
trainer shares, :class:`TrainConfig`, the one AdamW schedule), :mod:`~qfx.train.loop` (the loop,
:func:`finetune`, :func:`distill`, :func:`evaluate`), :mod:`~qfx.train.checkpoint` (lean,
world-size-free checkpoints), :mod:`~qfx.train.ddp` (torchrun, DDP, FSDP2).

Example::

    >>> from qfx import train
    >>> student = train.make_student(teacher, qfx.QuantConfig(4, 4), example_kwargs=batch)
    >>> result = train.distill(teacher, student, train_data, dev_data, train.TrainConfig(steps=1000))
    >>> qfx.compile(student, mode="int4", target="cpu")
"""
from qfx.train.config import KDConfigBase, adamw_with_warmup
from qfx.train.data import EncodedData, input_names
from qfx.train.ddp import init_distributed, world
from qfx.train.loop import PRECISIONS, TrainConfig, TrainResult, distill, evaluate, finetune, make_student, make_teacher
from qfx.train.losses import KDWeights, kd_loss

__all__ = [
    "EncodedData",
    "KDConfigBase",
    "adamw_with_warmup",
    "KDWeights",
    "TrainConfig",
    "TrainResult",
    "PRECISIONS",
    "make_student",
    "make_teacher",
    "distill",
    "finetune",
    "evaluate",
    "kd_loss",
    "input_names",
    "init_distributed",
    "world",
]
