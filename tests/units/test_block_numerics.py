"""Tier 1: block-scaled activations (QuantConfig(act_block=B)) against closed-form maths.

The definition (qfx.numerics.affine, "Block-scaled activations") is re-derived here
independently, one scalar fp32 operation at a time in numpy, so a change of order in the
library is caught bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qfx import numerics as nx
from qfx.config import QuantConfig
from qfx.numerics.fake_quant import ActFakeQuant, activation_codes, integer_linear

bits_st = st.sampled_from([4, 8])


def _x(seed: int, rows: int, k: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g) * scale + shift


@given(seed=st.integers(0, 10_000), rows=st.integers(1, 5), blocks=st.integers(1, 4), block=st.sampled_from([2, 8, 16, 32]),
       bits=bits_st, symmetric=st.booleans(), scale=st.floats(1e-2, 1e2))
def test_block_codes_are_token_wise_codes_of_each_block(seed, rows, blocks, block, bits, symmetric, scale):
    x = _x(seed, rows, blocks * block, scale)
    q, s, c = nx.quantize_activation(x, bits, symmetric, block=block)
    assert q.shape == x.shape and s.shape == c.shape == (rows, blocks)
    for j in range(blocks):
        qj, sj, cj = nx.quantize_activation(x[:, j * block:(j + 1) * block], bits, symmetric)
        assert torch.equal(q[:, j * block:(j + 1) * block], qj)
        assert torch.equal(s[:, j], sj) and torch.equal(c[:, j], cj)


def test_one_block_per_row_is_token_wise():
    x = _x(1, 4, 64)
    for symmetric in (True, False):
        tok = nx.quantize_activation(x, 4, symmetric)
        q, s, c = nx.quantize_activation(x, 4, symmetric, block=64)
        assert torch.equal(q, tok[0]) and torch.equal(s[:, 0], tok[1]) and torch.equal(c[:, 0], tok[2])


def _blocks_by_hand(q_a, s_a, c_a, q_w, s_w, bias) -> np.ndarray:
    """The documented order, one fp32 scalar operation at a time (numpy float32 never fuses)."""
    f = np.float32
    m, k = q_a.shape
    n, blocks, groups = q_w.shape[0], s_a.shape[1], s_w.shape[1]
    b = k // blocks
    y = np.zeros((m, n), dtype=np.float32)
    for i in range(m):
        for o in range(n):
            p = f(0.0)
            for j in range(blocks):
                acc = int(np.dot(q_a[i, j * b:(j + 1) * b].astype(np.int64), q_w[o, j * b:(j + 1) * b].astype(np.int64)))
                t = f(f(acc) * f(s_a[i, j]))
                if c_a is not None:
                    t = f(t + f(f(c_a[i, j]) * f(q_w[o, j * b:(j + 1) * b].astype(np.int64).sum())))
                if groups > 1:
                    t = f(t * f(s_w[o, j * groups // blocks]))
                p = f(p + t)
            v = f(p * f(s_w[o, 0])) if groups == 1 else p
            y[i, o] = v if bias is None else f(v + f(bias[o]))
    return y


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 4), n=st.integers(1, 5), blocks=st.integers(1, 4),
       block=st.sampled_from([4, 16]), a_bits=bits_st, w_bits=bits_st, symmetric=st.booleans(),
       grouped=st.booleans(), with_bias=st.booleans())
def test_block_linear_follows_the_documented_fp32_order(seed, m, n, blocks, block, a_bits, w_bits, symmetric, grouped,
                                                        with_bias):
    k = blocks * block
    x, w = _x(seed, m, k, 3.0, 0.5), _x(seed + 1, n, k)
    bias = _x(seed + 2, 1, n)[0] if with_bias else None
    q_a, s_a, c_a = nx.quantize_activation(x, a_bits, symmetric, block=block)
    q_w, s_w = nx.quantize_weight(w, w_bits, block if grouped else None)
    y = nx.int_linear_blocks_reference(q_a, s_a, c_a, q_w, s_w, nx.weight_block_sums(q_w, block), bias)
    want = _blocks_by_hand(q_a.numpy(), s_a.numpy(), None if symmetric else c_a.numpy(), q_w.numpy(), s_w.numpy(),
                           None if bias is None else bias.numpy())
    assert np.array_equal(y.numpy(), want)
    # and it is x_hat @ w_hat.T + bias up to fp32 rounding of the per-block sums
    x_hat = nx.dequantize(q_a, nx.QParams(s_a, None if symmetric else c_a), block).double()
    w_hat = nx.dequantize(q_w, nx.QParams(s_w, None), block if grouped else None).double()
    exact = x_hat @ w_hat.T + (0 if bias is None else bias.double())
    bound = 8 * (blocks + 2) * 2.0**-24 * ((x_hat.abs() @ w_hat.abs().T) + (0 if bias is None else bias.double().abs()))
    assert ((y.double() - exact).abs() <= bound + 1e-30).all()


def test_block_must_divide_k_and_weight_groups():
    with pytest.raises(ValueError, match="act_block=48 does not divide the activation's K=64"):
        nx.quantize_activation(_x(0, 2, 64), 4, True, block=48)
    with pytest.raises(ValueError, match=r"weight_group=64, act_block=128.*multiple of 128"):
        QuantConfig(4, 4, weight_group=64, act_block=128)
    with pytest.raises(ValueError, match=r"act_block=128, act_bits=16"):
        QuantConfig(4, 16, act_block=128)
    for bad in (0, 1, True, 12.5, "128"):
        with pytest.raises(ValueError, match="act_block"):
            QuantConfig(act_block=bad)
    assert QuantConfig(4, 4, weight_group=256, act_block=128).tag == "W4A4-sym-g256-ablk128"
    assert "act_block" not in repr(QuantConfig())  # token-wise checkpoints' fingerprints unchanged


@given(seed=st.integers(0, 1000), symmetric=st.booleans(), grouped=st.booleans())
@settings(max_examples=15, deadline=None)
def test_qat_twin_forward_is_the_block_linear_and_trains(seed, symmetric, grouped):
    block, k, n = 16, 48, 8
    x = _x(seed, 6, k, 2.0).reshape(2, 3, k).requires_grad_()
    w = _x(seed + 1, n, k).requires_grad_()
    bias = _x(seed + 2, 1, n)[0]
    act = (4, symmetric, None, block)
    codes = activation_codes(x, act)
    x_hat = ActFakeQuant(*act)(x, codes)
    group = block if grouped else None
    from qfx.numerics.fake_quant import WeightFakeQuant
    y = integer_linear(x_hat, WeightFakeQuant(4, group)(w), bias, codes, w, (4, group))
    q_w, s_w = nx.quantize_weight(w.detach(), 4, group)
    want = nx.int_linear_blocks_reference(codes[0].reshape(6, k), codes[1].reshape(6, 3), codes[2].reshape(6, 3),
                                          q_w, s_w, nx.weight_block_sums(q_w, block), bias)
    assert torch.equal(y.detach().reshape(6, n), want)
    y.sum().backward()
    assert x.grad is not None and w.grad is not None and x.grad.abs().sum() > 0


def test_act_block_state_dicts_do_not_cross():
    blockwise, tokenwise = ActFakeQuant(4, True, None, 128), ActFakeQuant(4, True, None)
    with pytest.raises(ValueError, match=r"trained with QuantConfig\(act_block=128\).*prepared with act_block=None"):
        tokenwise.load_state_dict(blockwise.state_dict())
    with pytest.raises(ValueError, match=r"trained with QuantConfig\(act_block=None\).*act_block=128"):
        blockwise.load_state_dict(tokenwise.state_dict())
    with pytest.raises(ValueError, match=r"act_block=64"):
        blockwise.load_state_dict(ActFakeQuant(4, True, None, 64).state_dict())
    blockwise.load_state_dict(ActFakeQuant(4, True, None, 128).state_dict())
    tokenwise.load_state_dict(ActFakeQuant(8, False, None).state_dict())


def test_block_ops_dispatch_and_refuse_by_name():
    x = _x(3, 5, 64)
    q, s, c = torch.ops.qfx.quantize(x, 8, False, None, None, "reference", act_block=32)
    assert s.shape == (5, 2)
    q_w, s_w = nx.quantize_weight(_x(4, 7, 64), 8)
    bs = nx.weight_block_sums(q_w, 32)
    y = torch.ops.qfx.int_linear(q, s, c, q_w, 8, s_w, bs, None, True, torch.float32, 8, "reference", act_block=32)
    assert torch.equal(y, nx.int_linear_blocks_reference(q, s, c, q_w, s_w, bs, None, gelu=True))
    with pytest.raises(RuntimeError, match=r"act_block=32.*no implementation for backend='nowhere'"):
        torch.ops.qfx.int_linear(q, s, c, q_w, 8, s_w, bs, None, False, torch.float32, 8, "nowhere", act_block=32)
    with torch._subclasses.FakeTensorMode():
        fq = torch.ops.qfx.quantize(torch.empty(2, 3, 64), 4, True, None, None, "reference", act_block=16)
        assert fq[1].shape == (2, 3, 4)
