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
