"""The tuner knows the activation block (issue 23): ``QuantConfig(act_block=B)`` parts carry their
block and scheme from the graph into :class:`PartSpec`, the cost model prices them as the block
kernels (always modelled, and the plan says so), and ``python -m qfx plan --act-block B`` plans a
block-scaled model (bad values refused naming the option and the fix). CPU only."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import qfx
from models import inputs, make
from qfx.capture import capture
from qfx.passes.annotate import annotate
from qfx.targets import get_target
from qfx.tune import autotune as at
from qfx.tune import cost_model
from qfx.tune.cli import plan_main
from qfx.tune.cost_model import MODEL_SHAPES
from qfx.tune.parts import layer_parts, part_specs
from qfx.tune.plan_report import plan_rows

BASE = MODEL_SHAPES["bert-base"]
HIDDEN = 64


@pytest.fixture(scope="module")
def model():
    return make("bert", hidden=HIDDEN, layers=2)


def _annotated(model, **cfg):
    return annotate(capture(model, (), inputs(2, 16)), qfx.QuantConfig(4, 4, **cfg))


def test_a_compiled_block_scaled_model_gives_parts_with_its_block(model):
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8),
                          config=qfx.QuantConfig(4, 4, symmetric=False, act_block=32), skip=("layer1.ffn_out",))
    with qfx.backends.only("reference"):  # the exact oracle: the CPU backend has no block kernel
        cm = qfx.compile(qat, mode="int4", target="cpu")
    by = {(s.layer, s.part): s for s in at.part_specs_from_graph(cm.graph_module)}
    assert by[(0, "ffn_in")] == at.PartSpec(0, "ffn_in", 4 * HIDDEN, HIDDEN, "int4", act_block=32, symmetric=False)
    assert by[(0, "ffn_out")].act_block == 32 and by[(0, "ffn_out")].k == 4 * HIDDEN
    skipped = by[(1, "ffn_out")]  # float: no block, the cost model's defaults
    assert (skipped.trained, skipped.act_block, skipped.symmetric) == ("fp16", None, True)
    plan = at.autotune(None, "sm_90", at.Scenario.of(batch=64, seq=128), parts=list(by.values()))
    assert plan.source == "modelled" and "act_block=32" in plan.origin


def test_layer_parts_carry_the_block_and_ask_the_block_kernel_whether_the_norm_quantizes(model):
    sm90 = get_target("sm_90")
    parts = {(g.layer, g.part): g.spec for g in layer_parts(_annotated(model, act_block=32), sm90)}
    assert all(s.act_block == 32 and s.symmetric for s in parts.values())
    # qkv and ffn_in read a LayerNorm: the Triton block kernel takes K=64 in blocks of 32 (fp16)
    assert {p for (_, p), s in parts.items() if s.quantize_in_norm} == {"qkv", "ffn_in"}
    # the pass keeps torch's LayerNorm with fp32 float parts, and the block kernel wants a power of two >= 16
    fp32 = layer_parts(_annotated(model, act_block=32), sm90, torch.float32)
    assert not any(g.spec.quantize_in_norm for g in fp32)
    odd = layer_parts(_annotated(model, act_block=8), sm90)
    assert not any(g.spec.quantize_in_norm for g in odd)
    token = {(g.layer, g.part): g.spec for g in layer_parts(_annotated(model), sm90)}
    assert token.keys() == parts.keys()
    assert all(dataclasses.replace(parts[key], act_block=None) == token[key] for key in token)


def test_block_parts_are_priced_as_the_block_kernels():
    scenario = at.Scenario.of(batch=32, seq=384)
    token = at.autotune(BASE, "sm_86", scenario, "int4")
    block = at.autotune(BASE, "sm_86", scenario, "int4", act_block=128)
    asym = at.autotune(BASE, "sm_86", scenario, "int4", act_block=128, symmetric=False)
    assert block.source == asym.source == "modelled" and "act_block=128" in block.origin
    t, b, a = (p.buckets[0].choices[2] for p in (token, block, asym))  # layer 0 ffn_in
    assert b.spec.act_block == 128 and t.spec.act_block is None
    int4 = {name: next(c for c in choice.candidates if c.precision == "int4")
            for name, choice in (("t", t), ("b", b), ("a", a))}
    assert int4["b"].us != int4["t"].us and int4["a"].us > int4["b"].us  # asymmetric: the offset terms
    assert "act_block=128" in int4["b"].kernel
    want = cost_model.part_time("sm_86", "ffn_in", 32 * 384, BASE.ffn, BASE.hidden, "int4", gelu=True,
                                act_block=128, symmetric=True)
    assert int4["b"].us == pytest.approx(want.us)
    fp16 = [next(c for c in p.buckets[0].choices[2].candidates if c.precision == "fp16") for p in (token, block)]
    assert fp16[0] == fp16[1]  # the float candidate does not depend on the block
    assert block.buckets[0].latency_us != token.buckets[0].latency_us
    # the plan's table names the kernel that runs: on sm_86 the sm80 block kernel, not a token-wise CUTLASS config
    kernels = {r["kernel"] for r in plan_rows(block) if r["precision"] == "int4"}
    assert kernels and all(k.startswith("cutlass sm80 block s4") and "act_block=128" in k for k in kernels)
    assert not any("triton" in r["kernel"] for r in plan_rows(token))


def test_block_plans_are_modelled_never_measured(monkeypatch):
    monkeypatch.setattr(at, "_present_family", lambda: "sm80")  # a GPU of sm_86's family "present"
    plan = at.autotune(BASE, "sm_86", at.Scenario.of(batch=8, seq=128), "int4", act_block=128, cache=False,
                       launchers=at.Launchers(gemm={}), progress=False)
    assert plan.source == "modelled"
    with pytest.raises(ValueError, match=r"measure=True with block-scaled parts \(act_block=128\).*measure=False"):
        at.autotune(BASE, "sm_86", at.Scenario.of(batch=8, seq=128), "int4", act_block=128, measure=True)


def test_bad_blocks_and_mixed_forms_are_refused():
    for bad in (0, 1, True, 2.0, "128"):
        with pytest.raises(ValueError, match=r"act_block=.*block size such as 128"):
            part_specs(BASE, "int4", act_block=bad)
    with pytest.raises(ValueError, match=r"act_block=100 does not divide K=\[768, 3072\]"):
        part_specs(BASE, "int4", act_block=100)
    specs = part_specs(BASE, "int4", act_block=128)
    assert {s.act_block for s in specs} == {128}
    assert {s.act_block for s in part_specs(BASE, {"ffn_in": "int8"}, act_block=128) if s.trained == "fp16"} == {None}
    mixed = specs[:4] + [dataclasses.replace(specs[4], act_block=None)]
    with pytest.raises(ValueError, match="mix activation forms"):
        at.autotune(None, "sm_90", at.Scenario.of(batch=8, seq=128), parts=mixed)
    with pytest.raises(ValueError, match="parts carry their own"):
        at.autotune(None, "sm_90", at.Scenario.of(batch=8, seq=128), parts=specs, act_block=128)


def test_plan_cli_act_block(capsys):
    args = ["--model", "bert-base", "--target", "sm_90", "--batch", "128", "--seq", "128", "--mode", "int8"]
    assert plan_main(args) == 0
    token = capsys.readouterr().out
    assert plan_main(args + ["--act-block", "128"]) == 0
    block = capsys.readouterr().out
    assert "MODELLED, not measured" in block and "act_block=128" in block and "act_block" not in token
    latency = [line for text in (token, block) for line in text.splitlines() if "predicted whole-model latency" in line]
    assert len(latency) == 2 and latency[0] != latency[1]
    rows = [[line for line in text.splitlines() if line.startswith(" 0-11")] for text in (token, block)]
    assert len(rows[0]) == len(rows[1]) == 4 and rows[0] != rows[1]
    for bad, why in (("abc", "whole number"), ("0", "block size such as 128"), ("1.5", "whole number"),
                     ("100", "does not divide K=[768, 3072]")):
        assert plan_main(args + ["--act-block", bad]) == 2
        err = capsys.readouterr().err
        assert "--act-block" in err and why in err, err
    assert plan_main(args + ["--act-block", "128", "--measure"]) == 2
    assert "drop --measure" in capsys.readouterr().err
