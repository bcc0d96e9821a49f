"""What every qfx trainer is configured with, and the one optimizer schedule they share.

:class:`KDConfigBase` holds the optimisation every distillation run has (steps, peak learning
rate, weight decay, warmup, gradient clipping, the decay after the warmup) and validates it,
naming the subclass and the field; :meth:`KDConfigBase.optimizer` builds AdamW and its
schedule (:func:`adamw_with_warmup`). Encoder KD (:class:`TrainConfig`), embedding KD
(:class:`qfx.embeddings.kd.DistillConfig`) and decoder KD
(:class:`qfx.decoders.quantize.DecoderKDConfig`) extend it with their own fields and defaults.

Example::

    >>> cfg = TrainConfig(steps=1000, lr=3e-5)
    >>> opt, sched = cfg.optimizer(p for p in student.parameters() if p.requires_grad)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import qfx.train.ddp as ddp

__all__ = ["KDConfigBase", "TrainConfig", "TrainResult", "PRECISIONS", "DECAYS", "adamw_with_warmup", "optimizer_step"]

#: the learning-rate decays after the warmup
DECAYS = ("linear", "cosine")


@dataclass(frozen=True)
class KDConfigBase:
    """The optimisation of one training run; subclasses add fields and their own defaults.

    Args:
        steps: optimizer steps.
        lr: peak AdamW learning rate, reached after the warmup.
        weight_decay: AdamW weight decay (matrices only).
        warmup: the fraction of the steps over which the learning rate ramps up linearly.
        grad_clip: clip the gradients' global norm to this (0: no clipping).
        decay: after the warmup, ``"linear"`` to 0 or ``"cosine"`` (:func:`adamw_with_warmup`).
    """

    steps: int
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.06
    grad_clip: float = 1.0
    decay: str = "linear"

    def __post_init__(self) -> None:
        self._check_positive("steps")
        if not (self.lr > 0 and 0 <= self.warmup < 1):
            raise ValueError(f"{type(self).__name__}(lr={self.lr}, warmup={self.warmup}): need lr > 0 and 0 <= warmup < 1")
        if not self.weight_decay >= 0 or not self.grad_clip >= 0:
            raise ValueError(f"{type(self).__name__}(weight_decay={self.weight_decay}, grad_clip={self.grad_clip}): "
                             "both must be >= 0 (grad_clip=0: no clipping)")
        if self.decay not in DECAYS:
            raise ValueError(f"{type(self).__name__}(decay={self.decay!r}): use one of {DECAYS}")

    def _check_positive(self, *names: str) -> None:
        for name in names:
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"{type(self).__name__}({name}={v!r}) must be a positive int")

    def optimizer(self, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW over ``params`` and its schedule, from this config."""
        return adamw_with_warmup(params, self.lr, self.weight_decay, self.steps, self.warmup, self.decay)


#: ``TrainConfig(precision=...)``: dtype of the float parts while training (master weights fp32)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainConfig(KDConfigBase):
    """Encoder QAT + KD (and fine-tuning): the optimisation of :class:`KDConfigBase`, then
    precision, parallelism, evaluation and checkpointing of one training run.

    ``batch_size`` is the global batch, split equally over the ranks (it must divide).
    ``stop_after`` ends this process after that many finished steps (with a checkpoint), as a
    kill would, for tests and time-boxed jobs; the schedule still assumes ``steps``.
    ``precision``: "fp32" (default: what the twin evaluates and what the accuracy study
    validated; nothing changes precision unless asked), "bf16" or "fp16" autocast.
    ``sharding``: "ddp" (replicas) or "fsdp" (FSDP2: parameters, gradients and optimizer state
    sharded; for models whose optimizer state does not fit one GPU). ``log_every``: steps
    between progress-bar loss updates (each one a host sync).

    ``compile``: run the training forward (and its backward) of the trained model through
    ``torch.compile`` (Inductor). Off by default because it is not bit-identical to eager:
    Inductor fuses the float parts (LayerNorm and softmax reductions tiled differently, bf16
    chains kept in fp32), so a last-bit change can move a 4-bit activation code. It only
    changes what training computes: evaluation, ``keep_best``, checkpoints and the returned
    QAT graph stay eager, and that twin is what ``qfx.compile`` reproduces bit for bit.
    """

    batch_size: int = 32
    eval_every: int = 100
    eval_batch_size: int = 128
    ckpt_dir: str | None = None
    ckpt_every: int = 100
    keep_best: bool = True
    seed: int = 42
    progress: bool = True
    desc: str = "train"
    stop_after: int | None = None
    precision: str = "fp32"
    sharding: str = "ddp"
    log_every: int = 10
    compile: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_positive("batch_size", "eval_every", "eval_batch_size", "ckpt_every", "log_every")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig(precision={self.precision!r}): use one of {tuple(PRECISIONS)}")
        if self.sharding not in ddp.SHARDING:
            raise ValueError(f"TrainConfig(sharding={self.sharding!r}): use one of {ddp.SHARDING}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"TrainConfig(compile={self.compile!r}) must be True or False")


@dataclass
class TrainResult:
    """``history``: one dict per evaluation (step, dev_acc, loss); ``model`` is trained in place.
    ``ckpt_bytes``: size of the checkpoint folder when the run returned (0 without one)."""

    history: list[dict[str, float]]
    steps_done: int
    best_dev: float | None
    best_step: int | None
    wall_s: float
    resumed_from: int = 0
    finished: bool = True
    ckpt_bytes: int = 0


def adamw_with_warmup(params, lr: float, weight_decay: float, steps: int, warmup: float,
                      decay: str = "linear") -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (weight decay on matrices only) with a linear warmup over ``warmup`` of ``steps``,
    then a linear decay to 0 (``decay="linear"``), or a cosine over the whole run scaled by the
    warmup ramp (``"cosine"``): the one schedule of every qfx trainer (encoder, embedding and
    decoder KD; :meth:`KDConfigBase.optimizer`)."""
    if decay not in DECAYS:
        raise ValueError(f"decay={decay!r}: use one of {DECAYS}")
    params = list(params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    # One fused kernel per step on CUDA (the foreach path launches ~4 kernels per tensor group
    # and was 6.5 ms of a 48 ms BERT-base step on an H100); same update rule.
    # FSDP2's DTensor shards keep the foreach path (fused support for DTensor varies by torch version).
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() and type(p) in (torch.Tensor, nn.Parameter) for p in params)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                            fused=fused or None)
    warm = max(int(warmup * steps), 1)

    def lr_at(step: int) -> float:
        if decay == "cosine":
            return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
        return (step + 1) / warm if step < warm else max(0.0, (steps - step) / max(steps - warm, 1))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def optimizer_step(loss: torch.Tensor, params, opt: torch.optim.Optimizer, sched, grad_clip: float) -> None:
    """One update of the single-process trainers (embedding and decoder KD): the gradients of
    ``loss``, their global norm clipped to ``grad_clip`` (0: not clipped), the AdamW step, then
    the schedule's."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()
