"""The L5 graph as a JSON node list, and back: what :mod:`qfx.runtime.serialize` stores under
``qfx.graph``.

One check of a node entry (:func:`entry_target`) serves both directions, so ``qfx.save`` never
writes a graph that ``qfx.load`` refuses: a call target comes from :mod:`qfx.runtime.allowlist`,
a placeholder is one of the model's inputs, a ``get_attr`` names a tensor stored in the file
(a plain dotted path: no ``__class__.__init__.__globals__``), keyword names and metadata keys
are plain. fx writes node targets, keyword names and the pytree input names into the source of
the generated ``forward``, which is why they must be identifiers.
"""
from __future__ import annotations

import builtins
import dataclasses
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from qfx.runtime.allowlist import (call_target, check_attr_path, check_identifier, device_named, dtype_named,
                                   target_name, treespec_from_json)
from qfx.runtime.fileformat import MAX_NODES, MAX_RANK, META
from qfx.runtime.tagged_json import decode, encode
from qfx.schema import META_CAPTURE

__all__ = ["graph_document", "build_graph", "entry_target", "check_input_name", "EXAMPLE"]

EXAMPLE = "__example__."  # tensor name prefix of the capture's example inputs
#: names fx's generated forward already uses: an input may not shadow them
_RESERVED = frozenset(dir(builtins)) | {"self", "torch", "fx_pytree", "pytree"}
_NODE_KEYS = {"name", "op", "target", "args", "kwargs", "meta"}


def check_input_name(name: Any) -> str:
    """An input name: a plain identifier that shadows nothing the generated forward uses."""
    if check_identifier("input", name) in _RESERVED:
        raise ValueError(f"input {name!r} shadows a name the generated forward uses")
    return name



def entry_target(entry: dict, attrs: set[str], inputs: set[str]):
    """The fx target of a node entry, checked: a call target from the allowlist, an input name
    the model takes, a get_attr path naming a stored tensor, or ``"output"``."""
    if not isinstance(entry, dict) or set(entry) - {"val"} != _NODE_KEYS:
        raise ValueError(f"node entry with keys {sorted(entry)[:8] if isinstance(entry, dict) else type(entry).__name__}")
    name, op, target = check_identifier("node name", entry["name"]), entry["op"], entry["target"]
    if not isinstance(entry["args"], list) or not isinstance(entry["kwargs"], dict) or not isinstance(entry["meta"], dict):
        raise ValueError(f"node {name}: args, kwargs or meta of the wrong type")
    for key in entry["kwargs"]:
        check_identifier(f"node {name}: keyword argument", key)
    for key in entry["meta"]:
        if not key.startswith(META):
            raise ValueError(f"node {name}: metadata key {key!r} is not qfx's")
    if op == "call_function":
        return call_target(target, name)
    if op not in ("placeholder", "get_attr", "output"):
        raise ValueError(f"node {name}: op {op!r} with target {str(target)[:80]!r} is not stored by qfx.save")
    if entry["kwargs"] or len(entry["args"]) != (op == "output"):  # fx writes a placeholder's args as its default
        raise ValueError(f"node {name}: a {op} node with arguments {str(entry['args'])[:80]} {str(entry['kwargs'])[:80]}")
    if op == "placeholder":
        if check_input_name(target) not in inputs:
            raise ValueError(f"node {name}: input {target!r} is not one of the model's inputs {sorted(inputs)}")
        return target
    if op == "get_attr":
        if check_attr_path(f"node {name}: get_attr", target) not in attrs:
            raise ValueError(f"node {name}: get_attr {target!r} names no tensor in the file")
        return target
    if target != "output":
        raise ValueError(f"node {name}: an output node with target {str(target)[:80]!r}")
    return target


def graph_document(gm: GraphModule, inputs: set[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    from torch.utils._pytree import treespec_dumps

    nodes, tensors, dropped, params = [], {}, set(), {n for n, _ in gm.named_parameters()}
    # the graph's inputs and outputs keep their symbolic shapes (the runtime reads which dims are
    # batch and sequence from them, qfx.runtime.buckets.dim_roles)
    out_args = gm.graph.output_node().args[0]
    leaves = out_args if isinstance(out_args, (tuple, list)) else (out_args,)
    boundary = {n for n in gm.graph.nodes if n.op == "placeholder"} | {a for a in leaves if isinstance(a, Node)}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            if node.users:
                raise ValueError(f"node {node.name} calls module {node.target!r}; qfx.save stores op graphs only")
            dropped.add(node.name)  # export's _guards_fn: no users, input checks stay in qfx's hook
            continue
        if node.op == "call_method":
            raise ValueError(f"node {node.name} calls method {node.target!r}; qfx.save stores op graphs only")
        entry = {"name": node.name, "op": node.op,
                 "target": target_name(node.target) if node.op == "call_function" else node.target}
        if node.op == "get_attr":
            value = _get_attr(gm, node.target)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"get_attr {node.target!r} is a {type(value).__name__}, not a tensor")
            tensors[node.target] = value
        entry["args"] = encode(tuple(node.args))["tuple"]
        entry["kwargs"] = {k: encode(v) for k, v in node.kwargs.items()}
        entry["meta"] = {k: encode(v) for k, v in node.meta.items() if k.startswith(META)}
        if node in boundary and isinstance(node.meta.get("val"), torch.Tensor):
            entry["val"] = _val_spec(node.meta["val"])
        if entry_target(entry, set(tensors), inputs) is not node.target:
            raise ValueError(f"node {node.name} calls {node.target!r}, stored as {entry['target']!r}, "
                             "which names another callable")
        nodes.append(entry)
    info = getattr(gm.graph._codegen, "pytree_info", None)
    qfx_ops = sorted({n.target for n in gm.graph.nodes if n.op == "call_function"
                      and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "qfx"}, key=str)
    graph_meta = {}
    for key, value in gm.meta.items():
        if key.startswith(META) and key != META_CAPTURE:
            try:
                graph_meta[key] = encode(value)
            except TypeError:
                pass  # runtime-only metadata (objects) is rebuilt by the runtime, not stored
    doc = {
        "nodes": nodes,
        "pytree": None if info is None else {
            "orig_args": list(info.orig_args),
            "in_spec": treespec_dumps(info.in_spec) if info.in_spec is not None else None,
            "out_spec": treespec_dumps(info.out_spec) if info.out_spec is not None else None,
        },
        "op_schemas": {target_name(op): str(op._schema) for op in qfx_ops},
        "parameters": sorted(t for t in tensors if t in params),
        "graph_meta": graph_meta,
        "dropped": sorted(dropped),
        "code": gm.code,
    }
    if doc["pytree"] is not None:
        _pytree_codegen(doc["pytree"])  # the check load makes
    return doc, tensors


def _val_spec(val: torch.Tensor) -> dict:
    """A tensor's symbolic shape (symbol names or ints), dtype and device."""
    shape = [str(d.node.expr) if isinstance(d, torch.SymInt) else int(d) for d in val.shape]
    return {"shape": shape, "dtype": str(val.dtype).removeprefix("torch."), "device": str(val.device)}


def _fake_vals(entries: list[dict]) -> dict[str, torch.Tensor]:
    """FakeTensors with one fresh symbol per saved symbol name, shared across tensors (so the
    batch dim of every input is the same symbol, as at capture). Nothing is allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    symbols: dict[str, torch.SymInt] = {}
    out = {}
    for e in entries:
        spec = e.get("val")
        if spec is None:
            continue
        if not (isinstance(spec, dict) and set(spec) == {"shape", "dtype", "device"} and isinstance(spec["shape"], list)
                and len(spec["shape"]) <= MAX_RANK):
            raise ValueError(f"node {e['name']}: val {str(spec)[:80]} is not {{shape (rank <= {MAX_RANK}), dtype, device}}")
        shape = []
        for d in spec["shape"]:
            if isinstance(d, str) and 0 < len(d) <= 64:
                if d not in symbols:
                    symbols[d] = env.create_unbacked_symint()
                shape.append(symbols[d])
            elif type(d) is int and 0 <= d < 2**31:
                shape.append(d)
            else:
                raise ValueError(f"node {e['name']}: dim {str(d)[:40]!r} is neither a size in [0, 2**31) nor a symbol")
        with mode:
            out[e["name"]] = torch.empty(shape, dtype=dtype_named(spec["dtype"]), device=device_named(spec["device"]))
    return out


#: the most values one node's arguments may hold: fx writes them into the generated source as
#: literals, and compiling a literal costs far more memory than its JSON (real nodes hold < 1000)
MAX_ARGUMENT_VALUES = 1 << 16


def _check_plain(node: str, value: Any) -> None:
    """Arguments are values fx writes as literals: no dataclass (those live in metadata), and at
    most :data:`MAX_ARGUMENT_VALUES` of them."""
    stack, count = [value], 0
    while stack:
        v = stack.pop()
        count += 1
        if count > MAX_ARGUMENT_VALUES:
            raise ValueError(f"node {node}: more than {MAX_ARGUMENT_VALUES} values among its arguments")
        if isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif dataclasses.is_dataclass(v):
            raise ValueError(f"node {node}: a {type(v).__name__} among its arguments")


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _pytree_codegen(py: Any):
    """fx's pytree code generator for the stored specs; the input names become the generated
    forward's parameters, so they must be plain identifiers."""
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    if not isinstance(py, dict) or set(py) != {"orig_args", "in_spec", "out_spec"} or not isinstance(py["orig_args"], list):
        raise ValueError("pytree entry is not {orig_args, in_spec, out_spec}")
    for name in py["orig_args"]:
        check_input_name(name)
    specs = [None if s is None else treespec_from_json(s) for s in (py["in_spec"], py["out_spec"])]
    return _PyTreeCodeGen(_PyTreeInfo(py["orig_args"], *specs))


def build_graph(doc: dict, tensors: dict[str, torch.Tensor], device: torch.device, inputs: set[str]) -> GraphModule:
    """The GraphModule the document describes. Every entry is checked before it becomes a node
    (:func:`_entry_target`); no node runs here."""
    if not isinstance(doc.get("nodes"), list) or len(doc["nodes"]) > MAX_NODES:
        raise ValueError(f"the graph is not a list of at most {MAX_NODES} nodes")
    attrs = {name for name in tensors if not name.startswith(EXAMPLE)}
    for name in attrs:
        check_attr_path("tensor name", name)
    graph = Graph()
    nodes: dict[str, Node] = {}
    vals = _fake_vals(doc["nodes"])
    for entry in doc["nodes"]:
        target = entry_target(entry, attrs, inputs)
        if entry["name"] in nodes:
            raise ValueError(f"node name {entry['name']!r} is used twice")
        if graph.find_nodes(op="output"):
            raise ValueError(f"node {entry['name']} comes after the output")
        args = decode({"tuple": entry["args"]}, nodes)
        kwargs = {k: decode(v, nodes) for k, v in entry["kwargs"].items()}
        _check_plain(entry["name"], (args, kwargs))
        node = graph.create_node(entry["op"], target, args, kwargs, name=entry["name"])
        if entry["name"] in vals:
            node.meta["val"] = vals[entry["name"]]
        for key, value in entry["meta"].items():
            node.meta[key] = decode(value, nodes)
        nodes[entry["name"]] = node
    if not graph.find_nodes(op="output"):
        raise ValueError("the graph has no output node")
    root = nn.Module()
    params = set(doc.get("parameters", ()))
    for name in sorted(attrs):
        owner = root
        *parents, leaf = name.split(".")
        for p in parents:
            if not hasattr(owner, p):
                owner.add_module(p, nn.Module())
            owner = getattr(owner, p)
            if not isinstance(owner, nn.Module):
                raise ValueError(f"tensor {name!r}: {p!r} is a tensor, not a module path")
        # A fresh allocation: safetensors' buffers need not be 64-byte aligned, and CPU GEMM
        # kernels (oneDNN/MKL) take other code paths, with other rounding, on unaligned data.
        t = tensors[name].to(device, copy=True)
        if name in params:
            owner.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
        else:
            owner.register_buffer(leaf, t)
    py = doc.get("pytree")
    if py is not None:
        graph._codegen = _pytree_codegen(py)
    gm = GraphModule(root, graph)
    if py is not None:
        gm._in_spec, gm._out_spec = graph._codegen.pytree_info.in_spec, graph._codegen.pytree_info.out_spec
    gm.graph.lint()
    return gm


