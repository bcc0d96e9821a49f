"""Tier 1: the numerics module against closed-form maths (property-tested)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qfx import numerics as nx

bits_st = st.sampled_from([4, 8])
U = 2.0**-24


def _x(seed: int, rows: int, k: int, scale: float, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g) * scale + shift


@given(seed=st.integers(0, 10_000), rows=st.integers(1, 6), k=st.integers(1, 64), bits=bits_st,
       symmetric=st.booleans(), scale=st.floats(1e-3, 1e3), shift=st.floats(-10, 10))
def test_roundtrip_error_at_most_half_step(seed, rows, k, bits, symmetric, scale, shift):
    x = _x(seed, rows, k, scale, shift)
    qp = nx.choose_qparams(x, bits, symmetric)
    q = nx.quantize(x, qp, bits)
    x_hat = nx.dequantize(q, qp)
    lo, hi = nx.code_range(bits)
    assert q.dtype == torch.int8 and int(q.min()) >= lo and int(q.max()) <= hi
    offset = 0 if qp.offset is None else qp.offset.abs()
    slack = 4 * U * (x.abs() + offset) + 4 * U * qp.scale * 2**bits
    assert ((x_hat - x).abs() <= qp.scale / 2 + slack).all()


@given(seed=st.integers(0, 10_000), bits=bits_st, k=st.integers(2, 40))
def test_asymmetric_uses_the_whole_code_range(seed, bits, k):
    x = _x(seed, 3, k, 1.0)
    qp = nx.choose_qparams(x, bits, symmetric=False)
    q = nx.quantize(x, qp, bits)
    lo, hi = nx.code_range(bits)
    assert (q.amin(dim=-1) == lo).all() and (q.amax(dim=-1) == hi).all()


@given(seed=st.integers(0, 10_000), bits=bits_st)
def test_symmetric_maps_absmax_to_the_top_code(seed, bits):
    x = _x(seed, 4, 16, 3.0)
    qp = nx.choose_qparams(x, bits, symmetric=True)
    q = nx.quantize(x, qp, bits)
    assert (q.abs().amax(dim=-1) == 2 ** (bits - 1) - 1).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_rows_use_eps_and_dequantize_to_zero(symmetric):
    x = torch.zeros(3, 8)
    qp = nx.choose_qparams(x, 4, symmetric)
    assert (qp.scale > 0).all()
    assert torch.equal(nx.dequantize(nx.quantize(x, qp, 4), qp), x)


def test_rounding_is_half_to_even():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 7.0]])  # S = 1 with 4-bit symmetric
    qp = nx.QParams(torch.tensor([[1.0]]), None)
    assert nx.quantize(x, qp, 4).tolist() == [[0, 2, 2, 0, -2, 7]]


def test_formulas_on_a_worked_example():
    # asymmetric 4-bit: min -1, max 2 -> S = 3/15 = 0.2, c = -1 + 8 * 0.2 = 0.6
    x = torch.tensor([[-1.0, 0.0, 2.0, 0.5]])
    q, s, c = nx.quantize_activation(x, 4, symmetric=False)
    assert torch.allclose(s, torch.tensor([0.2])) and torch.allclose(c, torch.tensor([0.6]))
    assert q.tolist() == [[-8, -3, 7, 0]]  # u = [0, 5, 15, 8] minus 8


@given(seed=st.integers(0, 10_000), rows=st.integers(1, 5), half_k=st.integers(1, 32))
def test_pack_unpack_identity(seed, rows, half_k):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, 2 * half_k), generator=g, dtype=torch.int8)
    packed = nx.pack_int4(q)
    assert packed.shape == (rows, half_k) and packed.dtype == torch.uint8
    assert torch.equal(nx.unpack_int4(packed), q)


def test_pack_layout_low_nibble_first():
    q = torch.tensor([[1, -1, -8, 7]], dtype=torch.int8)
    assert nx.pack_int4(q).tolist() == [[0xF1, 0x78]]


@pytest.mark.parametrize("bad", [torch.tensor([[8, 0]], dtype=torch.int8), torch.tensor([[0, 1, 2]], dtype=torch.int8)])
def test_pack_rejects_out_of_range_or_odd(bad):
    with pytest.raises(ValueError):
        nx.pack_int4(bad)


@given(seed=st.integers(0, 10_000), m=st.integers(1, 9), n=st.integers(1, 9), k=st.integers(1, 300))
def test_int_matmul_is_exact(seed, m, n, k):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    exact = (a.long().unsqueeze(1) * b.long().unsqueeze(0)).sum(-1)
    got = nx.int_matmul_reference(a, b)
    assert got.dtype == torch.int32 and torch.equal(got.long(), exact)


def test_int_matmul_extremes():
    a = torch.full((3, 4096), -128, dtype=torch.int8)
    b = torch.full((2, 4096), -128, dtype=torch.int8)
    assert (nx.int_matmul_reference(a, b) == 128 * 128 * 4096).all()


@given(seed=st.integers(0, 10_000), m=st.integers(1, 6), n=st.integers(1, 6), k_groups=st.integers(1, 4),
       group=st.sampled_from([None, 8, 16]), a_bits=bits_st, w_bits=bits_st, symmetric=st.booleans(),
       gelu=st.booleans())
def test_int_linear_matches_dequantized_float_linear(seed, m, n, k_groups, group, a_bits, w_bits, symmetric, gelu):
    k = 16 * k_groups
    x, w = _x(seed, m, k, 2.0, 0.3), _x(seed + 1, n, k, 0.1)
    bias = _x(seed + 2, 1, n, 0.5)[0]
    q_a, s_a, c_a = nx.quantize_activation(x, a_bits, symmetric)
    q_w, s_w = nx.quantize_weight(w, w_bits, group)
    ws = nx.weight_offset_sum(q_w, s_w)
    y = nx.int_linear_reference(q_a, s_a, c_a, q_w, s_w, ws, bias, gelu=False)
    x_hat = nx.dequantize(q_a, nx.QParams(s_a.unsqueeze(-1), None if symmetric else c_a.unsqueeze(-1)))
    w_hat = nx.dequantize(q_w, nx.QParams(s_w, None), group)
    ref = x_hat.double() @ w_hat.double().T + bias.double()
    bound = (k + 8) * U * (x_hat.abs().double() @ w_hat.abs().double().T + bias.abs().double()) + 1e-30
    assert ((y.double() - ref).abs() <= bound).all()
    if gelu:
        yg = nx.int_linear_reference(q_a, s_a, c_a, q_w, s_w, ws, bias, gelu=True)
        assert torch.equal(yg, torch.nn.functional.gelu(y))


@given(seed=st.integers(0, 10_000), bits=bits_st, symmetric=st.booleans())
def test_fake_quantize_forward_equals_dequant_quant_and_grad_is_ste(seed, bits, symmetric):
    x = _x(seed, 3, 10, 1.0).requires_grad_()
    clip = (-1.0, 1.0)
    y = nx.fake_quantize(x, bits, symmetric, clip=clip)
    q, s, c = nx.quantize_activation(x.detach(), bits, symmetric, clip)
    expected = q.float() * s.unsqueeze(-1) + c.unsqueeze(-1)
    assert torch.allclose(y.detach(), expected, atol=1e-6)
    y.sum().backward()
    inside = (x.detach() >= clip[0]) & (x.detach() <= clip[1])
    assert torch.equal(x.grad, inside.float())


@pytest.mark.parametrize("bits", [0, 2, 3, 16])
def test_unsupported_bits_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        nx.choose_qparams(torch.ones(2, 4), bits, True)


def test_group_size_must_divide_k():
    with pytest.raises(ValueError, match="group_size"):
        nx.quantize_weight(torch.ones(4, 10), 4, group_size=4)


def _rounded_quotient_fast_path(num: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPU quantizer's division (backends/cutlass/csrc/quantize_kernels.cu, rounded_quotient),
    in fp32 with torch's IEEE round-to-nearest ops: (rint of num * RN(1/scale), where that is
    taken); the kernel takes the true division everywhere else."""
    s = torch.tensor(scale, dtype=torch.float32)
    p = num * (torch.tensor(1.0, dtype=torch.float32) / s)
    r = torch.round(p)  # half to even, as rintf
    return r, (p.abs() <= 1024) & ((p - r).abs() <= 0.5 - 2.0**-10)


@pytest.mark.parametrize("bits, symmetric", [(8, True), (8, False), (4, True), (4, False)])
def test_reciprocal_fast_path_of_the_kernels_rounds_like_true_division(bits, symmetric):
    """Where the kernels skip the division (a multiply by the reciprocal, far enough from every
    half-integer), the code equals rint of the correctly rounded quotient: random rows of any scale
    and quotients within a few ulps of k + 1/2 (ties included), a million values per case."""
    gen = torch.Generator().manual_seed(7 * bits + symmetric)
    half = 2 ** (bits - 1)
    for exponent in (-30, -8, 0, 6, 20):
        x = torch.randn(4, 65536, generator=gen) * 2.0**exponent
        x[:, 0] *= 4  # each row's range fixes a scale of its own
        _, scale, offset = nx.quantize_activation(x, bits, symmetric)
        for row in range(x.shape[0]):
            s = float(scale[row])
            zero = offset[row] - half * scale[row]
            # quotients near k + 1/2: the boundaries a multiply could round to the wrong side of
            k = torch.randint(-half, 2 * half, (65536,), generator=gen).float() + 0.5
            near = (k * s).float()
            near = torch.cat([near, torch.nextafter(near, torch.full_like(near, float("inf"))),
                              torch.nextafter(near, torch.full_like(near, -float("inf")))])
            num = torch.cat([x[row] if symmetric else x[row] - zero, near])
            fast, taken = _rounded_quotient_fast_path(num, s)
            exact = torch.round(num / torch.tensor(s, dtype=torch.float32))
            assert taken[:65536].float().mean() > 0.99  # the common path for values of a row
            assert torch.equal(fast[taken], exact[taken])
