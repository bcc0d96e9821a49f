"""remove_padding: token-wise work runs on the real tokens only (L5, option ``remove_padding``).

On by default for GPU targets (``remove_padding="auto"``; ``True`` on any target, ``False`` off:
:mod:`qfx.runtime.packed` says why the CPU is off by default and which calls run packed).

A batch of sentences padded to the longest spends every GEMM, quantize, LayerNorm, GELU and
attention on padding. As FasterTransformer's "remove padding" (and FlashAttention's varlen
path), this pass runs the whole encoder on the real tokens packed together: the embedding
lookups read packed ids, every token-wise op and attention run packed, and the outputs are
repadded once, at the end.

Layouts. A tensor whose two leading dims are the batch and sequence symbols of
``attention_mask`` (``[B, S, *F]``) is *padded*; its *packed* form is ``[1, T, *F]``, the T
real tokens (``attention_mask != 0``) in row-major order. ``[1, T, F]`` rather than ``[T, F]``
keeps the rank, so every feature dim keeps its index (``split(dim=2)``, ``layer_norm([F])``,
broadcasts of ``[F]`` or ``[1, 1, F]`` parameters) and the graph's arguments stay valid.

Pattern (a layout propagation over the graph, in order; op sets in :mod:`qfx.schema`)::

    gather, scatter = qfx::token_index(attention_mask, None)             once, after the inputs
    cu_seqlens = pad(cumsum(sum(attention_mask != 0, 1)), (1, 0))        once, when attention packs
    merge(sdpa(heads(q), heads(k), heads(v), M))   q, k, v [B, S, H*D], M a key-padding mask of
                     attention_mask (evaluated on a probe), no dropout, not causal
      -> qfx::packed_attention(q, k, v, H, cu_seqlens, S, gather, scatter, attention_mask, M)
                     (passes/attention.py), run packed like a token-wise op; q, k, v packed
    y = embedding(W, ids)   ids [B, S] (or positions [1, S] read only by elementwise ops:
                     expanded to [B, S] first)
      -> y = embedding(W, qfx::pack_tokens(ids, gather))                y is packed
    y = op(x, ...)   op in TOKENWISE_OPS (int_linear, quantize, linear, layer_norm, fused
                     add+LayerNorm+quantize), x padded [B, S, F] (float)
      -> y = op(qfx::pack_tokens(x, gather), ...)                        y is packed
    y = op(a, b)     op in ELEMENTWISE_OPS (add, mul, GELU, casts...), some operand packed:
                     other operands packed, padded [B, S, ...] (-> pack_tokens: the values at
                     real tokens, exact) or constant over tokens ([F], [1, 1, F], scalars)
      -> y packed; getitem of a packed op and feature splits (FEATURE_SPLIT_OPS, dim >= 2,
         when a part feeds a token-wise op) are packed too
    any other consumer of a packed y (hidden[:, 0], the graph's outputs, an attention the
    packed form does not take)
      -> qfx::repad_tokens(y, scatter, attention_mask)     [B, S, *F], zeros at padding

Elementwise ops never start a packed chain: only a lookup / GEMM / quantize / LayerNorm does.
So the sub-graph that builds the attention mask (elementwise ops on ``attention_mask``) stays
padded. In a BERT: three integer packs (word ids, token types, positions), no float row packed
or repadded inside the encoder, one repad per [B, S, F] output (the pooler's hidden[:, 0] reads
the last hidden state's). When ``x[:, 0]`` is all that reads a packed ``x`` (a classifier's
pooler: logits only), it reads the packed rows cu_seqlens[b] (zeros where position 0 is
padding, what the repadded tensor holds there) and nothing is repadded at all.

Why packed attention: attention is the one op that mixes tokens. Re-padding its input and
packing its output (the first form of this pass) cost two [T, F] row copies and three padded
[B, S, F] tensors per layer, plus attention over the padding: at BERT-base 128 x 128 with 63 %
real tokens the packed model was slower than the padded one (issue 24). Each row's real tokens
are contiguous in the packed order whatever the padding's shape (right, left, holes), so a
key-padding attention is exactly attention within each cu_seqlens segment. An attention whose
mask is not a key-padding mask (causal, sliding, a mask that also hides real keys) keeps the
repadded form, and ``gm.meta["qfx_unpad"]`` says why.

When it applies: the model takes ``attention_mask`` (dynamic batch and sequence dims), has at
least one SDPA attention, and every SDPA's mask blocks every padded key for every real query
(checked by evaluating the mask's sub-graph on a probe mask, as passes/attention.py does).
That is what makes the rewrite exact: a padded position's value never reaches a real token,
so replacing it by zero (repad) changes nothing a real token sees. Otherwise (no mask, eager
attention, a mask that lets padded keys through) the graph is left as it is and
``gm.meta["qfx_unpad"]`` says why.

Invariant: at every real token, every output equals the padded graph's output; bit for bit on
the CPU reference backend (token-wise ops compute each row with the same operations whatever
the other rows: the integer GEMM is exact, its epilogue, quantize, LayerNorm and elementwise
ops are per row; tests/passes/test_unpad.py checks it over random lengths). The one op with no such
guarantee is a float GEMM (``aten.linear`` / weight-only linears: a BLAS may block another M
differently); bit-identical too in every case tried on the CPU (W4A16, ELECTRA's float
projection, fp32 and bf16). The pooler and classifier read ``hidden[:, 0]`` of a repadded
tensor, so they see the same shapes. On a GPU the integer GEMMs are exact too; a float GEMM
or LayerNorm kernel chosen per M may round differently, and packed attention in fp16 / bf16
runs a varlen kernel (qfx's short-tile Triton kernel or flash attention's, per a measured table:
passes/attention.py), which rounds as the padded model's fused SDPA kernels do (not bit for bit:
another kernel); in fp32 it runs the repadded reference, bit for bit. Padded positions of every ``[B, S, ...]`` output are zero. A batch row with no real
token (all-zero mask) has no packed row: its hidden states are zero (what HF would compute from
uniform attention over padding is not reproduced), e.g. its pooler output is ``tanh(bias)``; so
the runtime runs a call with such a row (or with padding at position 0) on the graph's padded
twin when an output reads position 0 (:class:`qfx.runtime.packed.PaddingRouter`).
The graph's other (non-token) values are unchanged.

Cost: ``token_index`` with ``capacity=None`` sizes T from the mask (one device sync per call
on a GPU). The runtime sizes it on the host instead (T counted from the caller's mask when it
routes the call): a fixed capacity per token bucket in its CUDA graphs (:mod:`qfx.runtime.graphs`),
the exact T in a direct launch; no sync inside the graph.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from qfx.passes.attention import PACKED_ATTENTION, attention_block
from qfx.schema import (
    ATTENTION_OPS, ELEMENTWISE_OPS, FEATURE_SPLIT_OPS, META_TOKENS, META_UNPAD, PACK_TOKENS, REPAD_TOKENS,
    TOKEN_INDEX, TOKENWISE_OPS, ancestors, arg, is_call, sdpa_mask,
)

__all__ = ["remove_padding"]

aten = torch.ops.aten
_MASK_INPUT = "attention_mask"  # the HF input convention (as passes/attention.py): 1 = real token
#: a probe mask: full, right-padded, left-and-right padded rows
_PROBE = ((1, 1, 1, 1, 1, 1), (1, 1, 1, 0, 0, 0), (0, 1, 1, 1, 1, 0))
#: row lookups by integer ids: the embeddings (packed ids -> packed rows, exact row copies)
_LOOKUPS = (aten.embedding.default,)
#: consumers that read only dtype / device / layout (export's checks): a packed input is fine
_METADATA_OPS = frozenset({aten._assert_tensor_metadata.default})


def _symbol(d: Any) -> str:
    return str(d.node.expr) if isinstance(d, torch.SymInt) else ""


def _val(node: Any) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _blocks_padded_keys(mask: Node, mask_input: Node) -> tuple[bool, str]:
    """Evaluate ``mask``'s sub-graph on the probe: every real query must be refused every
    padded key (boolean False, or an additive bias at the dtype's minimum)."""
    nodes = ancestors(mask)
    if any(n.op in ("call_module", "get_attr") for n in nodes):
        return False, "an attention mask depends on module state, not only on attention_mask"
    sub, env = Graph(), {}
    for n in nodes:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(env[mask])
    device = mask_input.meta["val"].device
    probe = torch.tensor(_PROBE, device=device)
    args = []
    for p in (n for n in nodes if n.op == "placeholder"):
        val = _val(p)
        if val is None:
            return False, f"input {p.name} is not a tensor"
        args.append(probe.to(val.dtype) if p is mask_input else torch.zeros(probe.shape, dtype=val.dtype, device=device))
    try:
        got = GraphModule(torch.nn.Module(), sub)(*args)
    except Exception as e:  # noqa: BLE001 - an unevaluable mask is simply not trusted
        return False, f"an attention mask did not evaluate on a probe ({type(e).__name__})"
    b, s = probe.shape
    if not isinstance(got, torch.Tensor) or got.dim() != 4:
        return False, f"an attention mask has shape {tuple(getattr(got, 'shape', ()))}, not [B, H, S, S]"
    got = got.expand(b, got.shape[1], s, s)
    allowed = got if got.dtype == torch.bool else got > torch.finfo(got.dtype).min / 2
    real = probe != 0
    leak = allowed & real[:, None, :, None] & ~real[:, None, None, :]  # real query -> padded key
    if leak.any():
        return False, "an attention mask lets real tokens attend to padded keys"
    return True, ""


def _why_not(gm: GraphModule, mask_input: Node | None) -> str:
    if mask_input is None:
        return "the model takes no attention_mask"
    val = _val(mask_input)
    if val is None or val.dim() != 2 or not all(_symbol(d) for d in val.shape):
        return "attention_mask has no dynamic [batch, seq] dims (captured with fixed shapes)"
    sdpas = [n for n in gm.graph.nodes if is_call(n, ATTENTION_OPS)]
    if not sdpas:
        return "no SDPA attention (eager attention is not checked for key padding)"
    masks = [sdpa_mask(sdpa) for sdpa in sdpas]
    if None in masks:
        return "an SDPA attention takes no mask: padded keys reach real tokens"
    for mask in dict.fromkeys(masks):  # each distinct mask once (layers usually share one)
        ok, why = _blocks_padded_keys(mask, mask_input)
        if not ok:
            return why
    return ""


class _Layouts:
    """The propagation's state: which nodes run packed, and the pack / repad nodes made."""

    def __init__(self, gm: GraphModule, mask_input: Node):
        self.gm, self.graph = gm, gm.graph
        self.mask = mask_input
        b, s = mask_input.meta["val"].shape
        self.batch, self.seq = _symbol(b), _symbol(s)
        self.packed: set[Node] = set()
        self.padded_val: dict[Node, Any] = {}  # a packed node's original (padded) val
        self.packs: dict[Node, Node] = {}
        self.repads: dict[Node, Node] = {}
        last_input = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
        with self.graph.inserting_after(last_input):
            index = self.graph.call_function(TOKEN_INDEX, (mask_input, None))
        with self.graph.inserting_after(index):
            self.gather = self.graph.call_function(operator.getitem, (index, 0))
        with self.graph.inserting_after(self.gather):
            self.scatter = self.graph.call_function(operator.getitem, (self.gather.args[0], 1))
        for node, name in ((index, "token_index"), (self.gather, "token_gather"), (self.scatter, "token_scatter")):
            node._rename(name)
        self._cu: tuple[Node, Node] | None = None

    def cu_seqlens(self) -> tuple[Node, Node]:
        """(cu_seqlens [B+1] int32, max_seqlen = S): each row's real tokens are contiguous in
        the packed order, whatever the padding's shape (right, left, holes); made once."""
        if self._cu is None:
            g = self.graph
            with g.inserting_after(self.scatter):
                real = g.call_function(aten.ne.Scalar, (self.mask, 0))
            with g.inserting_after(real):
                lengths = g.call_function(aten.sum.dim_IntList, (real, [1]), {"dtype": torch.int32})
            with g.inserting_after(lengths):
                ends = g.call_function(aten.cumsum.default, (lengths, 0), {"dtype": torch.int32})
            with g.inserting_after(ends):
                cu = g.call_function(aten.constant_pad_nd.default, (ends, [1, 0], 0.0))
            with g.inserting_after(cu):
                seq = g.call_function(aten.sym_size.int, (self.mask, 1))
            cu._rename("cu_seqlens")
            self._cu = (cu, seq)
        return self._cu

    def pack_attention(self) -> tuple[int, str]:
        """Replace each attention block over key-padded [B, S, H*D] tensors (passes/attention.py
        :func:`attention_block`) by ``qfx::packed_attention`` (same padded meta, packed later by
        the propagation); return how many, and why the first one left is not."""
        done, why = 0, ""
        for sdpa in [n for n in self.graph.nodes if is_call(n, ATTENTION_OPS)]:
            block, reason = attention_block(sdpa, self.mask)
            if block is None:
                why = why or reason
                continue
            cu, seq = self.cu_seqlens()
            with self.graph.inserting_after(block.out):
                node = self.graph.call_function(PACKED_ATTENTION, (
                    block.q, block.k, block.v, block.heads, cu, seq, self.gather, self.scatter, self.mask,
                    sdpa_mask(sdpa), block.scale))
            node.meta["val"] = block.out.meta["val"]
            block.out.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
            chain = block.out
            while chain is not sdpa:  # the merge chain, then the SDPA (fx keeps it: "seeded" op)
                up = chain.args[0]
                self.graph.erase_node(chain)
                chain = up
            self.graph.erase_node(sdpa)
            done += 1
        if done:  # the head views (the token index is read by the packed attention: kept)
            self.graph.eliminate_dead_code()
        return done, why

    # -- what a value is --------------------------------------------------------------------

    def is_tokens(self, node: Any) -> bool:
        """A padded ``[B, S, ...]`` tensor (its values at real tokens can be packed)."""
        val = _val(node)
        return (val is not None and val.dim() >= 2 and _symbol(val.shape[0]) == self.batch
                and _symbol(val.shape[1]) == self.seq)

    def is_constant_over_tokens(self, value: Any, rank: int) -> bool:
        """``value`` broadcasts the same to every token of a rank-``rank`` token tensor."""
        if not isinstance(value, Node):
            return True  # scalars, None, sizes
        val = _val(value)
        if val is None and value.op == "get_attr":
            owner, _, leaf = str(value.target).rpartition(".")
            val = getattr(self.gm.get_submodule(owner) if owner else self.gm, leaf, None)
        if not isinstance(val, torch.Tensor) or val.dim() > rank or any(_symbol(d) for d in val.shape):
            return False
        offset = rank - val.dim()
        return all(p - offset < 0 or val.shape[p - offset] == 1 for p in (0, 1))

    # -- rewrites ---------------------------------------------------------------------------

    def pack(self, node: Node, before: Node) -> Node:
        if node not in self.packs:
            with self.graph.inserting_before(before):
                self.packs[node] = self.graph.call_function(PACK_TOKENS, (node, self.gather))
            self.packs[node].meta[META_TOKENS] = "packed"
        return self.packs[node]

    def repad(self, node: Node, before: Node) -> Node:
        if node not in self.repads:
            with self.graph.inserting_before(before):
                r = self.graph.call_function(REPAD_TOKENS, (node, self.scatter, self.mask))
            if self.padded_val.get(node) is not None:
                r.meta["val"] = self.padded_val[node]  # the padded shape again (the runtime reads outputs')
            self.repads[node] = r
        return self.repads[node]

    def mark_packed(self, node: Node) -> None:
        self.packed.add(node)
        self.padded_val[node] = node.meta.pop("val", None)  # its shape is [1, T, ...] now
        node.meta[META_TOKENS] = "packed"

    def run_packed(self, node: Node, operands: list[Node], rank: int | None) -> bool:
        """Pack ``node``'s token ``operands`` if it can run packed; say whether it does."""
        plan = []
        for a in operands:
            if a in self.packed:
                continue
            if self.is_tokens(a):
                plan.append(a)
            elif rank is None or not self.is_constant_over_tokens(a, rank):
                return False
        for a in plan:
            node.replace_input_with(a, self.pack(a, node))
        self.mark_packed(node)
        return True

    def run_lookup(self, node: Node) -> bool:
        """``embedding(weight, ids)`` on packed ids when ``ids`` are per token ([B, S]) or one
        row of positions shared by the batch ([1, S], expanded first: a copy of B * S integers),
        so the lookup writes packed rows; say whether it does."""
        ids = node.args[1] if len(node.args) > 1 else None
        val = _val(ids)
        if ids in self.packed:
            self.mark_packed(node)
            return True
        if val is None or val.dim() != 2 or val.is_floating_point():
            return False
        if self.is_tokens(ids):
            node.replace_input_with(ids, self.pack(ids, node))
        elif (val.shape[0] == 1 and _symbol(val.shape[1]) == self.seq
              and node.users and all(is_call(u, ELEMENTWISE_OPS) for u in node.users)):  # broadcast over the batch
            with self.graph.inserting_before(node):
                batch = self.graph.call_function(aten.sym_size.int, (self.mask, 0))
                rows = self.graph.call_function(aten.expand.default, (ids, [batch, -1]))
            node.replace_input_with(ids, self.pack(rows, node))
        else:
            return False
        self.mark_packed(node)
        return True

    def read_first_tokens(self, node: Node) -> bool:
        """``x[:, 0]`` (``select(x, 1, 0)``, the [CLS] row a pooler reads) of a packed ``x`` that
        nothing else repads: the packed row cu_seqlens[b] where position 0 is real, zeros where it
        is padding (what the repadded tensor holds there): B rows read, no [B, S, F] tensor made.
        Say whether it does."""
        x = node.args[0]
        if not (x in self.packed and tuple(node.args[1:]) == (1, 0)
                and all(is_call(u, (aten.select.int,)) and tuple(u.args[1:]) == (1, 0) for u in x.users)):
            return False
        cu, _ = self.cu_seqlens()
        g = self.graph
        with g.inserting_before(node):
            first = g.call_function(aten.ne.Scalar, (g.call_function(aten.select.int, (self.mask, 1, 0)), 0))
            starts = g.call_function(aten.slice.Tensor, (cu, 0, 0, -1))
            index = g.call_function(aten.where.ScalarOther, (first, starts, 0))  # row 0 always exists
            rows = g.call_function(aten.index_select.default, (g.call_function(aten.select.int, (x, 0, 0)), 0, index))
            keep = g.call_function(aten.unsqueeze.default, (first, 1))
            out = g.call_function(aten.where.ScalarOther, (keep, rows, 0.0))
        out.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(out)
        g.erase_node(node)
        return True

    def repad_inputs(self, node: Node) -> None:
        for a in [a for a in node.all_input_nodes if a in self.packed]:
            node.replace_input_with(a, self.repad(a, node))


def _token_operands(node: Node) -> list[Node]:
    out = []
    for name in TOKENWISE_OPS[node.target]:
        value = arg(node, name) if isinstance(name, str) else (node.args[name] if name < len(node.args) else None)
        if isinstance(value, Node):
            out.append(value)
    return out


def _tensor_operands(node: Node) -> list[Node]:
    out: list[Node] = []
    map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
    return out


def _feeds_tokenwise(split: Node) -> bool:
    """Some part of a split is read by a token-wise op or packed attention (else repadding
    before it is one copy)."""
    return any(is_call(u, (*TOKENWISE_OPS, PACKED_ATTENTION)) or is_call(u, ELEMENTWISE_OPS)
               for part in split.users for u in part.users)


def _feature_dim(node: Node, rank: int | None) -> bool:
    """The split's dim is a feature dim of its (rank-``rank``, unknown: >= 3) token tensor."""
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    low = -1 if rank is None else -(rank - 2)
    return isinstance(dim, int) and (dim >= 2 or low <= dim <= -1)


def remove_padding(gm: GraphModule) -> GraphModule:
    """Run token-wise ops on packed real tokens and repad around attention; see module doc.

    Records ``gm.meta["qfx_unpad"]``: what was done, or why the graph was left as it is.

    Example::

        >>> gm = remove_padding(gm)           # an L5 graph of a BERT-like encoder
        >>> gm.meta["qfx_unpad"]                # BERT, 2 layers
        'on: 21 token-wise op(s) run on the real tokens only (3 pack, 3 repad, index from attention_mask)'
    """
    graph = gm.graph
    mask_input = next((n for n in graph.nodes if n.op == "placeholder" and n.name == _MASK_INPUT), None)
    why = _why_not(gm, mask_input)
    if why:
        gm.meta[META_UNPAD] = f"off: {why}"
        return gm
    lay = _Layouts(gm, mask_input)
    attentions, attention_why = lay.pack_attention()
    tokenwise = tuple(TOKENWISE_OPS)
    for node in list(graph.nodes):
        if node.op == "output":
            lay.repad_inputs(node)
            continue
        if node.op != "call_function" or node in (lay.gather, lay.scatter) or is_call(node, TOKEN_INDEX):
            continue
        if is_call(node, PACKED_ATTENTION):
            lay.run_packed(node, list(node.args[:3]), rank=None)  # q, k, v: [B, S, F] tokens, always packable
            continue
        if is_call(node, _LOOKUPS) and lay.run_lookup(node):
            continue
        if is_call(node, (aten.select.int,)) and lay.read_first_tokens(node):
            continue
        val = _val(node)
        rank = val.dim() if val is not None else None
        if is_call(node, tokenwise):
            operands = _token_operands(node)
            starts = any(lay.is_tokens(a) and _val(a).is_floating_point() and _val(a).dim() >= 3 for a in operands)
            if (starts or any(a in lay.packed for a in operands)) and lay.run_packed(node, operands, rank=None):
                continue
        elif is_call(node, ELEMENTWISE_OPS):
            operands = _tensor_operands(node)
            if any(a in lay.packed for a in operands) and lay.run_packed(node, operands, rank):
                continue
        elif node.target is operator.getitem and node.args[0] in lay.packed:
            lay.mark_packed(node)
            continue
        elif (is_call(node, FEATURE_SPLIT_OPS) and node.args[0] in lay.packed
              and _feature_dim(node, getattr(lay.padded_val.get(node.args[0]), "ndim", None)) and _feeds_tokenwise(node)):
            lay.mark_packed(node)
            continue
        elif is_call(node, _METADATA_OPS) and not {"size", "stride"} & set(node.kwargs):
            continue
        lay.repad_inputs(node)
    graph.eliminate_dead_code()  # also the token index when nothing was packed
    graph.lint()
    gm.recompile()
    work = sum(1 for n in lay.packed if is_call(n, tokenwise) and n.graph is graph)
    packs, repads = (sum(1 for n in graph.nodes if is_call(n, op)) for op in (PACK_TOKENS, REPAD_TOKENS))
    attention = (f"{attentions} attention(s) packed (varlen)" if attentions else "attention repadded")
    if any(is_call(n, ATTENTION_OPS) for n in graph.nodes) and attention_why:  # some attention kept its form
        attention += f"; {attention_why}: repadded there"
    gm.meta[META_UNPAD] = (f"on: {work} token-wise op(s) run on the real tokens only "
                            f"({packs} pack, {repads} repad, {attention}, index from attention_mask)" if work
                            else "off: no GEMM, quantize or LayerNorm reads a [batch, seq, features] tensor")
    return gm
