"""QuantConfig(rotation=b): quantized linears read a block-Hadamard-rotated input (passes/rotate_inputs.py).

The rotation is orthogonal (the float function is unchanged), deterministic (prepare_qat and
compile rebuild the same one), shared by linears that read one tensor, trains (its gradient is
the transposed rotation), and the compiled model stays its QAT twin bit for bit."""
from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import inputs, make

import qfx
from qfx import numerics
from qfx.capture import capture
from qfx.passes.annotate import annotate
from qfx.passes.rotate_inputs import rotate_inputs
from qfx.schema import ROTATE, is_call

ROLES = ("qkv", "attn_out", "ffn_in", "ffn_out")
pytestmark = pytest.mark.filterwarnings("ignore::qfx.PostTrainingQuantizationWarning")


def _tiny(seed=0):
    return make("bert_cls", layers=2, hidden=64, heads=2, seed=seed).eval()


# --------------------------------------------------------------------------- numerics


@settings(max_examples=25, deadline=None)
@given(log_b=st.integers(1, 6), blocks=st.integers(1, 5), rows=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_rotate_blocks_is_x_times_the_orthogonal_rotation_matrix(log_b, blocks, rows, seed):
    b = 2 ** log_b
    k = b * blocks
    r = numerics.rotation_matrix(k, b)
    assert torch.allclose(r @ r.T, torch.eye(k, dtype=torch.float64), atol=1e-12)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    signs = numerics.rotation_signs(k)
    y = numerics.rotate_blocks(x, signs, b)
    assert y.dtype == torch.float64 and torch.allclose(y, x @ r, atol=1e-12)
    assert torch.allclose(numerics.rotate_blocks(y, signs, b, transpose=True), x, atol=1e-12)
    y32 = numerics.rotate_blocks(x.float(), signs, b)
    assert y32.dtype == torch.float32 and torch.allclose(y32.double(), x @ r, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 40), seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_a_tokens_rotation_does_not_depend_on_the_other_tokens(rows, seed, dtype):
    """The QAT graph rotates a batch, the compiled model a padded bucket: each token's bits must
    be the same whatever else is rotated with it (a GEMM would not promise that)."""
    k, b = 256, 128
    x = torch.randn(rows, 3, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    signs = numerics.rotation_signs(k)
    whole = numerics.rotate_blocks(x, signs, b)
    assert whole.dtype == dtype
    for i in (0, rows - 1):
        assert torch.equal(numerics.rotate_blocks(x[i : i + 1, 1:2], signs, b), whole[i : i + 1, 1:2])
    padded = torch.cat([x, torch.zeros(5, 3, k, dtype=dtype)])
    assert torch.equal(numerics.rotate_blocks(padded, signs, b)[:rows], whole)


def test_rotation_signs_are_a_fixed_function_of_k():
    a, b = numerics.rotation_signs(384), numerics.rotation_signs(384)
    assert torch.equal(a, b) and set(a.tolist()) == {-1.0, 1.0}
    assert 0.4 < float((a > 0).float().mean()) < 0.6  # not degenerate
    assert not torch.equal(numerics.rotation_signs(384)[:256], numerics.rotation_signs(256))
    # pinned: a model rotated (prepare_qat) by one qfx version must compile with the same rotation
    # in the next, so the generator may never change; these values are its output when it was written
    assert numerics.rotation_signs(8).tolist() == [1, -1, 1, 1, 1, 1, 1, -1]
    assert int((numerics.rotation_signs(1024) > 0).sum()) == 518
    digest = hashlib.sha256(numerics.rotation_signs(1536).numpy().tobytes()).hexdigest()
    assert digest.startswith("6533824e20df3642"), digest


def test_rotate_op_has_the_transposed_rotation_as_its_gradient():
    k, b = 16, 8
    signs = numerics.rotation_signs(k)
    x = torch.randn(3, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.qfx.rotate(t, signs, b), (x,))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad", [0, 1, 3, 100, -8, True, 64.0, "128"])
def test_rotation_must_be_a_power_of_two_block(bad):
    with pytest.raises(ValueError, match="rotation"):
        qfx.QuantConfig(rotation=bad)


def test_a_rotation_block_that_does_not_divide_k_is_refused_with_the_linear_named():
    with pytest.raises(ValueError, match=r"rotation=256\) does not divide K=64 of linear layer0"):
        qfx.prepare_qat(_tiny(), example_kwargs=inputs(2, 8), config=qfx.QuantConfig(4, 4, rotation=256))


def test_checkpoints_saved_before_rotation_existed_still_resume():
    """The training checkpoint's fingerprint records repr(QuantConfig); a new field shows there
    only when set, so an older run's fingerprint matches, and a rotated run's does not."""
    from qfx.train.checkpoint import check_fingerprint

    legacy = ("QuantConfig(weight_bits=8, act_bits=8, symmetric=True, weight_group='row', act_granularity='token', "
              "act_clip=None, roles=('qkv', 'attn_out', 'ffn_in', 'ffn_out'), quantize_other=False)")
    assert repr(qfx.QuantConfig(8, 8)) == legacy
    run = {"run": {}, "params": []}
    check_fingerprint("ckpt", {**run, "quant": legacy}, {**run, "quant": repr(qfx.QuantConfig(8, 8))})
    with pytest.raises(ValueError, match="rotation=128"):
        check_fingerprint("ckpt", {**run, "quant": legacy}, {**run, "quant": repr(qfx.QuantConfig(8, 8, rotation=128))})


def test_the_tag_names_the_rotation():
    assert qfx.QuantConfig(4, 4, symmetric=False, rotation=128).tag == "W4A4-asym-rot128"
    assert qfx.QuantConfig(4, 4).tag == "W4A4-sym"


# --------------------------------------------------------------------------- the pass


def test_rotated_graph_computes_the_float_function():
    """Annotate + rotate_inputs, no quantization: the rotated linears give the float model's
    outputs (up to fp32 rounding); one rotation per distinct input (q, k and v share one)."""
    model = _tiny()
    x = inputs(3, 11, seed=1)
    with torch.no_grad():
        ref = model(**x).logits
    gm = capture(copy.deepcopy(model), (), inputs(2, 8))
    gm = rotate_inputs(annotate(gm, qfx.QuantConfig(4, 4, rotation=32), ()))
    rotations = [n for n in gm.graph.nodes if is_call(n, ROTATE)]
    assert len(rotations) == 2 * 4  # per layer: LN1 (q, k, v), context, LN2, GELU output
    assert len(gm.meta["qfx_rotated"]) == 2 * 6
    with torch.no_grad():
        got = gm(**x).logits
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_compiled_rotated_model_is_its_qat_twin_bit_for_bit_and_trains():
    cfg = qfx.QuantConfig(4, 4, symmetric=False, rotation=32)
    qat = qfx.prepare_qat(_tiny(), example_kwargs=inputs(2, 8), config=cfg)
    opt = torch.optim.SGD(qat.parameters(), lr=1e-2)
    x = inputs(4, 16, seed=3)
    for _ in range(2):  # gradients reach the embeddings through the rotations (STE + rotate's backward)
        opt.zero_grad()
        qat(**x).logits.square().mean().backward()
        emb = [p for n, p in qat.named_parameters() if "word_embeddings" in n][0]
        assert emb.grad is not None and emb.grad.abs().sum() > 0
        opt.step()
    qat.eval()
    compiled = qfx.compile(qat, mode="int4", target="cpu")
    y = inputs(3, 21, seed=7)
    with torch.no_grad():
        assert torch.equal(compiled(**y).logits, qat(**y).logits)
    precisions = {r.precision for r in compiled.report().quantized}
    assert precisions == {"W4A4 asym rot32"}, precisions
    parts = dict(compiled.report().float_parts)
    assert "input rotations (8 qfx::rotate)" in parts and "blocks of 32" in parts["input rotations (8 qfx::rotate)"]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), outlier=st.floats(10.0, 100.0))
def test_rotation_lowers_the_w4a4_error_of_inputs_with_outlier_channels(seed, outlier):
    """BERT's LayerNorm outputs carry a few huge channels; per-token 4-bit codes of every other
    channel then collapse to 0 or +-1. Rotated (x R, W R), the same linear loses much less."""
    g = torch.Generator().manual_seed(seed)
    k, n, b = 256, 64, 128
    x = torch.randn(32, k, generator=g)
    x[:, [5, 77]] *= outlier
    w = torch.randn(n, k, generator=g) * 0.05
    ref = x @ w.T
    r = numerics.rotation_matrix(k, b).float()

    def w4a4(a, m):
        return numerics.fake_quantize(a, 4, False) @ numerics.fake_quantize(m, 4, True).T

    plain = float((w4a4(x, w) - ref).norm() / ref.norm())
    rotated = float((w4a4(x @ r, w @ r) - ref).norm() / ref.norm())
    assert rotated < 0.7 * plain, (plain, rotated)


def test_compile_keeps_the_rotation_of_a_linear_it_leaves_in_float():
    """A QAT model's weights are W R; compiled with every part skipped, the float linears still
    read x R, so the model is the float function again."""
    model = _tiny()
    x = inputs(3, 11, seed=1)
    with torch.no_grad():
        ref = model(**x).logits
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=qfx.QuantConfig(4, 4, rotation=32)).eval()
    cm = qfx.compile(qat, mode="int4", target="cpu", skip=ROLES)
    assert not cm.report().quantized
    with torch.no_grad():
        assert torch.allclose(cm(**x).logits, ref, atol=1e-5)


def test_ptq_with_rotation_equals_the_untrained_qat_twin():
    model = _tiny()
    cfg = qfx.QuantConfig(4, 4, symmetric=False, rotation=32)
    ptq = qfx.compile(model, mode="int4", target="cpu", config=cfg, example_kwargs=inputs(2, 8))
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=cfg).eval()
    y = inputs(2, 9, seed=5)
    with torch.no_grad():
        assert torch.equal(ptq(**y).logits, qat(**y).logits)
    # the float model itself was not rotated
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, _tiny().bert.encoder.layer[0].attention.self.query.weight)


def test_rotated_model_saves_and_loads(tmp_path):
    cfg = qfx.QuantConfig(4, 4, rotation=32)
    cm = qfx.compile(_tiny(), mode="int4", target="cpu", config=cfg, example_kwargs=inputs(2, 8))
    path = qfx.save(cm, tmp_path / "rot.qfx.safetensors")
    again = qfx.load(path)
    y = inputs(2, 9, seed=5)
    with torch.no_grad():
        assert torch.equal(again(**y).logits, cm(**y).logits)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [qfx.QuantConfig(4, 4, symmetric=False, rotation=32), qfx.QuantConfig(8, 8, rotation=64)])
def test_gpu_rotated_compiled_model_is_its_twin(cfg):
    """fp32 float parts: bit-identical to the twin on the GPU; fp16 (the default) close to it and
    replayed from CUDA graphs."""
    target = qfx.detect_target()
    model = _tiny().cuda()
    qat = qfx.prepare_qat(model, example_kwargs={k: v.cuda() for k, v in inputs(2, 8).items()}, config=cfg).eval()
    x = {k: v.cuda() for k, v in inputs(3, 37, seed=5).items()}
    with torch.no_grad():
        twin = qat(**x).logits
        exact = qfx.compile(qat, mode=f"int{cfg.weight_bits}", target=target.name, float_dtype=torch.float32)
        assert torch.equal(exact(**x).logits, twin), (exact(**x).logits - twin).abs().max()
        fast = qfx.compile(qat, mode=f"int{cfg.weight_bits}", target=target.name)
        for _ in range(3):
            got = fast(**x).logits.float()
    assert torch.allclose(got, twin, atol=5e-2, rtol=5e-2), (got - twin).abs().max()
    assert {r.backend for r in fast.report().quantized} == {"cutlass"}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_rotation_kernel_is_the_torch_definition_bit_for_bit(dtype):
    from qfx.backends.triton.rotation import rotate_triton

    for k, b, rows in ((384, 128, 1), (1536, 128, 4099), (768, 64, 37), (64, 32, 130)):
        x = (torch.randn(rows, k, device="cuda") * 4).to(dtype)
        signs = numerics.rotation_signs(k).cuda()
        ref = numerics.rotate_blocks(x, signs, b)
        got = rotate_triton(x, signs, b)
        assert got.dtype == dtype and torch.equal(got, ref), (k, b, rows, (got.float() - ref.float()).abs().max())
        assert torch.equal(rotate_triton(x[:1], signs, b), ref[:1])  # row-count invariant
        assert torch.equal(numerics.rotate_blocks(x.cpu(), signs.cpu(), b), ref.cpu())  # IEEE adds: CPU == GPU


def test_padding_removal_packs_through_the_rotations():
    """qfx::rotate is token-wise: remove_padding=True runs it on the packed real tokens, and the
    real tokens keep the padded compile's bits."""
    from qfx.schema import PACK_TOKENS

    model = make("bert", layers=2, hidden=64, heads=2).eval()
    kw = dict(mode="int4", target="cpu", config=qfx.QuantConfig(4, 4, symmetric=False, rotation=32), example_kwargs=inputs(2, 8))
    padded, unpadded = qfx.compile(model, **kw), qfx.compile(model, remove_padding=True, **kw)
    gm = unpadded.graph_module
    assert gm.meta["qfx_unpad"].startswith("on:"), gm.meta["qfx_unpad"]
    assert sum(1 for n in gm.graph.nodes if is_call(n, PACK_TOKENS)) == 1 + 2  # as without rotation
    assert all(n.meta.get("qfx_tokens") == "packed" for n in gm.graph.nodes if is_call(n, ROTATE))
    x = inputs(3, 11, seed=4)
    x["attention_mask"][1, 6:] = 0
    real = x["attention_mask"].bool()
    with torch.no_grad():
        assert torch.equal(unpadded(**x).last_hidden_state[real], padded(**x).last_hidden_state[real])
