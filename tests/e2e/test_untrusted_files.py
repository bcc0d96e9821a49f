"""qfx.load on crafted files: every escape is refused before anything runs or is allocated.

Each crafted file is a real qfx file edited the way an attacker would, with its checksum
recomputed (the checksum is not keyed, so it never stops a deliberate edit). A canary pickle
creates a marker file when unpickled: ``torch.load(..., weights_only=False)`` reached from a
graph would create it. Every load must raise QfxFileError naming the problem, and the marker
must not exist afterwards.
"""
from __future__ import annotations

import io
import json
import pickle
import sys
import tracemalloc

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qfx
from qfx.runtime import allowlist, fileformat, graph_document, serialize
from models import inputs, make


class _Canary:
    """Unpickling it creates ``path`` (what a malicious pickle would do, minus the harm)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = make("bert_cls", hidden=32, layers=1)
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=qfx.QuantConfig(4, 4))
    cm = qfx.compile(qat, mode="int4", target="cpu")
    path = qfx.save(cm, tmp_path_factory.mktemp("untrusted") / "good.qfx.safetensors")
    return cm, path


@pytest.fixture
def canary(tmp_path):
    marker = tmp_path / "ran.marker"
    pkl = tmp_path / "payload.pkl"
    torch.save(_Canary(marker), pkl)
    yield marker, pkl
    assert not marker.exists(), "a crafted file ran code"


def _craft(path, out, graph=None, meta=None, tensors=None):
    """``path`` with its graph document, metadata or tensors changed, checksum recomputed."""
    with safe_open(str(path), framework="pt") as f:
        md = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    if graph is not None:
        doc = json.loads(md["qfx.graph"])
        graph(doc)
        md["qfx.graph"] = json.dumps(doc)
    if meta is not None:
        meta(md)
    if tensors is not None:
        tensors(ts)
    md["qfx.sha256"] = fileformat.digest(md, ts)
    save_file(ts, str(out), metadata=md)
    return out


def _node(doc, op, target=None):
    return next(n for n in doc["nodes"] if n["op"] == op and (target is None or n["target"] == target))


def _refused(path, match):
    with pytest.raises(serialize.QfxFileError, match=match):
        qfx.load(path)


def test_canary_is_live(canary, tmp_path):
    marker, pkl = canary
    torch.load(pkl, weights_only=False).close()  # what a graph calling torch.load would do
    assert marker.exists()
    marker.unlink()


def test_the_untouched_file_loads(saved):
    cm, path = saved
    x = inputs(2, 7, seed=3)
    assert torch.equal(qfx.load(path)(**x).logits, cm(**x).logits)


FOREIGN_TARGETS = [
    "torch.load", "torch.hub.load", "torch.utils.cpp_extension.load_inline", "torch.ops.load_library",
    "torch.ops.import_module", "builtins.eval", "builtins.exec", "builtins.getattr", "os.system",
    "subprocess.run", "_operator.attrgetter", "operator.methodcaller", "_operator.pow",
    "torch.ops.aten.from_file.default", "torch.ops.evil_ns.run.default", "torch.ops.qfx.__class__",
    "torch.ops.aten.add.Tensor.__call__", "torch.ops.aten", "torch.Tensor.__reduce_ex__", "torch.save", "",
]


@pytest.mark.parametrize("target", FOREIGN_TARGETS)
def test_foreign_call_target(saved, canary, tmp_path, target):
    _, path = saved
    marker, pkl = canary

    def call_it(doc):
        node = _node(doc, "call_function")
        node["target"], node["args"], node["kwargs"] = target, [str(pkl)], {"weights_only": False}

    _refused(_craft(path, tmp_path / "evil.safetensors", graph=call_it),
             rf"node '\w+' calls '{target.replace('.', '[.]')}', which is not in qfx's allowlist")


def test_non_string_target(saved, tmp_path):
    _, path = saved
    _refused(_craft(path, tmp_path / "t.safetensors", graph=lambda d: _node(d, "call_function").update(target=["torch", "load"])),
             "not in qfx's allowlist")


@pytest.mark.parametrize("target", [
    "__class__.__init__.__globals__", "bert.__class__", "training", "forward",
    'bert.x"), __import__("os").system("id"), ("', "bert..embeddings", "",
])
def test_get_attr_outside_the_stored_tensors(saved, tmp_path, target):
    _, path = saved
    _refused(_craft(path, tmp_path / "attr.safetensors", graph=lambda d: _node(d, "get_attr").update(target=target)),
             r"get_attr|not a plain identifier")


@pytest.mark.parametrize("name", ["input_ids=open('m', 'w')", "torch", "self", "print", "a b", "class"])
def test_input_names_reach_no_generated_code(saved, tmp_path, name):
    _, path = saved

    def rename(doc):
        _node(doc, "placeholder")["target"] = name

    def orig_args(doc):
        doc["pytree"]["orig_args"][0] = name

    for i, edit in enumerate((rename, orig_args)):
        _refused(_craft(path, tmp_path / f"in{i}.safetensors", graph=edit), "not a plain identifier|shadows|not one of")


def test_keyword_names_and_node_names_are_identifiers(saved, tmp_path):
    _, path = saved

    def kwarg(doc):
        _node(doc, "call_function")["kwargs"]["x=open('m','w')"] = 1

    def node_name(doc):
        _node(doc, "call_function")["name"] = "a = open('m', 'w')"

    _refused(_craft(path, tmp_path / "kw.safetensors", graph=kwarg), "keyword argument .* not a plain identifier")
    _refused(_craft(path, tmp_path / "nn.safetensors", graph=node_name), "node name .* not a plain identifier")


@pytest.mark.parametrize("tag, match", [
    ({"dtype": "load"}, "dtype 'load' is not one of"), ({"dtype": "__class__"}, "dtype '__class__' is not one of"),
    ({"layout": "load"}, "layout 'load' is not one of"), ({"memory_format": "hub"}, "memory format 'hub' is not one of"),
    ({"device": "cuda:0'); import os; ('"}, "is not 'cpu', 'cuda', 'cuda:N' or 'meta'"),
    ({"float": "1e999999"}, "not inf, -inf or nan"), ({"slice": [1, 2, {"dtype": "float32"}]}, r"is not \[start, stop, step\]"),
    ({"dataclass": "os.system", "fields": {}}, "dataclass 'os.system' is not one of qfx's"),
    ({"node": "not_defined_yet"}, "not defined before it"), ({"tuple": [1], "extra": 2}, "untagged JSON object"),
    ({"eval": "1"}, "unknown tag 'eval'"),
])
def test_tags_name_only_table_entries(saved, tmp_path, tag, match):
    _, path = saved

    def put(doc):
        _node(doc, "call_function")["args"][0] = tag

    _refused(_craft(path, tmp_path / "tag.safetensors", graph=put), match)


def test_dataclass_tags_import_nothing(saved, tmp_path):
    """The old loader imported any ``qfx.*`` module a tag named: ``qfx.__main__`` runs the CLI."""
    _, path = saved
    sys.modules.pop("qfx.__main__", None)

    def tag(doc):
        node = next(n for n in doc["nodes"] if "qfx" in n["meta"])
        node["meta"]["qfx"] = {"dataclass": "qfx.__main__.Anything", "fields": {}}

    _refused(_craft(path, tmp_path / "dc.safetensors", graph=tag), r"dataclass 'qfx\.__main__\.Anything' is not one of qfx's")
    assert "qfx.__main__" not in sys.modules


def test_metadata_keys_are_qfx_only(saved, tmp_path):
    _, path = saved

    def stack_trace(doc):  # fx prints node.meta["stack_trace"] into the generated source
        _node(doc, "call_function")["meta"]["stack_trace"] = "x\nimport os"

    _refused(_craft(path, tmp_path / "meta.safetensors", graph=stack_trace), "metadata key 'stack_trace' is not qfx's")


@pytest.mark.parametrize("spec", [
    '[1, {"type": "os.system", "context": "null", "children_spec": []}]',
    '[1, {"type": "torch.ops.load_library", "context": "null", "children_spec": []}]',
    '[1, {"type": "transformers.commands.x.Y", "context": "null", "children_spec": []}]',
    # torch's treespec_loads would import the module of an "__enum__" context
    '[1, {"type": "builtins.dict", "context": "[{\\"__enum__\\": true, \\"fqn\\": \\"antigravity:x\\", \\"name\\": \\"a\\"}]",'
    ' "children_spec": [{"type": null, "context": null, "children_spec": []}]}]',
    # dict keys are written into the generated forward
    '[1, {"type": "builtins.dict", "context": "[\\"a\'\\"]", "children_spec": [{"type": null, "context": null, "children_spec": []}]}]',
])
def test_pytree_specs_name_only_containers_and_model_outputs(saved, tmp_path, spec):
    _, path = saved
    sys.modules.pop("antigravity", None)

    def swap(doc):
        doc["pytree"]["out_spec"] = spec

    _refused(_craft(path, tmp_path / "spec.safetensors", graph=swap), "pytree")
    assert "antigravity" not in sys.modules


def test_tensor_names_are_plain_paths(saved, tmp_path):
    _, path = saved

    def rename(ts):
        ts["__class__"] = torch.zeros(1)

    _refused(_craft(path, tmp_path / "tn.safetensors", tensors=rename), "tensor name '__class__'")


def test_graph_structure(saved, tmp_path, monkeypatch):
    _, path = saved

    def forward_reference(doc):
        later = doc["nodes"][-2]["name"]
        _node(doc, "call_function")["args"][0] = {"node": later}

    def twice(doc):
        doc["nodes"].insert(1, dict(doc["nodes"][0]))

    def method(doc):
        _node(doc, "call_function").update(op="call_method", target="__reduce_ex__")

    def module(doc):
        _node(doc, "call_function").update(op="call_module", target="bert")

    def default(doc):  # fx writes a placeholder's argument into the def line as its default
        _node(doc, "placeholder")["args"] = ["x"]

    def literal(doc):  # a literal that would cost gigabytes to compile into the generated forward
        _node(doc, "call_function")["args"].append(list(range(graph_document.MAX_ARGUMENT_VALUES)))

    _refused(_craft(path, tmp_path / "fw.safetensors", graph=forward_reference), "not defined before it")
    _refused(_craft(path, tmp_path / "tw.safetensors", graph=twice), "used twice")
    _refused(_craft(path, tmp_path / "me.safetensors", graph=method), "op 'call_method'")
    _refused(_craft(path, tmp_path / "mo.safetensors", graph=module), "op 'call_module'")
    _refused(_craft(path, tmp_path / "de.safetensors", graph=default), "a placeholder node with arguments")
    _refused(_craft(path, tmp_path / "li.safetensors", graph=literal), "more than 65536 values among its arguments")
    monkeypatch.setattr(graph_document, "MAX_NODES", 10)
    _refused(path, "at most 10 nodes")


@pytest.mark.parametrize("shape", [[-1, 2], [2**62], [1] * 9, ["s0" * 100], [1.5], [True]])
def test_absurd_input_shapes(saved, tmp_path, shape):
    _, path = saved
    _refused(_craft(path, tmp_path / "val.safetensors", graph=lambda d: _node(d, "placeholder")["val"].update(shape=shape)),
             "dim|rank")


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [100, 200_000])
def test_deeply_nested_json(saved, tmp_path, depth):
    _, path = saved

    def nest(md):
        doc = md["qfx.graph"]
        md["qfx.graph"] = doc.replace('"args": [', f'"args": [{_nested(depth)}, ', 1)

    _refused(_craft(path, tmp_path / "deep.safetensors", meta=nest), "nested")


def _raw_file(path, header: bytes, data: bytes = b"", claimed: int | None = None):
    path.write_bytes((len(header) if claimed is None else claimed).to_bytes(8, "little") + header + data)
    return path


def test_huge_or_lying_headers_are_refused_before_reading(tmp_path):
    tracemalloc.start()
    _refused(_raw_file(tmp_path / "h1.safetensors", b"{}", claimed=2**62), "claims 4611686018427387904 bytes, more than qfx reads")
    _refused(_raw_file(tmp_path / "h5.safetensors", json.dumps({"w": {"dtype": "F32", "shape": [2**39, 2**39],
                                                                      "data_offsets": [0, 4]}}).encode(), b"\0" * 4), "tensor 'w'")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated to refuse a 4-byte file"
    _refused(_raw_file(tmp_path / "h2.safetensors", b"{}", claimed=fileformat.MAX_HEADER_BYTES), "truncated")
    _refused(_raw_file(tmp_path / "h3.safetensors", _nested(100_000).encode()), "nested too deeply")
    _refused(_raw_file(tmp_path / "h4.safetensors", b"\xff\xfe"), "corrupt")


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1], "data_offsets": [0, 2**40]},
    {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]},
    {"dtype": "object", "shape": [1], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "pickle": "x"},
])
def test_absurd_tensor_entries(tmp_path, entry):
    header = json.dumps({"w": entry, "__metadata__": {"qfx.format": fileformat.FORMAT_VERSION}}).encode()
    _refused(_raw_file(tmp_path / "t.safetensors", header, b"\0" * 4), r"tensor 'w'")


def test_directories_and_missing_parents(saved, tmp_path):
    cm, _ = saved
    with pytest.raises(ValueError, match=r"qfx\.save\(path=.*\): this is a directory; give a file path such as"):
        qfx.save(cm, tmp_path)
    with pytest.raises(ValueError, match=r"the directory .*nope.* does not exist"):
        qfx.save(cm, tmp_path / "nope" / "m.safetensors")
    _refused(tmp_path, "this is a directory, not a qfx file")


def test_save_refuses_what_load_would_refuse(saved, tmp_path):
    cm, _ = saved
    gm = cm.graph_module
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    old = node.target
    node.target = torch.load
    try:
        with pytest.raises(ValueError, match=rf"qfx\.save: node '{node.name}' calls 'torch.serialization.load', which is not in"):
            qfx.save(cm, tmp_path / "never.safetensors")
    finally:
        node.target = old
    assert not (tmp_path / "never.safetensors").exists()


def test_pickling_a_compiled_model_says_use_qfx_save(saved):
    cm, _ = saved
    with pytest.raises(TypeError, match=r"cannot be pickled .*qfx\.save\(model"):
        pickle.dumps(cm)
    with pytest.raises(TypeError, match=r"qfx\.save"):
        torch.save(cm, io.BytesIO())


def test_every_qfx_op_is_in_the_allowlist():
    """A new qfx op must be added to allowlist.QFX_OPS (or graphs using it cannot be saved)."""
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("qfx::")}
    assert registered == set(allowlist.QFX_OPS), (
        f"qfx ops not in allowlist.QFX_OPS: {sorted(registered - set(allowlist.QFX_OPS))}; "
        f"listed but not registered: {sorted(set(allowlist.QFX_OPS) - registered)}")
    assert not any(bad in op for op in allowlist.ATEN_OPS for bad in ("from_file", "save", "load", "empty"))
