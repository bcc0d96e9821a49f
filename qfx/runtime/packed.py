"""Padding removal at run time: the default, which path each call takes, and the checks.

The default (``qfx.compile(..., remove_padding="auto")``, :func:`resolve_remove_padding`):

* GPU targets (``sm_*``): the compile packs the graph when it can (:mod:`qfx.passes.unpad`; when
  it cannot, the model runs padded and ``runtime_report()`` says why). ``True`` packs on any
  target and refuses a graph that cannot be packed; ``False`` never packs.
* The CPU target: not packed unless ``remove_padding=True``. Packing is exact there too (bit
  for bit at every real token, tests/passes/test_unpad.py), but the CPU has no varlen attention
  kernel: attention runs repadded (three row scatters and a gather per layer), so the saving is
  the GEMM rows only and has not been measured to pay; and a CPU compile's contract is bit
  identity with its QAT twin at every position, padded ones included, which packing (zeros
  there) would change for every padded call.

Which path a call takes (:class:`PaddingRouter`, every call of a model whose graph packs):

* packed: the call has padding; its T real tokens run packed (a CUDA graph per token bucket);
  with ``remove_padding="auto"``, only when its padding fraction is at least
  :data:`AUTO_MIN_PADDING` (below it packing costs more than it saves: the token index, the row
  copies and the varlen attention against fewer skipped rows; ``True`` packs every padded call);
* padded, unread: with ``"auto"``, a call of fewer than :data:`AUTO_SYNC_MIN_POSITIONS` positions
  whose ``attention_mask`` is on the GPU runs the padded twin with its mask without reading the
  mask back: counting its padding would take a device sync, which also stops the host from
  queueing the call while the GPU still runs the previous one (at batch 1 that costs more than
  packing a few rows saves). A CPU mask (a tokenizer's) is counted for free, so such calls still
  pack; ``True`` reads every mask;
* padded, no saving: calls that replay CUDA graphs run bucketed shapes, so a packed call runs its
  token bucket (:meth:`qfx.runtime.buckets.Buckets.tokens`); when that fills the call's
  (batch, seq) bucket (batch 1: 104 real tokens of 128 round up to 128) packing skips no row and
  only adds the token index and the row copies, so the call runs the padded twin;
* padded: the call has no padding (the graph's padded twin, :func:`padded_twin`: the same
  kernels as a padded compile, no token index, no sync), or packing would not be exact: a
  per-row output (a pooler's ``hidden[:, 0]``, logits) reads position 0 of a row where it is
  padding (left padding, an empty row: packed, it would read zeros), reads other positions, or
  ``attention_mask`` holds values other than 0 and 1 (the model's own mask arithmetic reads
  them; packing keeps only ``!= 0``). The padded twin is exact for any mask: at real tokens and
  at per-row outputs it computes what ``remove_padding=False`` computes.

Why a padded twin of the packed graph rather than a second compile, or the packed graph for
every call: the twin is made from the packed graph's lean form in microseconds (no second
compile, nothing more to save or verify, loaded files included), shares its launchers and
weights, and runs the very kernels of a padded compile (exact for any mask); the packed graph
on a call without padding would only add the token index, the row copies and, on the CPU and
in fp32, the repadded attention's scatters.

Choosing needs three numbers of the mask on the host (real tokens, rows whose position 0 is
real, whether it is 0/1): free for a CPU mask (a tokenizer's), one small device sync for a GPU
one. ``compiled.runtime_report()`` counts the calls per path and names the last one.

Safety (:func:`check_index_plumbing`, once per model, loaded files included): every index
argument of the packed ops (``gather`` / ``scatter`` of ``qfx::token_index``, ``cu_seqlens``,
``max_seqlen``) must be computed from the ``attention_mask`` input the way the pass does, so no
crafted graph can hand a kernel indices past its rows; the ops check shapes and dtypes per call.
"""
from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

try:
    import numpy as _np
except ImportError:  # torch runs without numpy: the router counts with torch ops
    _np = None

from qfx.ops import gather_tokens, scatter_tokens
from qfx.passes.attention import PACKED_ATTENTION, packed_attention_impl
from qfx.runtime.buckets import Buckets, DimRoles
from qfx.runtime.launch_plan import module_over
from qfx.schema import META_UNPAD_MIN_PADDING, META_UNPAD_SYNC_MIN_POSITIONS, PACK_TOKENS, REPAD_TOKENS, TOKEN_INDEX, ancestors, is_call

__all__ = ["AUTO_DEVICES", "AUTO_MIN_PADDING", "AUTO_SYNC_MIN_POSITIONS", "resolve_remove_padding", "Route", "PaddingRouter", "padded_twin", "packed_forward",
           "check_index_plumbing", "packs_tokens"]

aten = torch.ops.aten
#: the target devices where ``remove_padding="auto"`` packs (see the module doc for the CPU)
AUTO_DEVICES = ("cuda",)
#: remove_padding="auto": a call with less padding than this fraction runs the padded twin.
#: `python benchmarks/e2e.py --pad-sweep` (benchmarks/RESULTS.md, H200 2026-12-07): BERT-base 128 x 128
#: packed is 1.16x padded at 25 % padding and 1.60x at 50 %, so no threshold above 0 is justified; the
#: rule that does bind below that is the token bucket's (a call whose bucket saves no row runs padded)
AUTO_MIN_PADDING = 0.0
#: remove_padding="auto": the fewest positions (B x S) of a call whose GPU attention_mask is read back
#: (one device sync) to route it; below, the call runs the padded twin with the mask, unread
AUTO_SYNC_MIN_POSITIONS = 4096
_MASK = "attention_mask"


def resolve_remove_padding(value, target) -> bool | str:
    """``remove_padding`` as the pipeline takes it: ``"auto"`` on a target that packs by default
    (:data:`AUTO_DEVICES`), else False; True and False as given. Anything else is refused."""
    if not isinstance(value, str) and value in (True, False):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto" if target.device in AUTO_DEVICES else False
    raise ValueError(f"remove_padding={value!r}: give 'auto' (the default: packs padded calls on GPU targets), "
                     "True (pack on any target; an error where the graph cannot be packed) or False (never pack)")


def packs_tokens(gm: GraphModule) -> bool:
    """Whether ``gm`` holds any op of padding removal."""
    return any(is_call(n, (TOKEN_INDEX, PACK_TOKENS, REPAD_TOKENS, PACKED_ATTENTION)) for n in gm.graph.nodes)


# -- the structure of a packed graph ------------------------------------------------------------


def _first_token_reads(graph) -> list[tuple[Node, Node, Node]]:
    """(out, x, cu) of each ``x[:, 0]`` the pass reads from packed rows (passes/unpad.py
    ``read_first_tokens``): out = where(first, index_select(x[0], 0, where(first, cu[:-1], 0)), 0)."""
    found = []
    for out in graph.nodes:
        if not (is_call(out, (aten.where.ScalarOther,)) and is_call(out.args[1], (aten.index_select.default,))):
            continue
        rows = out.args[1]
        head, index = rows.args[0], rows.args[2]
        if (is_call(head, (aten.select.int,)) and tuple(head.args[1:]) == (0, 0)
                and is_call(index, (aten.where.ScalarOther,)) and is_call(index.args[1], (aten.slice.Tensor,))):
            found.append((out, head.args[0], index.args[1].args[0]))
    return found


def _is_cu_seqlens(node, mask: Node) -> bool:
    """pad(cumsum(sum(mask != 0, [1], int32), 0, int32), [1, 0]): the pass's cu_seqlens."""
    if not (is_call(node, (aten.constant_pad_nd.default,)) and list(node.args[1]) == [1, 0]):
        return False
    ends = node.args[0]
    if not (is_call(ends, (aten.cumsum.default,)) and ends.args[1] == 0 and ends.kwargs.get("dtype") == torch.int32):
        return False
    lengths = ends.args[0]
    if not (is_call(lengths, (aten.sum.dim_IntList,)) and list(lengths.args[1]) == [1]
            and lengths.kwargs.get("dtype") == torch.int32):
        return False
    real = lengths.args[0]
    return is_call(real, (aten.ne.Scalar,)) and real.args[0] is mask and real.args[1] == 0


def check_index_plumbing(gm: GraphModule) -> None:
    """Refuse a graph whose packed ops take index arguments not computed from ``attention_mask``
    as :mod:`qfx.passes.unpad` computes them (a damaged or crafted file): kernels trust them."""
    mask = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == _MASK), None)
    index = {(n, i) for n in gm.graph.nodes if is_call(n, TOKEN_INDEX) for i in (0, 1)}
    gathers, scatters = set(), set()
    for n in gm.graph.nodes:
        if n.target is operator.getitem and isinstance(n.args[1], int) and (n.args[0], n.args[1]) in index:
            (gathers if n.args[1] == 0 else scatters).add(n)

    def arg(node: Node, i: int):
        return node.args[i] if len(node.args) > i else None  # the pass passes every index positionally

    def refuse(node: Node, argument: str, what: str) -> None:
        raise ValueError(f"packed graph: node {node.name} ({node.target}) takes a {argument} that is not {what}; "
                         "a qfx graph computes it from the attention_mask input (passes/unpad.py): compile and save "
                         "the model again with qfx")

    for n in gm.graph.nodes:
        if is_call(n, TOKEN_INDEX) and (mask is None or arg(n, 0) is not mask or arg(n, 1) is not None or n.kwargs):
            refuse(n, "mask or capacity", "the attention_mask input with capacity None")
        elif is_call(n, PACK_TOKENS) and arg(n, 1) not in gathers:
            refuse(n, "gather index", "qfx::token_index's gather")
        elif is_call(n, REPAD_TOKENS) and (arg(n, 1) not in scatters or arg(n, 2) is not mask):
            refuse(n, "scatter index or layout", "qfx::token_index's scatter and attention_mask")
        elif is_call(n, PACKED_ATTENTION):
            seq = arg(n, 5)
            if not _is_cu_seqlens(arg(n, 4), mask):
                refuse(n, "cu_seqlens", "the prefix sums of attention_mask's row lengths")
            if not (is_call(seq, (aten.sym_size.int,)) and seq.args[0] is mask and seq.args[1] == 1):
                refuse(n, "max_seqlen", "attention_mask's sequence length")
            if arg(n, 6) not in gathers or arg(n, 7) not in scatters or arg(n, 8) is not mask:
                refuse(n, "gather / scatter / mask", "qfx::token_index's and attention_mask")
    for out, _, cu in _first_token_reads(gm.graph):
        if not _is_cu_seqlens(cu, mask):
            refuse(out, "row index", "read from cu_seqlens")


def _output_names(gm: GraphModule, count: int) -> list[str]:
    """The caller-facing names of the graph's output leaves (a ModelOutput's keys), else their index."""
    spec = getattr(gm, "_out_spec", None)
    keys = getattr(spec, "context", None)
    if isinstance(keys, (list, tuple)) and len(keys) == count and all(isinstance(k, str) for k in keys):
        return list(keys)
    return [f"output {i}" for i in range(count)]


def _per_row_reads(gm: GraphModule, roles: DimRoles) -> tuple[str, str]:
    """Which token positions the outputs that are not [batch, seq, ...] tensors (a pooler's, logits)
    read from packed rows: "" (none), "first" (position 0 only) or "any"; and the first such output."""
    leaves = list(gm.graph.output_node().args[0])  # as dim_roles reads them: one role per entry
    names = _output_names(gm, len(leaves))
    firsts = {out for out, _, _ in _first_token_reads(gm.graph)}
    reads, reader = "", ""
    for leaf, r, name in zip(leaves, roles.outputs, names):
        if not isinstance(leaf, Node) or r is None or r[:2] == ("b", "s"):
            continue
        up = set(ancestors(leaf))
        for n in up:
            if is_call(n, REPAD_TOKENS):
                if any(u in up and not (is_call(u, (aten.select.int,)) and tuple(u.args[1:]) == (1, 0)) for u in n.users):
                    return "any", name
                reads, reader = "first", reader or name
            elif n in firsts:
                reads, reader = "first", reader or name
    return reads, reader


# -- the padded twin --------------------------------------------------------------------------


def _pack_view(x: torch.Tensor) -> torch.Tensor:
    """pack_tokens of every position: [B, S, *F] -> [1, B*S, *F] (a view when it can be)."""
    return x.flatten(0, 1).unsqueeze(0)


def _repad_view(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape(like.shape[0], like.shape[1], *x.shape[2:])


def _first_rows(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``hidden[:, 0]`` of the padded layout, as the padded model reads it."""
    return x.view(like.shape[0], like.shape[1], *x.shape[2:]).select(1, 0)


def _padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, like: torch.Tensor,
                      attn_mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """packed_attention over every position: the model's own SDPA with its own mask, on the
    same head views (same strides) as the padded graph."""
    b, s = like.shape[0], like.shape[1]
    f = q.shape[-1]
    y = torch.nn.functional.scaled_dot_product_attention(
        *(t.view(b, s, heads, f // heads).transpose(1, 2) for t in (q, k, v)), attn_mask=attn_mask, scale=scale)
    return y.transpose(1, 2).reshape(1, b * s, f)


def padded_twin(lean: GraphModule) -> GraphModule:
    """The lean graph of a packed model (:func:`qfx.runtime.launch_plan.bind_launchers`) over every
    position: packs and repads are views, attention is the model's SDPA with its captured mask,
    the pooler's ``hidden[:, 0]`` reads position 0. The token-wise ops see [1, B*S, F] where the
    padded compile's see [B, S, F]: the same rows, the same kernels (bit for bit on the CPU), so
    it computes what ``remove_padding=False`` does, for any mask; launchers are shared."""
    graph = copy.deepcopy(lean.graph)
    mask = next(n for n in graph.nodes if n.op == "placeholder" and n.name == _MASK)
    for out, x, _ in _first_token_reads(graph):
        with graph.inserting_before(out):
            first = graph.call_function(_first_rows, (x, mask))
        out.replace_all_uses_with(first)
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is gather_tokens:
            node.target, node.args = _pack_view, (node.args[0],)
        elif node.target is scatter_tokens:
            node.target, node.args = _repad_view, (node.args[0], node.args[2])
        elif node.target is packed_attention_impl:
            a = node.args
            node.target, node.args = _padded_attention, (a[0], a[1], a[2], a[3], a[8], a[9] if len(a) > 9 else None,
                                                         a[10] if len(a) > 10 else None)
    return module_over(lean, graph, "QfxLaunchPlanPadded")


# -- per call ------------------------------------------------------------------------------------


def packed_forward(plan, tokens: int, kwargs: dict):
    """A direct launch of the packed lean graph (a :class:`qfx.runtime.launch_plan.LaunchPlan`) with
    its token index sized on the host to the ``tokens`` real tokens the router counted from this
    very mask: static shapes, no device sync inside the graph (an empty call keeps one dummy row)."""
    index = plan.token_index
    if index is None:
        return plan.module.forward(**kwargs)
    index.capacity = max(tokens, 1)
    try:
        return plan.module.forward(**kwargs)
    finally:
        index.capacity = None


@dataclass(frozen=True)
class Route:
    """The path of one call: "packed" or "padded" (``why``: what made it padded), with its real tokens."""

    path: str
    why: str = ""
    tokens: int = 0

    @property
    def label(self) -> str:
        return self.path if not self.why else f"{self.path} ({self.why})"


NO_PADDING = "no padding"
#: the runtime report's count of calls routed padded with their GPU mask unread
UNREAD = "padded (small call, GPU mask not read back)"
#: the runtime report's count of calls routed padded because their token bucket fills their bucket
NO_SAVING = "padded (token bucket fills the bucket: packing saves nothing)"


def _mask_counts(mask: torch.Tensor) -> tuple[int, int, int]:
    """(nonzero entries, rows whose position 0 is nonzero, entries equal to 1) of a [B, S] mask:
    with numpy for a CPU mask (~6 us at 1 x 128, torch's op overhead is ~4x), else one sync."""
    if mask.device.type == "cpu" and _np is not None:
        try:
            a = mask.numpy()
        except (RuntimeError, TypeError):  # a tensor that needs grad, a dtype numpy lacks
            a = None
        if a is not None:
            real = a != 0
            tokens = int(_np.count_nonzero(real))
            return tokens, int(_np.count_nonzero(real[:, 0])), tokens if a.dtype == bool else int(_np.count_nonzero(a == 1))
    real = mask != 0
    ones = real if mask.dtype == torch.bool else mask == 1
    tokens, first, count = torch.stack((real.sum(), real[:, 0].sum(), ones.sum())).tolist()
    return tokens, first, count


class PaddingRouter:
    """Chooses each call's path (see the module doc) and counts them."""

    def __init__(self, gm: GraphModule, roles: DimRoles) -> None:
        self.reads, self.reader = _per_row_reads(gm, roles)
        self.min_padding = float(gm.meta.get(META_UNPAD_MIN_PADDING, 0.0))
        self.sync_min_positions = int(gm.meta.get(META_UNPAD_SYNC_MIN_POSITIONS, 0))
        #: the CUDA-graph buckets when calls replay graphs (set by the runtime): a packed call then
        #: runs its token bucket, and one that fills its (batch, seq) bucket saves nothing
        self.buckets: Buckets | None = None
        self.calls: Counter[str] = Counter()

    def route(self, mask: torch.Tensor) -> Route:
        """The path of a call with this ``attention_mask`` (on any device: one sync for a GPU one
        that is counted, see :data:`AUTO_SYNC_MIN_POSITIONS`)."""
        b, s = mask.shape
        if mask.device.type != "cpu" and b * s < self.sync_min_positions:
            self.calls[UNREAD] += 1  # one count per reason, whatever the call's size
            return Route("padded", f"attention_mask on the GPU, {b * s} positions (< {self.sync_min_positions}): "
                         "not read back (a device sync) for a call this small; a CPU mask is counted for free, "
                         "remove_padding=True counts every mask", 0)
        tokens, first, ones = _mask_counts(mask)
        if ones != tokens:  # some nonzero entry is not 1
            why = "attention_mask holds values other than 0 and 1"
        elif tokens == b * s:
            why = NO_PADDING
        elif self.reads == "any":
            why = f"output {self.reader} reads padded positions"
        elif self.reads == "first" and first < b:
            why = f"position 0 is padding in some row (left padding, an empty row) and output {self.reader} reads it"
        elif 1 - tokens / (b * s) < self.min_padding:
            why = (f"padding {1 - tokens / (b * s):.0%} is below {self.min_padding:.0%}, where remove_padding='auto' "
                   "starts to pack (True packs every padded call)")
        elif (bucket := self._bucket_saves_nothing(b, s, tokens)) is not None:
            # measured (benchmarks/RESULTS.md, 1 x 128 with 104 real tokens): the packed graph of the
            # same size costs the pack / repad and the index, so the padded twin is faster
            self.calls[NO_SAVING] += 1  # one count per reason, whatever the call's size
            return Route("padded", f"packing saves no positions: {tokens} real tokens round up to token bucket "
                         f"{bucket[1]}, all of the padded bucket {bucket[0]}", tokens)
        else:
            why = ""
        route = Route("padded" if why else "packed", why, tokens)
        self.calls[route.label] += 1
        return route

    def _bucket_saves_nothing(self, b: int, s: int, tokens: int) -> tuple[tuple[int, int], int] | None:
        """((batch, seq) bucket, token bucket) of a call whose token bucket fills its padded bucket."""
        if self.buckets is None or (fit := self.buckets.fit(b, s)) is None:
            return None
        slots = fit[0] * fit[1]
        bucket = self.buckets.tokens(tokens, slots)
        return (fit, bucket) if bucket >= slots else None

    def describe(self) -> str:
        policy = "calls with padding run packed, calls without run the padded twin"
        if self.min_padding:
            policy = (f"calls with at least {self.min_padding:.0%} padding run packed, the others run the padded "
                      "twin")
        if self.sync_min_positions:
            policy += (f"; a call of fewer than {self.sync_min_positions} positions with its attention_mask on the GPU "
                       "runs padded, its mask not read back")
        if self.buckets is not None:
            policy += "; a call whose token bucket fills its (batch, seq) bucket runs padded (packing saves nothing)"
        if self.reads == "any":
            policy += f"; output {self.reader} reads padded positions, so every call runs padded"
        elif self.reads == "first":
            policy += f"; a call where position 0 is padding in some row runs padded (output {self.reader} reads it)"
        counts = ", ".join(f"{n} {label}" for label, n in self.calls.most_common())
        return f"per call: {policy}; calls so far: {counts or 'none'}"
