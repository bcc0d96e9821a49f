"""``qfx.compile(..., tune=...)``: the per-part choice (qfx/tune/select.py) on a tiny BERT.

On the CPU the measured path runs on fake launchers and a fake timer (a pretend GPU of the
sm80 family), the modelled path on the cost model; the GPU test compiles with tune=True on
the GPU present and checks the output against the same compile with the equivalent skip.
"""
from __future__ import annotations

import pytest
import torch

import qfx
from models import inputs, make
from scripts import load_script
from qfx.capture import capture
from qfx.passes.annotate import annotate
from qfx.targets import get_target
from qfx.tune import Scenario
from qfx.tune import autotune as at
from qfx.tune.select import choose_parts, layer_parts, scenario_for_compile

IDENTITY = {"gpu": "Fake GPU 9000", "driver": "580.1", "library": "qfx test"}
HIDDEN = 64


@pytest.fixture(scope="module")
def model():
    return make("bert", hidden=HIDDEN, layers=2)


def _annotated(model, bits: int, skip=()):
    return annotate(capture(model, (), inputs(2, 16)), qfx.QuantConfig(bits, bits), skip)


@pytest.fixture(scope="module")
def int4_graph(model):
    return _annotated(model, 4)


def _gemm_us(prec: str, m: int, gelu: bool = False) -> float:
    """fp16 wins at small M (no quantize, no fixed cost), integer wins at large M; a GELU in
    the integer epilogue costs 1 us."""
    return 1.0 + 0.01 * m if prec == "fp16" else 4.0 + 0.002 * m + (1.0 if gelu else 0.0)


QUANTIZE_US, QUANTIZE_GELU_US, GELU_US, NORM_US, NORM_QUANTIZE_US = 2.0, 2.2, 1.0, 2.5, 3.0


def _fake_gpu(monkeypatch, timed: list):
    monkeypatch.setattr(at, "_present_family", lambda: "sm80")

    def gemm(prec):
        return lambda m, n, k, gelu: [(f"{prec}-kernel", ("gemm", prec, m, gelu))]

    launchers = at.Launchers(gemm={p: gemm(p) for p in ("fp16", "int8", "int4")},
                             quantize=lambda m, k, bits, gelu=False: ("quantize_gelu" if gelu else "quantize", m),
                             gelu=lambda m, n: ("gelu", m),
                             norm_quantize=lambda m, k, bits: (("norm_quantize", m), ("norm", m)))

    def timer(token):
        timed.append(token)
        kind, *rest = token
        if kind == "gemm":
            return _gemm_us(*rest)
        return {"quantize": QUANTIZE_US, "quantize_gelu": QUANTIZE_GELU_US, "gelu": GELU_US,
                "norm_quantize": NORM_QUANTIZE_US, "norm": NORM_US}[kind]
    return launchers, timer


def test_layer_parts_count_what_the_compiled_graph_runs(int4_graph):
    parts = {(p.layer, p.part): p for p in layer_parts(int4_graph, get_target("sm_86"))}
    assert len(parts) == 8
    qkv = parts[(0, "qkv")]
    assert qkv.names == ("layer0.q", "layer0.k", "layer0.v")
    # one fused integer GEMM of N = 3h reading one quantize, or three fp16 GEMMs of N = h
    assert (qkv.spec.n, qkv.spec.k, qkv.spec.fp16_gemms, qkv.spec.trained) == (3 * HIDDEN, HIDDEN, 3, "int4")
    # the quantize of qkv / ffn_in sits in the LayerNorm before them on a GPU with fp16 float parts
    assert {p: parts[(1, p)].spec.quantize_in_norm for p in ("qkv", "attn_out", "ffn_in", "ffn_out")} == \
        {"qkv": True, "attn_out": False, "ffn_in": True, "ffn_out": False}
    assert not any(p.spec.quantize_in_norm for p in layer_parts(int4_graph, get_target("sm_86"), torch.float32))


def test_precision_never_below_trained_and_parts_already_float_are_left_alone(model):
    gm = _annotated(model, 8, skip=("layer1.ffn_out",))
    decision = choose_parts(gm, "sm_90", Scenario.of(buckets=[(1, 16), (64, 64)]))
    assert decision.source == "modelled"
    parts = ("qkv", "attn_out", "ffn_in", "ffn_out")
    assert {(d.layer, d.part) for d in decision.parts} == {(l, p) for l in (0, 1) for p in parts} - {(1, "ffn_out")}
    for d in decision.parts:
        assert d.trained == "int8" and d.precision in ("int8", "fp16")
        assert d.precision == ("fp16" if d.fp16_us < d.trained_us else "int8")
    assert "layer1.ffn_out" not in decision.reasons  # the user's skip stays the user's


def test_measured_choice_skip_reasons_and_report(model, int4_graph, monkeypatch):
    timed = []
    launchers, timer = _fake_gpu(monkeypatch, timed)
    decision = choose_parts(int4_graph, "sm_86", Scenario.of(batch=1, seq=16), launchers=launchers, timer=timer,
                            cache=False, progress=False)
    assert decision.source == "measured" and timed
    # M = 16: fp16 (1.16 us per GEMM) beats int4 (4.03 us + its quantize) everywhere
    assert set(decision.skip) == {f"layer{l}.{n}" for l in (0, 1) for n in ("q", "k", "v", "attn_out", "ffn_in", "ffn_out")}
    qkv = next(d for d in decision.parts if d.part == "qkv")
    assert qkv.fp16_us == pytest.approx(3 * _gemm_us("fp16", 16))  # three GEMMs of N = h
    assert qkv.trained_us == pytest.approx(_gemm_us("int4", 16) + NORM_QUANTIZE_US - NORM_US)  # one GEMM, quantize in the norm
    attn_out = next(d for d in decision.parts if d.part == "attn_out")
    assert attn_out.trained_us == pytest.approx(_gemm_us("int4", 16) + QUANTIZE_US)  # a quantize kernel of its own
    ffn_in = next(d for d in decision.parts if d.part == "ffn_in")
    ffn_out = next(d for d in decision.parts if d.part == "ffn_out")
    # the FFN pair with ffn_in in fp16 (as chosen): an int4 ffn_out's quantize applies the GELU
    # (fuse_gelu_quantize), an fp16 one leaves it to a kernel of its own
    assert ffn_out.trained_us == pytest.approx(_gemm_us("fp16", 16) + _gemm_us("int4", 16) + QUANTIZE_GELU_US)
    assert ffn_out.fp16_us == pytest.approx(2 * _gemm_us("fp16", 16) + GELU_US)
    assert ffn_in.trained_us == pytest.approx(_gemm_us("int4", 16, gelu=True) + NORM_QUANTIZE_US - NORM_US)
    assert decision.ffn_pairs[0][("int4", "int4")] == pytest.approx(
        _gemm_us("int4", 16) + NORM_QUANTIZE_US - NORM_US + _gemm_us("int4", 16) + QUANTIZE_GELU_US)
    assert decision.reasons["layer0.q"] == (f"autotuner: fp16 faster at 1x16 ({qkv.fp16_us:.1f} us vs "
                                            f"{qkv.trained_us:.1f} us int4, measured)")
    assert decision.total_us() <= min(decision.total_us(r) for r in at.fixed_strategies("int4").values())
    # the decision through the skip mechanism: a CPU compile shows the reasons in the report
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 16), config=qfx.QuantConfig(4, 4))
    cm = qfx.compile(qat, mode="int4", target="cpu", skip=decision.skip)
    report = cm.report()
    decision.apply_to_report(report)
    float_rows = {r.name: r.note for r in report.linears if r.backend == "float" and r.role != "other"}
    assert float_rows.keys() == set(decision.skip)
    text = report.render(width=400)
    assert "autotuner: fp16 faster at 1x16" in text and "measured on" in text


def test_buckets_that_disagree_get_the_summed_choice_and_each_preference(int4_graph, monkeypatch):
    launchers, timer = _fake_gpu(monkeypatch, [])
    scenario = Scenario.of(buckets=[(1, 16), (64, 64)])  # M = 16 wants fp16, M = 4096 the integer GEMMs
    decision = choose_parts(int4_graph, "sm_86", scenario, launchers=launchers, timer=timer, cache=False,
                            progress=False)
    prefs = decision.bucket_preferences()
    assert set(prefs[(1, 16)].values()) == {"fp16"} and set(prefs[(64, 64)].values()) == {"int4"}
    for d in decision.parts:
        assert d.precision == ("fp16" if d.fp16_us < d.trained_us else "int4")
        assert d.trained_us == pytest.approx(sum(b[3] for b in d.per_bucket))
    assert decision.chosen() == {p: "int4" for p in ("qkv", "attn_out", "ffn_in", "ffn_out")}
    # the fixed strategies under the same times: attention parts add up, the FFN pair from its table
    fixed = at.fixed_strategies("int4")
    attention_fp16 = sum(d.fp16_us for d in decision.parts if d.part in ("qkv", "attn_out"))
    ffn = {c: sum(t[c] for t in decision.ffn_pairs.values()) for c in (("int4", "fp16"), ("fp16", "fp16"))}
    if decision.ffn_pairs:
        assert decision.total_us(fixed["q3-only"]) == pytest.approx(attention_fp16 + ffn[("int4", "fp16")])
        assert decision.total_us(fixed["all-fp16"]) == pytest.approx(attention_fp16 + ffn[("fp16", "fp16")])
    else:
        assert decision.total_us(fixed["all-fp16"]) == pytest.approx(sum(d.fp16_us for d in decision.parts))
    # ffn_out's times are the pair's when the pair is coupled (PartDecision)
    own = [d for d in decision.parts if not (decision.ffn_pairs and d.part == "ffn_in")]
    assert decision.total_us() == pytest.approx(sum(d.trained_us for d in own))
    assert decision.total_us() == pytest.approx(decision.total_us(fixed["all-int4"]))  # the plan is all-int4 here
    assert decision.total_us() < min(decision.total_us(fixed[k]) for k in ("q3-only", "all-fp16"))
    assert "buckets disagree" in decision.summary() and "1x16: qkv fp16" in decision.summary()


def test_a_cached_tune_does_not_time_again(int4_graph, monkeypatch, tmp_path):
    timed = []
    launchers, timer = _fake_gpu(monkeypatch, timed)
    scenario = Scenario.of(buckets=[(1, 16), (8, 32)])
    first = choose_parts(int4_graph, "sm_86", scenario, launchers=launchers, timer=timer,
                         cache=at.TuneCache(tmp_path, identity=IDENTITY), progress=False)
    assert timed
    second = choose_parts(int4_graph, "sm_86", scenario, launchers=launchers,
                          timer=lambda fn: pytest.fail("timed again despite the cache"),
                          cache=at.TuneCache(tmp_path, identity=IDENTITY), progress=False)
    assert second.parts == first.parts and second.skip == first.skip


def test_compile_keeps_the_decision_float_on_the_annotated_graph_as_skip_would(model, monkeypatch):
    """The api glue on the CPU: the decision (modelled for sm_86, as the CPU has nothing to tune)
    is applied to the annotated graph with keep_float (no second annotation), the report carries
    its reasons, and the model equals compiling with the same names in skip."""
    from qfx.tune import select

    real, decisions = select.choose_parts, []

    def modelled_for_sm86(gm, target, scenario, **kw):  # fp16 float parts, as on the GPU
        decisions.append(real(gm, "sm_86", scenario, measure=False, **dict(kw, float_dtype=torch.float16)))
        return decisions[-1]
    monkeypatch.setattr(select, "choose_parts", modelled_for_sm86)
    kept = []  # each keep_float call: the names it was asked to keep float

    def spy_keep_float(gm, reasons):
        kept.append(set(reasons))
        return real_keep_float(gm, reasons)
    real_keep_float = select.keep_float
    monkeypatch.setattr(select, "keep_float", spy_keep_float)
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 16), config=qfx.QuantConfig(4, 4))
    tuned = qfx.compile(qat, mode="int4", target="cpu", tune=True)
    decision, = decisions
    assert kept == [set(decision.skip)]  # once, on the annotated graph, with exactly the decision
    assert decision.scenario.buckets == ((2, 16),)
    assert decision.skip and len(decision.skip) < 12  # at 2 x 16 qkv stays int4, the rest goes fp16
    report = tuned.report()
    assert report.plan_origin.startswith("autotuner (modelled for sm_86")
    for row in report.linears:
        if row.role != "other":
            assert row.note.endswith(decision.reasons[row.name])
            assert (row.backend == "float") == (row.name in decision.skip)
    same = qfx.compile(qat, mode="int4", target="cpu", skip=decision.skip)
    x = inputs(3, 24, seed=1)
    assert torch.equal(tuned(**x).last_hidden_state, same(**x).last_hidden_state)


def _tuned_on_fake_sm86(model, monkeypatch, scenario, skip=()):
    """qfx.compile(..., tune=scenario) on the CPU, the decision measured on the fake sm80-family
    GPU (fake launchers and timer) for sm_86 with fp16 float parts; returns (compiled, decision)."""
    from qfx.tune import select

    launchers, timer = _fake_gpu(monkeypatch, [])
    real, decisions = select.choose_parts, []

    def measured_for_sm86(gm, target, scenario, **kw):
        kw = dict(kw, float_dtype=torch.float16, launchers=launchers, timer=timer, cache=False, progress=False)
        decisions.append(real(gm, "sm_86", scenario, **kw))
        return decisions[-1]
    monkeypatch.setattr(select, "choose_parts", measured_for_sm86)
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 16), config=qfx.QuantConfig(4, 4))
    tuned = qfx.compile(qat, mode="int4", target="cpu", tune=scenario, skip=skip)
    decision, = decisions
    return tuned, decision


def test_tuned_report_prints_the_per_part_table(model, monkeypatch, tmp_path):
    from qfx.backends.cutlass.configs import CONFIGS
    from qfx.backends.cutlass.dispatch import choose
    from qfx.targets import get_target
    from qfx.tune.select import FP16_KERNEL, TuningTable, runtime_kernel

    scenario = Scenario.of(buckets=[(1, 16), (64, 64)])  # M = 16 wants fp16, M = 4096 the int4 GEMMs
    tuned, decision = _tuned_on_fake_sm86(model, monkeypatch, scenario)
    report = tuned.report()
    table = report.tuning
    assert isinstance(table, TuningTable) and table is decision.table
    assert (table.target, table.source, table.layers) == ("sm_86", "measured", 2)
    text = report.render(width=140)
    for column in ("layer", "part", "batch", "GEMM M x N x K", "trained", "chosen", "kernel", "int4 us", "fp16 us",
                   "measured", "speedup"):
        assert column in text.split("autotuner per-part plan")[1]
    assert "predicted latency of the tuned parts at 1 x 16" in text and "left out of these sums: embeddings" in text
    assert "x seq" in next(line for line in text.splitlines() if "GEMM M x N x K" in line)  # the bucket column

    rows = table.rows()
    # BERT: every layer's part has the same shape and choice: one row per part and bucket
    assert [(r["layer"], r["part"], r["m"]) for r in rows] == [
        ("all 2 layers", p, m) for p in ("qkv", "attn_out", "ffn_in", "ffn_out") for m in (16, 4096)]
    assert all(r["layer"] in text for r in rows) and "4096 x 192 x 64" in text
    chosen = decision.chosen()
    assert chosen == {p: "int4" for p in ("qkv", "attn_out", "ffn_in", "ffn_out")}  # the summed choice
    sm86 = get_target("sm_86")
    for r in rows:
        assert r["precision"] == chosen[r["part"]] and set(r["times"]) == {"int4", "fp16"}
        assert r["us"] == r["times"][r["precision"]] and r["speedup"] == pytest.approx(r["fp16_us"] / r["us"])
        # the kernel the launch layer picks for this (N, K, M): an INT4 (s4) config of the sm80 family
        cfg = choose("sm80", "s4", r["m"], r["n"], r["k"], {c.name for c in CONFIGS})
        assert r["kernel"].startswith(cfg.name) and r["kernel"] == runtime_kernel(sm86, "int4", r["m"], r["n"], r["k"])
        assert f"{r['speedup']:.2f}x" in text and r["kernel"] in text
    # per layer, the table's choice is what the compiled graph runs
    backends = {(r.layer, r.role): r.backend for r in report.linears if r.role != "other"}
    assert {(int(r["layer"]), r["part"]): r["precision"] for r in table.rows(per_layer=True)} == {
        part: "fp16" if backend == "float" else "int4" for part, backend in backends.items()}
    # the times are the timer's, with the work each choice brings
    attn_out = {r["m"]: r for r in rows if r["part"] == "attn_out"}
    assert attn_out[16]["times"] == pytest.approx({"int4": _gemm_us("int4", 16) + QUANTIZE_US, "fp16": _gemm_us("fp16", 16)})
    assert attn_out[16]["speedup"] < 1 < attn_out[4096]["speedup"]  # int4 is slower at M = 16, kept for the sum
    qkv = next(r for r in rows if r["part"] == "qkv" and r["m"] == 4096)
    assert qkv["times"]["fp16"] == pytest.approx(3 * _gemm_us("fp16", 4096))  # HF's three q, k, v GEMMs
    assert runtime_kernel(sm86, "fp16", 4096, 64, 64, fp16_gemms=3) == FP16_KERNEL + " x3"
    # the chosen times add up to the tuner's totals, per bucket and over the scenario
    fixed = at.fixed_strategies("int4")
    for i, total in enumerate(table.totals):
        per_layer = [r for r in table.rows(per_layer=True) if (r["batch"], r["seq"]) == scenario.buckets[i]]
        assert len(per_layer) == 8
        assert total.chosen_us == pytest.approx(sum(r["us"] for r in per_layer))
        assert total.chosen_us == pytest.approx(decision.total_us(bucket=i))
        for name, rule in fixed.items():
            assert total.strategies[name] == pytest.approx(decision.total_us(rule, bucket=i))
        assert total.speedup == pytest.approx(total.fp16_us / total.chosen_us)
        assert f"{total.chosen_us:.1f} us as chosen vs {total.fp16_us:.1f} us all-fp16 ({total.speedup:.2f}x)" in text
    assert sum(t.chosen_us for t in table.totals) == pytest.approx(decision.total_us())
    if decision.ffn_pairs:  # fuse_gelu_quantize: the GELU moves with ffn_out's choice, counted with ffn_out
        assert table.ffn_coupled and "ffn_in and ffn_out are chosen together" in text
        m, norm_quantize = 4096, NORM_QUANTIZE_US - NORM_US
        ffn_in, ffn_out = (next(r for r in rows if r["part"] == p and r["m"] == m) for p in ("ffn_in", "ffn_out"))
        # ffn_in with ffn_out int4 as chosen: no GELU of its own in either precision
        assert ffn_in["times"] == pytest.approx({"int4": _gemm_us("int4", m) + norm_quantize, "fp16": _gemm_us("fp16", m)})
        # ffn_out int4: its quantize applies the GELU; fp16: the GELU goes back into ffn_in's int4 epilogue
        assert ffn_out["times"] == pytest.approx({"int4": _gemm_us("int4", m) + QUANTIZE_GELU_US,
                                                  "fp16": _gemm_us("fp16", m) + (_gemm_us("int4", m, gelu=True) - _gemm_us("int4", m))})
    # the report keeps the table through qfx.save / qfx.load (plain data)
    loaded = qfx.load(qfx.save(tuned, tmp_path / "tuned.qfx.safetensors"))
    assert loaded.report().tuning == table and str(loaded.report()) == str(report)


def test_tuned_report_rows_merge_only_equal_layers(model, monkeypatch):
    from qfx.tune.select import FP16_KERNEL, PartTiming, TuningTable

    def timing(layer, n, precision="int8"):
        return PartTiming(layer, "ffn_in", 32, 128, n, 768, "int8", precision, "k", {"int8": 10.0, "fp16": 12.0})
    equal = TuningTable("sm_90", "modelled", "o", 3, tuple(timing(l, 3072) for l in range(3)), ())
    assert [r["layer"] for r in equal.rows()] == ["all 3 layers"]
    assert [r["layer"] for r in equal.rows(per_layer=True)] == ["0", "1", "2"]
    shapes_differ = TuningTable("sm_90", "modelled", "o", 3, (timing(0, 3072), timing(1, 1024), timing(2, 3072)), ())
    assert [(r["layer"], r["n"]) for r in shapes_differ.rows()] == [("0,2", 3072), ("1", 1024)]
    choice_differs = TuningTable("sm_90", "modelled", "o", 3, (timing(0, 3072), timing(1, 3072), timing(2, 3072, "fp16")), ())
    assert [(r["layer"], r["precision"], r["speedup"]) for r in choice_differs.rows()] == [("0-1", "int8", 1.2), ("2", "fp16", 1.0)]
    # a part left float by the user in one layer: the others' row names them. At 1 x 16 fp16 wins everywhere
    tuned, decision = _tuned_on_fake_sm86(model, monkeypatch, Scenario.of(batch=1, seq=16), skip=("layer1.ffn_out",))
    report = tuned.report()
    rows = report.tuning.rows()
    assert [r["layer"] for r in rows if r["part"] == "ffn_out"] == ["0"]
    assert {r["layer"] for r in rows if r["part"] in ("qkv", "attn_out")} == {"all 2 layers"}
    assert len({(d.layer, d.part) for d in decision.parts}) == 7 == len(report.tuning.rows(per_layer=True))
    for r in rows:
        assert r["precision"] == "fp16" and r["speedup"] == 1.0
        assert r["kernel"] == FP16_KERNEL + (" x3" if r["part"] == "qkv" else "")
    assert {(r.layer, r.role) for r in report.linears if r.backend == "float" and r.role != "other"} == {
        (int(r["layer"]), r["part"]) for r in report.tuning.rows(per_layer=True)} | {(1, "ffn_out")}
    header = next(line for line in str(report).splitlines() if "GEMM M x N x K" in line)
    assert "x seq" not in header and "scenario 1x16 (batch x seq)" in str(report)  # one bucket: no bucket column


def test_the_plan_table_names_the_runtime_kernel_too():
    """python -m qfx plan (no GPU): the same printer, the kernel a library built for the target runs."""
    from qfx.backends.cutlass.configs import CONFIGS
    from qfx.backends.cutlass.dispatch import choose
    from qfx.tune import MODEL_SHAPES
    from qfx.tune.plan_report import plan_rows, render_plan
    from qfx.tune.select import FAMILY_DEFAULT, FP16_KERNEL

    plan = at.autotune(MODEL_SHAPES["bert-large"], "sm_86", Scenario.of(batch=2, seq=128), "int4", fused_epilogue=True)
    rows = plan_rows(plan)
    assert {r["precision"] for r in rows} == {"int4", "fp16"}  # modelled: both kinds of row
    for r in rows:
        if r["precision"] == "fp16":
            assert r["kernel"] == FP16_KERNEL
        else:
            cfg = choose("sm80", "s4", r["m"], r["n"], r["k"], {c.name for c in CONFIGS})
            assert r["kernel"] in (cfg.name, cfg.name + FAMILY_DEFAULT)  # marked unless a library for sm80 is loaded
        assert r["speedup"] == pytest.approx(r["times"]["fp16"] / r["times"][r["precision"]])
    assert "sm80_s4_" in render_plan(plan, width=160)


def test_no_tuning_table_without_tune(model):
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 16), config=qfx.QuantConfig(4, 4))
    report = qfx.compile(qat, mode="int4", target="cpu").report()
    assert report.tuning is None
    assert "autotuner" not in str(report) and "predicted latency" not in str(report)


def test_tune_true_takes_the_example_calls_shape(int4_graph):
    assert scenario_for_compile(True, int4_graph.meta["qfx_capture"]).buckets == ((2, 16),)
    sc = Scenario.of(batch=4, seq=32)
    assert scenario_for_compile(sc, int4_graph.meta["qfx_capture"]) is sc


def test_bad_tune_input_is_refused_naming_tune(model, int4_graph):
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 16), config=qfx.QuantConfig(4, 4))
    with pytest.raises(ValueError, match="tune=.*target='cpu'.*GPU target"):
        qfx.compile(qat, mode="int4", target="cpu", tune=True)
    with pytest.raises(ValueError, match=r"tune: .*seq=1000.*max_position_embeddings.*seq <= 64"):
        qfx.compile(qat, mode="int4", target="cpu", tune=Scenario.of(batch=1, seq=1000))
    with pytest.raises(ValueError, match="tune='fast'"):
        qfx.compile(qat, mode="int4", target="cpu", tune="fast")
    with pytest.raises(ValueError, match="tune=True with mode='fp16'"):
        qfx.compile(model, mode="fp16", target="cpu", example_kwargs=inputs(2, 16), tune=True)
    everything_float = _annotated(model, 4, skip=("layer0", "layer1"))
    with pytest.raises(ValueError, match="nothing to tune"):
        choose_parts(everything_float, "sm_86", Scenario.of(batch=1, seq=16))


def test_benchmark_dry_run_prints_modelled_plans(model, capsys):
    bench = load_script("benchmarks/autotune.py", "bench_autotune")
    rows = bench.modelled_rows(model, "sm_90", [(1, 16), (32, 64)], "int8")
    for r in rows:
        assert r["source"] == "modelled" and set(r["ms"]) == {"all-int8", "q3-only", "all-fp16", "autotuned"}
        assert r["ratio"] <= 1 + 1e-9 and set(r["plan"].values()) <= {"int8", "fp16"}
    with pytest.warns(qfx.PostTrainingQuantizationWarning):
        q3 = qfx.compile(model, mode="int8", target="cpu", example_kwargs=inputs(2, 16), skip=("qkv", "attn_out", "ffn_out"))
    assert bench.plan_of(q3) == {"qkv": "fp16", "attn_out": "fp16", "ffn_in": "int8", "ffn_out": "fp16"}
    bench.print_table(rows, "MODELLED")
    assert "| 32 x 64 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0


@pytest.mark.gpu
def test_tune_true_on_the_gpu_equals_the_same_skip(model, monkeypatch, tmp_path):
    monkeypatch.setenv("QFX_CACHE_DIR", str(tmp_path))  # a fresh autotune cache, not the user's
    target = qfx.detect_target().name
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 16), config=qfx.QuantConfig(8, 8))
    tuned = qfx.compile(qat, mode="int8", target=target, tune=True)  # the example call: 2 x 16
    assert "measured on" in tuned.report().plan_origin and "scenario 2x16" in tuned.report().plan_origin
    rows = tuned.report().linears
    assert all("autotuner: " in r.note for r in rows if r.role != "other")
    skip = tuple(r.name for r in rows if r.backend == "float" and r.note.startswith("autotuner: fp16 faster"))
    same = qfx.compile(qat, mode="int8", target=target, skip=skip)
    x = {k: v.cuda() for k, v in inputs(3, 24, seed=1).items()}
    assert torch.equal(tuned(**x).last_hidden_state, same(**x).last_hidden_state)
    # the per-part table: measured, and names the config the launch layer runs for each integer part
    from qfx.backends.cutlass.launch import device_family, library, pick_config
    from qfx.tune.select import FP16_KERNEL

    table = tuned.report().tuning
    assert table.source == "measured" and "MEASURED" in str(tuned.report())
    lib = library()
    family = device_family(torch.device("cuda"), lib)
    float_parts = {(r.layer, r.role) for r in rows if r.backend == "float" and r.role != "other"}
    for r in table.rows(per_layer=True):
        assert (r["precision"] == "fp16") == ((int(r["layer"]), r["part"]) in float_parts)
        if r["precision"] == "fp16":
            assert r["kernel"].startswith(FP16_KERNEL)
        else:
            assert r["kernel"] == pick_config(lib, family, "s8", r["m"], r["n"], r["k"]).name
