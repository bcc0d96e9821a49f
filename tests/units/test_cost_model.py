"""The cost model against the measurements it must reproduce: the repository's H100 GEMMs
(sm_90, within 20 % at M >= 2048) and every published Ampere/Ada speedup of
qfx/tune/data/published_ampere.json (within 25 %, the rows outside named with their reason)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qfx.targets import get_target
from qfx.tune import cost_model as cm
from qfx.tune import evidence

ROOT = Path(__file__).resolve().parents[2]
#: the H100 measurements this test checks the model against (raw rows of earlier device runs)
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def h100():
    return evidence.load_h100_measurements()


def test_the_data_file_matches_the_results_table(h100):
    rows = h100["final_run"]
    assert len(rows) == 48 and {r["h"] for r in rows} == {768, 1024}
    # spot check against benchmarks/RESULTS.md: h=1024 ffn_out M=8192: qfx 1423 TOPS, fp16 728
    r = next(r for r in rows if r["h"] == 1024 and r["role"] == "ffn_out" and r["m"] == 8192)
    assert math.isclose(2 * r["m"] * r["n"] * r["k"] / (r["us"]["qfx"] * 1e6), 1423, rel_tol=2e-3)
    assert math.isclose(2 * r["m"] * r["n"] * r["k"] / (r["us"]["fp16"] * 1e6), 728, rel_tol=2e-3)
    raw = json.loads((DATA / "h100_gemm_rn_epilogue.json").read_text())
    assert len(h100["rn_epilogue"]) == len(raw["rows"])


@pytest.mark.parametrize("column, precision", [("qfx", "int8"), ("fp16", "fp16")])
def test_sm90_within_20_percent_of_the_h100_at_m_ge_2048(h100, column, precision):
    errors = evidence.gemm_errors(h100["final_run"], column, precision)
    big = [(r["role"], r["h"], r["m"], e) for r, _, e in errors if r["m"] >= 2048]
    assert len(big) == 32
    worst = max(big, key=lambda x: abs(x[3]))
    assert abs(worst[3]) <= 0.20, worst
    # below M = 2048 the model is coarser (stated in the module): still within 25 %
    assert max(abs(e) for r, _, e in errors if r["m"] < 2048) <= 0.25


@pytest.mark.parametrize("column, symmetric", [("blk", False), ("blk_sym", True)])
def test_block_scaled_gemms_within_20_percent_of_the_h200_at_m_ge_2048(column, symmetric):
    """The block term (act_block=128: the promotion of every K block on the CUDA cores, the scales read)
    against the Triton block kernel as measured (qfx/tune/data/h200_block_gemm.json, benchmarks/RESULTS.md)."""
    data = json.loads((ROOT / "qfx" / "tune" / "data" / "h200_block_gemm.json").read_text())
    rows = [r for r in data["rows"] if r["m"] >= 2048]
    assert len(rows) == 24 and data["act_block"] == 128
    t = get_target(data["target"])
    errors = [(r["role"], r["h"], r["m"], cm.gemm_time(t, r["m"], r["n"], r["k"], "int8", act_block=128,
                                                       symmetric=symmetric).us / r["us"][column] - 1) for r in rows]
    worst = max(errors, key=lambda e: abs(e[3]))
    assert abs(worst[3]) <= 0.20, worst
    assert abs(sum(e[3] for e in errors) / len(errors)) <= 0.10  # no bias either way
    # the measured block kernel is slower than the token-wise one everywhere at M >= 2048, as modelled
    assert all(r["us"][column] > r["us"]["tok"] for r in rows)
    assert all(cm.gemm_time(t, r["m"], r["n"], r["k"], "int8", act_block=128, symmetric=symmetric).us
               > cm.gemm_time(t, r["m"], r["n"], r["k"], "int8").us for r in rows)


def test_the_rn_epilogue_rows_too(h100):
    errors = evidence.gemm_errors([r for r in h100["rn_epilogue"] if r["m"] >= 2048], "qfx", "int8")
    assert errors and max(abs(e) for _, _, e in errors) <= 0.20


def test_figure1_reproduced_within_25_percent():
    got = evidence.figure1_speedups("sm_86", m=12288, hidden=1024)
    for part, paper in evidence.PAPER_FIGURE1.items():
        assert abs(got[part] / paper - 1) <= 0.25, (part, got[part], paper)
    # the paper's qualitative finding: FFN-out gains much more than attention-out
    assert got["ffn_out"] > got["attn_out"] + 0.2


def test_int4_over_int8_grows_with_m_and_is_one_on_hopper():
    t = get_target("sm_86")
    speedups = [cm.gemm_time(t, m, 1024, 4096, "int8").us / cm.gemm_time(t, m, 1024, 4096, "int4").us
                for m in (128, 1024, 8192, 65536)]
    assert speedups == sorted(speedups) and speedups[-1] < 2.0
    h = get_target("sm_90")
    assert cm.gemm_time(h, 8192, 1024, 4096, "int4").us == cm.gemm_time(h, 8192, 1024, 4096, "int8").us


def test_refit_reproduces_the_committed_factors(h100):
    pytest.importorskip("scipy")
    fit = evidence.fit_gemm(h100["final_run"], "qfx", "int8")
    ref = cm.FIT["sm90a"]["int"]
    assert math.isclose(fit.alpha, ref.alpha, rel_tol=0.02) and math.isclose(fit.fixed_us, ref.fixed_us, rel_tol=0.02)
    assert math.isclose(fit.tile_overhead_steps, ref.tile_overhead_steps, rel_tol=0.05)


def test_whole_model_h100_within_25_percent():
    """Every measured whole-model row, M = 128 .. 16384 (the goal asks for M >= 2048): fp16 graphs
    (their pipeline has not changed since that run) and int8 graphs of the current pipeline (fused
    add + LayerNorm + quantize, GELU in the quantizer; session 4), none of them used in a fit."""
    shapes = {"minilm-l6": cm.MODEL_SHAPES["minilm"], "bert-base": cm.MODEL_SHAPES["bert-base"],
              "bert-large": cm.MODEL_SHAPES["bert-large"]}
    fp16_rows = json.loads((DATA / "h100_e2e_fuse_qkv.json").read_text())["rows"]
    int8_rows = json.loads((DATA / "h100_e2e_gelu_quantize.json").read_text())["rows"]
    checked = 0
    for rows, prec, key in ((fp16_rows, "fp16", "qfx fp16 graph"), (int8_rows, "int8", "qfx int8 replay")):
        for r in rows:
            t, _ = cm.model_latency("sm_90", shapes[r["model"]], r["bs"], r["seq"], prec)
            assert abs(t / 1000 / r["ms"][key] - 1) <= 0.25, (r["model"], r["bs"], prec, t / 1000, r["ms"][key])
            checked += 1
    assert checked == 12


def test_separate_quantize_kernel_matches_its_profile():
    """The quantize fit against the profiled kernel time (ms per forward) it was fitted to."""
    prof = json.loads((DATA / "h100_e2e_gelu_quantize.json").read_text())["profiles"]
    for key, m, ks, layers in (("bert-base 128x128 qfx int8 as called", 16384, (768, 3072), 12),
                               ("bert-large 32x384 qfx int8 as called", 12288, (1024, 4096), 24)):
        modelled = layers * sum(cm.quantize_time("sm_90", m, k, 8) for k in ks) / 1000
        assert abs(modelled / prof[key]["quantize"] - 1) <= 0.10, (key, modelled, prof[key]["quantize"])


def test_cost_model_refuses_cpu_targets_unknown_precisions_empty_shapes_and_non_bert_configs():
    with pytest.raises(ValueError, match="GPU target"):
        cm.gemm_time("cpu", 128, 768, 768, "int8")
    with pytest.raises(ValueError, match="precision='int2'"):
        cm.gemm_time("sm_86", 128, 768, 768, "int2")
    with pytest.raises(ValueError, match="positive"):
        cm.gemm_time("sm_86", 0, 768, 768, "int8")
    with pytest.raises(ValueError, match="not a BERT-family"):
        cm.ModelShape.from_config({"vocab_size": 3})


def test_model_shape_from_hf_configs():
    s = cm.ModelShape.from_config({"hidden_size": 384, "num_hidden_layers": 6, "intermediate_size": 1536,
                                   "num_attention_heads": 12, "max_position_embeddings": 512})
    assert s.parts() == cm.MODEL_SHAPES["minilm"].parts()
    d = cm.ModelShape.from_config({"dim": 768, "n_layers": 6, "hidden_dim": 3072, "n_heads": 12})
    assert d.parts()[2] == ("ffn_in", 3072, 768)


def test_unfused_epilogue_and_quantize_are_counted():
    t = get_target("sm_86")
    unfused = cm.part_time(t, "attn_out", 4096, 768, 768, "int8")
    fused = cm.part_time(t, "attn_out", 4096, 768, 768, "int8", fused_epilogue=True, fused_quantize=True)
    assert unfused.epilogue_us > 0 and fused.epilogue_us == 0
    assert unfused.quantize_us > fused.quantize_us > 0 and fused.us < unfused.us
    assert cm.part_time(t, "ffn_in", 4096, 3072, 768, "fp16", gelu=True).extra_us > 0


@pytest.fixture(scope="module")
def published():
    return evidence.check_published()


def test_every_published_ampere_ada_ratio_within_25_percent(published):
    """The goal of issue 22 section 2, as a test: each published INT8/FP16 (whole BERT forward) and
    INT4/INT8 (GEMM) ratio within 25 %, except the rows named in evidence.KNOWN_OUTSIDE."""
    assert len(published) == 102
    outside = [(c.label, round(c.published, 2), round(c.modelled, 2)) for c in published
               if abs(c.error) > evidence.TOLERANCE and c.known_outside is None]
    assert not outside, outside
    # the named exceptions are real misses (the list hides no row that passes), all FasterTransformer
    named = [c for c in published if c.known_outside is not None]
    assert len(named) == len(evidence.KNOWN_OUTSIDE) == 24
    assert all(abs(c.error) > evidence.TOLERANCE and c.row["pipeline"].startswith("ft-") for c in named)
    # every TensorRT demoBERT row and the paper's Figure 1 ratios are inside
    assert all(c.known_outside is None for c in published if not c.row["pipeline"].startswith("ft-"))
    # held-out rows (not used in any fit) are checked too: A30, L40S, every FasterTransformer row
    held = [c for c in published if c.held_out and c.known_outside is None]
    assert len(held) == 44 and max(abs(c.error) for c in held) <= evidence.TOLERANCE


def test_ampere_ada_refit_is_a_fixed_point():
    """fit_family from the committed factors lands on them again (they are the fit, not a guess)."""
    pytest.importorskip("scipy")
    for key in ("sm80", "sm_89"):
        fit, ref = evidence.fit_family(key), cm.FIT[key]
        ratio = fit["int"].eff_compute / fit["fp16"].eff_compute
        assert math.isclose(ratio, ref["int"].eff_compute / ref["fp16"].eff_compute, rel_tol=0.03), key
        assert abs(fit["int"].fixed_us - ref["int"].fixed_us) <= 1.0, key


def test_published_rows_cite_sources_and_whole_model_rows_use_the_whole_forward(published):
    for c in published:
        assert c.row["source"].strip() and c.row["pipeline"] in {*cm.PIPELINES, "cutlass-profiler"}
    row = next(c.row for c in published if c.row["kind"] == "model" and c.row["pipeline"] == "trt-int8")
    gemm_only = sum(cm.part_time(evidence.row_target(row), p, row["batch"] * row["seq"], n, k, "int8").gemm.us
                    for p, n, k in cm.MODEL_SHAPES[row["model"]].parts())
    total, _ = cm.model_latency(evidence.row_target(row), cm.MODEL_SHAPES[row["model"]], row["batch"], row["seq"], "int8",
                                **cm.PIPELINES["trt-int8"])
    assert total > 1.2 * cm.MODEL_SHAPES[row["model"]].layers * gemm_only / 2  # attention, norms, embeddings counted


def test_ampere_has_its_own_factors_not_the_h100s():
    assert cm.fit_for(get_target("sm_86"), "int") is cm.FIT["sm80"]["int"] is not cm.FIT["sm90a"]["int"]
    assert cm.fit_key(get_target("sm_89")) == "sm_89" and cm.fit_key(get_target("sm_80")) == "sm80"
    assert cm.fit_key(get_target("sm_90")) == "sm90a"


def test_issue_shape_int4_faster_than_fp16_on_the_a6000():
    """The issue's qkv GEMM (4096 x 2304 x 768): int4 and int8 GEMMs faster than fp16 (the
    evidence), and with the dequant fused the whole part too."""
    t = get_target("sm_86")
    gemm = {p: cm.gemm_time(t, 4096, 2304, 768, p, fused_epilogue=True).us for p in ("int4", "int8", "fp16")}
    assert gemm["int4"] < gemm["int8"] < gemm["fp16"]
    fp16_part = 3 * cm.part_time(t, "qkv", 4096, 768, 768, "fp16").us
    assert cm.part_time(t, "qkv", 4096, 2304, 768, "int4", fused_epilogue=True, fused_quantize=True).us < fp16_part


def test_plan_sm86_32x128_chooses_integer_parts():
    from qfx.tune import MODEL_SHAPES, Scenario, tune

    def chosen(**kw):
        plan = tune(MODEL_SHAPES["bert-base"], "sm_86", Scenario.of(batch=32, seq=128), "int4", measure=False,
                    cache=False, progress=False, **kw)
        return {c.spec.part: c.precision for c in plan.buckets[0].choices}

    # qfx's sm80 backend today (int32 GEMM output + a dequant kernel): FFN-in wins (the paper's
    # "q3" strategy at small bs x seq); the int32 round trip costs the narrow-output parts their gain
    today = chosen()
    assert today["ffn_in"] == "int4"
    # with the dequant fused into the GEMM (TensorRT, FasterTransformer int8_mode 2, the paper)
    # every part is integer, as the published whole-model speedups say
    assert set(chosen(fused_epilogue=True).values()) == {"int4"}


def test_int4_codes_follow_the_targets_mma_operand():
    assert cm.codes_bytes(get_target("sm_86"), 4) == 0.5 and cm.codes_bytes(get_target("sm_90"), 4) == 1.0
    assert cm.gemm_time("sm_86", 4096, 768, 768, "int4").kernel == "cutlass sm80 s4"
    assert cm.gemm_time("sm_90", 4096, 768, 768, "int4").kernel == "cutlass sm90a s8"


def test_trust_statement_names_the_evidence():
    ampere = evidence.trust_statement("sm_86")
    assert "published" in ampere and "A100" in ampere and "absolute microseconds are not" in ampere
    assert "no published number on NVIDIA GeForce RTX 3090" in evidence.trust_statement(get_target("sm_86", gpu="3090"))
    assert "H100" in evidence.trust_statement("sm_90")
    with pytest.raises(ValueError, match="GPU target"):
        evidence.trust_statement("cpu")
