"""Training data: tokenized examples, the batch schedule, and collation off the hot path.

* :class:`EncodedData`: token ids (no padding) and labels; ``batch`` pads and collates.
* :func:`batch_indices`: the global batch of a step, a function of (seed, step, batch size)
  only, so a resumed run (on any number of ranks) draws what the killed run would have.
* :func:`rank_slice`: this rank's share of a global batch (equal shares: DDP averages).
* :class:`Prefetcher`: collates the next step's batch in a worker thread into pinned memory
  and copies it to the device without blocking, while the current step runs.
"""
from __future__ import annotations

import inspect
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from qfx.schema import META_CAPTURE
import qfx.train.ddp as ddp

__all__ = ["EncodedData", "input_names", "fit_inputs", "batch_indices", "rank_slice", "check_batch_split", "Prefetcher"]


@dataclass
class EncodedData:
    """Tokenized examples: ``input_ids[i]`` (no padding) and ``labels[i]`` in [0, num_labels).

    ``batch`` pads to the longest sequence of the batch and returns the model's keyword
    inputs (``input_ids``, ``attention_mask``, ``token_type_ids``, each ``[B, S]`` int64) and
    the labels ``[B]``.

    Example::

        >>> data = EncodedData([[101, 7, 102], [101, 102]], [1, 0], pad_id=0, num_labels=2)
        >>> inputs, labels = data.batch([0, 1])     # inputs["input_ids"].shape == (2, 3)
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

    def batch(
        self, indices: Sequence[int], device: torch.device | str = "cpu", pin: bool = False
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Padded inputs and labels of ``indices`` on ``device`` (``pin``: page-locked host
        tensors first, so the copy to a GPU does not block the host)."""
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
        if pin:
            inputs, labels = {k: v.pin_memory() for k, v in inputs.items()}, labels.pin_memory()
        blocking = not pin
        return {k: v.to(device, non_blocking=not blocking) for k, v in inputs.items()}, labels.to(device, non_blocking=not blocking)


def input_names(model: Callable) -> frozenset[str] | None:
    """The keyword inputs ``model`` takes: a qfx graph's captured inputs, a CompiledModel's,
    or the names in ``forward``'s signature (None: it takes ``**kwargs``, pass everything)."""
    net = ddp.unwrap(model) if isinstance(model, nn.Module) else model
    info = getattr(net, "meta", {}).get(META_CAPTURE) if isinstance(net, torch.fx.GraphModule) else getattr(net, "_capture", None)
    if info is not None:
        return frozenset(info.input_names)
    params = inspect.signature(net.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and "input_ids" not in params:
        return None
    return frozenset(params)


def fit_inputs(inputs: dict[str, torch.Tensor], names: frozenset[str] | None) -> dict[str, torch.Tensor]:
    """Drop the inputs a model does not take (DistilBERT has no token_type_ids)."""
    return inputs if names is None else {k: v for k, v in inputs.items() if k in names}


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The global batch of ``step``: a seeded permutation per epoch, a function of step only."""
    per_epoch = max(n // batch_size, 1)
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[pos * batch_size : (pos + 1) * batch_size].tolist()


def check_batch_split(batch_size: int, n: int) -> None:
    """Every rank must get the same number of examples: DDP averages the ranks' gradients
    with equal weights, so unequal shares would weight some examples more than others."""
    _, world = ddp.world()
    global_batch = min(batch_size, n)
    if global_batch % world:
        lo, hi = (global_batch // world) * world, (global_batch // world + 1) * world
        fix = f"batch_size={hi}" + (f" or {lo}" if lo else "")
        raise ValueError(
            f"TrainConfig(batch_size={batch_size}) with {n} training examples gives global batches of {global_batch}, "
            f"which {world} ranks cannot share equally; use {fix} (a multiple of the world size {world})"
        )


def rank_slice(indices: list[int]) -> list[int]:
    """This rank's examples of a global batch (strided: equal shares, checked up front)."""
    rank, world = ddp.world()
    return indices[rank::world]


class Prefetcher:
    """Batches of consecutive steps, each collated in a worker thread while the step before
    it runs, in pinned memory and copied with ``non_blocking`` on a GPU.

    ``make(step) -> (inputs, labels)`` must depend on ``step`` only; ``get(step)`` returns
    the batch of ``step`` and starts collating ``step + 1``.

    Example::

        >>> with Prefetcher(lambda s: data.batch(plan(s), "cuda", pin=True), first=0) as pre:
        ...     inputs, labels = pre.get(0)
    """

    def __init__(self, make: Callable[[int], tuple[dict, torch.Tensor]], first: int, device: torch.device | None = None) -> None:
        self._make = make
        # The current CUDA device is per thread: without this, pinning memory in the worker
        # would open a context on GPU 0 from every rank (what DataLoader's pin thread avoids too).
        init = (lambda: torch.cuda.set_device(device)) if device is not None and device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qfx-collate", initializer=init)
        self._next = (first, self._pool.submit(make, first))

    def get(self, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        at, fut = self._next
        batch = fut.result() if at == step else self._make(step)
        self._next = (step + 1, self._pool.submit(self._make, step + 1))
        return batch

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
