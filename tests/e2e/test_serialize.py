"""qfx.save / qfx.load: bit-identical outputs, no float weights needed, clear errors on bad files."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qfx
from qfx.runtime import serialize
from models import ALL_FAMILIES, inputs, make


def _compile(config, family="bert_cls", hidden=32, mode=None, layers=2):
    model = make(family, hidden=hidden, layers=layers)
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=config)
    return qfx.compile(qat, mode=mode or f"int{config.weight_bits}", target="cpu"), model


@pytest.fixture(scope="module")
def w4(tmp_path_factory):
    cm, model = _compile(qfx.QuantConfig(4, 4))
    path = tmp_path_factory.mktemp("qfx") / "w4.qfx.safetensors"
    qfx.save(cm, path)
    return cm, model, path


@pytest.mark.parametrize("which", ["W4A4", "W8A8-asym"])
def test_loaded_outputs_are_bit_identical(tmp_path, w4, which):
    if which == "W4A4":
        cm, _, path = w4
    else:
        cm, _ = _compile(qfx.QuantConfig(8, 8, symmetric=False))
        path = qfx.save(cm, tmp_path / "m.qfx.safetensors")
    again = qfx.load(path)
    for batch, seq, seed in ((1, 5, 1), (3, 11, 2), (2, 8, 3)):
        x = inputs(batch, seq, seed=seed)
        a, b = cm(**x), again(**x)
        assert type(b) is type(a)
        assert torch.equal(a.logits, b.logits)
    assert str(again.report()) == str(cm.report())


def test_the_file_needs_no_float_weights_and_keeps_the_plan(w4):
    cm, model, path = w4
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        doc = json.loads(f.metadata()["qfx.graph"])
    assert not any(n.endswith("attention.self.query.weight") or n.endswith("intermediate.dense.weight") for n in names)
    codes = [n for n in names if n.endswith(".w_codes")]
    assert len(codes) == 8  # 2 layers x (qkv, attn_out, ffn_in, ffn_out)
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("layer0.ffn_in.w_codes").dtype == torch.uint8  # packed int4, two per byte
        assert f.get_tensor("layer0.ffn_in.w_codes").shape == (128, 16)
    plans = [n["meta"]["qfx_plan"] for n in doc["nodes"] if "qfx_plan" in n["meta"]]
    assert plans and all(p["fields"]["backend"] == plans[0]["fields"]["backend"] for p in plans)
    assert plans[0]["fields"]["backend"] in qfx.ops.registered_backends("int_linear")
    assert "torch.ops.qfx.int_linear.default" in doc["op_schemas"] and "def forward" in doc["code"]
    # the loaded model takes what the model takes: positional ids, missing mask filled in
    again = qfx.load(path)
    ids = inputs(2, 6, seed=4)["input_ids"]
    assert torch.equal(again(ids).logits, cm(ids).logits)
    with pytest.raises(ValueError, match="longer than the model supports"):
        again(torch.ones(1, 200, dtype=torch.long))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_saves_inside_the_allowlist(tmp_path, family):
    """Every call target a supported family's graph uses is on qfx.runtime.allowlist (save
    refuses anything else), and the reload is bit-identical."""
    cm, _ = _compile(qfx.QuantConfig(8, 8), family=family, layers=1)
    again = qfx.load(qfx.save(cm, tmp_path / f"{family}.safetensors"))
    x = inputs(2, 9, seed=6)
    a, b = cm(**x), again(**x)
    assert type(a) is type(b) and all(torch.equal(u, v) for u, v in zip(a.values(), b.values()))


def test_truncated_file(w4, tmp_path):
    _, _, path = w4
    data = path.read_bytes()
    for cut in (len(data) // 2, 40, len(data) - 3):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(serialize.QfxFileError, match=rf"{bad.name}.*(truncated|corrupt)"):
            qfx.load(bad)


def test_tampered_tensor_or_graph(w4, tmp_path):
    _, _, path = w4
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of the last tensor
    bad = tmp_path / "bit.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(serialize.QfxFileError, match=r"bit\.safetensors.*checksum mismatch"):
        qfx.load(bad)
    text = path.read_bytes()
    assert b"def forward(" in text  # the graph's source, inside qfx.graph
    bad2 = tmp_path / "graph.safetensors"
    bad2.write_bytes(text.replace(b"def forward(", b"def forwarc(", 1))  # same length: a valid header
    with pytest.raises(serialize.QfxFileError, match=r"graph\.safetensors.*checksum mismatch"):
        qfx.load(bad2)


def _rewrite(path, out, change):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(meta)
    meta["qfx.sha256"] = serialize.digest(meta, tensors)  # a consistent file from another version
    save_file(tensors, str(out), metadata=meta)
    return out


def test_version_mismatch(w4, tmp_path):
    _, _, path = w4

    def old_format(meta):
        meta["qfx.format"] = "0"

    with pytest.raises(serialize.QfxFileError, match=r"old\.safetensors.*format .0. .*reads format 2"):
        qfx.load(_rewrite(path, tmp_path / "old.safetensors", old_format))

    def old_schema(meta):
        doc = json.loads(meta["qfx.graph"])
        doc["op_schemas"]["torch.ops.qfx.int_linear.default"] = "qfx::int_linear(Tensor a) -> Tensor"
        meta["qfx.graph"] = json.dumps(doc)

    with pytest.raises(serialize.QfxFileError, match=r"schema\.safetensors.*version mismatch: op torch\.ops\.qfx\.int_linear"):
        qfx.load(_rewrite(path, tmp_path / "schema.safetensors", old_schema))

    def foreign_target(meta):
        doc = json.loads(meta["qfx.graph"])
        doc["nodes"][-2]["target"] = "os.system"
        meta["qfx.graph"] = json.dumps(doc)

    with pytest.raises(serialize.QfxFileError, match=r"node .* calls .os\.system.*not in qfx.s allowlist"):
        qfx.load(_rewrite(path, tmp_path / "evil.safetensors", foreign_target))


def test_not_a_qfx_file(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(serialize.QfxFileError, match="without qfx metadata"):
        qfx.load(plain)
    with pytest.raises(serialize.QfxFileError, match="no such file"):
        qfx.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="expected a qfx.CompiledModel"):
        qfx.save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_w4a4_linear_weights_under_0_3x_of_fp16(tmp_path):
    sizes = {}
    for bits in (4, 8):
        cm, model = _compile(qfx.QuantConfig(bits, bits), hidden=128, layers=1)
        path = qfx.save(cm, tmp_path / f"w{bits}.safetensors")
        linear = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in name]
        fp16 = sum(2 * (m.weight.numel() + m.bias.numel()) for m in linear)
        sizes[bits] = serialize.size_report(path)["linear_bytes"] / fp16
    assert sizes[4] <= 0.30 and 0.45 <= sizes[8] <= 0.56, sizes


def test_float_model_ptq_roundtrip(tmp_path):
    model = make("bert", hidden=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
        cm = qfx.compile(model, mode="int8", target="cpu", example_kwargs=inputs(2, 8))
    again = qfx.load(qfx.save(cm, tmp_path / "ptq.safetensors"))
    x = inputs(2, 7, seed=9)
    a, b = cm(**x), again(**x)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(a.pooler_output, b.pooler_output)


def test_load_restores_buckets_cuda_graphs_and_target(tmp_path):
    model = make("bert_cls", hidden=32, layers=1)
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=qfx.QuantConfig(8, 8))
    buckets = qfx.Buckets(batch=(1, 3), seq=(8, 24), max_graphs=5, token_step=16, token_buckets=2)
    cm = qfx.compile(qat, mode="int8", target="cpu", buckets=buckets)
    again = qfx.load(qfx.save(cm, tmp_path / "rt.safetensors"))
    assert again._buckets == cm._buckets and again._buckets.token_step == 16 and again._buckets.max_graphs == 5
    assert again._want_graphs is cm._want_graphs is False
    assert again.target == cm.target and again.target.name == "cpu"
    assert again.runtime_report() == cm.runtime_report()


@pytest.mark.gpu
def test_gpu_roundtrip_bit_identical(tmp_path):
    """Also: the loaded model replays CUDA graphs in the saved buckets, for the saved target."""
    from qfx.targets import detect_target

    target = detect_target()
    model = make("bert_cls", hidden=64).cuda()
    qat = qfx.prepare_qat(model, example_kwargs={k: v.cuda() for k, v in inputs(2, 8).items()}, config=qfx.QuantConfig(4, 4))
    cm = qfx.compile(qat, mode="int4", target=target.name, buckets=qfx.Buckets(batch=(2, 4), seq=(16, 32)))
    again = qfx.load(qfx.save(cm, tmp_path / "gpu.safetensors"))
    assert again._want_graphs is cm._want_graphs is True
    assert again.target == cm.target and again._buckets == cm._buckets
    for batch, seq in ((4, 16), (3, 20)):
        x = {k: v.cuda() for k, v in inputs(batch, seq, seed=1).items()}
        assert torch.equal(cm(**x).logits, again(**x).logits)
    assert "CUDA graphs: 2 bucket(s) captured" in again.runtime_report(), again.runtime_report()


def test_inputs_and_outputs_keep_their_symbolic_shapes(w4):
    cm, _, path = w4
    again = qfx.load(path)

    def dims(gm):
        out = {}
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                out[n.name] = tuple(str(d.node.expr) if isinstance(d, torch.SymInt) else d for d in n.meta["val"].shape)
        return out

    before, after = dims(cm.graph_module), dims(again.graph_module)
    assert set(before) == set(after)
    rename = {}
    for name in before:  # the same sharing pattern of symbols (names are fresh)
        for a, b in zip(before[name], after[name]):
            assert isinstance(a, str) == isinstance(b, str)
            if isinstance(a, str):
                assert rename.setdefault(a, b) == b
    assert len(set(rename.values())) == len(rename) == 2  # batch and sequence
    leaf = again.graph_module.graph.output_node().args[0][0]
    assert str(leaf.meta["val"].shape[0].node.expr) == after["input_ids"][0]
    assert again._capture.max_seq_len == cm._capture.max_seq_len and again._capture.input_names == cm._capture.input_names
