"""annotate: find every linear's layer and role from the graph's structure, and freeze its
quantization spec (L1 -> L2).

Pattern (matched on use-def edges and op objects, never on node or module names).

An *attention core* is either op below. A core's layer is one more than the deepest layer among
the cores it depends on (0 if none): sequential cores are successive layers, cores that do not
feed each other are one layer (LiLT's text and layout attention, Canine's local-attention
chunks)::

    scaled_dot_product_attention(q, k, v, mask/bias)                          (SDPA)
    matmul|bmm(softmax(scores) -> (dropout|view|...)*, v)                     (eager)
        scores = f(matmul|bmm(q, k^T), scale, mask, relative-position terms)

(DeBERTa's disentangled attention and MPNet's relative bias are eager cores whose ``scores``
add further terms.) Around core ``i``, with "reaches" meaning a path of tensor edges that
crosses no other linear:

    linear reaches v (and q and k)            role qkv, part v (fused: part qkv, ModernBERT Wqkv)
    linear on the layer input reaches q / k   role qkv, part q / k ("on" the layer input: on a
                                              view or slice of it, as Canine's chunks)
    other linear reaching the scores          role other, part attn_bias (DeBERTa's projections
                                              of the relative-position embeddings)
    other linear on the layer input           role other, part attn_in (MobileBERT's bottlenecks)
    linear reached from the core's output     role attn_out
    other linear reaching attn_out's input    role other, part attn_side (ConvBERT's convolution)
    linear after core i with a residual add   role ffn_out if it reaches the add without another
    around it                                 linear, else ffn_in (GLU FFNs: several ffn_in)
    linear before core 0 (embedding projection) or after a layer with no residual add around
    it (pooler, classifier)                    role other, layer None

Role other stays float unless QuantConfig(quantize_other=True); its reason says what it is. A
core whose values come from no linear (SqueezeBERT's Conv1d projections) has no attn_out, and
annotating for quantization refuses the model, naming the op it reads instead.

A weight read by several linears (ALBERT: one layer's weights applied by every layer) gives
each use its own layer, role and name; ``LinearInfo.shared_with`` names the other uses. They
quantize one parameter with one spec, so they train it together and share its codes
(``lower_to_integer`` stores them once; the report notes "weight shared with ...").

Invariant: the graph is not changed at all; each ``aten.linear`` node gains
``node.meta["qfx"]``, a frozen :class:`LinearInfo` whose ``name`` is unique in the graph (a
duplicate is an internal error: two linears sharing a label would share quantized weights).

Example::

    >>> annotate(qfx.capture(bert, example_kwargs=batch), qfx.QuantConfig(4, 4))
    >>> [n.meta["qfx"].name for n in linear_nodes(gm)][:6]
    ['layer0.q', 'layer0.k', 'layer0.v', 'layer0.attn_out', 'layer0.ffn_in', 'layer0.ffn_out']
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch.fx import GraphModule, Node

from qfx.config import OTHER_ROLE, QuantConfig
from qfx.passes._attrs import param_or_buffer
from qfx.schema import ATTENTION_OPS, LINEAR_OPS, META_CAPTURE, META_LINEAR, LinearInfo, QuantSpec, linear_nodes

__all__ = ["annotate", "linear_infos", "keep_float", "attention_cores", "AttentionCore", "LinearInfo", "QuantSpec",
           "LINEAR_OPS", "linear_nodes"]

aten = torch.ops.aten
SOFTMAX_OPS = frozenset({aten.softmax.int, aten._softmax.default, aten._safe_softmax.default})
MATMUL_OPS = frozenset({aten.matmul.default, aten.bmm.default})
ADD_OPS = frozenset({aten.add.Tensor, aten.add_.Tensor})
#: ops between softmax and the value matmul that neither mix tokens nor change values
#: (dropout is the identity in eval; dtype casts keep the probabilities)
_PROBS_PASS = frozenset({
    aten.dropout.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.to.dtype, aten._to_copy.default, aten.contiguous.default, aten.clone.default,
    aten.type_as.default, aten.alias.default,
})
#: ops that only check a tensor's metadata and return nothing: a user that is no data edge
#: (export adds one after ``softmax(x, dtype=torch.float32)``: Splinter, MarkupLM)
_CHECK_OPS = frozenset({aten._assert_tensor_metadata.default})
#: ops that take a view, slice or copy of one tensor (their first argument): a linear reading
#: ``x[:, a:b]`` reads ``x`` (Canine's local attention computes q and k on chunks of it)
_SAME_TENSOR = _PROBS_PASS | frozenset({
    aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.permute.default, aten.transpose.int, aten.expand.default,
})


@dataclass
class AttentionCore:
    """One attention op of the graph: ``node`` (SDPA, or the eager value matmul), the tensors
    it reads as q, k, v and the rest of its score inputs (mask, relative-position terms)."""

    node: Node
    q: list[Node] = field(default_factory=list)
    k: list[Node] = field(default_factory=list)
    v: list[Node] = field(default_factory=list)
    scores: list[Node] = field(default_factory=list)  # eager: the softmax input
    extra: list[Node] = field(default_factory=list)  # SDPA: attn_mask (may carry a bias)


def _is_tensor_edge(n: Node) -> bool:
    """Data flows along ``n`` unless it is a shape (SymInt) or other non-tensor value:
    ``x.size(1)`` must not make ``x`` an ancestor of what uses the size."""
    val = n.meta.get("val")
    return val is None or isinstance(val, torch.Tensor) or (
        isinstance(val, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in val)
    )


def _is_linear(n: Node) -> bool:
    return n.op == "call_function" and n.target in LINEAR_OPS


def _through_probs(n: Node) -> Node | None:
    """From a softmax, follow its single-use chain of pass-through ops to a matmul reading the
    probabilities as its first operand (the value matmul); None if there is none."""
    cur = n
    while True:
        users = [u for u in cur.users if not (u.op == "call_function" and u.target in _CHECK_OPS)]
        if len(users) != 1:
            return None
        u = users[0]
        if u.op != "call_function":
            return None
        if u.target in MATMUL_OPS and u.args[0] is cur:
            return u
        if u.target not in _PROBS_PASS or u.args[0] is not cur:
            return None
        cur = u


def attention_cores(gm: GraphModule) -> list[AttentionCore]:
    """Every attention core of ``gm`` (SDPA or eager), in graph order."""
    cores = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in ATTENTION_OPS:
            tensors = [a for a in n.args[3:] if isinstance(a, Node)] + [a for a in n.kwargs.values() if isinstance(a, Node)]
            cores.append(AttentionCore(n, [n.args[0]], [n.args[1]], [n.args[2]], extra=tensors))
        elif n.target in SOFTMAX_OPS:
            pv = _through_probs(n)
            if pv is not None:
                cores.append(AttentionCore(pv, v=[pv.args[1]], scores=[n.args[0]]))
    return cores  # graph order: each core was appended at its SDPA / softmax node


def _linear_sources(starts: list[Node], stop: set[Node] = frozenset()) -> set[Node]:
    """Linears that reach one of ``starts`` along tensor edges without crossing another linear
    (the walk also stops at ``stop``: the layer's input)."""
    found, seen, stack = set(), set(), list(starts)
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, Node):
            continue
        seen.add(n)
        if _is_linear(n):
            found.add(n)
            continue
        if n in stop:
            continue
        stack.extend(a for a in n.all_input_nodes if _is_tensor_edge(a))
    return found


def _users_reached(start: Node, crosses: Callable[[Node], bool]) -> Iterator[tuple[Node, Node]]:
    """Every node reached from ``start`` along user edges, once, as ``(node it was reached from,
    node)``; the walk goes on past a node only where ``crosses(node)``."""
    seen, stack = set(), [start]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            yield n, u
            if crosses(u):
                stack.append(u)


def _linear_sinks(start: Node) -> set[Node]:
    """Linears reached from ``start`` along tensor edges without crossing another linear."""
    return {u for _, u in _users_reached(start, lambda u: not _is_linear(u) and _is_tensor_edge(u)) if _is_linear(u)}


def _ancestors(n: Node) -> set[Node]:
    seen, stack = set(), [n]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen and _is_tensor_edge(a):
                seen.add(a)
                stack.append(a)
    return seen


def _closes_residual(lin: Node, cross_linears: bool) -> bool:
    """Some ``add`` downstream of ``lin`` adds a tensor that is an ancestor of ``lin``'s
    input: ``lin`` sits inside a residual block (an FFN), not in a head."""
    anc = _ancestors(lin)
    for n, u in _users_reached(lin, lambda u: _is_tensor_edge(u) and (cross_linears or not _is_linear(u))):
        if u.op == "call_function" and u.target in ADD_OPS:
            if any(a in anc for a in u.args[:2] if isinstance(a, Node) and a is not n):
                return True
    return False


def _core_layers(gm: GraphModule, cores: list[AttentionCore]) -> tuple[list[int], dict[Node, int | None]]:
    """Each core's layer and each node's last layer before it.

    A core's layer is one more than the deepest layer among its (tensor-edge) ancestors, 0 if
    it has none: cores that do not feed each other are one layer (LiLT's text and layout
    attention; the chunks of Canine's local attention), sequential cores are successive ones.
    ``last[node]`` is the deepest layer among ``node``'s ancestors and itself (None: before
    any attention)."""
    index = {c.node: i for i, c in enumerate(cores)}
    layer = [0] * len(cores)
    last: dict[Node, int | None] = {}
    for n in gm.graph.nodes:
        prev = [last[a] for a in n.all_input_nodes if _is_tensor_edge(a) and last.get(a) is not None]
        here = max(prev) if prev else None
        if n in index:
            here = layer[index[n]] = 0 if here is None else here + 1
        last[n] = here
    return layer, last


def _root(n: Node) -> Node:
    """The tensor ``n`` is a view, slice or copy of."""
    while n.op == "call_function" and n.target in _SAME_TENSOR and isinstance(n.args[0], Node):
        n = n.args[0]
    return n


def _softmax_feeds(gm: GraphModule) -> str:
    """Where the graph's softmax probabilities go instead of a value matmul (XLNet: einsum),
    said in a refusal; empty when the graph has no softmax."""
    feeds = set()
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in SOFTMAX_OPS:
            continue
        users = [u for u in n.users if u.target not in _CHECK_OPS]
        while len(users) == 1 and users[0].target in _PROBS_PASS:
            users = [u for u in users[0].users if u.target not in _CHECK_OPS]
        feeds |= {str(u.target) for u in users}
    return f": its softmax probabilities feed {', '.join(sorted(feeds))}" if feeds else ""


def _producer(n: Node) -> str:
    """The op that computes ``n`` (through views): what an attention reads instead of a linear."""
    n = _root(n)
    return str(n.target) if n.op == "call_function" else f"{n.op} {n.target}"


@dataclass
class _Role:
    layer: int | None
    role: str
    part: str
    why_float: str = ""  # for role "other": the true reason it is not a transformer linear


@dataclass
class _Projections:
    """What one attention core reads from linears (empty when it reads none)."""

    q: set[Node]
    k: set[Node]
    v: set[Node]
    scores: set[Node]  # every linear reaching the scores (q, k and relative-position terms)


def _projections(core: AttentionCore) -> _Projections:
    v_lin = _linear_sources(core.v)
    layer_in = {lin.args[0] for lin in v_lin}  # the tensor q, k and v are computed from
    roots = {_root(x) for x in layer_in}
    q_lin = _linear_sources(core.q, layer_in)
    k_lin = _linear_sources(core.k, layer_in)
    score_lin = _linear_sources(core.scores + core.extra, layer_in)
    if core.scores:  # eager: q and k are the layer-input linears of the score matmul
        q_lin, k_lin = _split_qk(core, {s for s in score_lin if _root(s.args[0]) in roots})
    return _Projections(q_lin, k_lin, v_lin, score_lin)


def _classify(gm: GraphModule) -> tuple[dict[Node, _Role], list[tuple[int, AttentionCore]]]:
    """linear node -> its layer, role and part, from the structure around attention cores; and
    the cores (with their layer) whose values come from no linear."""
    cores = attention_cores(gm)
    layer_of, last = _core_layers(gm, cores)
    proj = [_projections(c) for c in cores]
    roles: dict[Node, _Role] = {}
    for i, p in zip(layer_of, proj):
        for lin in p.q | p.k | p.v:
            slots = "".join(s for s, group in (("q", p.q), ("k", p.k), ("v", p.v)) if lin in group)
            if len(slots) == 3:
                roles[lin] = _Role(i, "qkv", "qkv")
            elif len(slots) == 1:
                roles[lin] = _Role(i, "qkv", slots)
    for i, p in zip(layer_of, proj):  # after every core's q/k/v: LiLT's layout q/k reach the text scores
        for lin in p.scores | p.q | p.k | p.v:
            roles.setdefault(lin, _Role(i, OTHER_ROLE, "attn_bias", (
                f"in layer {i}, but it feeds the attention scores from a tensor other than the layer's input "
                "(a relative-position projection, as in DeBERTa), so it is none of qkv/attn_out/ffn_in/ffn_out"
            )))
    outs = []
    for i, core, p in zip(layer_of, cores, proj):
        if not p.v:  # an attention over conv projections (SqueezeBERT) has no attention output linear
            continue
        for lin in _linear_sinks(core.node):
            if lin not in roles:
                roles[lin] = _Role(i, "attn_out", "attn_out")
                outs.append((i, lin))
    for i, out in outs:  # linears beside the core whose output joins it before attn_out (ConvBERT)
        for lin in _linear_sources([out.args[0]]):
            roles.setdefault(lin, _Role(i, OTHER_ROLE, "attn_side", (
                f"in layer {i}'s attention block, beside the attention (its output joins the attention's "
                "output before attn_out, as ConvBERT's span-based convolution), so it is none of qkv/attn_out/ffn_in/ffn_out"
            )))
    by_input = defaultdict(list)
    for lin in linear_nodes(gm):
        by_input[_root(lin.args[0])].append(lin)
    for i, p in zip(layer_of, proj):  # other linears on the layer's input (MobileBERT's bottlenecks)
        for lin in (x for v in p.v for x in by_input[_root(v.args[0])] if x not in roles):
            roles[lin] = _Role(i, OTHER_ROLE, "attn_in", (
                f"in layer {i}, a projection of the layer's input beside q/k/v (MobileBERT's bottlenecks: of the "
                "tensor q and k read, or of the residual), so it is none of qkv/attn_out/ffn_in/ffn_out"
            ))
    ffn: dict[int, list[Node]] = defaultdict(list)
    for lin in linear_nodes(gm):
        if lin in roles:
            continue
        i = last[lin]
        if i is None:
            roles[lin] = _Role(None, OTHER_ROLE, OTHER_ROLE, "outside the encoder layers (before the first attention: an input projection)")
        elif _closes_residual(lin, cross_linears=True):
            ffn[i].append(lin)
        else:
            roles[lin] = _Role(None, OTHER_ROLE, OTHER_ROLE, f"outside the encoder layers (after layer {i}, with no residual around it: a pooler or head)")
    for i, group in ffn.items():
        outs_ = [lin for lin in group if _closes_residual(lin, cross_linears=False)] or group[-1:]
        for lin in group:
            roles[lin] = _Role(i, "ffn_out" if lin in outs_ else "ffn_in", "ffn_out" if lin in outs_ else "ffn_in")
    return roles, [(i, c) for i, c, p in zip(layer_of, cores, proj) if not p.v]


def _split_qk(core: AttentionCore, candidates: set[Node]) -> tuple[set[Node], set[Node]]:
    """Eager attention: q and k are the operands of the score matmul whose both operands come
    from layer-input linears (DeBERTa's other score matmuls pair q or k with a position term)."""
    seen, stack = set(), list(core.scores)
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, Node) or _is_linear(n):
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in MATMUL_OPS:
            a, b = (_linear_sources([x]) for x in n.args[:2])
            if a and b and a <= candidates and b <= candidates:
                return a, b
        stack.extend(x for x in n.all_input_nodes if _is_tensor_edge(x))
    return set(), set()


def _names(gm: GraphModule, linears: list[Node], roles: dict[Node, _Role]) -> dict[Node, str]:
    """Readable unique names: ``layer3.q``, ``layer3.ffn_in`` (``ffn_in0``/``ffn_in1`` when a
    layer has several), ``pooler.dense`` (the weight's path) outside the layers."""
    base = {}
    for n in linears:
        r = roles[n]
        base[n] = f"layer{r.layer}.{r.part}" if r.layer is not None else _param_name(n.args[1]).removesuffix(".weight")
    count, seen = Counter(base.values()), Counter()
    names = {}
    for n in linears:
        b = base[n]
        if count[b] > 1:
            names[n] = f"{b}{seen[b]}"
            seen[b] += 1
        else:
            names[n] = b
    dup = [k for k, c in Counter(names.values()).items() if c > 1]
    if dup:  # e.g. "layer0.ffn_in1" also produced as a base name: never share a label
        raise RuntimeError(f"qfx internal error: annotate gave two linears the same name {dup}; please report it")
    return names


def _param_name(node: Node) -> str:
    if isinstance(node, Node) and node.op == "get_attr":
        return str(node.target)
    raise ValueError(f"linear weight {node} is computed, not a parameter; qfx quantizes parameters only")


def _shape(gm: GraphModule, weight: str) -> tuple[int, int]:
    w = param_or_buffer(gm, weight)
    if w.dim() != 2:
        raise ValueError(f"linear weight {weight} has shape {tuple(w.shape)}, expected 2-D")
    return int(w.shape[0]), int(w.shape[1])


def _skip_matches(entry: str, info_name: str, role: str, layer: int | None) -> bool:
    return entry in (info_name, role) or (layer is not None and entry == f"layer{layer}")


def annotate(gm: GraphModule, config: QuantConfig | None, skip: tuple[str, ...] = ()) -> GraphModule:
    """Record a :class:`LinearInfo` on every ``aten.linear`` node (:func:`linear_infos`); return
    ``gm`` unchanged otherwise."""
    for node, info in linear_infos(gm, config, skip).items():
        node.meta[META_LINEAR] = info
    return gm


def keep_float(gm: GraphModule, reasons: Mapping[str, str]) -> GraphModule:
    """Keep the linears ``reasons`` names in float, each with its reason (the autotuner's choice,
    made on the annotated graph); return ``gm``.

    Pattern: each linear of an annotated graph (L2) whose ``LinearInfo.name`` is in ``reasons``.
    Invariant: its info loses its spec and takes its reason, as annotating with the name in
    ``skip`` would; the nodes and the other infos are unchanged, and the graph is not walked
    again (layers and roles stay what annotate found)."""
    kept = set()
    for node in linear_nodes(gm):
        info = node.meta.get(META_LINEAR)
        if info is not None and info.name in reasons:
            node.meta[META_LINEAR] = replace(info, spec=None, float_reason=reasons[info.name])
            kept.add(info.name)
    if kept != set(reasons):
        raise ValueError(f"keep_float: no annotated linear is called {sorted(set(reasons) - kept)}")
    return gm


def linear_infos(gm: GraphModule, config: QuantConfig | None, skip: tuple[str, ...] = ()) -> dict[Node, LinearInfo]:
    """Every ``aten.linear`` node's :class:`LinearInfo`, in graph order: the module doc's
    pattern, read without changing the graph or its nodes.

    ``config=None`` gives roles only (every linear stays float). ``skip`` entries are
    linear names ("layer3.ffn_in"), roles ("ffn_out") or whole layers ("layer3").
    """
    linears = linear_nodes(gm)
    if not linears:
        raise ValueError("the model has no linear layers (no aten.linear in the captured graph): "
                         "there is nothing for qfx to quantize")
    roles, no_linear_qkv = _classify(gm)
    family = getattr(gm.meta.get(META_CAPTURE), "model_class", type(gm).__name__)
    if config is not None and no_linear_qkv:
        layer, core = no_linear_qkv[0]
        raise ValueError(
            f"qfx does not support {family}: the attention of layer {layer} reads values computed by "
            f"{_producer(core.v[0])}, not by a linear (aten.linear), and qfx quantizes linears only, so its "
            "encoder would stay float (a Conv1d projection, as in SqueezeBERT). There is no option that makes "
            "it quantizable; qfx supports encoders whose q/k/v are nn.Linear"
        )
    in_layers = any(r.layer is not None for r in roles.values())
    if config is not None and not in_layers and not config.quantize_other:
        raise ValueError(
            f"qfx does not support {family} yet: annotate found no attention that reads a linear "
            "(neither aten.scaled_dot_product_attention nor matmul -> softmax -> matmul)"
            f"{_softmax_feeds(gm)}, so no linear has a transformer role and nothing would be quantized. What to "
            "do: if the model offers another attn_implementation ('sdpa' or 'eager'), load it with that; or pass "
            "QuantConfig(quantize_other=True) to quantize every linear as a plain linear"
        )
    names = _names(gm, linears, roles)
    uses: dict[str, list[str]] = defaultdict(list)
    for node in linears:
        uses[_param_name(node.args[1])].append(names[node])
    infos: dict[Node, LinearInfo] = {}
    for node in linears:
        weight = _param_name(node.args[1])
        n_out, k = _shape(gm, weight)
        r, name = roles[node], names[node]
        spec, reason = None, ""
        if config is None:
            reason = "fp16 mode"
        elif any(_skip_matches(s, name, r.role, r.layer) for s in skip):
            reason = "skipped by the user (skip=...)"
        elif r.role == OTHER_ROLE and not config.quantize_other:
            reason = f"{r.why_float}; quantize_other=False"
        elif r.role != OTHER_ROLE and r.role not in config.roles:
            reason = f"role {r.role} not in QuantConfig.roles"
        else:
            spec = QuantSpec.from_config(config)
            if spec.group_size is not None and k % spec.group_size:
                raise ValueError(
                    f"QuantConfig(weight_group={spec.group_size}) does not divide K={k} of "
                    f"linear {name}; choose a divisor of {k}"
                )
            if spec.rotation is not None and k % spec.rotation:
                raise ValueError(
                    f"QuantConfig(rotation={spec.rotation}) does not divide K={k} of linear {name}; "
                    f"choose a power of two that divides {k} (or rotation=None)"
                )
        info = LinearInfo(name, r.layer, r.role, r.part, weight, k, n_out, spec, reason)
        shared = tuple(u for u in uses[weight] if u != name)
        if shared:
            info = replace(info, shared_with=shared)
        infos[node] = info
    valid = {i.name for i in infos.values()} | {i.role for i in infos.values()} | {
        f"layer{i.layer}" for i in infos.values() if i.layer is not None}
    unknown = [s for s in skip if s not in valid]
    if unknown:
        raise ValueError(f"skip={tuple(skip)!r}: no linear is called {unknown}; valid names: {sorted(valid)}")
    return infos
