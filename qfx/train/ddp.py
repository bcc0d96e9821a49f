"""Processes and parallelism: the same training code under one process or ``torchrun``.

* :func:`init_distributed`: join torchrun's process group (NCCL on GPUs, gloo on CPUs) and
  pick this rank's device; a GPU run without NCCL stops with a clear error and the gloo hint.
* :func:`wrap`: DDP (replicated weights, averaged gradients) or FSDP2 (``fully_shard``:
  parameters, gradients and optimizer state sharded over the ranks) for the model that
  trains; the frozen teacher of KD is sharded the same way under FSDP (:func:`wrap_frozen`).
* ``world() -> (rank, world_size)``, :func:`barrier`, :func:`all_sum`.

Example::

    >>> device = init_distributed()          # under torchrun; a no-op in one process
    >>> net = wrap(model, device, "ddp")
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["SHARDING", "world", "barrier", "all_sum", "init_distributed", "wrap", "wrap_frozen", "unwrap", "is_fsdp"]

#: ``TrainConfig(sharding=...)``: "ddp" replicates the model on every rank; "fsdp" shards
#: parameters, gradients and optimizer state (FSDP2) when they do not fit on one GPU.
SHARDING = ("ddp", "fsdp")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over the ranks (float64; one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def init_distributed(backend: str | None = None) -> torch.device | None:
    """Join the process group torchrun describes (``WORLD_SIZE > 1``) and return this rank's
    device (``cuda:LOCAL_RANK`` on GPUs); None in a single process.

    ``backend``: None picks NCCL when CUDA is visible, gloo otherwise. Asking for NCCL (or
    running on GPUs) on a torch without NCCL raises a ValueError that names the gloo
    fallback instead of failing inside the first collective.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if dist.is_initialized():
        return _rank_device()
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"init_distributed(backend={backend!r}): use 'nccl' (GPUs) or 'gloo' (CPUs, or GPUs without NCCL)")
    if backend == "nccl" and not (dist.is_available() and dist.is_nccl_available()):
        raise ValueError(
            f"init_distributed(backend='nccl'): this torch build ({torch.__version__}) has no NCCL, which multi-GPU "
            "training needs for speed; install a CUDA build of torch with NCCL, or run with backend='gloo' "
            "(slower all-reduce through host memory; e.g. --dist-backend gloo)"
        )
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return _rank_device()


def _rank_device() -> torch.device:
    if torch.cuda.is_available():  # gloo over CUDA tensors works too (the no-NCCL fallback)
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def is_fsdp(model: nn.Module) -> bool:
    return getattr(model, "_qfx_sharding", None) == "fsdp"


def wrap(model: nn.Module, device: torch.device, sharding: str = "ddp") -> nn.Module:
    """The module that trains: ``model`` itself (one process), DDP, or FSDP2 in place.

    FSDP2 (``torch.distributed.fsdp.fully_shard``) shards the whole graph module as one unit:
    at rest the four fp32 copies AdamW keeps (weights, gradients, two moments) are split over
    the ranks; the weights are all-gathered whole for each forward and backward and resharded
    after, so the peak holds one full copy of the weights plus the shards.
    """
    if sharding not in SHARDING:
        raise ValueError(f"TrainConfig(sharding={sharding!r}): use one of {SHARDING}")
    if world()[1] == 1:
        return model
    if sharding == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, reshard_after_forward=True)  # root too: an eval forward must not leave it gathered
        model._qfx_sharding = "fsdp"
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def wrap_frozen(model: nn.Module, sharding: str) -> nn.Module:
    """The KD teacher (no gradients): replicated under DDP, sharded like the student under
    FSDP (its parameters gathered for each forward and freed after)."""
    if sharding == "fsdp" and world()[1] > 1 and not is_fsdp(model):
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, reshard_after_forward=True)
        model._qfx_sharding = "fsdp"
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
