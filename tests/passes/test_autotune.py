"""The per-part autotuner: precision rules, modelled vs measured plans, the on-disk cache, the
plan report and ``python -m qfx plan`` (CPU; the measured path runs on fake launchers)."""
from __future__ import annotations

import json

import pytest
import torch

from qfx.tune import autotune as at
from qfx.tune.cli import plan_main
from qfx.tune.cost_model import MODEL_SHAPES, ModelShape
from qfx.tune.plan_report import plan_rows, render_plan

BASE = MODEL_SHAPES["bert-base"]
IDENTITY = {"gpu": "Fake GPU 9000", "driver": "580.1", "library": "qfx 0.1.0, torch x"}


def test_allowed_precisions_never_lower_than_trained():
    assert at.allowed_precisions("int4") == ("int4", "int8", "fp16")
    assert at.allowed_precisions("int8") == ("int8", "fp16")
    assert at.allowed_precisions("fp16") == ("fp16",)
    with pytest.raises(ValueError, match="trained precision 'int2'"):
        at.allowed_precisions("int2")


def test_scenario_parsing_and_model_limits():
    assert at.Scenario.of(batch=32, seq=128).buckets == ((32, 128),)
    assert at.Scenario.of(buckets=[(1, 128), (32, 384)]).buckets == ((1, 128), (32, 384))
    for bad in (dict(batch=32), dict(batch=0, seq=8), dict(buckets=[]), dict(batch=1, seq=8, buckets=[(1, 8)])):
        with pytest.raises(ValueError, match="Scenario"):
            at.Scenario.of(**bad)
    with pytest.raises(ValueError, match="at most 512 tokens"):
        at.autotune(BASE, "sm_86", at.Scenario.of(batch=1, seq=1024))


@pytest.mark.parametrize("target", ["sm_80", "sm_86", "sm_89", "sm_90"])
@pytest.mark.parametrize("bs_seq", [(1, 128), (32, 128), (128, 384)])
def test_modelled_plan_is_marked_and_never_slower_than_a_fixed_strategy(target, bs_seq):
    plan = at.autotune(BASE, target, at.Scenario.of(batch=bs_seq[0], seq=bs_seq[1]), "int4", measure=False)
    assert plan.source == "modelled" and "modelled" in plan.origin and "not measured" in plan.origin
    b = plan.buckets[0]
    assert len(b.choices) == 4 * BASE.layers
    assert set(b.fixed_us) == {"all-int4", "q3-only", "all-fp16"}
    assert b.latency_us <= min(b.fixed_us.values()) * (1 + 1e-9)
    for c in b.choices:
        assert c.precision in at.allowed_precisions(c.spec.trained)
        assert c.us == min(x.us for x in c.candidates)


def test_int8_trained_never_gets_int4_and_float_parts_stay_fp16():
    plan = at.autotune(BASE, "sm_86", at.Scenario.of(batch=64, seq=512), {"qkv": "int8", "ffn_in": "int8", "ffn_out": "int8"},
                       fused_quantize=True, fused_epilogue=True)
    for c in plan.buckets[0].choices:
        assert c.precision != "int4"
        if c.spec.part == "attn_out":
            assert c.precision == "fp16" and len(c.candidates) == 1
    assert any(c.precision == "int8" for c in plan.buckets[0].choices)


def test_large_m_quantizes_and_the_paper_pipeline_quantizes_more():
    today = at.autotune(BASE, "sm_90", at.Scenario.of(batch=128, seq=128), "int4")
    paper = at.autotune(BASE, "sm_90", at.Scenario.of(batch=128, seq=128), "int4", fused_quantize=True)
    n_today = sum(c.precision != "fp16" for c in today.buckets[0].choices)
    n_paper = sum(c.precision != "fp16" for c in paper.buckets[0].choices)
    assert 0 < n_today <= n_paper == 4 * BASE.layers
    assert paper.buckets[0].latency_us < today.buckets[0].latency_us


def test_cpu_target_and_measuring_without_a_gpu_are_refused():
    with pytest.raises(ValueError, match="CPU"):
        at.autotune(BASE, "cpu", at.Scenario.of(batch=1, seq=8))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="measure=False"):
            at.autotune(BASE, "sm_86", at.Scenario.of(batch=1, seq=8), measure=True)


def _fake(monkeypatch, times, calls):
    """Pretend a GPU of the sm80 family is present and time fake kernels from a table."""
    monkeypatch.setattr(at, "_present_family", lambda: "sm80")

    def gemm(prec):
        def make(m, n, k, gelu):
            calls.append((prec, m, n, k))
            return [(f"{prec}-k{i}", (prec, i, m, n, k)) for i in range(2)]
        return make

    launchers = at.Launchers(gemm={p: gemm(p) for p in ("fp16", "int8", "int4")},
                             quantize=lambda m, k, bits: ("quantize", bits, m, k),
                             gelu=lambda m, n: ("gelu", m, n))
    return launchers, lambda token: times(token)


def _times(token):
    if token[0] == "quantize":
        return 2.0
    if token[0] == "gelu":
        return 1.0
    prec, i, m, n, k = token
    base = {"fp16": 10.0, "int8": 7.0, "int4": 5.0}[prec]
    return base + i  # kernel 0 is the faster one


def test_measured_plan_uses_the_launchers_and_the_cache(tmp_path, monkeypatch):
    calls = []
    launchers, timer = _fake(monkeypatch, _times, calls)
    shape = ModelShape("tiny", 64, 2, 256, 2, 128)
    cache = at.TuneCache(tmp_path, identity=IDENTITY)
    plan = at.autotune(shape, "sm_86", at.Scenario.of(batch=2, seq=64), "int4", launchers=launchers, cache=cache,
                       timer=timer, progress=False)
    assert plan.source == "measured" and plan.origin.startswith("measured on")
    for c in plan.buckets[0].choices:
        assert (c.precision, c.kernel) == ("int4", "int4-k0") and c.us == 5.0 + 2.0
        assert c.fp16_us == 10.0 + (1.0 if c.spec.part == "ffn_in" else 0.0)
    n_calls = len(calls)
    assert n_calls == 4 * 3  # every unique (part, shape) x precision once, not per layer
    saved = json.loads(cache.path.read_text())
    assert saved["gpu"] == IDENTITY["gpu"] and saved["format"] == 1 and len(saved["entries"]) > 0
    # second tune: everything from the cache, nothing launched or timed
    again = at.TuneCache(tmp_path, identity=IDENTITY)
    plan2 = at.autotune(shape, "sm_86", at.Scenario.of(batch=2, seq=64), "int4", launchers=launchers, cache=again,
                        timer=lambda fn: pytest.fail("timed despite the cache"), progress=False)
    assert len(calls) == n_calls
    assert plan2.buckets[0].choices == plan.buckets[0].choices


@pytest.mark.parametrize("field", ["gpu", "driver", "library"], ids=["another-device", "another-driver", "another-library"])
def test_a_cache_from_another_gpu_or_version_is_ignored_with_a_message(tmp_path, field):
    cache = at.TuneCache(tmp_path, identity=IDENTITY)
    cache.put("int8|k|1|2|3|0", 1.0)
    cache.save()
    other = dict(IDENTITY, **{field: IDENTITY[field] + " other"})
    if field == "gpu":  # another GPU name is another file; simulate a copied file
        (tmp_path / "fake_gpu_9000_other.json").write_text(cache.path.read_text())
    with pytest.warns(at.AutotuneCacheWarning, match=f"made for {field}"):
        ignored = at.TuneCache(tmp_path, identity=other)
    assert ignored.entries == {} and field in ignored.ignored


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1}), json.dumps([1, 2]),
                                     json.dumps({"format": 99, "entries": {}, **IDENTITY})])
def test_a_corrupt_cache_is_reported_and_ignored(tmp_path, content):
    path = at.TuneCache(tmp_path, identity=IDENTITY).path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    with pytest.warns(at.AutotuneCacheWarning, match=str(path.name)):
        cache = at.TuneCache(tmp_path, identity=IDENTITY)
    assert cache.entries == {}
    cache.put("x", 1.0)
    cache.save()  # rewritten cleanly
    assert at.TuneCache(tmp_path, identity=IDENTITY).entries == {"x": 1.0}


def test_plan_report_rows_and_text():
    plan = at.autotune(BASE, "sm_86", at.Scenario.of(buckets=[(1, 128), (32, 128)]), "int4")
    rows = plan_rows(plan, 1)
    assert [r["part"] for r in rows] == ["qkv", "attn_out", "ffn_in", "ffn_out"]
    assert all(r["layer"] == "0-11" and r["m"] == 4096 for r in rows)
    assert len(plan_rows(plan, 1, per_layer=True)) == 4 * 12
    text = render_plan(plan)
    assert text.count("MODELLED, not measured") == 2
    assert "predicted whole-model latency" in text and "q3-only" in text and "4096 x 2304 x 768" in text


def test_plan_cli_without_a_gpu(capsys, tmp_path):
    assert plan_main(["--model", "bert-base", "--target", "sm_86", "--batch", "32", "--seq", "128"]) == 0
    out = capsys.readouterr().out
    assert "bert-base on sm_86 (NVIDIA RTX A6000)" in out and "MODELLED" in out and "speedup vs fp16" in out
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 1024,
                               "num_attention_heads": 4, "max_position_embeddings": 128}))
    assert plan_main(["--model", str(cfg), "--target", "SM90", "--buckets", "1x128,8x64", "--mode", "int8"]) == 0
    assert capsys.readouterr().out.count("qfx plan:") == 2
    assert plan_main(["--model", str(cfg), "--target", "sm_90", "--batch", "1", "--seq", "256"]) == 2
    assert "at most 128 tokens" in capsys.readouterr().err
    assert plan_main(["--model", "bert-huge", "--target", "sm_90", "--batch", "1", "--seq", "8"]) == 2
    assert plan_main(["--model", "bert-base", "--target", "sm_75", "--batch", "1", "--seq", "8"]) == 2
    assert "choose one of" in capsys.readouterr().err


@pytest.mark.gpu
def test_measured_on_the_gpu_present(tmp_path):
    from qfx.targets import detect_target

    target = detect_target()
    plan = at.autotune(MODEL_SHAPES["minilm"], target, at.Scenario.of(batch=8, seq=128), "int8",
                       cache=at.TuneCache(tmp_path), progress=False)
    assert plan.source == "measured"
    assert all(c.us > 0 and c.fp16_us > 0 for c in plan.buckets[0].choices)


def test_part_specs_from_a_compiled_graph():
    import qfx
    from models import inputs, make

    model = make("bert", hidden=64, layers=2)
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=qfx.QuantConfig(4, 4), skip=("layer1.ffn_out",))
    cm = qfx.compile(qat, mode="int4", target="cpu")
    specs = at.part_specs_from_graph(cm.graph_module)
    by = {(s.layer, s.part): s for s in specs}
    assert by[(0, "ffn_in")] == at.PartSpec(0, "ffn_in", 256, 64, "int4")
    assert by[(1, "ffn_out")].trained == "fp16"  # skipped: stays float, only fp16 is allowed
    assert {s.part for s in specs} == {"qkv", "attn_out", "ffn_in", "ffn_out"}
    plan = at.autotune(None, "sm_86", at.Scenario.of(batch=8, seq=64), parts=specs)
    assert plan.buckets[0].choice(1, "ffn_out").precision == "fp16"
