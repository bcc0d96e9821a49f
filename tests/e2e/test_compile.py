"""The public API: prepare_qat trains, compile reproduces it, bad input gets clear errors."""
from __future__ import annotations

import warnings

import pytest
import torch
from models import inputs, make

import qfx
from qfx.runtime.verify import compare_linears


@pytest.fixture(scope="module")
def qat_and_compiled():
    model = make("bert_cls", layers=2)
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=qfx.QuantConfig(4, 4, symmetric=False)).eval()
    return model, qat, qfx.compile(qat, mode="int4", target="cpu")


def test_qat_trains_with_a_plain_optimizer():
    torch.manual_seed(0)
    model = make("bert_cls", layers=1)
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=qfx.QuantConfig(4, 4)).train()
    x, y = inputs(8, 12, seed=3), torch.randint(0, 2, (8,))
    opt = torch.optim.Adam(qat.parameters(), lr=3e-3)
    before = dict((k, v.detach().clone()) for k, v in qat.named_parameters())
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(qat(**x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    w = "bert.encoder.layer.0.intermediate.dense.weight"
    assert not torch.equal(before[w], qat.get_parameter(w))  # STE gradients reached the weight
    assert torch.equal(model.get_parameter(w), make("bert_cls", layers=1).get_parameter(w))  # source untouched


def test_prepare_qat_twice_is_an_error(qat_and_compiled):
    _, qat, _ = qat_and_compiled
    with pytest.raises(ValueError, match="already prepared"):
        qfx.prepare_qat(qat, example_kwargs=inputs(2, 8))


def test_compiled_model_keeps_inputs_and_outputs(qat_and_compiled):
    _, qat, compiled = qat_and_compiled
    x = {**inputs(3, 9), "token_type_ids": torch.zeros(3, 9, dtype=torch.long)}
    out = compiled(**x)
    assert type(out).__name__ == "SequenceClassifierOutput"
    # the QAT forward is the integer path itself: on the same device, bit-identical logits
    assert torch.equal(out.logits, qat(**x).logits)
    checks = compare_linears(qat, compiled, **x)
    assert all(c.ok and c.max_abs_error == 0 for c in checks)


def test_report_lists_every_linear_and_every_float_part(qat_and_compiled):
    _, _, compiled = qat_and_compiled
    rep = compiled.report()
    assert len(rep.quantized) == 12 and {r.precision for r in rep.quantized} == {"W4A4 asym"}
    # one CPU backend for every linear: the int8 one where the CPU has int8 dot products, else the reference
    assert {r.backend for r in rep.quantized} in ({"cpu"}, {"reference"})
    float_names = [name for name, _ in rep.float_parts]
    assert "bert.pooler.dense" in float_names and "classifier" in float_names
    text = str(rep)
    assert "layer1.ffn_out" in text and "quantize_other=False" in text
    assert "GELU of its input fused into the quantizer" in text  # layerN.ffn_out: fuse_gelu_quantize


def test_compiling_a_float_model_is_ptq_and_warns():
    model = make("bert", layers=1)
    with pytest.warns(qfx.PostTrainingQuantizationWarning, match="post-training"):
        compiled = qfx.compile(model, mode="int8", target="cpu", example_kwargs=inputs(2, 8))
    assert "post-training" in compiled.report().origin
    x = inputs(2, 6)
    err = (compiled(**x).last_hidden_state - model(**x).last_hidden_state).abs().max()
    assert err < 0.2  # W8A8 PTQ of a random tiny BERT: close, not exact


def test_fp16_mode_quantizes_nothing_and_says_so():
    model = make("bert", layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PTQ warning for fp16
        compiled = qfx.compile(model, mode="fp16", target="cpu", example_kwargs=inputs(2, 8))
    rep = compiled.report()
    assert rep.quantized == [] and all(r.precision == "float16" for r in rep.linears)


def test_quantize_other_covers_pooler_and_classifier():
    model = make("bert_cls", layers=1)
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=qfx.QuantConfig(8, 8, quantize_other=True))
    names = {r.name for r in qfx.compile(qat, mode="int8").report().quantized}
    assert {"bert.pooler.dense", "classifier"} <= names


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="int3"), "mode"),
        (dict(mode="int8"), "mode"),  # the QAT model was trained for int4
        (dict(target="sm_75"), "target"),
        (dict(config=qfx.QuantConfig(8, 8)), "config"),
    ],
)
def test_bad_compile_arguments(qat_and_compiled, kwargs, match):
    _, qat, _ = qat_and_compiled
    with pytest.raises(ValueError, match=match):
        qfx.compile(qat, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_gpu_target_without_gpu_is_a_clear_error(qat_and_compiled):
    _, qat, _ = qat_and_compiled
    with pytest.raises(ValueError, match="CUDA"):
        qfx.compile(qat, mode="int4", target="sm_90")


def test_bad_inputs_name_the_parameter(qat_and_compiled):
    _, qat, compiled = qat_and_compiled
    for model in (qat, compiled):
        with pytest.raises(ValueError, match="input_ids.*empty batch"):
            model(input_ids=torch.zeros(0, 4, dtype=torch.long), attention_mask=torch.zeros(0, 4, dtype=torch.long))
        with pytest.raises(ValueError, match="input_ids.*longer than the model supports"):
            model(**inputs(1, 65))


def test_inputs_on_another_device_than_the_capture_are_a_clear_error(qat_and_compiled):
    _, qat, _ = qat_and_compiled  # captured on the CPU
    x = {k: v.to("meta") for k, v in inputs(2, 8).items()}
    with pytest.raises(ValueError, match="input_ids is on meta, but this graph was captured on cpu.*before qfx.prepare_qat"):
        qat(**x)


def test_nan_weights_are_rejected():
    model = make("bert", layers=1)
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="encoder.layer.0.output.dense.weight.*NaN"):
        qfx.prepare_qat(model, example_kwargs=inputs(2, 8))


def test_lowered_graph_exports_and_compiles(qat_and_compiled):
    _, _, compiled = qat_and_compiled
    gm = compiled.graph_module
    x = {**inputs(2, 8), "token_type_ids": torch.zeros(2, 8, dtype=torch.long)}  # the graph's own inputs
    ep = torch.export.export(gm, (), x, strict=False)
    assert any(n.target == torch.ops.qfx.int_linear.default for n in ep.graph.nodes)
    fn = torch.compile(gm, backend="aot_eager", dynamic=False)
    assert torch.allclose(fn(**x).logits, gm(**x).logits)


@pytest.mark.slow
def test_real_minilm_w4a4_compiles_and_matches_its_qat_twin(minilm_w4a4):
    qat, other = minilm_w4a4
    compiled = qfx.compile(qat, mode="int4", target="cpu")
    checks = compare_linears(qat, compiled, **other)
    assert len(checks) == 36 and all(c.ok and c.max_abs_error == 0 for c in checks)
    assert torch.equal(compiled(**other).logits, qat(**other).logits)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpu_backend_says_why_it_is_unavailable():
    ok, why = qfx.backends.CutlassBackend().available()
    assert not ok and len(why) > 10  # e.g. "no CUDA device visible" or "libqfx_cutlass.so not built ..."


def test_float_dtype_sets_the_precision_of_the_float_parts(qat_and_compiled):
    _, qat, _ = qat_and_compiled
    compiled = qfx.compile(qat, mode="int4", target="cpu", float_dtype=torch.bfloat16)
    assert compiled.report().run_dtype == "bfloat16"
    x = inputs(2, 9)
    out = compiled(**x).logits
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), qat(**x).logits, atol=0.1)
    with pytest.raises(ValueError, match="float_dtype"):
        qfx.compile(qat, mode="int4", target="cpu", float_dtype=torch.int8)


def test_float_inputs_are_captured_in_the_float_parts_dtype():
    """A model taking float inputs compiled with fp16 float parts is called with fp16 inputs (the
    benchmark's Linear table compiled from an fp32 example and then refused fp16 calls)."""
    lin = torch.nn.Sequential(torch.nn.Linear(32, 16)).eval()
    with pytest.warns(qfx.PostTrainingQuantizationWarning):
        cm = qfx.compile(lin, mode="int8", target="cpu", example_args=(torch.randn(2, 8, 32),), float_dtype=torch.float16,
                         config=qfx.QuantConfig(8, 8, quantize_other=True))
    x = torch.randn(3, 8, 32)
    out = cm(x.half())
    assert out.dtype == torch.float16 and out.shape == (3, 8, 16)
    with pytest.raises(ValueError, match="float16"):
        cm(x)  # fp32 given to an fp16 model: a clear error, never a silent cast


# --------------------------------------------------------------------------- one parse of the arguments (issue 21)


@pytest.mark.parametrize("spelling, mode, run_dtype", [("FP16", "fp16", "float16"), ("half", "fp16", "float16"),
                                                         (" W8A8 ", "int8", "float32"), ("INT4", "int4", "float32")])
def test_every_spelling_of_a_mode_compiles_what_its_canonical_name_compiles(spelling, mode, run_dtype):
    """mode='FP16' / 'half' used to run fp32 float parts on the CPU while 'fp16' ran fp16, and the
    report printed the raw spelling: the mode is parsed once and only the parsed value is used."""
    model, x = make("bert", layers=1), inputs(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
        spelled = qfx.compile(model, mode=spelling, target="cpu", example_kwargs=x)
        canonical = qfx.compile(model, mode=mode, target="cpu", example_kwargs=x)
    assert (spelled.report().mode, spelled.report().run_dtype) == (mode, run_dtype)
    assert spelled.report().render() == canonical.report().render()
    with torch.no_grad():
        assert torch.equal(spelled(**x).last_hidden_state, canonical(**x).last_hidden_state)


def test_mode_none_takes_the_qat_models_trained_width():
    qat = qfx.prepare_qat(make("bert", layers=1), example_kwargs=inputs(2, 8), config=qfx.QuantConfig(8, 8))
    assert qfx.compile(qat, mode=None).report().mode == "int8"


def _gpt2(hidden=64):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=1, n_embd=hidden, n_head=2, vocab_size=97, n_positions=64, bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("spelling, mode", [("w4a16", "w4a16"), ("W4A8", "w4a8")])
def test_a_decoder_mode_names_the_decoder_entry_point_and_that_call_runs(spelling, mode):
    """qfx.compile(decoder, mode='w4a16') answered "mode='w4a16' is not one of ('int4', 'int8', 'fp16')"
    although qfx.decoders.quantize_decoder does exactly that: it names that call."""
    from qfx.decoders import quantize_decoder

    gpt2 = _gpt2()
    with pytest.raises(ValueError, match=rf"GPT2LMHeadModel is a causal LM; quantize it with "
                                         rf"qfx\.decoders\.quantize_decoder\(model, mode='{mode}'\)"):
        qfx.compile(gpt2, mode=spelling)
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        assert quantize_decoder(gpt2, mode=mode)(input_ids=ids).logits.shape == (2, 8, 97)


def test_a_decoder_mode_on_an_encoder_names_the_compile_call_with_that_precision():
    model, x = make("bert", layers=1), inputs(2, 8)
    with pytest.raises(ValueError, match=r"qfx\.compile\(model, mode='int4', config=qfx\.QuantConfig\(weight_bits=4, act_bits=16\)\)"):
        qfx.compile(model, mode="w4a16", example_kwargs=x)
    with pytest.warns(qfx.PostTrainingQuantizationWarning):
        cm = qfx.compile(model, mode="int4", config=qfx.QuantConfig(weight_bits=4, act_bits=16), example_kwargs=x)
    assert cm.report().quantized and all(r.precision.startswith("W4A16") for r in cm.report().quantized)


# --------------------------------------------------------------------------- wrapper adapters (issue 21)


class _Pooled(torch.nn.Module):
    """A toy wrapper around an encoder (what a SentenceTransformer is to qfx): mean-pooled states."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, batch):
        return self.encoder(**batch).last_hidden_state.mean(1)


@pytest.fixture
def pooled_adapter(monkeypatch):
    """A WrapperAdapter for _Pooled, registered for one test; records what compile hands it."""
    from qfx.api import WrapperAdapter, register_wrapper_adapter

    monkeypatch.setattr(qfx.api, "_WRAPPER_ADAPTERS", dict(qfx.api._WRAPPER_ADAPTERS))
    seen = []

    def compile_pooled(w, mode, target, example_args, example_kwargs, config, skip, float_dtype, remove_padding):
        seen.append((mode, target.name, float_dtype, remove_padding))
        return _Pooled(qfx.compile(w.encoder, mode, target, example_args, example_kwargs, config, skip, float_dtype,
                                   remove_padding=remove_padding))

    register_wrapper_adapter(WrapperAdapter(
        name="Pooled",
        matches=lambda m: isinstance(m, _Pooled),
        encoder_of=lambda w: w.encoder,
        prepare_qat=lambda w, args, kwargs, config, skip: _Pooled(qfx.prepare_qat(w.encoder, args, kwargs, config, skip)),
        compile=compile_pooled,
        run=lambda w, batches: [w(b) for b in batches],
    ))
    return seen


def test_a_registered_wrapper_goes_through_its_adapter_with_the_parsed_arguments(pooled_adapter):
    x = inputs(2, 8)
    qat = qfx.prepare_qat(_Pooled(make("bert", layers=1)), example_kwargs=x, config=qfx.QuantConfig(8, 8)).eval()
    assert isinstance(qat, _Pooled) and qfx.is_qat_model(qat.encoder)
    compiled = qfx.compile(qat, mode=None, target="CPU")  # the width of the encoder's trained config
    assert pooled_adapter == [("int8", "cpu", torch.float32, False)]
    with torch.no_grad():
        assert torch.equal(compiled(x), qat(x))
    qfx.compile(qat, mode="W8A8", remove_padding=True)
    assert pooled_adapter[-1] == ("int8", "cpu", torch.float32, True)
    qfx.compile(_Pooled(make("bert", layers=1)), mode="half", example_kwargs=x)  # a float wrapper
    assert pooled_adapter[-1] == ("fp16", "cpu", torch.float16, False)
    for option in (dict(tune=True), dict(cuda_graphs=False), dict(buckets=qfx.Buckets())):
        with pytest.raises(ValueError, match=rf"{next(iter(option))}=\.\.\.: not supported for a Pooled yet; compile its encoder"):
            qfx.compile(qat, mode="int8", **option)


def test_gptq_init_reaches_a_wrappers_encoder_through_its_adapter(pooled_adapter):
    from qfx.train.gptq_init import gptq_init

    x = inputs(2, 8)
    qat = qfx.prepare_qat(_Pooled(make("bert", layers=1, hidden=64)), example_kwargs=x, config=qfx.QuantConfig(4, 4))
    errs = gptq_init(qat, [inputs(4, 16, seed=s) for s in range(2)])  # run by the adapter: qat(batch) per batch
    assert len(errs) == 6 and sum(g for _, g in errs.values()) < sum(r for r, _ in errs.values())


def test_imports_point_down_the_floors():
    """api imports no package above it (wrappers register instead) and the numerics floor imports
    only itself and the ground floor; imports inside functions count."""
    import ast
    from pathlib import Path

    root = Path(qfx.__file__).parent

    def qfx_imports(path):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module:  # from qfx import numerics -> qfx.numerics
                names += [f"qfx.{a.name}" for a in n.names] if n.module == "qfx" else [n.module]
        return {n for n in names if n == "qfx" or n.startswith("qfx.")}

    above_api = ("qfx.train", "qfx.embeddings", "qfx.decoders", "qfx.cli")
    assert not [m for m in qfx_imports(root / "api.py") if m.startswith(above_api)]
    ground = ("qfx.numerics", "qfx._version", "qfx.config", "qfx.targets", "qfx.models")
    for path in sorted((root / "numerics").glob("*.py")):
        assert all(m.startswith(ground) for m in qfx_imports(path)), (path.name, qfx_imports(path))
