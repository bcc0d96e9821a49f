"""Save and load a compiled model: ``qfx.save(compiled, path)`` / ``qfx.load(path)``.

One file, safetensors. The tensors are what the L5 graph reads with ``get_attr``: packed int4
(or int8) weight codes, weight scales, weight offset sums (``<linear>.w_codes`` /
``.w_scale`` / ``.w_offset_sum``), biases, and the float parts' parameters (embeddings,
LayerNorms, a float pooler/classifier). No float copy of a quantized weight exists in the
compiled graph, so none is saved; neither the float model nor the QAT model is needed to load.

The safetensors header's string metadata holds (all JSON):

* ``qfx.format`` (``"1"``), ``qfx.version``, ``qfx.sha256``: the file's format version, the
  qfx that wrote it, and a SHA-256 over the graph document and every tensor (name, dtype,
  shape, bytes) in name order: a truncated or tampered file is refused.
* ``qfx.graph``: the L5 fx graph as a node list, one entry per node: ``name``, ``op``
  (placeholder / get_attr / call_function / output), ``target`` (``"torch.ops.qfx.int_linear.default"``,
  ``"_operator.getitem"``, a get_attr path or an input name), ``args`` / ``kwargs`` in a tagged
  JSON form (``{"node": name}``, ``{"dtype": "float16"}``, ``{"device": "cpu"}``,
  ``{"tuple": [...]}``, ``{"slice": [a, b, c]}``, ``{"float": "inf"}``) and ``meta``: qfx's
  node metadata (LinearInfo, QuantSpec, PlanChoice: the plan, i.e. each op's backend and why)
  as tagged dataclasses. Plus the pytree input/output specs (torch's
  ``treespec_dumps``, so the output keeps its HF class), the schema of every qfx op used
  (a changed op schema is a version mismatch), the parameter names, and ``code``: the graph's
  Python source, for people to read (never executed).
* ``qfx.capture``: every field of the capture record (:class:`qfx.capture.CaptureInfo`:
  model class name, input names, maximum sequence length, device, dtype, ...) except the
  source module, of which only the signature of ``forward`` is kept (so callers may pass what
  the model takes). The graph's inputs and outputs keep their symbolic shapes (``val``:
  symbol names, dtype, device), rebuilt on load as FakeTensors over fresh symbols.
* ``qfx.report``: the compile report (a tagged dataclass).

Why a node list rather than ``torch.export``'s serialized program: the L5 graph is already an
fx graph of registered ops whose arguments are plain values, so a node list is exact, small,
human-readable and loads without tracing or ``pickle``; torch.export's format would need the
graph re-exported (fake-tensor tracing of every custom op, with their backends' constraints)
and stores weights in its own archive, not in safetensors next to the plan. Loading resolves
call targets only inside ``torch.ops``, ``operator`` and ``torch`` (no arbitrary import) and
dataclasses only inside ``qfx``. Dropped on save: export's shape-guard module (``_guards_fn``;
qfx's own input checks in :func:`qfx.capture.check_inputs` still run) and the FakeTensor ``val``
metadata of inner nodes.

The loaded model runs on the device it was saved from (export bakes the device into the graph:
``arange(..., device=cpu)``); on the same device its outputs are bit-identical to the saved
model's (same tensors, same ops, same order).

Example::

    >>> cm = qfx.compile(qat, mode="int4", target="cpu")
    >>> qfx.save(cm, "model.qfx.safetensors")
    >>> again = qfx.load("model.qfx.safetensors")
    >>> torch.equal(again(**batch).logits, cm(**batch).logits)
    True
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import operator
import os
from pathlib import Path
from typing import Any

import torch

from qfx._version import __version__
from torch import nn
from torch.fx import Graph, GraphModule, Node

__all__ = ["save", "load", "QfxFileError", "FORMAT_VERSION", "size_report"]

FORMAT_VERSION = "1"
_META_PREFIX = "qfx"
_ALLOWED_DATACLASS_MODULES = ("qfx.",)


class QfxFileError(ValueError):
    """A qfx file cannot be loaded: the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------
# Tagged JSON for fx arguments and qfx metadata


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, Node):
        return {"node": value.name}
    if isinstance(value, torch.dtype):
        return {"dtype": _dtype_name(value)}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"dict with non-string keys {list(value)[:3]}")
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {"dataclass": f"{cls.__module__}.{cls.__qualname__}",
                "fields": {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    raise TypeError(f"cannot store a {type(value).__name__} ({value!r:.80})")


def _resolve_dataclass(path: str):
    if not path.startswith(_ALLOWED_DATACLASS_MODULES):
        raise ValueError(f"dataclass {path!r} is outside qfx")
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    if cls is None or not dataclasses.is_dataclass(cls):
        raise ValueError(f"dataclass {path!r} no longer exists in this qfx")
    return cls


def _decode(value: Any, nodes: dict[str, Node] | None = None) -> Any:
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    if "dataclass" in value:  # {"dataclass": "qfx.schema.LinearInfo", "fields": {...}}
        tag, body = "dataclass", value
    elif len(value) == 1:  # every other tag is a one-key object
        (tag, body), = value.items()
    else:
        raise ValueError(f"untagged JSON object {sorted(value)[:4]}")
    if tag == "node":
        return nodes[body]
    if tag == "float":
        return float(body)
    if tag == "dtype":
        return getattr(torch, body)
    if tag == "device":
        return torch.device(body)
    if tag == "layout":
        return getattr(torch, body)
    if tag == "memory_format":
        return getattr(torch, body)
    if tag == "slice":
        return slice(*(_decode(v, nodes) for v in body))
    if tag == "tuple":
        return tuple(_decode(v, nodes) for v in body)
    if tag == "dict":
        return {k: _decode(v, nodes) for k, v in body.items()}
    if tag == "dataclass":
        cls = _resolve_dataclass(value["dataclass"])
        fields = {k: _decode(v, nodes) for k, v in value["fields"].items()}
        expected = {f.name for f in dataclasses.fields(cls)}
        if set(fields) - expected or {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                                      and f.default_factory is dataclasses.MISSING} - set(fields):
            raise ValueError(f"{value['dataclass']} has fields {sorted(expected)} in this qfx, the file has {sorted(fields)}")
        return cls(**fields)
    raise ValueError(f"unknown tag {tag!r}")


def _target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    from torch.fx.node import _get_qualified_name

    return _get_qualified_name(target)


def _resolve_target(name: str):
    """A call target by qualified name, only inside torch.ops / operator / torch (no imports)."""
    if name.startswith("torch.ops."):
        obj = torch.ops
        for part in name.split(".")[2:]:
            obj = getattr(obj, part)
        return obj
    if name.startswith(("_operator.", "operator.")):
        return getattr(operator, name.split(".", 1)[1])
    if name.startswith("torch.") and name.count(".") >= 1:
        obj = torch
        for part in name.split(".")[1:]:
            obj = getattr(obj, part)
        if callable(obj):
            return obj
    raise ValueError(f"call target {name!r} is outside torch.ops / operator / torch")


# ----------------------------------------------------------------------------------------------
# Saving


def _graph_document(gm: GraphModule) -> tuple[dict, dict[str, torch.Tensor]]:
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
        entry = {"name": node.name, "op": node.op}
        if node.op == "call_function":
            entry["target"] = _target_name(node.target)
        elif node.op == "call_method":
            raise ValueError(f"node {node.name} calls method {node.target!r}; qfx.save stores op graphs only")
        else:
            entry["target"] = node.target
        if node.op == "get_attr":
            value = _get_attr(gm, node.target)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"get_attr {node.target!r} is a {type(value).__name__}, not a tensor")
            tensors[node.target] = value
        entry["args"] = _encode(tuple(node.args))["tuple"]
        entry["kwargs"] = {k: _encode(v) for k, v in node.kwargs.items()}
        meta = {}
        for key, value in node.meta.items():
            if key.startswith(_META_PREFIX):
                meta[key] = _encode(value)
        entry["meta"] = meta
        if node in boundary and isinstance(node.meta.get("val"), torch.Tensor):
            entry["val"] = _val_spec(node.meta["val"])
        nodes.append(entry)
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    qfx_ops = sorted({n.target for n in gm.graph.nodes if n.op == "call_function"
                      and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "qfx"}, key=str)
    graph_meta = {}
    for key, value in gm.meta.items():
        if key.startswith(_META_PREFIX) and key != "qfx_capture":
            try:
                graph_meta[key] = _encode(value)
            except TypeError:
                pass  # runtime-only metadata (objects) is rebuilt by the runtime, not stored
    doc = {
        "nodes": nodes,
        "pytree": None if info is None else {
            "orig_args": list(info.orig_args),
            "in_spec": treespec_dumps(info.in_spec) if info.in_spec is not None else None,
            "out_spec": treespec_dumps(info.out_spec) if info.out_spec is not None else None,
        },
        "op_schemas": {_target_name(op): str(op._schema) for op in qfx_ops},
        "parameters": sorted(t for t in tensors if t in params),
        "graph_meta": graph_meta,
        "dropped": sorted(dropped),
        "code": gm.code,
    }
    return doc, tensors


def _val_spec(val: torch.Tensor) -> dict:
    """A tensor's symbolic shape (symbol names or ints), dtype and device."""
    shape = [str(d.node.expr) if isinstance(d, torch.SymInt) else int(d) for d in val.shape]
    return {"shape": shape, "dtype": _dtype_name(val.dtype), "device": str(val.device)}


def _fake_vals(entries: list[dict]) -> dict[str, torch.Tensor]:
    """FakeTensors with one fresh symbol per saved symbol name, shared across tensors (so the
    batch dim of every input is the same symbol, as at capture)."""
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
        shape = []
        for d in spec["shape"]:
            if isinstance(d, str):
                if d not in symbols:
                    symbols[d] = env.create_unbacked_symint()
                shape.append(symbols[d])
            else:
                shape.append(d)
        with mode:
            out[e["name"]] = torch.empty(shape, dtype=getattr(torch, spec["dtype"]), device=spec["device"])
    return out


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _signature_document(fn) -> list[dict]:
    out = []
    for p in inspect.signature(fn).parameters.values():
        default = p.default
        entry = {"name": p.name, "kind": int(p.kind)}
        if default is not inspect.Parameter.empty:
            try:
                entry["default"] = _encode(default)
            except TypeError:
                entry["default"] = None  # only None-like defaults matter for binding inputs
        out.append(entry)
    return out


_CAPTURE_OBJECTS = ("source", "example_kwargs")  # stored otherwise: a signature stand-in, tensors


def _capture_document(info) -> dict:
    """Every CaptureInfo field as tagged JSON, except the source module (only its forward's
    signature is kept) and the example inputs (stored as tensors)."""
    fields = {f.name: _encode(getattr(info, f.name)) for f in dataclasses.fields(info) if f.name not in _CAPTURE_OBJECTS}
    return {
        "fields": fields,
        "signature": _signature_document(info.source.forward),
        "example_inputs": sorted(k for k, v in info.example_kwargs.items() if isinstance(v, torch.Tensor)),
    }


def _digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(meta):
        if key != f"{_META_PREFIX}.sha256":
            h.update(key.encode())
            h.update(meta[key].encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(compiled, path: str | os.PathLike) -> Path:
    """Write ``compiled`` (a :class:`qfx.CompiledModel`) to ``path`` (one safetensors file).

    Returns the path. See the module docstring for what the file holds.

    Example::

        >>> qfx.save(qfx.compile(qat, mode="int4", target="cpu"), "bert.qfx.safetensors")
    """
    from safetensors.torch import save_file

    for attr in ("graph_module", "report", "_capture", "device"):
        if not hasattr(compiled, attr):
            raise ValueError(f"qfx.save(compiled=...): expected a qfx.CompiledModel, got {type(compiled).__name__} "
                             f"(no .{attr}); compile the model with qfx.compile first")
    doc, tensors = _graph_document(compiled.graph_module)
    info = compiled._capture
    for name in _capture_document(info)["example_inputs"]:
        tensors[f"__example__.{name}"] = info.example_kwargs[name]
    report = compiled.report()
    try:
        report_doc = _encode(report)
    except TypeError:
        report_doc = {"text": str(report)}
    # One CPU copy per tensor: safetensors refuses tensors sharing storage (tied weights).
    cpu = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    meta = {
        f"{_META_PREFIX}.format": FORMAT_VERSION,
        f"{_META_PREFIX}.version": __version__,
        f"{_META_PREFIX}.graph": json.dumps(doc, sort_keys=True),
        f"{_META_PREFIX}.capture": json.dumps(_capture_document(info), sort_keys=True),
        f"{_META_PREFIX}.report": json.dumps(report_doc, sort_keys=True),
        f"{_META_PREFIX}.device": str(compiled.device),
    }
    meta[f"{_META_PREFIX}.sha256"] = _digest(meta, cpu)
    path = Path(path)
    save_file(cpu, str(path), metadata=meta)
    return path


# ----------------------------------------------------------------------------------------------
# Loading


def _fail(path, problem: str) -> QfxFileError:
    return QfxFileError(f"qfx.load({str(path)!r}): {problem}")


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.exists():
        raise _fail(path, "no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise _fail(path, f"not a complete safetensors file (truncated or corrupt): {e}") from None
    return meta, tensors


def _stub_source(capture_doc: dict) -> nn.Module:
    """A weightless stand-in for the source model: its class name and forward signature are
    all the input normalisation of :mod:`qfx.capture` reads from it."""
    params = []
    for p in capture_doc["signature"]:
        kw = {"default": _decode(p["default"])} if "default" in p else {}
        params.append(inspect.Parameter(p["name"], inspect._ParameterKind(p["kind"]), **kw))
    cls = type(capture_doc["fields"]["model_class"], (nn.Module,), {"__doc__": "signature stand-in for a loaded qfx model"})
    stub = cls()

    def forward(*args, **kwargs):  # never called: the graph runs instead
        raise RuntimeError("the loaded model's source is a signature stand-in; call the CompiledModel")

    forward.__signature__ = inspect.Signature(params)
    object.__setattr__(stub, "forward", forward)
    return stub


def _build_graph(doc: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> GraphModule:
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
    from torch.utils._pytree import treespec_loads

    graph = Graph()
    nodes: dict[str, Node] = {}
    vals = _fake_vals(doc["nodes"])
    for entry in doc["nodes"]:
        args = _decode({"tuple": entry["args"]}, nodes)
        kwargs = {k: _decode(v, nodes) for k, v in entry["kwargs"].items()}
        op = entry["op"]
        if op not in ("placeholder", "get_attr", "call_function", "output"):
            raise ValueError(f"node {entry['name']}: op {op!r} is not stored by qfx.save")
        target = _resolve_target(entry["target"]) if op == "call_function" else entry["target"]
        node = graph.create_node(op, target, args, kwargs, name=entry["name"])
        if entry["name"] in vals:
            node.meta["val"] = vals[entry["name"]]
        for key, value in entry["meta"].items():
            node.meta[key] = _decode(value, nodes)
        nodes[entry["name"]] = node
    root = nn.Module()
    params = set(doc["parameters"])
    for name, t in tensors.items():
        if name.startswith("__example__."):
            continue
        owner = root
        *parents, leaf = name.split(".")
        for p in parents:
            if not hasattr(owner, p):
                owner.add_module(p, nn.Module())
            owner = getattr(owner, p)
        # A fresh allocation: safetensors' buffers need not be 64-byte aligned, and CPU GEMM
        # kernels (oneDNN/MKL) take other code paths, with other rounding, on unaligned data.
        t = t.to(device, copy=True)
        if name in params:
            owner.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
        else:
            owner.register_buffer(leaf, t)
    py = doc.get("pytree")
    if py is not None:
        for spec in (py["in_spec"], py["out_spec"]):
            _import_pytree_types(spec)
        in_spec = treespec_loads(py["in_spec"]) if py["in_spec"] else None
        out_spec = treespec_loads(py["out_spec"]) if py["out_spec"] else None
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(py["orig_args"], in_spec, out_spec))
    gm = GraphModule(root, graph)
    if py is not None:
        gm._in_spec, gm._out_spec = graph._codegen.pytree_info.in_spec, graph._codegen.pytree_info.out_spec
    gm.graph.lint()
    return gm


def _import_pytree_types(spec: str | None) -> None:
    """treespec_loads finds a node type only once its module registered it: import the
    transformers module named in the spec (e.g. ``transformers.modeling_outputs``), nothing else."""
    if not spec:
        return

    def walk(node):
        if isinstance(node, dict):
            t = node.get("type")
            if isinstance(t, str) and t.startswith("transformers."):
                importlib.import_module(t.rpartition(".")[0])
            for child in node.get("children_spec", []):
                walk(child)

    walk(json.loads(spec)[1])


def load(path: str | os.PathLike):
    """Load a model written by :func:`save` (a :class:`qfx.CompiledModel`).

    Raises :class:`QfxFileError` (a ValueError) naming the file and the problem for a missing,
    truncated, tampered (checksum) or version-mismatched file, and RuntimeError when the saved
    target's GPU family is not the GPU present.
    """
    from qfx.capture import CaptureInfo, _install_input_normalizer
    from qfx.runtime import CompiledModel

    path = Path(path)
    meta, tensors = _read(path)
    fmt = meta.get(f"{_META_PREFIX}.format")
    if fmt is None:
        raise _fail(path, "a safetensors file without qfx metadata (not written by qfx.save)")
    if fmt != FORMAT_VERSION:
        raise _fail(path, f"qfx file format {fmt} (written by qfx {meta.get(f'{_META_PREFIX}.version', '?')}); this qfx "
                          f"reads format {FORMAT_VERSION}: load it with that qfx version, or compile and save again")
    if _digest(meta, tensors) != meta.get(f"{_META_PREFIX}.sha256"):
        raise _fail(path, "checksum mismatch: the tensors or the graph were modified after qfx.save (tampered or damaged)")
    try:
        doc = json.loads(meta[f"{_META_PREFIX}.graph"])
        cap = json.loads(meta[f"{_META_PREFIX}.capture"])
        report_doc = json.loads(meta[f"{_META_PREFIX}.report"])
    except (KeyError, ValueError) as e:
        raise _fail(path, f"qfx metadata is incomplete or not JSON ({e})") from None
    for name, schema in doc.get("op_schemas", {}).items():
        try:
            now = str(_resolve_target(name)._schema)
        except (AttributeError, RuntimeError, ValueError):
            now = None
        if now != schema:
            raise _fail(path, f"version mismatch: op {name} was saved as `{schema}`, this qfx has "
                              f"`{now or 'no such op'}`; compile and save the model again with this qfx")
    try:
        fields = {k: _decode(v) for k, v in cap["fields"].items()}
        known = {f.name for f in dataclasses.fields(CaptureInfo)}
        if set(fields) - known:
            raise ValueError(f"capture fields {sorted(set(fields) - known)} are unknown to this qfx")
    except (KeyError, ValueError, TypeError) as e:
        raise _fail(path, f"version mismatch in the capture record: {e}") from None
    device = fields["device"]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _fail(path, f"the model was saved on {device} and runs only there (the device is part of the graph); "
                          "no CUDA GPU is visible")
    try:
        report = _decode(report_doc) if "text" not in report_doc else report_doc["text"]
        gm = _build_graph(doc, tensors, device)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise _fail(path, f"version mismatch or damaged graph: {type(e).__name__}: {e}") from None
    target = getattr(report, "target", None)
    if isinstance(target, str) and target.startswith("sm"):
        from qfx.targets import get_target

        get_target(target).check_device(device)
    examples = {k[len("__example__."):]: v.to(device) for k, v in tensors.items() if k.startswith("__example__.")}
    try:
        info = CaptureInfo(**fields, source=_stub_source(cap), example_kwargs=examples)
    except TypeError as e:  # a field this qfx requires is missing from the file
        raise _fail(path, f"version mismatch in the capture record: {e}") from None
    for key, value in doc.get("graph_meta", {}).items():
        gm.meta[key] = _decode(value)
    gm.meta["qfx_capture"] = info
    _install_input_normalizer(gm)
    return CompiledModel(gm, report, info, device)


def size_report(path: str | os.PathLike, fp16_path: str | os.PathLike | None = None) -> dict[str, float]:
    """Bytes on disk of a qfx file and of its quantized linears' tensors.

    ``linear_bytes``: codes + scales + offset sums + biases of the integer linears (tensors
    named ``<linear>.w_*`` and the biases their ops read); ``fp16_path``: an fp16 safetensors
    of the same float model to compare the whole file against.
    """
    from safetensors import safe_open

    path = Path(path)
    out = {"file_bytes": float(path.stat().st_size)}
    with safe_open(str(path), framework="pt") as f:
        doc = json.loads(f.metadata()[f"{_META_PREFIX}.graph"])
        names = set(f.keys())
        int_inputs = set()
        by_name = {e["name"]: e for e in doc["nodes"]}
        for e in doc["nodes"]:
            if e["target"] in ("torch.ops.qfx.int_linear.default", "torch.ops.qfx.weight_only_linear.default"):
                for a in e["args"]:
                    if isinstance(a, dict) and "node" in a and by_name[a["node"]]["op"] == "get_attr":
                        int_inputs.add(by_name[a["node"]]["target"])
        linear = 0
        for name in names & int_inputs:
            t = f.get_slice(name)
            shape = t.get_shape()
            linear += math.prod(shape) * {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "I32": 4}[t.get_dtype()]
        out["linear_bytes"] = float(linear)
    if fp16_path is not None:
        out["fp16_file_bytes"] = float(Path(fp16_path).stat().st_size)
    return out
