"""qfx.train.compose: 2:4 pruning (static l1 mask, P=>Q, kept through QAT and compile) and layer reduction."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qfx
from qfx import numerics
from qfx import train as qat
from qfx.train import compose

from test_qat_kd import W4A4, _cfg, _example, tiny_classifier, toy_data


@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 10_000))
def test_two_four_mask_keeps_the_two_largest_of_every_four(n, groups, seed):
    w = torch.randn(n, 4 * groups, generator=torch.Generator().manual_seed(seed))
    mask = compose.two_four_mask(w)
    g_abs, g_mask = w.abs().reshape(n, groups, 4), mask.reshape(n, groups, 4)
    assert (g_mask.sum(-1) == 2).all()
    kept_min = g_abs.masked_fill(~g_mask, float("inf")).amin(-1)
    dropped_max = g_abs.masked_fill(g_mask, -1.0).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_two_four_mask_breaks_ties_deterministically():
    mask = compose.two_four_mask(torch.ones(2, 8))
    assert mask.tolist() == [[True, True, False, False] * 2] * 2


def test_two_four_mask_needs_k_multiple_of_four():
    with pytest.raises(ValueError, match="multiple of 4"):
        compose.two_four_mask(torch.randn(3, 6))


def test_pruned_student_stays_2_4_through_training_and_compile():
    teacher, data = tiny_classifier(), toy_data(32)
    student = qat.make_student(teacher, W4A4, _example())
    masks = compose.two_four_masks(student, teacher)
    assert len(masks) == 12  # 6 linears x 2 layers: q, k, v, attn_out, ffn_in, ffn_out
    for name, m in masks.items():  # the mask is the teacher's l1 mask
        assert torch.equal(m, compose.two_four_mask(teacher.get_parameter(name)))
    keeper = compose.SparsityKeeper(student, masks)
    qat.distill(teacher, student, data, None, _cfg(steps=4), post_step=keeper.reapply)
    assert compose.sparsity(student, list(masks)) == pytest.approx(0.5)
    for name, m in masks.items():
        assert (student.get_parameter(name)[~m] == 0).all(), name
    cm = qfx.compile(student.eval(), mode="int4", target="cpu")
    codes = numerics.unpack_int4(cm.graph_module.get_buffer("layer0.ffn_in.w_codes"))
    w_mask = masks["bert.encoder.layer.0.intermediate.dense.weight"]
    assert (codes[~w_mask] == 0).all()  # the integer model sees the masked weights (P=>Q)


def test_default_keep_spreads_layers_and_keeps_the_last():
    assert compose.default_keep(6, 3) == (1, 3, 5)
    assert compose.default_keep(6, 4) == (0, 2, 3, 5)
    assert compose.default_keep(6, 6) == tuple(range(6))
    with pytest.raises(ValueError):
        compose.default_keep(6, 0)


def test_reduce_layers_copies_the_kept_layers():
    teacher = tiny_classifier(layers=3)
    small = compose.reduce_layers(teacher, (0, 2))
    assert small.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 3
    _, _, layers = compose.encoder_layers(small)
    for got, want in zip(layers, (0, 2)):
        ref = dict(teacher.bert.encoder.layer[want].named_parameters())
        assert all(torch.equal(p, ref[k]) for k, p in got.named_parameters())
    assert small(**_example()).logits.shape == (4, 2)
    for bad in ((2, 0), (0, 3), ()):
        with pytest.raises(ValueError):
            compose.reduce_layers(teacher, bad)


def test_layer_reduced_student_distils_from_the_full_teacher():
    teacher, data = tiny_classifier(layers=3), toy_data(32)
    keep = compose.default_keep(3, 2)
    student = qat.make_student(compose.reduce_layers(teacher, keep), W4A4, _example())
    res = qat.distill(teacher, student, data, data, _cfg(steps=3), layer_map=keep)
    assert res.steps_done == 3
    with pytest.raises(ValueError, match="layer_map"):
        qat.distill(teacher, qat.make_student(compose.reduce_layers(teacher, keep), W4A4, _example()), data, None, _cfg(steps=1), layer_map=(0,))
