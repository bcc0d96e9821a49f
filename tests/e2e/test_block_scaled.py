"""Block-scaled activations end to end (CPU): QAT twin == compiled model bit for bit, the plan and
the report know the block, save / load keeps it, bad input gets clear errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import inputs, make

import qfx
from qfx.schema import INT_LINEAR, QUANTIZE, arg, is_call


def _compile_on_reference(qat, mode):
    """The exact oracle (float64 sums); the default CPU plan (the CPU backend) is compared with it below."""
    with qfx.backends.only("reference"):
        return qfx.compile(qat, mode=mode, target="cpu")


def _lowered_nodes(cm):
    return [n for n in cm.graph_module.graph.nodes if is_call(n, (INT_LINEAR, QUANTIZE))]


@settings(max_examples=6, deadline=None)
@given(bits=st.sampled_from([4, 8]), symmetric=st.booleans(), block=st.sampled_from([16, 32]),
       grouped=st.booleans(), seed=st.integers(0, 100))
def test_compiled_block_scaled_model_is_its_qat_twin_bit_for_bit(bits, symmetric, block, grouped, seed):
    model = make("bert_cls", layers=1, seed=seed)
    cfg = qfx.QuantConfig(bits, bits, symmetric=symmetric, weight_group=block if grouped else "row", act_block=block)
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=cfg).eval()
    x = inputs(3, 8, seed=seed + 1)
    want = qat(**x).logits
    assert torch.equal(_compile_on_reference(qat, f"int{bits}")(**x).logits, want)
    assert torch.equal(qfx.compile(qat, mode=f"int{bits}", target="cpu")(**x).logits, want)  # the CPU backend


@pytest.fixture(scope="module")
def w4a4_blocks():
    model = make("bert_cls", layers=1)
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=qfx.QuantConfig(4, 4, symmetric=False, act_block=16))
    return model, qat.eval(), _compile_on_reference(qat, "int4")


def test_every_quantize_and_linear_carries_the_block_and_the_report_says_so(w4a4_blocks):
    _, _, compiled = w4a4_blocks
    nodes = _lowered_nodes(compiled)
    assert nodes and all(arg(n, "act_block") == 16 for n in nodes)
    rows = compiled.report().quantized
    assert rows and all("ablk16" in r.precision for r in rows)


def test_block_scaled_differs_from_token_wise_and_token_wise_graphs_are_unchanged(w4a4_blocks):
    model, qat, _ = w4a4_blocks
    token = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=qfx.QuantConfig(4, 4, symmetric=False)).eval()
    x = inputs(2, 8, seed=3)
    assert not torch.equal(token(**x).logits, qat(**x).logits)
    compiled = _compile_on_reference(token, "int4")
    assert all("act_block" not in n.kwargs for n in _lowered_nodes(compiled))


def test_save_load_keeps_the_block(w4a4_blocks, tmp_path):
    _, qat, compiled = w4a4_blocks
    again = qfx.load(qfx.save(compiled, tmp_path / "blocks.qfx.safetensors"))
    x = inputs(2, 8, seed=5)
    assert torch.equal(again(**x).logits, qat(**x).logits)


def test_block_scaled_qat_state_does_not_load_into_a_token_wise_model(w4a4_blocks):
    model, qat, _ = w4a4_blocks
    token = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=qfx.QuantConfig(4, 4, symmetric=False))
    with pytest.raises(ValueError, match=r"act_block=16\).*prepared with act_block=None.*act_block=16"):
        token.load_state_dict(qat.state_dict())
    with pytest.raises(ValueError, match=r"act_block=None\).*prepared with act_block=16"):
        qat.load_state_dict(token.state_dict())


def test_default_cpu_plan_runs_block_scaled_linears_on_the_cpu_backend(w4a4_blocks):
    _, qat, on_reference = w4a4_blocks
    compiled = qfx.compile(qat, mode="int4", target="cpu")
    x = inputs(2, 8, seed=7)
    assert torch.equal(compiled(**x).logits, qat(**x).logits)
    assert torch.equal(compiled(**x).logits, on_reference(**x).logits)
    rows = compiled.report().quantized
    available, why = qfx.backends.CpuBackend().available()
    assert {r.backend for r in rows} == ({"cpu"} if available else {"reference"}), why
    if available:  # bound launchers, not the dispatcher
        assert compiled.launch_plan.bound and set(compiled.launch_plan.bound.values()) == {"cpu"}


def test_a_block_below_the_cpu_gemm_granularity_runs_on_the_reference_and_says_why():
    model = make("bert_cls", layers=1)
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=qfx.QuantConfig(8, 8, act_block=4)).eval()
    compiled = qfx.compile(qat, mode="int8", target="cpu")
    x = inputs(2, 8, seed=2)
    assert torch.equal(compiled(**x).logits, qat(**x).logits)
    rows = compiled.report().quantized
    assert {r.backend for r in rows} == {"reference"}
    if qfx.backends.CpuBackend().available()[0]:  # its refusal names the block, in the report
        assert all("act_block=4 is not a multiple of 8" in r.note for r in rows), [r.note for r in rows]


@pytest.mark.parametrize("entry", ["prepare_qat", "compile"])
def test_a_block_that_does_not_divide_k_is_a_clear_error(entry):
    model = make("bert_cls", layers=1)  # hidden 32: K = 32 (qkv, attn_out, ffn_in) and 128 (ffn_out)
    cfg = qfx.QuantConfig(8, 8, act_block=64)
    with pytest.raises(ValueError, match=r"QuantConfig\(act_block=64\) does not divide K=32 of linear layer0\.q"):
        if entry == "prepare_qat":
            qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=cfg)
        else:
            qfx.compile(model, mode="int8", target="cpu", example_kwargs=inputs(2, 8), config=cfg)
