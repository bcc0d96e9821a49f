"""qfx.qat: quantization-aware training with layer-wise knowledge distillation (the paper's 3.1).

The student is ``qfx.prepare_qat(teacher)`` (fake-quant weights and activations, STE); the
teacher is the fp32 model captured with :func:`qfx.capture`. Both get feature taps
(:mod:`qfx.passes.expose_features`) so the loss can read, per layer::

    loss = logit * T^2 KL(softmax(t/T) || softmax(s/T))                    "Logit"
         + att   * sum_l MSE(att_s[l], att_t[map[l]])  over valid (query, key)  "Att*"/"Att"
         + rep   * sum_l MSE(h_s[l],  h_t[map[l]])     over valid tokens         "Rep"
         + ce    * CE(s, labels)

``att`` is the pre-softmax score ``scale * q k^T`` ("Att*", the paper's default for BERT) or
the softmax probabilities ("Att"). ``map`` is the identity, or the kept teacher layers when
the student has fewer layers (layer reduction, :mod:`qfx.compose`).

The training loop (:func:`distill`, and :func:`finetune` for the fp32 teacher with plain
cross-entropy) is the same code under one process or ``torchrun`` (DDP; NCCL on GPUs, gloo
on CPUs): each rank reads its slice of every global batch, rank 0 writes checkpoints and the
progress bar. The batch order and the dropout seeds are functions of (seed, step), so a run
resumed from a checkpoint takes exactly the steps the killed run would have taken.

Example::

    >>> student = qfx.qat.make_student(teacher, qfx.QuantConfig(4, 4), example_kwargs=batch)
    >>> result = qfx.qat.distill(teacher, student, train, dev, qfx.qat.TrainConfig(steps=1000))
    >>> qfx.compile(student, mode="int4", target="cpu")
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from qfx.api import is_qat_model, prepare_qat
from qfx.capture import capture
from qfx.config import QuantConfig
from qfx.passes.expose_features import FeatureRecorder, expose_features, feature_taps

__all__ = [
    "EncodedData",
    "KDWeights",
    "TrainConfig",
    "TrainResult",
    "make_student",
    "make_teacher",
    "distill",
    "finetune",
    "evaluate",
    "kd_loss",
    "input_names",
]

_ATTENTION_KINDS = ("scores", "probs")
_CKPT = "last.pt"


# --------------------------------------------------------------------------- data


@dataclass
class EncodedData:
    """Tokenized examples: ``input_ids[i]`` (no padding) and ``labels[i]`` in [0, num_labels).

    ``batch`` pads to the longest sequence of the batch and returns the model's keyword
    inputs (``input_ids``, ``attention_mask``, ``token_type_ids``) and the labels.
    """

    input_ids: list[list[int]]
    labels: list[int]
    pad_id: int
    num_labels: int

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"EncodedData: {len(self.input_ids)} texts but {len(self.labels)} labels")
        bad = [(i, y) for i, y in enumerate(self.labels) if not (isinstance(y, int) and 0 <= y < self.num_labels)]
        if bad:
            i, y = bad[0]
            raise ValueError(
                f"EncodedData: {len(bad)} labels are outside [0, {self.num_labels}) (first: example {i} has label {y!r}); "
                "map the labels to 0..num_labels-1 or raise num_labels"
            )
        empty = [i for i, ids in enumerate(self.input_ids) if not ids]
        if empty:
            raise ValueError(f"EncodedData: {len(empty)} examples have no tokens (first: {empty[0]}); drop empty texts first")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> "EncodedData":
        return EncodedData([self.input_ids[i] for i in indices], [self.labels[i] for i in indices], self.pad_id, self.num_labels)

    def batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        seqs = [self.input_ids[i] for i in indices]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, : len(s)] = 1
        labels = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        # token_type_ids too: a single-segment task, and every graph then sees one input set.
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        return {k: v.to(device) for k, v in inputs.items()}, labels.to(device)


def input_names(model: Callable) -> frozenset[str] | None:
    """The keyword inputs ``model`` takes: a qfx graph's captured inputs, a CompiledModel's,
    or the names in ``forward``'s signature (None: it takes ``**kwargs``, pass everything)."""
    net = _unwrap(model) if isinstance(model, nn.Module) else model
    info = getattr(net, "meta", {}).get("qfx_capture") if isinstance(net, torch.fx.GraphModule) else getattr(net, "_capture", None)
    if info is not None:
        return frozenset(info.input_names)
    params = inspect.signature(net.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and "input_ids" not in params:
        return None
    return frozenset(params)


def _fit(inputs: dict[str, torch.Tensor], names: frozenset[str] | None) -> dict[str, torch.Tensor]:
    """Drop the inputs a model does not take (DistilBERT has no token_type_ids)."""
    return inputs if names is None else {k: v for k, v in inputs.items() if k in names}


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class KDWeights:
    """Weights of the loss terms; ``attention`` is ``"scores"`` (pre-softmax) or ``"probs"``."""

    logit: float = 1.0
    att: float = 1.0
    rep: float = 1.0
    ce: float = 0.0
    temperature: float = 1.0
    attention: str = "scores"

    def __post_init__(self) -> None:
        for name in ("logit", "att", "rep", "ce"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"KDWeights({name}={v!r}) must be a finite weight >= 0")
        if self.logit + self.att + self.rep + self.ce == 0:
            raise ValueError("KDWeights: all loss weights are 0; set at least one of logit/att/rep/ce")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"KDWeights(temperature={self.temperature!r}) must be > 0")
        if self.attention not in _ATTENTION_KINDS:
            raise ValueError(f"KDWeights(attention={self.attention!r}): use 'scores' (pre-softmax, Att*) or 'probs' (Att)")

    @property
    def needs_features(self) -> bool:
        return self.att > 0 or self.rep > 0


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation and checkpointing of one training run.

    ``batch_size`` is the global batch (split over DDP ranks). ``stop_after`` ends this
    process after that many finished steps (with a checkpoint), as a kill would, for tests
    and time-boxed jobs; the schedule still assumes ``steps``.
    """

    steps: int
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.06
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batch_size: int = 128
    ckpt_dir: str | None = None
    ckpt_every: int = 100
    keep_best: bool = True
    seed: int = 42
    progress: bool = True
    desc: str = "train"
    stop_after: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batch_size", "ckpt_every"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"TrainConfig({name}={v!r}) must be a positive int")
        if not (self.lr > 0 and 0 <= self.warmup < 1):
            raise ValueError(f"TrainConfig(lr={self.lr}, warmup={self.warmup}): need lr > 0 and 0 <= warmup < 1")


@dataclass
class TrainResult:
    """``history``: one dict per evaluation (step, dev_acc, loss); ``model`` is trained in place."""

    history: list[dict[str, float]]
    steps_done: int
    best_dev: float | None
    best_step: int | None
    wall_s: float
    resumed_from: int = 0
    finished: bool = True


# --------------------------------------------------------------------------- distributed


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    if _world()[1] == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------- models


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def make_teacher(teacher: nn.Module, example_kwargs: dict[str, Any]) -> torch.fx.GraphModule:
    """A frozen fp32 copy of ``teacher`` as a graph with feature taps (on the teacher's device).

    A copy, because the captured graph shares the module's parameters and freezing them
    would freeze ``teacher`` (and every student later copied from it).
    """
    gm = expose_features(capture(copy.deepcopy(teacher).eval(), example_kwargs=_fit(example_kwargs, input_names(teacher))))
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm.eval()


def make_student(
    teacher: nn.Module, config: QuantConfig, example_kwargs: dict[str, Any], skip: tuple[str, ...] = ()
) -> torch.fx.GraphModule:
    """``prepare_qat`` of a copy of ``teacher`` with feature taps, on the teacher's device.

    The graph is captured where the model lives because export records the device of the
    tensors it creates (attention-mask arithmetic), so it is built on the training device.
    """
    gm = expose_features(prepare_qat(teacher, example_kwargs=_fit(example_kwargs, input_names(teacher)), config=config, skip=skip))
    for p in gm.parameters():  # every float weight trains, whatever the teacher's flags were
        p.requires_grad_(p.is_floating_point())
    return gm


def _num_labels(model: nn.Module) -> int | None:
    src = model
    if isinstance(model, torch.fx.GraphModule) and "qfx_capture" in getattr(model, "meta", {}):
        src = model.meta["qfx_capture"].source
    return getattr(getattr(src, "config", None), "num_labels", None)


def _check_pair(s_rec: FeatureRecorder | None, t_rec: FeatureRecorder | None, layer_map: Sequence[int], s_out, t_out) -> None:
    """Teacher and student must agree on what the loss compares (first step only)."""
    if s_out.shape != t_out.shape:
        raise ValueError(f"teacher logits {tuple(t_out.shape)} and student logits {tuple(s_out.shape)} differ: the models classify into different label sets")
    if s_rec is None:
        return
    if len(layer_map) != s_rec.num_layers or max(layer_map) >= t_rec.num_layers:
        raise ValueError(
            f"the student has {s_rec.num_layers} layers and the teacher {t_rec.num_layers}; layer_map={tuple(layer_map)} "
            "must give one teacher layer per student layer (see qfx.compose.reduce_layers)"
        )
    for i, j in [(0, 0)] + [(l + 1, t + 1) for l, t in enumerate(layer_map)]:
        if s_rec.hidden[i].shape != t_rec.hidden[j].shape:
            raise ValueError(
                f"student hidden state {i} {tuple(s_rec.hidden[i].shape)} and teacher hidden state {j} "
                f"{tuple(t_rec.hidden[j].shape)} differ: teacher and student architectures differ"
            )
    if s_rec.q[0].shape != t_rec.q[layer_map[0]].shape:
        raise ValueError(f"student and teacher attention shapes differ ({tuple(s_rec.q[0].shape)} vs {tuple(t_rec.q[0].shape)}): different head counts")


# --------------------------------------------------------------------------- loss


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (a-b)^2 over the positions where ``mask`` (broadcastable to a) is true."""
    mask = mask.to(a.dtype).expand_as(a)
    return ((a - b.to(a.dtype)) ** 2 * mask).sum() / mask.sum().clamp_min(1)


def _attention(rec: FeatureRecorder, layer: int, key_mask: torch.Tensor, kind: str) -> torch.Tensor:
    scores = rec.scores(layer)
    if kind == "scores":
        return scores
    return torch.softmax(scores.masked_fill(~key_mask, float("-inf")), dim=-1)


def kd_loss(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    weights: KDWeights,
    s_rec: FeatureRecorder | None = None,
    t_rec: FeatureRecorder | None = None,
    layer_map: Sequence[int] = (),
) -> tuple[torch.Tensor, dict[str, float]]:
    """The Logit / Att / Rep (+ CE) loss of one batch; returns (loss, float of each term)."""
    terms: dict[str, torch.Tensor] = {}
    if weights.logit:
        T = weights.temperature
        terms["logit"] = F.kl_div(
            F.log_softmax(s_logits.float() / T, -1), F.log_softmax(t_logits.float() / T, -1), log_target=True, reduction="batchmean"
        ) * (T * T)
    if weights.ce:
        terms["ce"] = F.cross_entropy(s_logits.float(), labels)
    valid = attention_mask.bool()  # [B, S]
    if weights.att:
        key = valid[:, None, None, :]
        pair = key & valid[:, None, :, None]
        terms["att"] = sum(
            _masked_mse(_attention(s_rec, l, key, weights.attention), _attention(t_rec, t, key, weights.attention).detach(), pair)
            for l, t in enumerate(layer_map)
        )
    if weights.rep:
        tok = valid[..., None]
        pairs = [(0, 0)] + [(l + 1, t + 1) for l, t in enumerate(layer_map)]
        terms["rep"] = sum(_masked_mse(s_rec.hidden[i], t_rec.hidden[j].detach(), tok) for i, j in pairs)
    total = sum(getattr(weights, k) * v for k, v in terms.items())
    return total, {k: float(v.detach()) for k, v in terms.items()}


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: Callable, data: EncodedData, batch_size: int = 128, device: torch.device | str | None = None) -> float:
    """Accuracy of ``model(**inputs).logits`` on ``data`` (this rank's slice under DDP, summed).

    Works for HF models, qfx QAT graphs and :class:`qfx.CompiledModel`; sorts by length
    so batches carry little padding.
    """
    rank, world = _world()
    net = _unwrap(model) if isinstance(model, nn.Module) else model
    if device is None:
        device = _device_of(net) if isinstance(net, nn.Module) else torch.device("cpu")
    dev = torch.device(device)
    was_training = getattr(net, "training", False)
    if was_training:
        net.eval()
    order = sorted(range(rank, len(data), world), key=lambda i: len(data.input_ids[i]))
    names, correct = input_names(net), 0
    for start in range(0, len(order), batch_size):
        inputs, labels = data.batch(order[start : start + batch_size], dev)
        logits = net(**_fit(inputs, names)).logits
        correct += int((logits.argmax(-1) == labels.to(logits.device)).sum())
    if was_training:
        net.train()
    total_correct, total = _all_sum([correct, len(order)], dev)
    return total_correct / max(total, 1)


# --------------------------------------------------------------------------- the loop


def _batch_indices(n: int, step: int, cfg: TrainConfig) -> list[int]:
    """The global batch of ``step``: a seeded permutation per epoch, a function of step only."""
    per_epoch = max(n // cfg.batch_size, 1)
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[pos * cfg.batch_size : (pos + 1) * cfg.batch_size].tolist()


def _rank_slice(indices: list[int]) -> list[int]:
    rank, world = _world()
    mine = indices[rank::world]
    if not mine:
        raise ValueError(f"batch of {len(indices)} cannot feed {world} ranks; raise batch_size")
    return mine


def _optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    warm = max(int(cfg.warmup * cfg.steps), 1)

    def lr_at(step: int) -> float:  # linear warmup, then linear decay to 0
        return (step + 1) / warm if step < warm else max(0.0, (cfg.steps - step) / max(cfg.steps - warm, 1))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


@dataclass
class _State:
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_dev: float | None = None
    best_step: int | None = None
    best_weights: dict[str, torch.Tensor] | None = None


def _ckpt_path(cfg: TrainConfig) -> str | None:
    return os.path.join(cfg.ckpt_dir, _CKPT) if cfg.ckpt_dir else None


def _save(cfg: TrainConfig, model: nn.Module, opt, sched, state: _State) -> None:
    """Rank 0 writes atomically (temp file + rename): a kill mid-write keeps the old file."""
    path = _ckpt_path(cfg)
    if path is None or _world()[0] != 0:
        return
    os.makedirs(cfg.ckpt_dir, exist_ok=True)
    blob = {
        "step": state.step,
        "model": _unwrap(model).state_dict(),
        "optim": opt.state_dict(),
        "sched": sched.state_dict(),
        "history": state.history,
        "best": (state.best_dev, state.best_step, state.best_weights),
        "train_config": asdict(cfg),
    }
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(blob, tmp)
    os.replace(tmp, path)


def _load(cfg: TrainConfig, model: nn.Module, opt, sched, device: torch.device) -> _State:
    path = _ckpt_path(cfg)
    if path is None or not os.path.exists(path):
        return _State()
    blob = torch.load(path, map_location=device, weights_only=False)
    if blob["train_config"]["steps"] != cfg.steps or blob["train_config"]["batch_size"] != cfg.batch_size:
        raise ValueError(
            f"checkpoint {path} was written by a run with steps={blob['train_config']['steps']}, "
            f"batch_size={blob['train_config']['batch_size']}; resume with the same settings or use a new ckpt_dir"
        )
    _unwrap(model).load_state_dict(blob["model"])
    opt.load_state_dict(blob["optim"])
    sched.load_state_dict(blob["sched"])
    best_dev, best_step, best_w = blob["best"]
    return _State(blob["step"], blob["history"], best_dev, best_step, best_w)


class _StopFlag:
    """SIGTERM (torchrun, schedulers) sets a flag; the loop checkpoints and returns."""

    def __init__(self) -> None:
        self.set = False
        self._old = None

    def __enter__(self) -> "_StopFlag":
        with contextlib.suppress(ValueError):  # not the main thread: no handler, no flag
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.set = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _progress(cfg: TrainConfig, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=cfg.desc, disable=not cfg.progress or _world()[0] != 0, dynamic_ncols=True, leave=False)


def _evaluate_into(model, dev_data, cfg: TrainConfig, state: _State, loss: float) -> None:
    acc = evaluate(model, dev_data, cfg.eval_batch_size)
    state.history.append({"step": state.step, "dev_acc": acc, "loss": loss})
    if cfg.keep_best and (state.best_dev is None or acc > state.best_dev):
        state.best_dev, state.best_step = acc, state.step
        state.best_weights = {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}


def _train(
    model: nn.Module,
    step_loss: Callable[[nn.Module, dict, torch.Tensor], tuple[torch.Tensor, dict]],
    train_data: EncodedData,
    dev_data: EncodedData | None,
    cfg: TrainConfig,
    post_step: Callable[[], None] | None = None,
) -> TrainResult:
    """The loop shared by :func:`finetune` and :func:`distill`."""
    rank, _ = _world()
    device = _device_of(model)
    net = _wrap_ddp(model, device)
    opt, sched = _optimizer(model, cfg)
    state = _load(cfg, net, opt, sched, device)
    resumed, t0, last_loss = state.step, time.perf_counter(), float("nan")
    net.train()
    stop_at = min(cfg.steps, cfg.stop_after) if cfg.stop_after is not None else cfg.steps
    with _StopFlag() as flag, _progress(cfg, state.step) as bar:
        while state.step < stop_at and not flag.set:
            # Seeds are functions of the step: a resumed run draws what the killed run would have.
            torch.manual_seed(cfg.seed * 1_000_003 + state.step * 1009 + rank)
            inputs, labels = train_data.batch(_rank_slice(_batch_indices(len(train_data), state.step, cfg)), device)
            loss, parts = step_loss(net, inputs, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            if post_step is not None:
                post_step()
            state.step += 1
            last_loss = float(loss.detach())
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in parts.items()} | {"lr": f"{sched.get_last_lr()[0]:.2g}"})
            if dev_data is not None and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
                _evaluate_into(net, dev_data, cfg, state, last_loss)
                if rank == 0 and cfg.progress:
                    bar.write(f"[{cfg.desc}] step {state.step}: dev acc {state.history[-1]['dev_acc']:.4f}")
            if state.step % cfg.ckpt_every == 0 or state.step == stop_at or flag.set:
                _save(cfg, net, opt, sched, state)
    _barrier()
    finished = state.step >= cfg.steps
    if finished and cfg.keep_best and state.best_weights is not None:
        _unwrap(net).load_state_dict(state.best_weights)  # model selection on dev, as the paper reports
    return TrainResult(state.history, state.step, state.best_dev, state.best_step, time.perf_counter() - t0, resumed, finished)


# --------------------------------------------------------------------------- entry points


def finetune(model: nn.Module, train_data: EncodedData, dev_data: EncodedData | None, cfg: TrainConfig) -> TrainResult:
    """Plain cross-entropy training of a float classifier (the fp32 teacher), in place."""
    _check_labels(model, train_data)

    names = input_names(model)

    def step_loss(net, inputs, labels):
        loss = F.cross_entropy(net(**_fit(inputs, names)).logits.float(), labels)
        return loss, {"ce": float(loss.detach())}

    return _train(model, step_loss, train_data, dev_data, cfg)


def _check_labels(model: nn.Module, data: EncodedData) -> None:
    n = _num_labels(model)
    if n is not None and data.num_labels != n:
        raise ValueError(f"the data has {data.num_labels} label values but the model's head has {n} outputs")


def distill(
    teacher: nn.Module,
    student: torch.fx.GraphModule,
    train_data: EncodedData,
    dev_data: EncodedData | None,
    cfg: TrainConfig,
    weights: KDWeights = KDWeights(),
    layer_map: Sequence[int] | None = None,
    post_step: Callable[[], None] | None = None,
) -> TrainResult:
    """Train ``student`` (a :func:`make_student` graph) to mimic ``teacher``, in place.

    Args:
        teacher: the fp32 model (an ``nn.Module``; captured here) or a :func:`make_teacher` graph.
        student: ``make_student(...)``: a QAT graph with feature taps.
        layer_map: teacher layer distilled into each student layer (default: the identity).
        post_step: called after every optimizer step (e.g. re-applying pruning masks).
    """
    if not is_qat_model(student):
        raise ValueError("student must be a qfx.prepare_qat graph (use qfx.qat.make_student)")
    if weights.needs_features and not feature_taps(student):
        raise ValueError("student has no feature taps; build it with qfx.qat.make_student (or run expose_features)")
    _check_labels(student, train_data)
    device = _device_of(student)
    if not feature_taps(teacher):
        example = train_data.batch(list(range(min(2, len(train_data)))), device)[0]
        teacher = make_teacher(teacher.to(device), _fit(example, input_names(teacher)))
    t_names, s_names = input_names(teacher), input_names(student)
    t_rec, s_rec = FeatureRecorder(teacher), FeatureRecorder(student)
    lmap = tuple(layer_map) if layer_map is not None else tuple(range(s_rec.num_layers))
    checked = []

    def step_loss(net, inputs, labels):
        with torch.no_grad(), t_rec:
            t_logits = teacher(**_fit(inputs, t_names)).logits
        with s_rec:
            s_logits = net(**_fit(inputs, s_names)).logits
        if not checked:
            _check_pair(s_rec if weights.needs_features else None, t_rec, lmap, s_logits, t_logits)
            checked.append(True)
        loss, parts = kd_loss(s_logits, t_logits, labels, inputs["attention_mask"], weights, s_rec, t_rec, lmap)
        t_rec.clear(), s_rec.clear()
        return loss, parts

    return _train(student, step_loss, train_data, dev_data, cfg, post_step)
