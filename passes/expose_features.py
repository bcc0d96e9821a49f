"""expose_features: put identity "tap" modules where distillation reads a layer's features.

Pattern (use-def edges, op objects and module classes; never node or module names)::

    x -> (ActFakeQuant)? -> linear_q/k/v -> ... -> scaled_dot_product_attention(q, k, v, mask)
         |                                                    |  |
         hidden{0}: the input of the first attention          q, k of attention i: tap{i}.q/k
    ffn_out linear(i) -> (dropout)* -> add(residual) -> layer_norm?      hidden{i+1}

* ``q`` / ``k`` taps sit on the query and key inputs of each attention op (``[B, H, S, d]``);
  pre-softmax scores are ``scale * q @ k^T`` with the op's own ``scale`` (kept on the tap).
* ``hidden{i+1}`` is layer i's output: the residual ``add`` after its ffn_out linear, or the
  ``layer_norm`` right after it when that is the add's only user (post-LN BERT).
* ``hidden0`` is the tensor the first attention block reads (the embedding output), taken
  before any activation fake-quant, so teacher and student tap the same float tensor.

Layers are numbered by the attention op's graph order and ffn_out roles come from
:mod:`qfx.passes.annotate`: the graph's own ``node.meta["qfx"]`` when it was annotated, else the
roles :func:`~qfx.passes.annotate.linear_infos` reads from a bare :func:`qfx.capture` (not written
to the nodes: the metadata stays as it was).

Invariant: only ``call_module`` nodes of :class:`FeatureTap` (the identity) are added and
the tapped values are rewired through them, so the graph computes exactly what it computed
before; parameters, fake-quant modules and metadata are unchanged. Read the taps with
:class:`FeatureRecorder`.

Example::

    >>> gm = expose_features(qfx.capture(teacher, example_kwargs=batch))
    >>> with FeatureRecorder(gm) as rec:
    ...     gm(**batch)
    >>> rec.hidden[0].shape, rec.scores(1).shape      # [B, S, D], [B, H, S, S]
"""
from __future__ import annotations


import torch
from torch import nn
from torch.fx import GraphModule, Node

from qfx.numerics.fake_quant import ActFakeQuant
from qfx.passes.annotate import linear_infos
from qfx.schema import ATTENTION_OPS, META_LINEAR, LinearInfo, linear_nodes

__all__ = ["expose_features", "FeatureTap", "FeatureRecorder", "feature_taps"]

aten = torch.ops.aten
_DROPOUT_OPS = {aten.dropout.default}
_ADD_OPS = {aten.add.Tensor}
_NORM_OPS = {aten.layer_norm.default}
#: container module the taps live in; its name is ours, never matched on other graphs
_TAP_ROOT = "qfx_taps"


class FeatureTap(nn.Module):
    """Identity with a label: ``kind`` in {"q", "k", "hidden"} and its layer index.

    Forward hooks (see :class:`FeatureRecorder`) read the tensor that passes through.
    """

    def __init__(self, kind: str, index: int, scale: float | None = None) -> None:
        super().__init__()
        self.kind, self.index, self.scale = kind, index, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"kind={self.kind}, index={self.index}" + (f", scale={self.scale:.4g}" if self.scale else "")


def _is_module(gm: GraphModule, node: Node, cls) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), cls)


def _is_dropout(gm: GraphModule, node: Node) -> bool:
    return (node.op == "call_function" and node.target in _DROPOUT_OPS) or _is_module(gm, node, nn.Dropout)


def _single_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _layer_output(gm: GraphModule, ffn_out: Node) -> Node:
    """ffn_out -> dropout* -> add -> (layer_norm if it is the add's only user)."""
    cur = ffn_out
    while (nxt := _single_user(cur)) is not None and _is_dropout(gm, nxt):
        cur = nxt
    add = _single_user(cur)
    if add is None or add.op != "call_function" or add.target not in _ADD_OPS:
        raise ValueError(
            f"expose_features: the FFN output {ffn_out} does not feed a residual add; "
            "qfx distils encoders with residual layers (BERT, RoBERTa, DistilBERT ...)"
        )
    norm = _single_user(add)
    return norm if norm is not None and norm.op == "call_function" and norm.target in _NORM_OPS else add


def _float_input(gm: GraphModule, linear: Node) -> Node:
    """The linear's input before its activation fake-quant (if any)."""
    x = linear.args[0]
    return x.args[0] if _is_module(gm, x, ActFakeQuant) else x


def _attention_nodes(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ATTENTION_OPS]


def _roles(gm: GraphModule) -> dict[Node, LinearInfo]:
    """Each linear's :class:`LinearInfo` in graph order: the annotation the graph carries, or
    the roles-only reading of an unannotated graph (read, never written to its nodes)."""
    annotated = {n: n.meta[META_LINEAR] for n in linear_nodes(gm) if META_LINEAR in n.meta}
    return annotated or linear_infos(gm, None)


def _ffn_out_by_layer(infos: dict[Node, LinearInfo]) -> dict[int, Node]:
    """The first ffn_out linear of each layer in graph order.

    The first, because annotate also calls a classifier head's Linear -> ReLU -> Linear
    (DistilBERT's pre_classifier / classifier) ffn_in / ffn_out of the last layer.
    """
    out: dict[int, Node] = {}
    for node, info in infos.items():
        if info.role == "ffn_out" and info.layer is not None:
            out.setdefault(info.layer, node)
    return out


def _first_qkv_linear(infos: dict[Node, LinearInfo]) -> Node:
    for node, info in infos.items():
        if info.role == "qkv" and info.layer == 0:
            return node
    raise ValueError("expose_features: the first attention op reads no linear q/k/v projection")


def _sdpa_scale(sdpa: Node, head_dim: int | None) -> float | None:
    scale = sdpa.kwargs.get("scale", sdpa.args[6] if len(sdpa.args) > 6 else None)
    if scale is None and head_dim:
        return head_dim ** -0.5
    return scale


def _insert_tap(gm: GraphModule, target: str, tap: FeatureTap, value: Node, users: list[Node]) -> Node:
    """Insert ``tap(value)`` right after ``value`` and make ``users`` read it instead."""
    gm.add_submodule(target, tap)
    with gm.graph.inserting_after(value):
        node = gm.graph.call_module(target, (value,))
    node.meta = {k: v for k, v in value.meta.items() if k in ("val", "tensor_meta")}
    for u in users:
        u.replace_input_with(value, node)
    return node


def feature_taps(gm: nn.Module) -> list[FeatureTap]:
    """The taps of a graph that went through :func:`expose_features` (empty otherwise)."""
    return [m for m in gm.modules() if isinstance(m, FeatureTap)]


def expose_features(gm: GraphModule) -> GraphModule:
    """Tap q/k of every attention op and every layer's hidden state; return ``gm``.

    Raises ``ValueError`` when the graph has no attention op or is already tapped.
    """
    if feature_taps(gm):
        raise ValueError("expose_features: this graph already has feature taps")
    attention = _attention_nodes(gm)
    if not attention:
        raise ValueError("expose_features: no scaled_dot_product_attention op in the graph; capture with attn_implementation='sdpa'")
    infos = _roles(gm)
    ffn_out = _ffn_out_by_layer(infos)
    missing = [i for i in range(len(attention)) if i not in ffn_out]
    if missing:
        raise ValueError(f"expose_features: layers {missing} have an attention op but no FFN output linear")
    first = _first_qkv_linear(infos)
    emb = _float_input(gm, first)
    # Every user of the embedding output reads the tap (the fake-quant and the residual).
    _insert_tap(gm, f"{_TAP_ROOT}.hidden0", FeatureTap("hidden", 0), emb, list(emb.users))
    for i, sdpa in enumerate(attention):
        q, k = sdpa.args[0], sdpa.args[1]
        head_dim = q.meta["val"].shape[-1] if "val" in q.meta else None
        scale = _sdpa_scale(sdpa, int(head_dim) if head_dim is not None else None)
        _insert_tap(gm, f"{_TAP_ROOT}.layer{i}.q", FeatureTap("q", i, scale), q, [sdpa])
        _insert_tap(gm, f"{_TAP_ROOT}.layer{i}.k", FeatureTap("k", i, scale), k, [sdpa])
        out = _layer_output(gm, ffn_out[i])
        _insert_tap(gm, f"{_TAP_ROOT}.hidden{i + 1}", FeatureTap("hidden", i + 1), out, list(out.users))
    gm.graph.lint()
    gm.recompile()
    return gm


class FeatureRecorder:
    """Context manager: forward hooks on a tapped graph's taps, filled on every forward.

    ``hidden[i]`` ([B, S, D]; 0 = embedding output), ``q[i]`` / ``k[i]`` ([B, H, S, d]) and
    ``scores(i)`` (pre-softmax ``scale * q @ k^T``, [B, H, S, S], without the mask).
    """

    def __init__(self, gm: nn.Module) -> None:
        self.taps = feature_taps(gm)
        if not self.taps:
            raise ValueError("FeatureRecorder: the model has no feature taps; run qfx.passes.expose_features on it first")
        self.hidden: dict[int, torch.Tensor] = {}
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self._scale: dict[int, float] = {}
        self._handles: list = []

    @property
    def num_layers(self) -> int:
        return sum(1 for t in self.taps if t.kind == "q")

    def _hook(self, tap: FeatureTap):
        store = {"hidden": self.hidden, "q": self.q, "k": self.k}[tap.kind]

        def hook(module, args, output):
            store[tap.index] = output

        return hook

    def __enter__(self) -> "FeatureRecorder":
        for tap in self.taps:
            self._handles.append(tap.register_forward_hook(self._hook(tap)))
            if tap.kind == "q":
                self._scale[tap.index] = tap.scale
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.hidden.clear(), self.q.clear(), self.k.clear()

    def scores(self, layer: int) -> torch.Tensor:
        q, k = self.q[layer], self.k[layer]
        return torch.matmul(q, k.transpose(-1, -2)) * self._scale[layer]
