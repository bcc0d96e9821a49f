"""Bad input at call time, tried as a new user would: each gets a ValueError naming the
argument, what was given and what is expected (not torch's or export's raw message)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from models import inputs, make

import qfx

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models():
    """(QAT twin, compiled model) of a tiny BERT classifier, both checked on every call."""
    qat = qfx.prepare_qat(make("bert_cls"), example_kwargs=inputs(2, 8), config=qfx.QuantConfig(8, 8)).eval()
    return {"qat": qat, "compiled": qfx.compile(qat, mode="int8", target="cpu")}


def _bad(batch: dict) -> dict:
    return {**inputs(2, 8), **batch}


BAD = {
    "float16 input_ids": (
        lambda: _bad({"input_ids": inputs(2, 8)["input_ids"].half()}),
        r"input_ids has dtype torch.float16, expected torch.int64.*\.long\(\)",
    ),
    "1-D input_ids": (
        lambda: {"input_ids": inputs(1, 8)["input_ids"][0]},
        r"input_ids is 1-D \(shape \(8,\)\), expected 2-D \[batch, seq\].*unsqueeze\(0\)",
    ),
    "misspelt keyword": (
        lambda: {"input_ids": inputs(2, 8)["input_ids"], "atention_mask": inputs(2, 8)["attention_mask"]},
        r"'atention_mask' is not an input of BertForSequenceClassification.forward; did you mean 'attention_mask'",
    ),
    "attention_mask of the wrong length": (
        lambda: _bad({"attention_mask": torch.ones(2, 9, dtype=torch.long)}),
        r"attention_mask has seq size 9 \(shape \(2, 9\)\), but input_ids has 8",
    ),
    "sequence over the model's limit": (
        lambda: inputs(2, 65),
        r"input_ids has sequence length 65, longer than the model supports \(64\); truncate",
    ),
    "wrong batch in one input": (
        lambda: _bad({"token_type_ids": torch.zeros(3, 8, dtype=torch.long)}),
        r"token_type_ids has batch size 3 .* but input_ids has 2",
    ),
}


@pytest.mark.parametrize("which", ["qat", "compiled"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_argument_given_and_expected(models, which, case):
    make_batch, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        models[which](**make_batch())


#: values no compiled model can run: a clear error naming the input and the fix
BAD_VALUES = {
    "meta tensors": (lambda x: {k: v.to("meta") for k, v in x.items()}, r"input_ids is a meta tensor \(a shape without data\)"),
    "lists": (lambda x: {k: v.tolist() for k, v in x.items()}, r"input_ids is a list, not a torch.Tensor; pass torch.as_tensor"),
    "numpy arrays": (lambda x: {k: v.numpy() for k, v in x.items()}, r"input_ids is a numpy.ndarray, not a torch.Tensor"),
    "a positional list": (lambda x: (x["input_ids"].tolist(),), r"input_ids is a list, not a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_compiled_model_refuses_values_it_cannot_run(models, case):
    """Issue 22: meta tensors hit "Cannot copy out of meta tensor", lists and numpy arrays
    answered "missing inputs ['attention_mask', ...]"."""
    make_call, match = BAD_VALUES[case]
    call = make_call(inputs(2, 8))
    with pytest.raises(ValueError, match=match):
        models["compiled"](*call) if isinstance(call, tuple) else models["compiled"](**call)


@pytest.mark.parametrize("convert", [lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.to(torch.float16),
                                     lambda m: m.to("cpu", torch.float64), lambda m: m.float()])
def test_changing_a_compiled_models_dtype_names_float_dtype(models, convert):
    """``compiled.half()`` converted the scales and failed at the next call with "mixed dtype"."""
    x = inputs(2, 8)
    with torch.no_grad():
        before = models["compiled"](**x).logits
    with pytest.raises(ValueError, match=r"dtypes are fixed when it is compiled.*float_dtype=torch.float16"):
        convert(models["compiled"])
    with torch.no_grad():
        assert torch.equal(models["compiled"].to("cpu")(**x).logits, before)  # untouched; a device-only .to passes


def test_outputs_with_grad_enabled_are_ordinary_tensors_a_head_can_backpropagate_through(models):
    """The outputs were inference tensors even with grad enabled, so
    ``head(compiled(**b).logits).backward()`` failed."""
    x = inputs(2, 8)
    out = models["compiled"](**x).logits
    assert not out.is_inference()
    head = torch.nn.Linear(out.shape[-1], 1)
    head(out).sum().backward()
    assert head.weight.grad is not None and torch.equal(head.weight.grad[0], out.sum(0))
    with torch.inference_mode():
        assert models["compiled"](**x).logits.is_inference()  # no copy where no autograd can follow
    with torch.no_grad():
        assert torch.equal(models["compiled"](**x).logits, out)


def _bert_example(**changes) -> dict:
    return {**inputs(2, 8), **changes}


BAD_EXAMPLES = {
    "float input_ids": (
        lambda: _bert_example(input_ids=inputs(2, 8)["input_ids"].float()),
        r"example input input_ids has dtype torch.float32; token ids .* integers: pass input_ids.long\(\)",
    ),
    "a key **kwargs would swallow": (
        lambda: _bert_example(foo=torch.ones(2, 8)),
        r"example_kwargs\['foo'\]: 'foo' is not a named parameter of BertModel.forward .*its \*\*kwargs would take it "
        r"and the captured model would require it on every call: drop it$",
    ),
    "a misspelt key": (
        lambda: _bert_example(atention_mask=torch.ones(2, 8, dtype=torch.long)),
        r"'atention_mask' is not a named parameter .*: drop it \(did you mean 'attention_mask'\?\)",
    ),
    "an HF option": (
        lambda: _bert_example(output_hidden_states=True),
        r"'output_hidden_states' is not a named parameter .*: set model.config.output_hidden_states = True before capturing",
    ),
    "lists": (lambda: {k: v.tolist() for k, v in inputs(2, 8).items()}, r"example input input_ids is a list, not a torch.Tensor"),
}


@pytest.mark.parametrize("entry", ["prepare_qat", "compile"])
@pytest.mark.parametrize("case", list(BAD_EXAMPLES))
def test_bad_examples_are_refused_before_capture(entry, case):
    """Float input_ids failed inside torch.export with its raw message; an example key that HF's
    ``**kwargs`` swallows became an input the captured model required on every call."""
    make_example, match = BAD_EXAMPLES[case]
    fn = qfx.prepare_qat if entry == "prepare_qat" else qfx.compile
    with pytest.raises(ValueError, match=match):
        fn(make("bert"), example_kwargs=make_example())


def test_the_config_route_the_hf_option_error_names_works():
    model = make("bert")
    model.config.output_hidden_states = True
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8))
    assert len(qat(**inputs(1, 5)).hidden_states) == model.config.num_hidden_layers + 1


def test_readme_names_resolve_after_a_plain_import_qfx():
    """``qfx.models.minilm_path()`` and ``qfx.runtime.verify.compare_linears`` as the README writes
    them, in a fresh interpreter (no earlier import of the submodules)."""
    code = "import qfx; print(qfx.models.minilm_path().name, qfx.runtime.verify.compare_linears.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "compare_linears"


def test_good_input_still_runs_after_the_checks(models):
    """Positional args, batch 1, and another length pass the checks and agree."""
    x = inputs(1, 13)
    a = models["compiled"](x["input_ids"], x["attention_mask"]).logits
    assert torch.equal(a, models["qat"](**x).logits)


def test_compiling_a_compiled_model_is_a_clear_error(models):
    with pytest.raises(ValueError, match=r"already a qfx CompiledModel.*compile that one again"):
        qfx.compile(models["compiled"], mode="int8")


@pytest.mark.gpu
def test_sequence_over_the_limit_on_the_gpu_path():
    qat = qfx.prepare_qat(make("bert"), example_kwargs=inputs(2, 8), config=qfx.QuantConfig(4, 4)).eval()
    compiled = qfx.compile(qat, mode="int4", target=qfx.detect_target().name)
    with pytest.raises(ValueError, match="input_ids has sequence length 65, longer than the model supports"):
        compiled(**{k: v.cuda() for k, v in inputs(2, 65).items()})


def test_running_next_to_a_checkout_imports_the_package_not_the_folder(tmp_path):
    """Issue 8, item 6: a script run from the folder that holds a checkout called ``qfx``
    used to import the checkout as an empty namespace package."""
    (tmp_path / "qfx").symlink_to(ROOT, target_is_directory=True)
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent("""
        import qfx
        print(qfx.prepare_qat.__module__, qfx.__file__)
    """))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["qfx.api", str(ROOT / "qfx" / "__init__.py")]
    # Without an installed qfx (no site-packages: python -S) the guard says what to do.
    bare = subprocess.run([sys.executable, "-S", "-c", "import qfx"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert bare.returncode != 0 and "found the qfx checkout" in bare.stderr and "pip install -e ." in bare.stderr
