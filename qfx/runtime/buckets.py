"""Shape buckets: which (batch, seq) a call is padded to, and which tensor dims are which.

A compiled GPU model replays one CUDA graph per bucket. Inputs are padded into the bucket
(token inputs with 0, ``attention_mask`` with 0 on padded positions so no real token attends
to them, and with 1 on padded batch rows so they stay finite; for a packed call 0, so they
add no token), and every output is sliced back to the caller's batch and sequence. A packed
call (padding removal, on by default for GPU targets) replays the graph of its (batch, seq,
token bucket) (:meth:`Buckets.tokens`). Dims are told apart by the symbols torch.export gave
them (``s0`` batch, ``s1`` seq), never by comparing sizes (a 128 x 128 call has equal sizes).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

__all__ = ["Buckets", "DimRoles", "dim_roles", "token_budget_batches"]

#: default sequence buckets: multiples of 16 (tensor-core friendly) dense where BERT traffic is
_SEQ = (16, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512)
_BATCH = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


@dataclass(frozen=True)
class Buckets:
    """The (batch, seq) shapes CUDA graphs are captured for; a call is padded up to the
    smallest bucket that holds it. A call larger than every bucket runs by direct launch.

    Example::

        >>> qfx.compile(model, mode="int8", target="sm_90", buckets=qfx.Buckets(batch=(1, 8, 32), seq=(128,)))
        >>> qfx.compile(model, mode="int8", target="sm_90",   # packed calls: graphs per token bucket
        ...             buckets=qfx.Buckets(seq=(128,), token_step=128, token_buckets=4))
    """

    batch: tuple[int, ...] = _BATCH
    seq: tuple[int, ...] = _SEQ
    max_graphs: int = 32  # captured graphs kept at once (least recently used dropped)
    #: padding removal (a packed call, the default on GPU targets): its real-token count T is padded up
    #: to a multiple of ``token_step`` (a GEMM tile's M), coarsened geometrically: between two
    #: powers of two there are ``token_buckets`` buckets, so the dummy rows a bucket adds are
    #: at most 1 / token_buckets of T (6 % by default; any mix of lengths with about the same
    #: total replays one graph), and never more than the (batch, seq) bucket's B * S
    token_step: int = 64
    token_buckets: int = 16

    def __post_init__(self):
        for name in ("batch", "seq"):
            values = getattr(self, name)
            if not values or any((not isinstance(v, int)) or v < 1 for v in values):
                raise ValueError(f"Buckets({name}={values!r}): give positive integers, e.g. {name}=(1, 8, 32)")
            object.__setattr__(self, name, tuple(sorted(set(values))))
        if self.max_graphs < 1:
            raise ValueError(f"Buckets(max_graphs={self.max_graphs}): keep at least 1 graph")
        for name in ("token_step", "token_buckets"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Buckets({name}={getattr(self, name)!r}): give a positive integer, e.g. {name}=64")

    def limited_to(self, max_seq: int | None) -> "Buckets":
        if max_seq is None:
            return self
        seq = tuple(s for s in self.seq if s < max_seq) + (max_seq,)
        return Buckets(self.batch, seq, self.max_graphs, self.token_step, self.token_buckets)

    def tokens(self, real: int, slots: int) -> int:
        """The token bucket of a call with ``real`` real tokens in a (batch, seq) bucket of
        ``slots`` = batch * seq positions: a multiple of ``token_step``, at least 1, at most
        ``slots``, at most T / token_buckets above T once T >= token_step * token_buckets.

        Example::

            >>> Buckets().tokens(300, 32 * 128)        # T < 1024: steps of 64
            320
            >>> Buckets().tokens(10300, 128 * 128)     # T in [8192, 16384): steps of 8192 / 16
            10752
        """
        real = max(real, 1)
        octave = 1 << (real.bit_length() - 1)  # the largest power of two <= real
        step = max(self.token_step, octave // self.token_buckets // self.token_step * self.token_step)
        return min(slots, -(-real // step) * step)

    def fit(self, batch: int, seq: int | None) -> tuple[int, int | None] | None:
        """The smallest bucket holding (batch, seq), or None when none does."""
        i = bisect.bisect_left(self.batch, batch)
        if i == len(self.batch):
            return None
        if seq is None:
            return self.batch[i], None
        j = bisect.bisect_left(self.seq, seq)
        if j == len(self.seq):
            return None
        return self.batch[i], self.seq[j]


def token_budget_batches(lengths: list[int], token_budget: int, buckets: Buckets | None = None) -> list[list[int]]:
    """Throughput batches of sequences of ``lengths`` tokens: indices sorted by length (longest
    first, so the first batch shows the memory peak), cut so that each batch padded to its
    sequence bucket holds at most ``token_budget`` positions and at most the largest batch
    bucket rows. Every index appears once; the caller restores its own order.

    Example::

        >>> token_budget_batches([5, 120, 30, 128], 256, Buckets(batch=(1, 2, 4), seq=(32, 128)))
        [[3, 1], [2, 0]]
    """
    if token_budget < 1:
        raise ValueError(f"token_budget={token_budget}: give a positive number of padded positions, e.g. 16384")
    buckets = buckets or Buckets()
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    rows = 0
    for i in order:
        if batches:
            seq = buckets.fit(1, max(1, lengths[batches[-1][0]]))
            width = seq[1] if seq is not None else lengths[batches[-1][0]]
            if (rows + 1) * width <= token_budget and rows < buckets.batch[-1]:
                batches[-1].append(i)
                rows += 1
                continue
        batches.append([i])
        rows = 1
    return batches


@dataclass(frozen=True)
class DimRoles:
    """Per input and per output leaf: for each dim "b" (batch), "s" (seq) or "" (static)."""

    inputs: dict[str, tuple[str, ...]]
    outputs: tuple[tuple[str, ...] | None, ...]  # None: not a tensor
    has_seq: bool
    why_not: str = ""  # non-empty: these shapes cannot be bucketed (and why)


def _symbols(val) -> list[str]:
    return [str(d.node.expr) if isinstance(d, torch.SymInt) else "" for d in val.shape]


def dim_roles(gm: GraphModule, input_names: tuple[str, ...] | None = None) -> DimRoles:
    """Read the batch and sequence symbols of the captured graph's inputs and outputs.

    ``input_names``: the caller-facing names of the graph's inputs in order (placeholders may
    be renamed, e.g. ``input`` -> ``input_1``); default: the placeholder names.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = list(input_names) if input_names and len(input_names) == len(placeholders) else [n.name for n in placeholders]
    vals = dict(zip(names, (n.meta.get("val") for n in placeholders)))
    # the first input with a dynamic leading dim names the batch (token ids [B, S], or features
    # [B, S, K] / [tokens, K]); its dim 1, when dynamic, the sequence
    lead = next((v for v in vals.values() if isinstance(v, torch.Tensor) and v.dim() >= 1
                 and _symbols(v)[0]), None)
    if lead is None:
        return DimRoles({}, (), False, "no input with a dynamic batch dim (captured with fixed shapes)")
    syms = _symbols(lead)
    role = {syms[0]: "b"}
    if len(syms) > 1 and syms[1]:
        role[syms[1]] = "s"

    def roles_of(val) -> tuple[str, ...] | str:
        out = []
        for sym in _symbols(val):
            if sym and sym not in role:
                return f"a dim of size {sym} is neither the batch nor the sequence length"
            out.append(role.get(sym, ""))
        return tuple(out)

    inputs = {}
    for name, val in vals.items():
        if not isinstance(val, torch.Tensor):
            return DimRoles({}, (), False, f"input {name} is not a tensor")
        r = roles_of(val)
        if isinstance(r, str):
            return DimRoles({}, (), False, f"input {name}: {r}")
        inputs[name] = r
    outputs = []
    for leaf in gm.graph.output_node().args[0]:
        val = leaf.meta.get("val") if hasattr(leaf, "meta") else None
        if not isinstance(val, torch.Tensor):
            outputs.append(None)
            continue
        r = roles_of(val)
        if isinstance(r, str):
            return DimRoles({}, (), False, f"output {leaf}: {r}")
        outputs.append(r)
    has_seq = "attention_mask" in inputs
    return DimRoles(inputs, tuple(outputs), has_seq)
