"""annotate: find every linear's role and layer, and freeze its quantization spec (L1 -> L2).

Pattern (matched on use-def edges and op objects, never on node or module names)::

    linear_q/k/v -> (view|transpose|...)* -> scaled_dot_product_attention   role qkv  (part q|k|v)
    scaled_dot_product_attention -> (view|transpose|...)* -> linear          role attn_out
    linear -> (view|...)* -> gelu|relu|silu                                   role ffn_in
    gelu|relu|silu -> (view|dropout|...)* -> linear -> ... -> add (residual)  role ffn_out
    any other linear (pooler, classifier, projections)                        role other

The layer index of an attention linear is the index of its attention op in graph order; an
FFN linear belongs to the last attention op among its ancestors (networkx).

Invariant: the graph is not changed at all; each ``aten.linear`` node gains
``node.meta["qfx"]``, a frozen :class:`LinearInfo`.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from qfx.config import OTHER_ROLE, QuantConfig, precision_tag
from qfx.fake_quant import integer_linear

__all__ = ["annotate", "LinearInfo", "QuantSpec", "LINEAR_OPS", "linear_nodes"]

aten = torch.ops.aten
#: a float linear (L1, L2) and the quantized linear of the QAT graph (L3), same leading args (x, W, b)
LINEAR_OPS = {aten.linear.default, integer_linear}
ATTENTION_OPS = {aten.scaled_dot_product_attention.default}
ACTIVATION_OPS = {aten.gelu.default, aten.relu.default, aten.silu.default}
#: ops that move or reshape data without mixing tokens or channels
TRANSPARENT_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.contiguous.default, aten.clone.default, aten.dropout.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.mul.Tensor, aten.div.Tensor,
    aten.to.dtype, aten._to_copy.default, aten.flatten.using_ints,
}


@dataclass(frozen=True)
class QuantSpec:
    """How one linear is quantized: frozen, validated against its shape."""

    weight_bits: int
    act_bits: int  # 16: float activations (weight-only)
    symmetric: bool
    group_size: int | None
    act_clip: tuple[float, float] | None

    @classmethod
    def from_config(cls, cfg: QuantConfig) -> "QuantSpec":
        return cls(cfg.weight_bits, cfg.act_bits, cfg.symmetric, cfg.group_size, cfg.act_clip)

    @property
    def quantizes_activations(self) -> bool:
        return self.act_bits < 16

    @property
    def precision(self) -> str:
        return precision_tag(self.weight_bits, self.act_bits, self.symmetric, self.group_size)


@dataclass(frozen=True)
class LinearInfo:
    """What annotate records on a linear node."""

    name: str  # readable path, e.g. "layer3.ffn_in" or "layer0.q" or "classifier"
    layer: int | None
    role: str  # qkv | attn_out | ffn_in | ffn_out | other
    part: str  # q | k | v for qkv, else the role
    weight: str  # qualified name of the weight parameter
    in_features: int
    out_features: int
    spec: QuantSpec | None  # None: stays float
    float_reason: str = ""  # why it stays float


def linear_nodes(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEAR_OPS]


def _is_transparent(n: Node) -> bool:
    if n.op != "call_function" or n.target not in TRANSPARENT_OPS:
        return False
    if n.target in (aten.mul.Tensor, aten.div.Tensor):  # scaling by a constant only
        return not isinstance(n.args[1], Node)
    return True


def _producer(n: Node) -> Node:
    """Walk back from ``n`` through transparent ops along the data input."""
    while isinstance(n, Node) and _is_transparent(n):
        n = n.args[0]
    return n


def _consumers(n: Node) -> list[Node]:
    """Non-transparent users reached from ``n`` along data (first) inputs."""
    out, stack = [], [n]
    while stack:
        cur = stack.pop()
        for u in cur.users:
            if _is_transparent(u) and u.args[0] is cur:
                stack.append(u)
            else:
                out.append(u)
    return out


def _param_name(gm: GraphModule, node: Node) -> str:
    if isinstance(node, Node) and node.op == "get_attr":
        return str(node.target)
    raise ValueError(f"linear {node} takes a computed weight, not a parameter; qfx quantizes parameters only")


def _shape(gm: GraphModule, weight: str) -> tuple[int, int]:
    w = gm.get_parameter(weight) if weight in dict(gm.named_parameters()) else gm.get_buffer(weight)
    if w.dim() != 2:
        raise ValueError(f"linear weight {weight} has shape {tuple(w.shape)}, expected 2-D")
    return int(w.shape[0]), int(w.shape[1])


def _find_roles(gm: GraphModule) -> dict[Node, tuple[int | None, str, str]]:
    """linear node -> (layer, role, part)."""
    roles: dict[Node, tuple[int | None, str, str]] = {}
    attn = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ATTENTION_OPS]
    for layer, sdpa in enumerate(attn):
        for part, arg in zip("qkv", sdpa.args[:3]):
            src = _producer(arg)
            if src.target in LINEAR_OPS:
                roles[src] = (layer, "qkv", part)
        for u in _consumers(sdpa):
            if u.target in LINEAR_OPS and _producer(u.args[0]) is sdpa:
                roles[u] = (layer, "attn_out", "attn_out")
    dag = nx.DiGraph((a, n) for n in gm.graph.nodes for a in n.all_input_nodes)
    attn_index = {n: i for i, n in enumerate(attn)}

    def layer_of(n: Node) -> int | None:
        idx = [attn_index[a] for a in nx.ancestors(dag, n) if a in attn_index]
        return max(idx) if idx else None

    for act in (n for n in gm.graph.nodes if n.op == "call_function" and n.target in ACTIVATION_OPS):
        src = _producer(act.args[0])
        outs = [u for u in _consumers(act) if u.target in LINEAR_OPS and u not in roles and _producer(u.args[0]) is act]
        # An FFN ends in the residual add; a head (DistilBERT's pre_classifier -> ReLU ->
        # classifier) has the same linear-act-linear shape but no residual.
        outs = [u for u in outs if any(c.target == aten.add.Tensor for c in _consumers(u))]
        if not outs or src.target not in LINEAR_OPS or src in roles:
            continue
        roles[src] = (layer_of(src), "ffn_in", "ffn_in")
        for u in outs:
            roles[u] = (layer_of(u), "ffn_out", "ffn_out")
    return roles


def _skip_matches(entry: str, info_name: str, role: str, layer: int | None) -> bool:
    return entry in (info_name, role) or (layer is not None and entry == f"layer{layer}")


def annotate(gm: GraphModule, config: QuantConfig | None, skip: tuple[str, ...] = ()) -> GraphModule:
    """Record a :class:`LinearInfo` on every ``aten.linear`` node; return ``gm`` unchanged otherwise.

    ``config=None`` annotates roles only (every linear stays float). ``skip`` entries are
    linear names ("layer3.ffn_in"), roles ("ffn_out") or whole layers ("layer3").
    """
    linears = linear_nodes(gm)
    if not linears:
        raise ValueError(
            "the model has no linear layers (no aten.linear in the captured graph): "
            "there is nothing for qfx to quantize"
        )
    roles = _find_roles(gm)
    has_attention = any(n.op == "call_function" and n.target in ATTENTION_OPS for n in gm.graph.nodes)
    if config is not None and not has_attention and not config.quantize_other:
        raise ValueError(
            "annotate found no attention op (aten.scaled_dot_product_attention), so no linear has a "
            "transformer role and nothing would be quantized; load the model with "
            "attn_implementation='sdpa', or pass QuantConfig(quantize_other=True) to quantize every linear"
        )
    infos: list[tuple[Node, LinearInfo]] = []
    for node in linears:
        weight = _param_name(gm, node.args[1])
        n_out, k = _shape(gm, weight)
        layer, role, part = roles.get(node, (None, OTHER_ROLE, OTHER_ROLE))
        name = f"layer{layer}.{part}" if role != OTHER_ROLE else weight.removesuffix(".weight")
        spec, reason = None, ""
        if config is None:
            reason = "fp16 mode"
        elif any(_skip_matches(s, name, role, layer) for s in skip):
            reason = "skipped by the user (skip=...)"
        elif role == OTHER_ROLE and not config.quantize_other:
            reason = "outside the encoder layers (quantize_other=False)"
        elif role != OTHER_ROLE and role not in config.roles:
            reason = f"role {role} not in QuantConfig.roles"
        else:
            spec = QuantSpec.from_config(config)
            if spec.group_size is not None and k % spec.group_size:
                raise ValueError(
                    f"QuantConfig(weight_group={spec.group_size}) does not divide K={k} of "
                    f"linear {name}; choose a divisor of {k}"
                )
        infos.append((node, LinearInfo(name, layer, role, part, weight, k, n_out, spec, reason)))
    names = {i.name for _, i in infos}
    valid = names | {i.role for _, i in infos} | {f"layer{i.layer}" for _, i in infos if i.layer is not None}
    unknown = [s for s in skip if s not in valid]
    if unknown:
        raise ValueError(f"skip={tuple(skip)!r}: no linear is called {unknown}; valid names: {sorted(valid)}")
    for node, info in infos:
        node.meta["qfx"] = info
    return gm
