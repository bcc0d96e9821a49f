"""Checkpoints: what resume needs and nothing more, readable by any number of ranks.

A run's folder holds at most two files:

* ``last.pt`` while training: the student's weights, the optimizer state, the LR schedule,
  the step, the dev history and a fingerprint of the run (:func:`fingerprint`). Model and
  optimizer state are *full* (unsharded) dicts keyed by parameter name
  (``torch.distributed.checkpoint.state_dict``), the same for one process, DDP and FSDP, so a
  run resumes on another number of GPUs (the batch schedule is a function of the step, not of
  the ranks). Once the run is finished, ``last.pt`` is rewritten with the final (dev-selected)
  weights only: the optimizer state of a finished phase is deleted.
* ``best.pt`` while training with ``keep_best``: the weights of the best dev evaluation so far.

Rank 0 writes atomically (temp file + rename): a kill mid-write keeps the old file.

Example::

    >>> model_sd, optim_sd = model_and_optim_state(net, opt)        # full dicts, on the CPU
    >>> save(ckpt_dir, LAST, {"step": 3, "model": model_sd, "optim": optim_sd, ...})
    >>> blob = load(ckpt_dir)                                          # None when there is none
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from qfx.schema import META_CONFIG
import qfx.train.ddp as ddp

__all__ = ["LAST", "BEST", "fingerprint", "check_fingerprint", "model_and_optim_state", "load_model_and_optim_state",
           "save", "load", "remove", "folder_bytes"]

LAST, BEST = "last.pt", "best.pt"

#: TrainConfig fields that define what a run computes; resuming with others is another run.
_RUN_FIELDS = ("steps", "batch_size", "lr", "weight_decay", "warmup", "grad_clip", "seed", "precision")


def fingerprint(cfg_dict: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """What must match to resume: the run's settings, the parameter names and shapes, and the
    student's quantization config (the world size may differ)."""
    net = ddp.unwrap(model)
    params = sorted((k, tuple(shape)) for k, shape in _full_shapes(net).items())
    qcfg = getattr(net, "meta", {}).get(META_CONFIG) if isinstance(net, torch.fx.GraphModule) else None
    return {"run": {k: cfg_dict.get(k) for k in _RUN_FIELDS}, "params": params, "quant": None if qcfg is None else repr(qcfg)}


def _full_shapes(net: nn.Module) -> dict[str, torch.Size]:
    # FSDP2 parameters are DTensors whose .shape is the full (unsharded) shape.
    return {k: v.shape for k, v in net.named_parameters()}


def check_fingerprint(path: str, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """ValueError naming what differs between the checkpoint's run and this one."""
    diffs = [f"{k}={saved['run'].get(k)!r} (now {now['run'].get(k)!r})" for k in now["run"] if saved["run"].get(k) != now["run"].get(k)]
    if saved["quant"] != now["quant"]:
        diffs.append(f"quantization {saved['quant']} (now {now['quant']})")
    if saved["params"] != now["params"]:
        a, b = dict(map(tuple, saved["params"])), dict(now["params"])
        other = sorted(set(a) ^ set(b)) or [k for k in a if tuple(a[k]) != tuple(b[k])]
        diffs.append(f"model parameters differ (first: {other[0]!r})")
    if diffs:
        raise ValueError(
            f"checkpoint {path} was written by another run: {', '.join(diffs)}; "
            "resume with the same settings or use a new ckpt_dir"
        )


def model_and_optim_state(model: nn.Module, opt: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """Full (unsharded) state dicts keyed by parameter name, copied to the CPU, on every rank
    (under FSDP a collective: all ranks must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    from torch.utils._pytree import tree_map

    # cpu_offload=False: with it, ranks other than 0 would get empty dicts, and every rank
    # needs the full weights (DDP replicas, best-weights selection at the end).
    opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
    net = _resharded(ddp.unwrap(model))
    if opt is None:
        model_sd, optim_sd = get_model_state_dict(net, options=opts), None
    else:
        model_sd, optim_sd = get_state_dict(net, opt, options=opts)
    to_cpu = lambda v: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return tree_map(to_cpu, model_sd), None if optim_sd is None else tree_map(to_cpu, optim_sd)


def load_model_and_optim_state(model: nn.Module, opt: torch.optim.Optimizer | None, model_sd: dict, optim_sd: dict | None) -> None:
    """Load full state dicts into a plain, DDP or FSDP model (each rank reads the whole file)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    opts = StateDictOptions(full_state_dict=True)
    net = _resharded(ddp.unwrap(model))
    if opt is None or optim_sd is None:
        set_model_state_dict(net, model_sd, options=opts)
    else:
        set_state_dict(net, opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)


def _resharded(net: nn.Module) -> nn.Module:
    """An FSDP2 module left unsharded by a forward (evaluation) holds plain tensors where
    the state-dict functions expect its DTensor shards: reshard it first."""
    if ddp.is_fsdp(net):
        net.reshard()
    return net


def save(ckpt_dir: str, name: str, blob: dict[str, Any]) -> None:
    """Rank 0 writes ``ckpt_dir/name`` atomically; other ranks return."""
    if ddp.world()[0] != 0:
        return
    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, name)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load(ckpt_dir: str | None, name: str = LAST) -> dict[str, Any] | None:
    """The blob at ``ckpt_dir/name`` on the CPU, or None."""
    if ckpt_dir is None:
        return None
    path = os.path.join(ckpt_dir, name)
    if not os.path.exists(path):
        return None
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if "fingerprint" not in blob:
        raise ValueError(f"checkpoint {path} predates qfx.train's format (no fingerprint); use a new ckpt_dir")
    return blob


def remove(ckpt_dir: str, name: str) -> None:
    if ddp.world()[0] == 0:
        path = os.path.join(ckpt_dir, name)
        if os.path.exists(path):
            os.remove(path)


def folder_bytes(ckpt_dir: str | None) -> int:
    """Bytes under ``ckpt_dir`` (0 if absent)."""
    if not ckpt_dir or not os.path.isdir(ckpt_dir):
        return 0
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(ckpt_dir) for f in files)
