"""Weight-only 4-bit formats (qfx.numerics): code tables checked against bitsandbytes' published
values and constructions, round-trip bounds, codes in range, double quantization, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qfx import numerics as nx

# Decision-tree pivots of bitsandbytes' dQuantizeNF4 (csrc/kernels.cu, commit c037a306e97c),
# ascending: an independent statement of "nearest NF4 value" to check our midpoints against.
BNB_NF4_PIVOTS = (
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
)
# dQuantizeFP4's pivots on |x| (same file), ascending, and dDequantizeFP4Tree's fp32 literals
# for codes 0b000..0b111.
BNB_FP4_PIVOTS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
BNB_FP4_LITERALS = (0.0, 5.208333333e-03, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25)


def test_nf4_table_is_qlora_normal_quantiles():
    """NF4 = quantiles of N(0, 1) (QLoRA appendix E / bitsandbytes create_normal_map with
    offset 0.9677083): 8 positive, 7 negative, an exact zero, normalised to [-1, 1]."""
    from scipy.stats import norm

    offset = 0.9677083
    pos = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].double().numpy()).tolist()
    neg = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].double().numpy())).tolist()
    vals = torch.tensor(sorted(pos + neg + [0.0]), dtype=torch.float64)
    vals = vals / vals.max()
    code = nx.nf4_code()
    assert code.shape == (16,) and code.dtype == torch.float32
    assert torch.allclose(code.double(), vals, atol=2e-7, rtol=0)
    assert code[7] == 0 and code[0] == -1 and code[15] == 1
    assert bool((code[1:] > code[:-1]).all())


def test_nf4_pivots_match_bitsandbytes_tree():
    code = nx.nf4_code().double()
    mids = (code[:-1] + code[1:]) / 2
    assert torch.allclose(mids, torch.tensor(BNB_NF4_PIVOTS, dtype=torch.float64), atol=1e-7, rtol=0)


def test_fp4_table_from_bit_fields_and_bitsandbytes_literals():
    """Code bits s|e1 e0|m, exponent bias 3: e = 0 is 0 or 0.0625 (subnormal), else
    2^(4 - e) * (1.5 if m else 1); normalised by 12 (bitsandbytes' test_4bit_quant closed form)."""
    code = nx.fp4_code()
    for idx in range(16):
        sign = -1.0 if idx & 8 else 1.0
        e, m = (idx >> 1) & 3, idx & 1
        mag = (0.0625 if m else 0.0) if e == 0 else 2.0 ** (4 - e) * (1.5 if m else 1.0)
        assert code[idx].item() == pytest.approx(sign * mag / 12.0, abs=1e-7)
        assert math.copysign(1.0, code[idx].item()) == sign  # -0.0 for code 0b1000
    literals = torch.tensor(BNB_FP4_LITERALS, dtype=torch.float32)  # fp32 rounding of the literals
    assert torch.equal(code[:8], literals)
    assert torch.equal(code[8:], -literals)
    mags = code[:8].double().sort().values
    assert torch.allclose((mags[:-1] + mags[1:]) / 2, torch.tensor(BNB_FP4_PIVOTS, dtype=torch.float64), atol=1e-6, rtol=0)


def test_dynamic_map_structure():
    """bitsandbytes' signed dynamic map: 0, 1, and per decade 10^(e-6), e = 0..6, the 2^e
    midpoints of equal steps of [0.1, 1], both signs."""
    d = nx.dynamic_map_8bit()
    assert d.shape == (256,) and bool((d[1:] > d[:-1]).all())
    assert d.max() == 1.0 and (d == 0).sum() == 1
    pos = d[d > 0][:-1]  # drop the extra 1.0
    for e in range(7):
        lo, hi = 0.1 * 10.0 ** (e - 6), 10.0 ** (e - 6)
        in_decade = pos[(pos > lo * 0.999) & (pos < hi)]
        assert in_decade.numel() == 1 << e
        step = 0.9 / (1 << e) * 10.0 ** (e - 6)
        expected = torch.tensor([(0.1 * 10.0 ** (e - 6)) + step * (j + 0.5) for j in range(1 << e)])
        assert torch.allclose(in_decade.double(), expected.double(), rtol=1e-6, atol=0)
    assert torch.equal(d[d < 0].flip(0), -pos)


def _weights(seed: int, rows: int, blocks: int, block: int, log_scale: float, outlier: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, blocks * block, generator=g) * (10.0 ** log_scale)
    if outlier:
        w[0, 0] *= 50.0
    return w


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 4), blocks=st.integers(1, 3),
    block=st.sampled_from([16, 32, 64]), log_scale=st.floats(-3, 2), outlier=st.booleans(),
    fmt=st.sampled_from(nx.WEIGHT_FORMATS),
)
def test_round_trip_codes_in_range_and_nearest(seed, rows, blocks, block, log_scale, outlier, fmt):
    w = _weights(seed, rows, blocks, block, log_scale, outlier)
    wq = nx.quantize_weight_4bit(w, fmt, block_size=block)
    scale, offset = wq.scale, wq.offset
    assert scale.shape == (rows, blocks)
    w_hat = nx.dequantize_weight_4bit(wq)
    assert w_hat.shape == w.shape and torch.isfinite(w_hat).all()
    per_elem = scale.repeat_interleave(block, dim=1)
    fp32 = 4 * 2.0**-24 * (w.abs() + (0 if offset is None else offset.abs().repeat_interleave(block, dim=1)))
    if fmt.startswith("int4"):
        assert wq.codes.dtype == torch.int8 and int(wq.codes.min()) >= -8 and int(wq.codes.max()) <= 7
        assert bool(((w_hat - w).abs() <= per_elem / 2 + fp32 + 1e-30).all())
    else:
        assert wq.codes.dtype == torch.uint8 and int(wq.codes.max()) <= 15
        table = nx.nf4_code() if fmt == "nf4" else nx.fp4_code()
        # The chosen entry is a nearest one to x / A (ties allowed), and the block absmax maps to +-1.
        normed = (w / per_elem).reshape(-1, 1)
        dist = (normed - table.reshape(1, -1)).abs()
        chosen = dist.gather(1, wq.codes.reshape(-1, 1).long())
        assert bool((chosen <= dist.min(dim=1, keepdim=True).values + 1e-6).all())
        assert torch.equal(scale, w.abs().reshape(rows, blocks, block).amax(-1))
        gap = (table.sort().values.diff().max() / 2).item()
        assert bool(((w_hat - w).abs() <= per_elem * (gap + 1e-6)).all())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 700), log_scale=st.floats(-4, 2))
def test_double_quant_bound(seed, n, log_scale):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(n, generator=g) * (10.0 ** log_scale) + 1e-6
    dq = nx.double_quantize(v)
    assert dq.codes.dtype == torch.uint8 and dq.codes.shape == (n,)
    assert dq.absmax.shape == (math.ceil(n / 256),)
    v_hat = nx.double_dequantize(dq)
    dyn = nx.dynamic_map_8bit()
    half_gap = (dyn.diff().max() / 2).item()
    b = dq.absmax.repeat_interleave(256)[:n]
    assert bool(((v_hat - v).abs() <= b * (half_gap + 1e-6) + 4 * 2.0**-24 * v.abs().max()).all())


def test_double_quant_changes_little_and_saves_memory():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    plain = nx.quantize_weight_4bit(w, "nf4", 64)
    dq = nx.quantize_weight_4bit(w, "nf4", 64, double_quant=True)
    assert isinstance(dq.scale, nx.DoubleQuantized)
    assert torch.equal(plain.codes, dq.codes)  # codes are taken with the fp32 absmax, as bitsandbytes does
    err_plain = (nx.dequantize_weight_4bit(plain) - w).pow(2).mean()
    err_dq = (nx.dequantize_weight_4bit(dq) - w).pow(2).mean()
    assert err_dq <= err_plain * 1.05
    assert dq.nbytes() < plain.nbytes()
    assert nx.weight_format_bits("nf4", 64, False) == 4.5
    assert nx.weight_format_bits("nf4", 64, True) == pytest.approx(4.127, abs=1e-3)  # QLoRA's 0.127 bits


def test_zero_block_and_packing():
    w = torch.zeros(2, 64)
    for fmt in nx.WEIGHT_FORMATS:
        wq = nx.quantize_weight_4bit(w, fmt, 32, double_quant=True)
        assert torch.equal(nx.dequantize_weight_4bit(wq), w)
    codes = torch.randint(0, 16, (3, 10), dtype=torch.uint8)
    assert torch.equal(nx.unpack_uint4(nx.pack_uint4(codes)), codes)
    assert nx.pack_uint4(torch.tensor([[1, 2]], dtype=torch.uint8)).item() == 0x21


def test_fake_quantize_weight_straight_through():
    w = torch.randn(4, 64, requires_grad=True)
    y = nx.fake_quantize_weight_4bit(w, "nf4", 64)
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    assert not torch.equal(y.detach(), w.detach())


def test_4bit_weight_formats_refuse_unknown_formats_indivisible_blocks_non_2d_weights_and_wide_codes():
    w = torch.randn(4, 96)
    with pytest.raises(ValueError, match="fmt='nf5'"):
        nx.quantize_weight_4bit(w, "nf5")
    with pytest.raises(ValueError, match="block_size=64 does not divide the input dimension K=96"):
        nx.quantize_weight_4bit(w, "nf4", 64)
    with pytest.raises(ValueError, match="2-D"):
        nx.quantize_weight_4bit(torch.randn(96), "int4", 32)
    with pytest.raises(ValueError, match="codes outside"):
        nx.pack_uint4(torch.full((1, 2), 16, dtype=torch.uint8))
