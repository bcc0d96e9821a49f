"""Save and load a compiled model: ``qfx.save(compiled, path)`` / ``qfx.load(path)``.

One file, safetensors. The tensors are what the L5 graph reads with ``get_attr``: packed int4
(or int8) weight codes, weight scales, weight offset sums (``<linear>.w_codes`` /
``.w_scale`` / ``.w_offset_sum``), biases, and the float parts' parameters (embeddings,
LayerNorms, a float pooler/classifier). No float copy of a quantized weight exists in the
compiled graph, so none is saved; neither the float model nor the QAT model is needed to load.

The safetensors header's string metadata holds (all JSON):

* ``qfx.format`` (``"2"``), ``qfx.version``, ``qfx.sha256``: the file's format version, the
  qfx that wrote it, and a SHA-256 over the metadata and every tensor (name, dtype, shape,
  bytes) in name order: a truncated or damaged file is refused (the checksum is not keyed:
  it does not authenticate, see "Untrusted files" below).
* ``qfx.graph``: the L5 fx graph as a node list, one entry per node: ``name``, ``op``
  (placeholder / get_attr / call_function / output), ``target`` (``"torch.ops.qfx.int_linear.default"``,
  ``"_operator.getitem"``, a get_attr path or an input name), ``args`` / ``kwargs`` in a tagged
  JSON form (``{"node": name}``, ``{"dtype": "float16"}``, ``{"device": "cpu"}``,
  ``{"tuple": [...]}``, ``{"slice": [a, b, c]}``, ``{"float": "inf"}``) and ``meta``: qfx's
  node metadata (LinearInfo, QuantSpec, PlanChoice: the plan, i.e. each op's backend and why)
  as tagged dataclasses (:mod:`qfx.runtime.tagged_json`). Plus the pytree input/output specs
  (torch's ``treespec_dumps``, so the output keeps its HF class; read back by
  :func:`qfx.runtime.allowlist.treespec_from_json`, not torch's loader), the schema of every qfx op used
  (a changed op schema is a version mismatch), the parameter names, and ``code``: the graph's
  Python source, for people to read (never executed).
* ``qfx.capture``: every field of the capture record (:class:`qfx.capture.CaptureInfo`:
  model class name, input names, maximum sequence length, device, dtype, ...) except the
  source module, of which only the signature of ``forward`` is kept (so callers may pass what
  the model takes). The graph's inputs and outputs keep their symbolic shapes (``val``:
  symbol names, dtype, device), rebuilt on load as FakeTensors over fresh symbols.
* ``qfx.report``: the compile report (a tagged dataclass).
* ``qfx.runtime``: what ``qfx.compile`` gave the CompiledModel besides the graph: its
  :class:`~qfx.runtime.buckets.Buckets`, the ``cuda_graphs`` setting and the target (name and
  GPU), so the loaded model runs as the saved one did.

Why a node list rather than ``torch.export``'s serialized program: the L5 graph is already an
fx graph of registered ops whose arguments are plain values, so a node list is exact, small,
human-readable and loads without tracing or ``pickle``; torch.export's format would need the
graph re-exported (fake-tensor tracing of every custom op, with their backends' constraints)
and stores weights in its own archive, not in safetensors next to the plan. Dropped on save:
export's shape-guard module (``_guards_fn``; qfx's own input checks in
:func:`qfx.capture.check_inputs` still run) and the FakeTensor ``val`` metadata of inner nodes.

The loaded model runs on the device it was saved from (export bakes the device into the graph:
``arange(..., device=cpu)``); on the same device its outputs are bit-identical to the saved
model's (same tensors, same ops, same order).

Untrusted files: loading never runs code from the file and never unpickles; the only module it
may import by a name in the file is a transformers ``modeling_*`` module defining the output's
``ModelOutput`` class (matched by pattern, :func:`qfx.runtime.allowlist.treespec_from_json`).
The header is checked against fixed limits before it is parsed (:mod:`qfx.runtime.fileformat`);
every name in the file becomes an object only through the tables of :mod:`qfx.runtime.allowlist`
(call targets, dataclasses, dtypes, devices, pytree types), and names that fx writes into the
generated ``forward`` must be plain identifiers.
``save`` applies the same tables, so qfx never writes a file it would refuse. A graph that
passes can still compute anything the allowlisted tensor ops compute (time and memory at call
time are the model's), as with any model file.

Example::

    >>> cm = qfx.compile(qat, mode="int4", target="cpu")
    >>> qfx.save(cm, "model.qfx.safetensors")
    >>> again = qfx.load("model.qfx.safetensors")
    >>> torch.equal(again(**batch).logits, cm(**batch).logits)
    True
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qfx._version import __version__
from qfx.runtime.allowlist import call_target, check_identifier
from qfx.runtime.fileformat import FORMAT_VERSION, META, QfxFileError, digest, fail, parse_json, read
from qfx.runtime.graph_document import EXAMPLE, build_graph, check_input_name, graph_document
from qfx.runtime.tagged_json import decode, encode
from qfx.schema import META_CAPTURE

__all__ = ["save", "load", "QfxFileError", "FORMAT_VERSION", "size_report"]


# ----------------------------------------------------------------------------------------------
# Saving


def _signature_document(fn) -> list[dict]:
    out = []
    for p in inspect.signature(fn).parameters.values():
        default = p.default
        entry = {"name": p.name, "kind": int(p.kind)}
        if default is not inspect.Parameter.empty:
            try:
                entry["default"] = encode(default)
            except TypeError:
                entry["default"] = None  # only None-like defaults matter for binding inputs
        out.append(entry)
    return out


_CAPTURE_OBJECTS = ("source", "example_kwargs")  # stored otherwise: a signature stand-in, tensors


def _capture_document(info) -> dict:
    """Every CaptureInfo field as tagged JSON, except the source module (only its forward's
    signature is kept) and the example inputs (stored as tensors)."""
    fields = {f.name: encode(getattr(info, f.name)) for f in dataclasses.fields(info) if f.name not in _CAPTURE_OBJECTS}
    return {
        "fields": fields,
        "signature": _signature_document(info.source.forward),
        "example_inputs": sorted(k for k, v in info.example_kwargs.items() if isinstance(v, torch.Tensor)),
    }


def _runtime_document(compiled) -> dict:
    """What the CompiledModel was given besides the graph: buckets, CUDA graphs, target."""
    target = compiled.target
    return {"buckets": encode(compiled._buckets), "cuda_graphs": bool(compiled._want_graphs),
            "target": None if target is None else {"name": target.name, "gpu": target.gpu}}


def _save_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"qfx.save(path={str(path)!r}): this is a directory; give a file path such as "
                         f"{str(path / 'model.qfx.safetensors')!r}")
    if not path.parent.is_dir():
        raise ValueError(f"qfx.save(path={str(path)!r}): the directory {str(path.parent)!r} does not exist; create it first")
    return path


def save(compiled, path: str | os.PathLike) -> Path:
    """Write ``compiled`` (a :class:`qfx.CompiledModel`) to ``path`` (one safetensors file).

    Returns the path. See the module docstring for what the file holds. Raises ValueError for
    a directory, a missing parent directory, or a graph calling something outside
    :mod:`qfx.runtime.allowlist` (qfx never writes a file it would refuse to load).

    Example::

        >>> qfx.save(qfx.compile(qat, mode="int4", target="cpu"), "bert.qfx.safetensors")
    """
    from safetensors.torch import save_file

    for attr in ("graph_module", "report", "_capture", "device"):
        if not hasattr(compiled, attr):
            raise ValueError(f"qfx.save(compiled=...): expected a qfx.CompiledModel, got {type(compiled).__name__} "
                             f"(no .{attr}); compile the model with qfx.compile first")
    path = _save_path(path)
    info = compiled._capture
    try:
        doc, tensors = graph_document(compiled.graph_module, set(info.input_names))
    except ValueError as e:
        raise ValueError(f"qfx.save: {e}") from None
    for name in _capture_document(info)["example_inputs"]:
        tensors[f"{EXAMPLE}{name}"] = info.example_kwargs[name]
    report = compiled.report()
    try:
        report_doc = encode(report)
    except TypeError:
        report_doc = {"text": str(report)}
    # One CPU copy per tensor: safetensors refuses tensors sharing storage (tied weights).
    cpu = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    meta = {
        f"{META}.format": FORMAT_VERSION,
        f"{META}.version": __version__,
        f"{META}.graph": json.dumps(doc, sort_keys=True),
        f"{META}.capture": json.dumps(_capture_document(info), sort_keys=True),
        f"{META}.report": json.dumps(report_doc, sort_keys=True),
        f"{META}.runtime": json.dumps(_runtime_document(compiled), sort_keys=True),
        f"{META}.device": str(compiled.device),
    }
    meta[f"{META}.sha256"] = digest(meta, cpu)
    save_file(cpu, str(path), metadata=meta)
    return path


# ----------------------------------------------------------------------------------------------
# Loading


def _stub_source(capture_doc: dict, model_class: str) -> nn.Module:
    """A weightless stand-in for the source model: its class name and forward signature are
    all the input normalisation of :mod:`qfx.capture` reads from it."""
    params = []
    for p in capture_doc["signature"]:
        kw = {"default": decode(p["default"])} if "default" in p else {}
        params.append(inspect.Parameter(check_identifier("signature parameter", p["name"]),
                                        inspect._ParameterKind(p["kind"]), **kw))
    cls = type(model_class, (nn.Module,), {"__doc__": "signature stand-in for a loaded qfx model"})
    stub = cls()

    def forward(*args, **kwargs):  # never called: the graph runs instead
        raise RuntimeError("the loaded model's source is a signature stand-in; call the CompiledModel")

    forward.__signature__ = inspect.Signature(params)
    object.__setattr__(stub, "forward", forward)
    return stub


def _capture_fields(cap: dict) -> dict:
    from qfx.capture import CaptureInfo

    fields = {k: decode(v) for k, v in cap["fields"].items()}
    known = {f.name for f in dataclasses.fields(CaptureInfo)}
    if set(fields) - known:
        raise ValueError(f"capture fields {sorted(set(fields) - known)} are unknown to this qfx")
    names = fields.get("input_names")
    if not isinstance(names, tuple) or not names:
        raise ValueError("the capture record has no input names")
    for name in names:
        check_input_name(name)
    if not isinstance(fields.get("model_class"), str) or not isinstance(fields.get("device"), torch.device):
        raise ValueError("the capture record's model_class or device is malformed")
    if not (fields.get("max_seq_len") is None or type(fields["max_seq_len"]) is int and 0 < fields["max_seq_len"] < 2**31):
        raise ValueError(f"max_seq_len {fields.get('max_seq_len')!r} is not a positive size")
    return fields


def _runtime_settings(doc: Any) -> dict:
    """CompiledModel's buckets, cuda_graphs and target from the ``qfx.runtime`` document."""
    from qfx.runtime.buckets import Buckets
    from qfx.targets import get_target

    if not isinstance(doc, dict) or set(doc) != {"buckets", "cuda_graphs", "target"}:
        raise ValueError("the runtime record is not {buckets, cuda_graphs, target}")
    buckets = decode(doc["buckets"])
    if not isinstance(buckets, Buckets) or not isinstance(doc["cuda_graphs"], bool):
        raise ValueError("the runtime record's buckets or cuda_graphs is malformed")
    target = doc["target"]
    if target is not None:
        if not isinstance(target, dict) or not isinstance(target.get("name"), str):
            raise ValueError(f"the runtime record's target {str(target)[:80]} is malformed")
        target = get_target(target["name"])
        gpu = doc["target"].get("gpu")
        if gpu is not None and gpu != target.gpu:
            target = target.with_gpu(gpu)
    return {"buckets": buckets, "cuda_graphs": doc["cuda_graphs"], "target": target}


def _adds_optional_args(now: str | None, saved: str) -> bool:
    """``now`` is the ``saved`` op schema with defaulted arguments appended (e.g. ``act_block=None``):
    a graph saved before them calls the op exactly as it did, so the file stays loadable."""
    if now is None:
        return False
    head, sep, ret = saved.rpartition(") -> ")
    now_head, now_sep, now_ret = now.rpartition(") -> ")
    if not (sep and now_sep and ret == now_ret and now_head.startswith(head + ", ")):
        return False
    return all("=" in extra for extra in now_head[len(head) + 2:].split(", "))


def load(path: str | os.PathLike):
    """Load a model written by :func:`save` (a :class:`qfx.CompiledModel`), with the buckets,
    CUDA-graph setting and target it was saved with.

    Safe on untrusted files (see the module docstring): nothing in the file is executed,
    imported or unpickled. Raises :class:`QfxFileError` (a ValueError) naming the file and the
    problem for a missing, truncated, damaged, version-mismatched or refused file (the message
    names the node and target a refused graph calls), and RuntimeError when the saved target's
    GPU family is not the GPU present.
    """
    from qfx.capture import CaptureInfo, _install_input_normalizer
    from qfx.runtime import CompiledModel
    from qfx.runtime.report import CompileReport

    path = Path(path)
    meta, tensors = read(path)
    fmt = meta.get(f"{META}.format")
    if fmt is None:
        raise fail(path, "a safetensors file without qfx metadata (not written by qfx.save)")
    if fmt != FORMAT_VERSION:
        raise fail(path, f"qfx file format {fmt[:20]!r} (written by qfx {meta.get(f'{META}.version', '?')[:20]}); this qfx "
                         f"reads format {FORMAT_VERSION}: load it with that qfx version, or compile and save again")
    if digest(meta, tensors) != meta.get(f"{META}.sha256"):
        raise fail(path, "checksum mismatch: the tensors or the graph were modified after qfx.save (tampered or damaged)")
    try:
        doc, cap, report_doc, runtime_doc = (parse_json(meta.get(f"{META}.{k}"), f"qfx.{k}")
                                             for k in ("graph", "capture", "report", "runtime"))
        if not all(isinstance(d, dict) for d in (doc, cap, report_doc)):
            raise ValueError("a qfx metadata entry is not a JSON object")
    except ValueError as e:
        raise fail(path, f"qfx metadata is incomplete or malformed ({e})") from None
    for name, schema in (doc.get("op_schemas") or {}).items():
        try:
            now = str(call_target(name, "op_schemas")._schema)
        except (AttributeError, ValueError):
            now = None
        if now != schema and not _adds_optional_args(now, str(schema)):
            raise fail(path, f"version mismatch: op {str(name)[:80]} was saved as `{str(schema)[:200]}`, this qfx has "
                             f"`{now or 'no such op'}`; compile and save the model again with this qfx")
    try:
        fields = _capture_fields(cap)
        settings = _runtime_settings(runtime_doc)
    except (KeyError, ValueError, TypeError) as e:
        raise fail(path, f"version mismatch or malformed capture/runtime record: {e}") from None
    device = fields["device"]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise fail(path, f"the model was saved on {device} and runs only there (the device is part of the graph); "
                         "no CUDA GPU is visible")
    try:
        report = decode(report_doc) if "text" not in report_doc else str(report_doc["text"])
        if not isinstance(report, (CompileReport, str)):
            raise ValueError(f"the report is a {type(report).__name__}, not a CompileReport")
        gm = build_graph(doc, tensors, device, set(fields["input_names"]))
        examples = {k[len(EXAMPLE):]: v.to(device) for k, v in tensors.items()
                    if k.startswith(EXAMPLE) and k[len(EXAMPLE):] in fields["input_names"]}
        info = CaptureInfo(**fields, source=_stub_source(cap, fields["model_class"]), example_kwargs=examples)
        graph_meta = doc.get("graph_meta") or {}
        for key, value in graph_meta.items():
            if not key.startswith(META) or key == META_CAPTURE:
                raise ValueError(f"graph metadata key {key!r} is not qfx's")
            gm.meta[key] = decode(value)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise fail(path, f"version mismatch or damaged graph: {type(e).__name__}: {e}") from None
    gm.meta[META_CAPTURE] = info
    _install_input_normalizer(gm)
    return CompiledModel(gm, report, info, device, **settings)


def size_report(path: str | os.PathLike, fp16_path: str | os.PathLike | None = None) -> dict[str, float]:
    """Bytes on disk of a qfx file and of its quantized linears' tensors.

    ``linear_bytes``: codes + scales + offset sums + biases of the integer linears (tensors
    named ``<linear>.w_*`` and the biases their ops read); ``fp16_path``: an fp16 safetensors
    of the same float model to compare the whole file against.
    """
    path = Path(path)
    meta, tensors = read(path)
    out = {"file_bytes": float(path.stat().st_size)}
    doc = parse_json(meta.get(f"{META}.graph"), "qfx.graph")
    by_name = {e["name"]: e for e in doc["nodes"]}
    int_inputs = set()
    for e in doc["nodes"]:
        if e["target"] in ("torch.ops.qfx.int_linear.default", "torch.ops.qfx.weight_only_linear.default"):
            for a in e["args"]:
                if isinstance(a, dict) and "node" in a and by_name[a["node"]]["op"] == "get_attr":
                    int_inputs.add(by_name[a["node"]]["target"])
    out["linear_bytes"] = float(sum(tensors[n].numel() * tensors[n].element_size() for n in set(tensors) & int_inputs))
    if fp16_path is not None:
        out["fp16_file_bytes"] = float(Path(fp16_path).stat().st_size)
    return out
