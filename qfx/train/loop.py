"""The training loop: fp32 fine-tuning of the teacher and QAT + KD of the student.

One loop (:func:`finetune`, :func:`distill`) under one process or ``torchrun``: each rank
reads its equal share of every global batch (:mod:`qfx.train.data`), DDP or FSDP2 keeps the
ranks in step (:mod:`qfx.train.ddp`), rank 0 writes lean checkpoints that resume on any
number of ranks (:mod:`qfx.train.checkpoint`) and draws the progress bar. The batch order and
the dropout seeds are functions of (seed, step), so a resumed run takes exactly the steps the
killed run would have taken.

Precision (``TrainConfig.precision``): "fp32" (default), or "bf16" / "fp16" autocast for the
float parts of teacher and student with fp32 master weights (fp16 with loss scaling). The
integer linears of the student keep their exact accumulator and fp32 epilogue in every
setting and return the autocast dtype, as the compiled model does with float parts in that
dtype; evaluation always runs the fp32 twin.

Example::

    >>> student = make_student(teacher, qfx.QuantConfig(4, 4), example_kwargs=batch)
    >>> result = distill(teacher, student, train, dev, TrainConfig(steps=1000, precision="bf16"))
    >>> qfx.compile(student, mode="int4", target="cpu")
"""
from __future__ import annotations

import contextlib
import copy
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qfx.api import is_qat_model, prepare_qat
from qfx.capture import capture
from qfx.config import QuantConfig
from qfx.passes.expose_features import FeatureRecorder, feature_taps
from qfx.pipeline import TRAIN_PASSES, PassContext, run_passes
from qfx.schema import META_CAPTURE
import qfx.train.checkpoint as checkpoint
import qfx.train.ddp as ddp
from qfx.train.config import PRECISIONS, TrainConfig, TrainResult, adamw_with_warmup  # noqa: F401  (named here too)
from qfx.train.data import EncodedData, Prefetcher, batch_indices, check_batch_split, fit_inputs, input_names, rank_slice
from qfx.train.losses import KDWeights, check_pair, kd_loss

__all__ = ["PRECISIONS", "TrainConfig", "TrainResult", "make_teacher", "make_student", "evaluate", "finetune", "distill"]

# --------------------------------------------------------------------------- models


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def make_teacher(teacher: nn.Module, example_kwargs: dict[str, Any]) -> torch.fx.GraphModule:
    """A frozen fp32 copy of ``teacher`` as a graph with feature taps (on the teacher's device):
    :func:`qfx.capture`, then the training pipeline (:data:`qfx.pipeline.TRAIN_PASSES`).

    A copy, because the captured graph shares the module's parameters and freezing them
    would freeze ``teacher`` (and every student later copied from it).
    """
    gm = capture(copy.deepcopy(teacher).eval(), example_kwargs=fit_inputs(example_kwargs, input_names(teacher)))
    gm = run_passes(gm, TRAIN_PASSES, PassContext(config=None))
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm.eval()


def make_student(
    teacher: nn.Module, config: QuantConfig, example_kwargs: dict[str, Any], skip: tuple[str, ...] = ()
) -> torch.fx.GraphModule:
    """``prepare_qat`` of a copy of ``teacher``, then the training pipeline
    (:data:`qfx.pipeline.TRAIN_PASSES`: feature taps last), on the teacher's device.

    The graph is captured where the model lives because export records the device of the
    tensors it creates (attention-mask arithmetic), so it is built on the training device.
    """
    gm = prepare_qat(teacher, example_kwargs=fit_inputs(example_kwargs, input_names(teacher)), config=config, skip=skip)
    gm = run_passes(gm, TRAIN_PASSES, PassContext(config=config, skip=tuple(skip)))
    for p in gm.parameters():  # every float weight trains, whatever the teacher's flags were
        p.requires_grad_(p.is_floating_point())
    return gm


def _num_labels(model: nn.Module) -> int | None:
    src = model
    if isinstance(model, torch.fx.GraphModule) and META_CAPTURE in getattr(model, "meta", {}):
        src = model.meta[META_CAPTURE].source
    return getattr(getattr(src, "config", None), "num_labels", None)


def _check_labels(model: nn.Module, data: EncodedData) -> None:
    n = _num_labels(model)
    if n is not None and data.num_labels != n:
        raise ValueError(f"the data has {data.num_labels} label values but the model's head has {n} outputs")


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: Callable, data: EncodedData, batch_size: int = 128, device: torch.device | str | None = None) -> float:
    """Accuracy of ``model(**inputs).logits`` on ``data`` (this rank's slice under DDP, summed).

    Works for HF models, qfx QAT graphs (the fp32 twin: no autocast) and
    :class:`qfx.CompiledModel`; sorts by length so batches carry little padding.
    """
    rank, world = ddp.world()
    net = ddp.unwrap(model) if isinstance(model, nn.Module) else model
    if device is None:
        device = _device_of(net) if isinstance(net, nn.Module) else torch.device("cpu")
    dev = torch.device(device)
    was_training = getattr(net, "training", False)
    if was_training:
        net.eval()
    order = sorted(range(rank, len(data), world), key=lambda i: len(data.input_ids[i]))
    names, correct = input_names(net), 0
    # FSDP ranks all-gather in every forward: each must run as many forwards as the others.
    n_batches = math.ceil(math.ceil(len(data) / world) / batch_size) if isinstance(net, nn.Module) and ddp.is_fsdp(net) else None
    starts = list(range(0, len(order), batch_size))
    for start in starts:
        inputs, labels = data.batch(order[start : start + batch_size], dev)
        logits = net(**fit_inputs(inputs, names)).logits
        correct += int((logits.argmax(-1) == labels.to(logits.device)).sum())
    for _ in range(len(starts), n_batches or 0):  # a dummy forward, not counted
        net(**fit_inputs(data.batch([0], dev)[0], names))
    if was_training:
        net.train()
    total_correct, total = ddp.all_sum([correct, len(order)], dev)
    return total_correct / max(total, 1)


# --------------------------------------------------------------------------- the loop


def _optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    return cfg.optimizer(p for p in model.parameters() if p.requires_grad)


@dataclass
class _State:
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_dev: float | None = None
    best_step: int | None = None
    best_weights: dict[str, torch.Tensor] | None = None  # full, on the CPU
    finished: bool = False


class _Run:
    """One run's optimizer, schedule, loss scaler and checkpoint files."""

    def __init__(self, net: nn.Module, cfg: TrainConfig, device: torch.device, fp: dict) -> None:
        self.net, self.cfg, self.device, self.fp = net, cfg, device, fp
        self.opt, self.sched = _optimizer(net, cfg)
        # fp16 needs loss scaling (5 exponent bits); bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    def autocast(self):
        dtype = PRECISIONS[self.cfg.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def save(self, state: _State) -> None:
        cfg = self.cfg
        if cfg.ckpt_dir is None or (ddp.world()[0] != 0 and not ddp.is_fsdp(self.net)):
            return
        model_sd, optim_sd = checkpoint.model_and_optim_state(self.net, None if state.finished else self.opt)
        blob = {"step": state.step, "finished": state.finished, "model": model_sd, "optim": optim_sd,
                "sched": None if state.finished else self.sched.state_dict(),
                "scaler": None if state.finished else self.scaler.state_dict(),
                "history": state.history, "best": (state.best_dev, state.best_step),
                "fingerprint": self.fp, "world_size": ddp.world()[1], "train_config": asdict(cfg)}
        checkpoint.save(cfg.ckpt_dir, checkpoint.LAST, blob)

    def save_best(self, state: _State) -> None:
        if self.cfg.ckpt_dir is not None:
            checkpoint.save(self.cfg.ckpt_dir, checkpoint.BEST, {"step": state.best_step, "model": state.best_weights, "fingerprint": self.fp})

    def resume(self) -> _State:
        cfg = self.cfg
        blob = checkpoint.load(cfg.ckpt_dir)
        if blob is None:
            return _State()
        checkpoint.check_fingerprint(f"{cfg.ckpt_dir}/{checkpoint.LAST}", blob["fingerprint"], self.fp)
        rank, world = ddp.world()
        if blob["world_size"] != world and rank == 0 and cfg.progress:
            print(f"[{cfg.desc}] resuming a {blob['world_size']}-rank run on {world} rank(s): full state dicts, resharded on load", flush=True)
        finished = blob["finished"]
        # Loading fills a fresh optimizer's state with a zero-lr step, which torch skips
        # when gradients are left over (a model trained before): clear them first.
        self.opt.zero_grad(set_to_none=True)
        checkpoint.load_model_and_optim_state(self.net, None if finished else self.opt, blob["model"], blob["optim"])
        state = _State(blob["step"], blob["history"], *blob["best"], finished=finished)
        if not finished:
            self.sched.load_state_dict(blob["sched"])
            self.scaler.load_state_dict(blob["scaler"])
            best = checkpoint.load(cfg.ckpt_dir, checkpoint.BEST) if state.best_step is not None else None
            state.best_weights = None if best is None else best["model"]
        return state


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

    return tqdm(total=cfg.steps, initial=start, desc=cfg.desc, disable=not cfg.progress or ddp.world()[0] != 0, dynamic_ncols=True, leave=False)


def _evaluate_into(run: _Run, dev_data, state: _State, loss: float) -> None:
    acc = evaluate(run.net, dev_data, run.cfg.eval_batch_size)
    state.history.append({"step": state.step, "dev_acc": acc, "loss": loss})
    if run.cfg.keep_best and (state.best_dev is None or acc > state.best_dev):
        state.best_dev, state.best_step = acc, state.step
        state.best_weights = checkpoint.model_and_optim_state(run.net, None)[0]
        run.save_best(state)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _oom_error(run: _Run, step_loss, inputs: dict, labels: torch.Tensor, step: int) -> torch.OutOfMemoryError:
    """The OOM message, with the largest per-rank batch that fits (forward + backward of the
    same step's examples, halving from the batch that failed; no optimizer step taken)."""
    rank, world = ddp.world()
    n, seq = labels.shape[0], inputs["input_ids"].shape[-1]
    run.opt.zero_grad(set_to_none=True)
    empty = torch.cuda.empty_cache if run.device.type == "cuda" else (lambda: None)
    empty()
    fits, b = 0, n // 2
    sync_off = run.net.no_sync() if isinstance(run.net, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
    with sync_off:  # probes are per rank: no gradient all-reduce
        while b >= 1 and not fits:
            try:
                loss, _ = step_loss(run.net, {k: v[:b] for k, v in inputs.items()}, labels[:b], run.autocast)
                loss.backward()
                fits = b
            except Exception as e:  # noqa: BLE001 (only OOM is expected; anything else re-raises)
                if not _is_oom(e):
                    raise
                b //= 2
            finally:
                run.opt.zero_grad(set_to_none=True)
                empty()
    cfg = run.cfg
    where = f"batch_size={cfg.batch_size} ({n} per rank on {world} rank(s), {seq} tokens) ran out of memory at step {step}"
    if fits:
        more = [] if cfg.precision != "fp32" else ["precision='bf16'"]
        more += [] if cfg.sharding == "fsdp" or world == 1 else ["sharding='fsdp'"]
        fix = (f"a per-rank batch of {fits} fits (measured now, forward + backward): use TrainConfig(batch_size={fits * world})"
               + "".join(f", or {m}" for m in more))
    else:
        fix = "not even one example fits: shorten the sequences, use precision='bf16', or sharding='fsdp' on several GPUs"
    return torch.OutOfMemoryError(f"{where}; {fix}")


def _train(
    model: nn.Module,
    step_loss: Callable,
    train_data: EncodedData,
    dev_data: EncodedData | None,
    cfg: TrainConfig,
    post_step: Callable[[], None] | None = None,
    frozen: Sequence[nn.Module] = (),
) -> TrainResult:
    """The loop shared by :func:`finetune` and :func:`distill`.

    ``step_loss(net, inputs, labels, autocast) -> (loss, parts)`` runs the forwards under
    ``autocast()``; ``frozen`` modules (the KD teacher) are sharded like ``model`` under FSDP.
    """
    t0 = time.perf_counter()
    rank, world = ddp.world()
    check_batch_split(cfg.batch_size, len(train_data))
    device = _device_of(model)
    fp = checkpoint.fingerprint(asdict(cfg), model)
    for m in frozen:
        ddp.wrap_frozen(m, cfg.sharding)
    run = _Run(ddp.wrap(model, device, cfg.sharding), cfg, device, fp)
    net = run.net
    # The compiled module shares net's parameters; only the training forward goes through it.
    train_net = torch.compile(net) if cfg.compile else net
    state = run.resume()
    resumed = state.step
    if state.finished:  # a finished run: its final weights are loaded, nothing to do
        return TrainResult(state.history, state.step, state.best_dev, state.best_step, time.perf_counter() - t0, resumed, True,
                           checkpoint.folder_bytes(cfg.ckpt_dir))
    net.train()
    stop_at = min(cfg.steps, cfg.stop_after) if cfg.stop_after is not None else cfg.steps
    pin = device.type == "cuda"

    def make_batch(step: int):
        return train_data.batch(rank_slice(batch_indices(len(train_data), step, cfg.batch_size, cfg.seed)), device, pin=pin)

    loss = None
    with _StopFlag() as flag, _progress(cfg, state.step) as bar, Prefetcher(make_batch, state.step, device) as batches:
        while state.step < stop_at and not flag.set:
            # Seeds are functions of the step: a resumed run draws what the killed run would have.
            torch.manual_seed(cfg.seed * 1_000_003 + state.step * 1009 + rank)
            inputs, labels = batches.get(state.step)
            oom = False
            try:
                loss, parts = step_loss(train_net, inputs, labels, run.autocast)
                run.opt.zero_grad(set_to_none=True)
                run.scaler.scale(loss).backward()
            except Exception as e:  # noqa: BLE001 (only OOM is handled; the rest re-raises)
                if not _is_oom(e):
                    raise
                oom = True  # probed outside the except: its traceback holds the failed step's tensors
            if oom:
                loss = parts = None
                raise _oom_error(run, step_loss, inputs, labels, state.step)
            if cfg.grad_clip:
                run.scaler.unscale_(run.opt)
                nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            run.scaler.step(run.opt)
            run.scaler.update()
            run.sched.step()
            if post_step is not None:
                post_step()
            state.step += 1
            bar.update(1)
            if state.step % cfg.log_every == 0 and bar.disable is False:  # the only per-step host sync, every log_every steps
                bar.set_postfix({k: f"{float(v):.3g}" for k, v in parts.items()} | {"lr": f"{run.sched.get_last_lr()[0]:.2g}"})
            if dev_data is not None and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
                _evaluate_into(run, dev_data, state, float(loss.detach()))
                if rank == 0 and cfg.progress:
                    bar.write(f"[{cfg.desc}] step {state.step}: dev acc {state.history[-1]['dev_acc']:.4f}")
            if state.step % cfg.ckpt_every == 0 or state.step == stop_at or flag.set:
                if state.step < cfg.steps:  # the finished run writes its lean checkpoint below
                    run.save(state)
    run.opt.zero_grad(set_to_none=True)  # the last step's gradients: memory the caller does not need
    ddp.barrier()
    finished = state.step >= cfg.steps
    if finished:
        if cfg.keep_best and state.best_weights is not None:  # model selection on dev, as the paper reports
            checkpoint.load_model_and_optim_state(net, None, state.best_weights, None)
        state.finished = True
        run.save(state)  # weights, step and history only: a finished run's optimizer state is deleted
        if cfg.ckpt_dir is not None:
            checkpoint.remove(cfg.ckpt_dir, checkpoint.BEST)
        ddp.barrier()
    return TrainResult(state.history, state.step, state.best_dev, state.best_step, time.perf_counter() - t0, resumed, finished,
                       checkpoint.folder_bytes(cfg.ckpt_dir) if rank == 0 else 0)


# --------------------------------------------------------------------------- entry points


def finetune(
    model: nn.Module, train_data: EncodedData, dev_data: EncodedData | None, cfg: TrainConfig, post_step: Callable[[], None] | None = None
) -> TrainResult:
    """Plain cross-entropy training of a float classifier (the fp32 teacher), in place;
    ``post_step`` is called after every optimizer step.

    Example::

        >>> finetune(model, train, dev, TrainConfig(steps=500, precision="bf16"))
    """
    _check_labels(model, train_data)
    names = input_names(model)

    def step_loss(net, inputs, labels, autocast):
        with autocast():
            logits = net(**fit_inputs(inputs, names)).logits
        loss = F.cross_entropy(logits.float(), labels)
        return loss, {"ce": loss.detach()}

    return _train(model, step_loss, train_data, dev_data, cfg, post_step)


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

    Example::

        >>> distill(teacher, make_student(teacher, qfx.QuantConfig(4, 4), batch), train, dev, TrainConfig(steps=1000))
    """
    if not is_qat_model(student):
        raise ValueError("student must be a qfx.prepare_qat graph (use qfx.train.make_student)")
    if weights.needs_features and not feature_taps(student):
        raise ValueError("student has no feature taps; build it with qfx.train.make_student (or run expose_features)")
    _check_labels(student, train_data)
    device = _device_of(student)
    if not feature_taps(teacher):
        example = train_data.batch(list(range(min(2, len(train_data)))), device)[0]
        teacher = make_teacher(teacher.to(device), fit_inputs(example, input_names(teacher)))
    t_names, s_names = input_names(teacher), input_names(student)
    t_rec, s_rec = FeatureRecorder(teacher), FeatureRecorder(student)
    lmap = tuple(layer_map) if layer_map is not None else tuple(range(s_rec.num_layers))
    checked = []

    def step_loss(net, inputs, labels, autocast):
        try:
            with autocast():
                with torch.no_grad(), t_rec:
                    t_logits = teacher(**fit_inputs(inputs, t_names)).logits
                with s_rec:
                    s_logits = net(**fit_inputs(inputs, s_names)).logits
            if not checked:
                check_pair(s_rec if weights.needs_features else None, t_rec, lmap, s_logits, t_logits)
                checked.append(True)
            return kd_loss(s_logits, t_logits, labels, inputs["attention_mask"], weights, s_rec, t_rec, lmap)
        finally:  # also after a failed forward (OOM): the recorders must not keep its tensors
            t_rec.clear(), s_rec.clear()

    return _train(student, step_loss, train_data, dev_data, cfg, post_step, frozen=(teacher,))
