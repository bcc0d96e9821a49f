"""The cost model's block term (``QuantConfig(act_block=B)``, qfx/tune/cost_model.py), against formulas
computed here from first principles: the scales each GEMM reads, the promotion of every K block on the
CUDA cores, the quantize kernels' block scales, and the FFN-in producer that writes the FFN-out's codes
(the fp16 FFN intermediate's round trip and its quantize kernel removed)."""
from __future__ import annotations

import math

import pytest

from qfx.targets import get_target
from qfx.tune import cost_model as cm

#: (int8 tensor-core ops, fp32 add / mul results, int32 adds) per SM per clock on the H100 (4 tensor cores x
#: 2048 dense int8 ops; 128 fp32 lanes; 64 int32 adds), and on the RTX A6000 (GA102); the promotion converts
#: each int32 block sum exactly by an int32 add and an fp32 subtract (backends/triton/block_gemm_kernels.py)
H100_RATES, A6000_RATES = (8192, 128, 64), (2048, 128, 64)


def _ffn_bytes(parts) -> float:
    """The FFN's DRAM traffic as modelled: FFN-in, the FFN-out's input quantize, FFN-out."""
    by = {p.part: p for p in parts}
    return by["ffn_in"].gemm.bytes_moved + by["ffn_out"].quantize_bytes + by["ffn_out"].gemm.bytes_moved


def _scale_bytes(m, n, k, block, symmetric):
    """fp32 activation scales (and, asymmetric, offsets and the weights' block code sums) a GEMM reads."""
    return 4 * (k / block) * (m * (1 if symmetric else 2) + (0 if symmetric else n))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("model, batch, seq", [("bert-base", 128, 128), ("bert-large", 32, 384)])
def test_block_ffn_traffic_is_token_wise_less_the_removed_round_trip(model, batch, seq, symmetric):
    shape, block = cm.MODEL_SHAPES[model], 128
    m, h, f = batch * seq, shape.hidden, shape.ffn
    _, token = cm.model_latency("sm_90", shape, batch, seq, "int8")
    _, blocks = cm.model_latency("sm_90", shape, batch, seq, "int8", act_block=block, symmetric=symmetric)
    # token-wise (int8 codes, fp16 outputs): FFN-in writes [m, f] fp16, a quantize kernel reads it back and
    # writes the codes and a scale and an offset per token, FFN-out reads the codes
    want_token = (m * h + f * h + 2 * m * f) + (2 * m * f + m * f + 8 * m) + (m * f + h * f + 2 * m * h)
    # block-scaled: FFN-in writes the codes and 8 bytes per (row, block) itself; both GEMMs read block scales
    want_block = ((m * h + f * h + m * f + 8 * m * f / block + _scale_bytes(m, f, h, block, symmetric))
                  + (m * f + h * f + 2 * m * h + _scale_bytes(m, h, f, block, symmetric)))
    assert math.isclose(_ffn_bytes(token), want_token, rel_tol=1e-12)
    assert math.isclose(_ffn_bytes(blocks), want_block, rel_tol=1e-12)
    round_trip = 2 * m * f + 2 * m * f  # the fp16 intermediate written and read
    saved = _ffn_bytes(token) - _ffn_bytes(blocks)
    overhead = 8 * m * f / block + _scale_bytes(m, f, h, block, symmetric) + _scale_bytes(m, h, f, block, symmetric)
    assert math.isclose(saved, round_trip + 8 * m - overhead, rel_tol=1e-12)
    assert 0.85 * round_trip < saved < round_trip  # the block scales cost a little of what the round trip saved
    by = {p.part: p for p in blocks}
    assert by["ffn_out"].quantize_us == 0 and by["ffn_out"].quantize_bytes == 0  # no quantize kernel left
    assert all(p.gemm.kernel == "triton block s8 (act_block=128)" for p in blocks)


def test_the_producer_needs_both_ffn_parts_integer():
    shape = cm.MODEL_SHAPES["bert-base"]
    _, parts = cm.model_latency("sm_90", shape, 32, 128, {"ffn_in": "fp16", "ffn_out": "int8"}, act_block=128)
    by = {p.part: p for p in parts}
    m, f = 32 * 128, shape.ffn
    # FFN-in in fp16: its [m, f] output is read by a block quantize kernel (codes + 8 bytes per (row, block))
    assert math.isclose(by["ffn_out"].quantize_bytes, m * f * (2 + 1) + 8 * m * f / 128, rel_tol=1e-12)
    assert by["ffn_out"].quantize_us > 0 and by["ffn_in"].gemm.kernel == "cuBLAS fp16"


@pytest.mark.parametrize("symmetric", [True, False])
def test_block_gemm_promotion_and_scales_follow_the_formula(symmetric):
    t = get_target("sm_90")
    m, n, k, block, tile = 8192, 768, 3072, 128, (128, 128)
    token = cm.gemm_time(t, m, n, k, "int8", tiles=[tile])
    blocks = cm.gemm_time(t, m, n, k, "int8", tiles=[tile], act_block=block, symmetric=symmetric)
    waves = math.ceil(math.ceil(m / 128) * math.ceil(n / 128) / t.sm_count)
    int8_clk, fp32_clk, int_add_clk = H100_RATES
    clocks_per_us = 1978.9e6 / (132 * int8_clk)  # the H100's INT8 peak over its SMs' int8 ops per clock: ~1.83 GHz
    assert 1800 < clocks_per_us < 1850
    # scale and accumulate; + the offset term, timed as 7 fp32 operations (its multiply and add and the per-block
    # loads of its operands: fitted on the H200, tests/units/test_cost_model.py)
    ops = 2 if symmetric else 2 + 7
    per_tile = 128 * 128 * (k / block) * (1 / int_add_clk + (1 + ops) / fp32_clk) / clocks_per_us
    assert math.isclose(blocks.compute_us - token.compute_us, waves * per_tile, rel_tol=1e-9)
    assert math.isclose(blocks.bytes_moved - token.bytes_moved, _scale_bytes(m, n, k, block, symmetric), rel_tol=1e-12)
    assert blocks.us > token.us and blocks.kernel == "triton block s8 (act_block=128)"
    # the promotion per K block: a smaller block promotes more often
    assert cm.gemm_time(t, m, n, k, "int8", act_block=64).compute_us > cm.gemm_time(t, m, n, k, "int8", act_block=128).compute_us


def test_ampere_block_gemm_runs_int4_natively_with_its_epilogue_fused():
    """sm_86 (modelled only): the CUTLASS backend's sm80 block kernel (backends/cutlass/block_linear.py):
    native s4 MMA on packed weights and int8 activation codes (packed to nibbles on chip), its epilogue in
    the kernel (no int32 output, no separate dequant kernel, unlike the CUTLASS 2.x token-wise path)."""
    t = get_target("sm_86")
    m, n, k = 4096, 1024, 4096
    est = cm.gemm_time(t, m, n, k, "int4", act_block=128, symmetric=False, tiles=[(128, 128)])
    assert est.kernel == "cutlass sm80 block s4 (act_block=128)"
    assert math.isclose(est.bytes_moved, 1.0 * m * k + 0.5 * n * k + 2 * m * n + _scale_bytes(m, n, k, 128, False),
                        rel_tol=1e-12)
    int8_clk, fp32_clk, int_add_clk = A6000_RATES
    clocks_per_us = 309.7e6 / (84 * int8_clk)
    waves = math.ceil(32 * 8 / 84)
    mma = waves * (2 * 128 * 128 * k / (0.725 * 619.3e6 / 84))
    overhead = waves * 1.142 * (2 * 128**3 / (309.7e6 / 84))
    promote = waves * 128 * 128 * (k / 128) * (1 / int_add_clk + (1 + 4) / fp32_clk) / clocks_per_us
    assert math.isclose(est.compute_us, mma + overhead + promote, rel_tol=1e-9)
    part = cm.part_time(t, "ffn_out", m, n, k, "int4", act_block=128)
    assert part.epilogue_us == 0 and cm.part_time(t, "ffn_out", m, n, k, "int4").epilogue_us > 0


def test_quantize_kernels_write_a_scale_and_an_offset_per_block():
    t = get_target("sm_90")
    m, k = 16384, 3072
    assert math.isclose(cm.quantize_bytes(t, m, k, 8, act_block=128) - cm.quantize_bytes(t, m, k, 8),
                        8 * m * (k / 128 - 1), rel_tol=1e-12)
    assert cm.quantize_time(t, m, k, 8, act_block=128) > cm.quantize_time(t, m, k, 8)
    # folded into the LayerNorm: the codes and the block scales only
    assert math.isclose(cm.fused_quantize_time(t, m, k, 8, act_block=128) * 0.8 * 3350 * 1e3,
                        m * k + 8 * m * k / 128, rel_tol=1e-9)


def test_token_wise_models_are_unchanged_by_the_block_terms():
    shape = cm.MODEL_SHAPES["bert-base"]
    for target in ("sm_90", "sm_86"):
        total, parts = cm.model_latency(target, shape, 128, 128, "int8")
        again, _ = cm.model_latency(target, shape, 128, 128, "int8", act_block=None, symmetric=False)
        assert total == again and not any("block" in p.gemm.kernel for p in parts)
    with pytest.raises(ValueError, match="no CUDA-core rates"):
        cm.promotion_us(get_target("cpu"), 1.0)
