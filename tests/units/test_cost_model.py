"""The cost model against the measurements it must reproduce: the repository's H100 GEMMs
(sm_90, within 20 % at M >= 2048) and the paper's Figure 1 (A6000, within 25 %)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qfx.targets import get_target
from qfx.tune import cost_model as cm

ROOT = Path(__file__).resolve().parents[2]
#: the H100 measurements this test checks the model against (raw rows of earlier device runs)
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def h100():
    return cm.load_h100_measurements()


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
    errors = cm.gemm_errors(h100["final_run"], column, precision)
    big = [(r["role"], r["h"], r["m"], e) for r, _, e in errors if r["m"] >= 2048]
    assert len(big) == 32
    worst = max(big, key=lambda x: abs(x[3]))
    assert abs(worst[3]) <= 0.20, worst
    # below M = 2048 the model is coarser (stated in the module): still within 25 %
    assert max(abs(e) for r, _, e in errors if r["m"] < 2048) <= 0.25


def test_the_rn_epilogue_rows_too(h100):
    errors = cm.gemm_errors([r for r in h100["rn_epilogue"] if r["m"] >= 2048], "qfx", "int8")
    assert errors and max(abs(e) for _, _, e in errors) <= 0.20


def test_figure1_reproduced_within_25_percent():
    got = cm.figure1_speedups("sm_86", m=12288, hidden=1024)
    for part, paper in cm.PAPER_FIGURE1.items():
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
    fit = cm.fit_gemm(h100["final_run"], "qfx", "int8")
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


def test_bad_input():
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
