"""Capture: every supported family exports with dynamic batch and sequence and computes
exactly what eager computes; failures say what to do."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import FAMILIES, first_tensor, inputs, make

import qfx
from qfx.capture import FixedDimWarning

_CAPTURED: dict[str, tuple] = {}


def _captured(family: str):
    if family not in _CAPTURED:
        model = make(family)
        _CAPTURED[family] = (model, qfx.capture(model, example_kwargs=inputs(2, 8)))
    return _CAPTURED[family]


@pytest.mark.parametrize("family", FAMILIES)
@given(batch=st.integers(1, 4), seq=st.integers(1, 40), seed=st.integers(0, 1000))
def test_capture_equals_eager_for_any_batch_and_seq(family, batch, seq, seed):
    model, gm = _captured(family)
    x = inputs(batch, seq, seed)
    with torch.no_grad():
        assert torch.equal(first_tensor(gm(**x)), first_tensor(model(**x)))


def test_capture_keeps_the_output_structure():
    model, gm = _captured("bert_cls")
    out = gm(**inputs(2, 5))
    assert type(out).__name__ == "SequenceClassifierOutput" and out.logits.shape == (2, 2)


def test_capture_records_what_it_learned():
    _, gm = _captured("bert")
    info = gm.meta["qfx_capture"]
    assert info.model_class == "BertModel" and info.max_seq_len == 64 and info.dynamic


def test_example_longer_than_the_model_supports_is_rejected():
    with pytest.raises(ValueError, match="exceeds"):
        qfx.capture(make("bert"), example_kwargs=inputs(2, 65))


def test_empty_example_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        qfx.capture(make("bert"), example_kwargs={"input_ids": torch.zeros(0, 4, dtype=torch.long)})


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: export cannot capture it
            return self.lin(x)
        return x


class _Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _DataDependent()

    def forward(self, x):
        return self.block(x) + 1


def test_uncapturable_model_gets_an_error_naming_the_module_and_the_fix():
    with pytest.raises(qfx.QfxCaptureError, match=r"(?s)in module block.*What to do"):
        qfx.capture(_Outer(), example_args=(torch.randn(2, 3, 4),))


def test_real_minilm_captures(minilm_path):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path, dtype=torch.float32).eval()
    batch = dict(tok(["qfx compiles encoders", "to integers"], padding=True, return_tensors="pt"))
    gm = qfx.capture(model, example_kwargs=batch)
    other = dict(tok(["a different batch of three", "b", "c c c"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        assert torch.equal(gm(**other).last_hidden_state, model(**other).last_hidden_state)


# ---------------------------------------------------------------- robustness (issue 8, item 4)


def test_sliced_non_contiguous_example_captures_and_serves_other_shapes():
    model = make("bert")
    big = inputs(4, 32)
    example = {k: v[:2, :16] for k, v in big.items()}  # a view with the big batch's strides
    assert not example["input_ids"].is_contiguous()
    gm = qfx.capture(model, example_kwargs=example)
    x = inputs(3, 11, seed=4)
    with torch.no_grad():
        assert torch.equal(gm(**x).last_hidden_state, model(**x).last_hidden_state)


def test_batch_one_example_then_batch_n_and_positional_args():
    model = make("bert")
    one = inputs(1, 8)
    gm = qfx.capture(model, example_args=(one["input_ids"], one["attention_mask"]))
    x = inputs(4, 5, seed=5)
    with torch.no_grad():
        assert torch.equal(gm(x["input_ids"], x["attention_mask"]).last_hidden_state, model(**x).last_hidden_state)
    assert gm.meta["qfx_capture"].dims["input_ids"] == ("batch", "seq")


class _TokenMLP(torch.nn.Module):
    """A model whose input's last dim is the feature dim: [tokens, hidden] or [batch, seq, hidden]."""

    def __init__(self, d=16):
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("shape, later, dims", [
    ((5, 16), (9, 16), ("tokens", 16)),
    ((2, 5, 16), (3, 7, 16), ("batch", "seq", 16)),
    ((1, 1, 16), (4, 3, 16), ("batch", "seq", 16)),
])
def test_float_inputs_keep_their_feature_dim_static(shape, later, dims):
    model = _TokenMLP().eval()
    gm = qfx.capture(model, example_args=(torch.randn(shape),))
    assert gm.meta["qfx_capture"].dims["x"] == dims
    x = torch.randn(later)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    with pytest.raises(ValueError, match=r"x has size 8 in dim .*expected 16"):
        gm(torch.randn(*later[:-1], 8))


def test_misspelt_example_keyword_is_named_with_a_suggestion():
    x = inputs(2, 8)
    with pytest.raises(ValueError, match=r"'atention_mask' is not a parameter of BertModel.forward.*did you mean 'attention_mask'"):
        qfx.capture(make("bert"), example_kwargs={"input_ids": x["input_ids"], "atention_mask": x["attention_mask"]})


class _FixedLength(torch.nn.Module):
    """Adds a position table of fixed length: the model itself fixes dim 1."""

    def __init__(self, d=16, n=8):
        super().__init__()
        self.pos, self.lin = torch.nn.Parameter(torch.randn(n, d)), torch.nn.Linear(d, d)

    def forward(self, x):
        return self.lin(x + self.pos)


def test_dims_the_model_fixes_are_recorded_and_checked():
    model = _FixedLength().eval()
    with pytest.warns(FixedDimWarning, match=r"_FixedLength fixes seq to 8 .*What to do: pad every input to seq = 8"):
        gm = qfx.capture(model, example_args=(torch.randn(2, 8, 16),))
    assert gm.meta["qfx_capture"].dims["x"] == ("batch", 8, 16)  # export's own fix: seq = 8
    x = torch.randn(5, 8, 16)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    with pytest.raises(ValueError, match=r"x has size 9 in dim 1 .*expected 8: _FixedLength fixed this dim when captured"):
        gm(torch.randn(2, 9, 16))


def test_a_sequence_length_the_model_fixes_is_said_at_capture_with_the_fix():
    """Canine's local attention loops over chunks in Python: export fixes seq (issue 22)."""
    model = make("canine")
    with pytest.warns(FixedDimWarning, match=r"CanineModel fixes seq to 8 .*padding='max_length', max_length=8"):
        gm = qfx.capture(model, example_kwargs=inputs(2, 8))
    x = inputs(3, 8, seed=1)
    with torch.no_grad():
        assert torch.equal(first_tensor(gm(**x)), first_tensor(model(**x)))
    with pytest.raises(ValueError, match=r"input_ids has size 11 in dim 1 .*CanineModel fixed this dim when captured.*pad"):
        gm(**inputs(2, 11))


def test_a_guard_no_range_expresses_keeps_seq_dynamic_and_is_said():
    """MobileBERT's trigram embedding slices [:, 1:]: export guards seq != 2, which no range
    expresses ("Constraints violated (seq)" before issue 22); capture keeps seq dynamic."""
    model = make("mobilebert")
    with pytest.warns(FixedDimWarning, match=r"MobileBertModel's forward guards seq \(\(\(-1\) \+ seq\) != 1\)"):
        gm = qfx.capture(model, example_kwargs=inputs(2, 8))
    assert gm.meta["qfx_capture"].dims["input_ids"] == ("batch", "seq")
    for batch, seq in ((1, 5), (3, 11), (2, 30)):
        x = inputs(batch, seq, seed=seq)
        with torch.no_grad():
            assert torch.equal(first_tensor(gm(**x)), first_tensor(model(**x)))


def test_a_data_dependent_model_is_refused_with_why_and_where():
    with pytest.raises(qfx.QfxCaptureError, match=(
            r"(?s)could not capture LongformerModel \(in module encoder.layer.0.attention.self\).*"
            r"modeling_longformer.py.*Why: LongformerModel computes a size or a branch from its inputs' values.*What to do")):
        qfx.capture(make("longformer"), example_kwargs=inputs(2, 8))


def test_float_mask_shaped_like_the_ids_keeps_batch_and_seq_dynamic():
    model = make("bert")
    x = {**inputs(2, 8), "attention_mask": inputs(2, 8)["attention_mask"].float()}
    gm = qfx.capture(model, example_kwargs=x)
    assert gm.meta["qfx_capture"].dims["attention_mask"] == ("batch", "seq")
    y = {**inputs(3, 5), "attention_mask": inputs(3, 5)["attention_mask"].float()}
    with torch.no_grad():
        assert torch.equal(gm(**y).last_hidden_state, model(**y).last_hidden_state)
