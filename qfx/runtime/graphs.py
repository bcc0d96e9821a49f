"""CUDA graphs per shape bucket, captured on first use, replayed on every later call.

A BERT-base forward is ~300 kernels; launched one by one from Python it is host-bound at small
shapes (HARDWARE.md: ~10 ms as called vs ~1 ms replayed). :class:`GraphPool` captures the lean
graph (:mod:`qfx.runtime.launch_plan`) once per (batch, seq) bucket and replays it.

Why hand-rolled rather than ``torch.compile(mode="reduce-overhead")``: the issue asked for the
existing engines where they meet the goals. CUDA-graph trees re-trace through Dynamo on every
new shape and first call (tens of seconds for BERT-base), keep their own output-aliasing rules
(outputs are overwritten by the next replay unless cloned), and offer no bucket padding. The
part that is specific to us is small: pad into a bucket, replay, slice back. The capture
itself is ``torch.cuda.CUDAGraph`` with one shared memory pool.

Padding removal (on by default for GPU targets, :mod:`qfx.passes.unpad`, :mod:`qfx.runtime.packed`):
the graph packs the real tokens, T of them, and T changes from call to call while a graph needs
fixed shapes. So a packed call replays the graph of its (batch, seq, token bucket)
(:meth:`qfx.runtime.buckets.Buckets.tokens`): the lean graph's ``qfx::token_index``
(:class:`qfx.runtime.launch_plan.TokenIndex`) is given the bucket as its capacity while capturing,
so the graph computes the index on the GPU with fixed shapes (real tokens first, dummy rows
after, whose outputs land in a dropped row). The runtime needs T on the host to choose the
bucket: counted from the caller's mask, free for a CPU mask, one small device sync for a GPU
one. Padded batch rows get an all-zero mask (no tokens). A call the runtime routes padded (no
padding, or packing would not be exact) replays the padded twin's graph, key
(batch, seq, "padded"), or the unmasked one, (batch, seq, "dense"), when it fills its bucket.

Memory: graphs share one private pool (replays are sequential on one stream, so their
intermediates may overlap); each keeps static inputs and outputs alive. Outputs returned to the
caller are copies (slices of the static outputs would be overwritten by the next replay).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from qfx.runtime.buckets import Buckets, DimRoles

__all__ = ["GraphPool", "CaptureFailed"]


def _rebuilder(spec) -> Callable[[list], Any]:
    """leaves -> the output structure. A flat mapping of tensors (HF's ModelOutput classes) is
    rebuilt by its constructor directly: ``tree_unflatten`` costs ~10x more host time there."""
    children = spec.children() if callable(getattr(spec, "children", None)) else spec.children_specs
    flat = spec.num_leaves == spec.num_children and all(c.is_leaf() for c in children)
    context = spec.context
    if flat and isinstance(context, (list, tuple)) and all(isinstance(k, str) for k in context) and context:
        cls, keys = spec.type, list(context)
        try:
            probe = cls(**{k: None for k in keys})
        except Exception:  # noqa: BLE001 - not a keyword-constructible mapping: the generic path
            probe = None
        if probe is not None:
            return lambda values: cls(**dict(zip(keys, values)))
    return lambda values: pytree.tree_unflatten(values, spec)


class CaptureFailed(RuntimeError):
    """A bucket could not be captured; the model runs it by direct launch (and says why)."""


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: Any  # the pytree the graph's forward returned (static tensors)
    leaves: list = field(default_factory=list)  # its leaves, flattened once at capture
    rebuild: Callable[[list], Any] | None = None  # leaves -> the output structure


@dataclass
class GraphPool:
    """Bucketed CUDA graphs of ``forward`` (a callable taking the graph's keyword inputs)."""

    forward: Callable[..., Any]
    roles: DimRoles
    buckets: Buckets
    device: torch.device
    #: the same graph with attention unmasked, replayed for calls with no padding at all (a
    #: fused kernel without a bias is faster); None: always the masked graph
    dense_forward: Callable[..., Any] | None = None
    #: the lean graph's bound qfx::token_index (padding removal), else None
    token_index: Any = None
    #: padding removal: the graph over every position (qfx.runtime.packed.padded_twin), replayed
    #: for calls routed padded; None: no such graph
    padded_forward: Callable[..., Any] | None = None
    graphs: "OrderedDict[tuple, _Captured]" = field(default_factory=OrderedDict)
    failed: dict[tuple, str] = field(default_factory=dict)
    captures: int = 0
    last_key: tuple | None = None  # the graph the last call replayed

    def __post_init__(self):
        self._pool = torch.cuda.graph_pool_handle()

    def bucket_for(self, kwargs: dict[str, torch.Tensor]) -> tuple | None:
        first = next(iter(kwargs.values()))
        batch = first.shape[0]
        seq = first.shape[1] if self.roles.has_seq else None
        fit = self.buckets.fit(batch, seq)
        if fit is None:
            return None
        # without an attention mask, padding the sequence would change every real token's
        # attention: the sequence length then stays exact
        return fit if self.roles.has_seq else (fit[0], first.shape[1])

    def key_for(self, kwargs: dict[str, torch.Tensor], dense: bool, tokens: int | None = None,
                padded: bool = False) -> tuple | None:
        """The graph a call replays: its bucket, plus "dense" when nothing is padded (the call
        fills its bucket exactly and ``dense`` says its attention_mask is all ones); with
        padding removal, plus "padded" for a call routed padded (``padded``), else the token
        bucket of its ``tokens`` real tokens."""
        bucket = self.bucket_for(kwargs)
        if bucket is None:
            return None
        first = next(iter(kwargs.values()))
        if dense and self.dense_forward is not None and tuple(first.shape[:2]) == tuple(bucket):
            return (*bucket, "dense")
        if padded and self.padded_forward is not None:
            return (*bucket, "padded")
        if self.token_index is not None:
            slots = bucket[0] * bucket[1]
            return (*bucket, self.buckets.tokens(slots if tokens is None else tokens, slots))
        return bucket

    # -- padding -------------------------------------------------------------------------

    def _static_inputs(self, bucket: tuple, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, x in like.items():
            shape = [bucket[0] if r == "b" else bucket[1] if r == "s" else x.shape[i]
                     for i, r in enumerate(self.roles.inputs[name])]
            out[name] = torch.zeros(shape, dtype=x.dtype, device=self.device)
        return out

    def _fill(self, static: dict[str, torch.Tensor], kwargs: dict[str, torch.Tensor], packed: bool = False) -> None:
        for name, x in kwargs.items():
            dst = static[name]
            roles = self.roles.inputs[name]
            if tuple(dst.shape) == tuple(x.shape):
                dst.copy_(x, non_blocking=True)
                continue
            region = tuple(slice(0, x.shape[i]) if r else slice(None) for i, r in enumerate(roles))
            dst.zero_()
            dst[region].copy_(x, non_blocking=True)
            if name == "attention_mask" and roles[:1] == ("b",) and dst.shape[0] > x.shape[0] and not packed:
                dst[x.shape[0]:].fill_(1)  # padded rows attend to something: no NaN anywhere
            # a packed graph's padded rows stay all-zero: no packed token reads them

    def _slice(self, entry: _Captured, batch: int, seq: int) -> Any:
        leaves = entry.leaves
        if len(leaves) != len(self.roles.outputs):
            raise RuntimeError(f"the graph returned {len(leaves)} tensors, its signature says {len(self.roles.outputs)}")
        cut = []
        for leaf, roles in zip(leaves, self.roles.outputs):
            if roles is None or not isinstance(leaf, torch.Tensor):
                cut.append(leaf)
                continue
            region = tuple(slice(0, batch) if r == "b" else slice(0, seq) if r == "s" else slice(None) for r in roles)
            cut.append(leaf[region].clone())
        return entry.rebuild(cut)

    # -- capture and replay -----------------------------------------------------------------

    def _capture(self, key: tuple, kwargs: dict[str, torch.Tensor]) -> _Captured:
        bucket = key[:2]
        forward = {("dense",): self.dense_forward, ("padded",): self.padded_forward}.get(key[2:], self.forward)
        if self.token_index is not None and forward is self.forward:  # the token index: fixed to the token bucket
            capacity = key[2] if len(key) > 2 and isinstance(key[2], int) else bucket[0] * bucket[1]
            try:
                self.token_index.capacity = capacity
                return self._capture_with(key, forward, kwargs)
            finally:
                self.token_index.capacity = None
        return self._capture_with(key, forward, kwargs)

    def _capture_with(self, key: tuple, forward: Callable[..., Any], kwargs: dict[str, torch.Tensor]) -> _Captured:
        static = self._static_inputs(key[:2], kwargs)
        self._fill(static, kwargs, self._packed(key))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: kernel configs, workspaces, cuBLAS handles are made here
                forward(**static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = forward(**static)
        self.captures += 1
        leaves, spec = pytree.tree_flatten(outputs)
        return _Captured(graph, static, outputs, leaves, _rebuilder(spec))

    def _packed(self, key: tuple) -> bool:
        """Whether the graph of ``key`` packs tokens (its padded batch rows get no token)."""
        return self.token_index is not None and isinstance(key[-1], int) and len(key) > 2

    def run(self, kwargs: dict[str, torch.Tensor], dense: bool = False, tokens: int | None = None,
            padded: bool = False) -> tuple[bool, Any]:
        """(True, outputs) replayed from a graph, or (False, None) when this call's shape has
        no usable bucket (the caller then launches directly). ``dense``: the caller checked that
        attention_mask is all ones; ``tokens``: its real-token count (padding removal);
        ``padded``: the call is routed to the padded twin (padding removal)."""
        bucket = self.key_for(kwargs, dense, tokens, padded)
        self.last_key = bucket
        if bucket is None or bucket in self.failed:
            return False, None
        entry = self.graphs.get(bucket)
        if entry is None:
            try:
                entry = self._capture(bucket, kwargs)
            except Exception as e:  # noqa: BLE001 - any capture failure falls back, and is reported
                self.failed[bucket] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                warnings.warn(f"qfx: CUDA graph capture failed for bucket {bucket}; this shape runs by "
                              f"direct launch ({self.failed[bucket]})", RuntimeWarning, stacklevel=3)
                torch.cuda.synchronize(self.device)
                return False, None
            self.graphs[bucket] = entry
            while len(self.graphs) > self.buckets.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(bucket)
            self._fill(entry.inputs, kwargs, self._packed(bucket))
        entry.graph.replay()
        first = next(iter(kwargs.values()))
        return True, self._slice(entry, first.shape[0], first.shape[1] if first.dim() > 1 else 0)
