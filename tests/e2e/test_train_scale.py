"""qfx.train at scale, on the CPU: the tensor-core accumulator (dispatch and exactness), mixed
precision, the training pipeline's feature taps, lean checkpoints, and the bad-input errors
(batch vs world size, another run's checkpoint, NCCL missing, out of memory). GPU tests at
the end (marked ``gpu``): the twin on int8 tensor cores stays bit-identical to the compiled model.
"""
from __future__ import annotations

import os

import pytest
import torch

import qfx
from qfx import numerics
from qfx import train as kd
from qfx.numerics.fake_quant import activation_codes, integer_linear
from qfx.pipeline import QAT_PASSES, TRAIN_PASSES
from qfx.train import checkpoint, ddp

from models import inputs, make
from test_qat_kd import W4A4, _example, _params, tiny_classifier, toy_data


def _cfg(tmp_path=None, **kw) -> kd.TrainConfig:
    base = dict(steps=4, batch_size=8, lr=1e-3, eval_every=2, progress=False, ckpt_every=1)
    if tmp_path is not None:
        base["ckpt_dir"] = str(tmp_path)
    return kd.TrainConfig(**(base | kw))


# --------------------------------------------------------------------------- accumulator


@pytest.mark.parametrize("m,k,n", [(1, 8, 8), (3, 64, 24), (16, 32, 8), (17, 128, 64), (40, 384, 1536), (5, 13, 7)])
@pytest.mark.parametrize("bits", [4, 8])
def test_int_mm_path_equals_the_float64_reference(m, k, n, bits):
    """torch._int_mm (forced, on the CPU where torch implements it too) returns the same int32
    accumulators as the float64 reference, M <= 16 padded; extreme codes included."""
    lo, hi = numerics.code_range(bits)
    g = torch.Generator().manual_seed(m * k + n)
    a = torch.randint(lo, hi + 1, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    a[0] = lo  # the largest magnitudes: -2^(b-1) * -2^(b-1) summed over K
    b[0] = lo
    got = numerics.int_matmul(a, b, tensor_cores=True)
    want = numerics.int_matmul_reference(a, b)
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got, want)
    assert int(want[0, 0]) == k * lo * lo


def test_int_matmul_dispatch(monkeypatch):
    """CUDA with K, N multiples of 8 -> tensor cores; anything else -> the float64 reference
    (the CPU reference by default); M is padded to 17 rows for torch._int_mm."""
    refuse = numerics.affine._int_mm_refusal
    assert refuse(torch.device("cuda", 0), 384, 1536) is None
    assert "multiples of 8" in refuse(torch.device("cuda", 0), 13, 64)
    assert "multiples of 8" in refuse(torch.device("cuda", 0), 64, 12)
    assert "reference" in refuse(torch.device("cpu"), 64, 64)
    seen = []
    real = torch._int_mm

    def spy(x, y):
        seen.append((tuple(x.shape), tuple(y.shape), y.stride()))
        return real(x, y)

    monkeypatch.setattr(torch, "_int_mm", spy)
    a, b = torch.ones(3, 16, dtype=torch.int8), torch.ones(8, 16, dtype=torch.int8)
    assert torch.equal(numerics.int_matmul(a, b), numerics.int_matmul_reference(a, b)) and seen == []  # CPU: float64
    numerics.int_matmul(a, b, tensor_cores=True)
    assert seen == [((17, 16), (16, 8), (1, 16))]  # padded M, column-major [K, N] operand
    with pytest.raises(ValueError, match="int8 codes"):
        numerics.int_matmul(a.int(), b, tensor_cores=True)


def test_integer_linear_under_bf16_autocast_rounds_the_fp32_twin_once():
    """Under autocast the integer linear returns the autocast dtype: its fp32 result rounded
    once (as the compiled model with float parts in that dtype); gradients reach fp32 weights."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    w = torch.randn(48, 32, requires_grad=True)
    bias = torch.randn(48, requires_grad=True)
    act = (4, False, None)
    codes = activation_codes(x, act)
    x_hat = kd_fq_act(x, codes)
    w_hat = numerics.fake_quantize(w, 4, True, None)
    y32 = integer_linear(x_hat, w_hat, bias, codes, w, (4, None))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = integer_linear(x_hat, w_hat, bias, codes, w, (4, None))
    assert y32.dtype == torch.float32 and y16.dtype == torch.bfloat16
    assert torch.equal(y16, y32.to(torch.bfloat16))
    y16.float().square().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def kd_fq_act(x, codes):
    from qfx.numerics.fake_quant import ActFakeQuant

    return ActFakeQuant(4, False, None)(x, codes)


# --------------------------------------------------------------------------- pipeline


def test_training_graphs_end_with_expose_features_from_the_pipeline():
    teacher = tiny_classifier()
    student = kd.make_student(teacher, W4A4, _example())
    t_graph = kd.make_teacher(teacher, _example())
    names = [n for n, _ in QAT_PASSES] + [n for n, _ in TRAIN_PASSES]
    assert TRAIN_PASSES[-1][0] == "expose_features"
    assert list(student.meta["qfx_passes"])[-len(names):] == names
    assert list(t_graph.meta["qfx_passes"])[-1] == "expose_features"


# --------------------------------------------------------------------------- mixed precision


def test_bf16_distill_keeps_fp32_master_weights_and_compiles_to_its_twin():
    teacher, data = tiny_classifier(dropout=0.0), toy_data(32)
    student = kd.make_student(teacher, W4A4, _example())
    before = _params(student)
    res = kd.distill(teacher, student, data, data, _cfg(precision="bf16", keep_best=False), kd.KDWeights(ce=0.5))
    assert res.steps_done == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    after = _params(student)
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], v) for k, v in after.items())
    student.eval()
    x = toy_data(6, seed=3).batch(list(range(6)))[0]
    with torch.no_grad():
        twin = student(**x).logits
        got = qfx.compile(student, mode="int4", target="cpu")(**x).logits
    assert torch.equal(got, twin)


@pytest.mark.parametrize("bad", [dict(precision="fp8"), dict(sharding="zero"), dict(log_every=0), dict(compile="yes")])
def test_train_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        _cfg(**bad)


# --------------------------------------------------------------------------- checkpoints


def test_finished_run_keeps_weights_only_and_resumes_as_done(tmp_path):
    teacher, data = tiny_classifier(), toy_data(32)
    student = kd.make_student(teacher, W4A4, _example())
    part = kd.distill(teacher, student, data, data, _cfg(tmp_path, stop_after=2))
    mid = torch.load(tmp_path / checkpoint.LAST, weights_only=False)
    mid_size = os.path.getsize(tmp_path / checkpoint.LAST)
    assert not part.finished and mid["optim"] is not None and (tmp_path / checkpoint.BEST).exists()
    res = kd.distill(teacher, student, data, data, _cfg(tmp_path))
    assert res.finished and res.resumed_from == 2
    assert sorted(os.listdir(tmp_path)) == [checkpoint.LAST]
    done = torch.load(tmp_path / checkpoint.LAST, weights_only=False)
    assert done["finished"] and done["optim"] is None and done["sched"] is None
    weight_bytes = sum(v.numel() * v.element_size() for v in student.state_dict().values())
    assert res.ckpt_bytes == os.path.getsize(tmp_path / checkpoint.LAST) < 1.2 * weight_bytes + 100_000
    assert res.ckpt_bytes < 0.5 * mid_size  # weights + Adam's two moments -> weights alone
    again = kd.make_student(teacher, W4A4, _example())
    res2 = kd.distill(teacher, again, data, data, _cfg(tmp_path))
    assert res2.resumed_from == 4 and res2.history == res.history
    for k, v in _params(student).items():
        assert torch.equal(v, _params(again)[k]), k


def test_checkpoint_of_another_run_is_rejected_with_what_differs(tmp_path):
    teacher, data = tiny_classifier(), toy_data(32)
    kd.distill(teacher, kd.make_student(teacher, W4A4, _example()), data, None, _cfg(tmp_path, stop_after=1))
    with pytest.raises(ValueError, match=r"precision='fp32' \(now 'bf16'\).*new ckpt_dir"):
        kd.distill(teacher, kd.make_student(teacher, W4A4, _example()), data, None, _cfg(tmp_path, precision="bf16"))
    with pytest.raises(ValueError, match="quantization"):
        kd.distill(teacher, kd.make_student(teacher, qfx.QuantConfig(8, 8), _example()), data, None, _cfg(tmp_path))


# --------------------------------------------------------------------------- bad input


def test_world_size_that_does_not_divide_the_batch_is_rejected(monkeypatch):
    monkeypatch.setattr(ddp, "world", lambda: (0, 3))
    with pytest.raises(ValueError, match=r"batch_size=9 or 6 \(a multiple of the world size 3\)"):
        kd.finetune(tiny_classifier(), toy_data(32), None, _cfg())


def test_gpu_run_without_nccl_names_the_gloo_fallback(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match="no NCCL.*backend='gloo'"):
        kd.init_distributed()
    with pytest.raises(ValueError, match="use 'nccl'"):
        kd.init_distributed(backend="mpi")


class _SmallMemory(torch.nn.Module):
    """A classifier whose 'device' holds at most ``fits`` examples (forward raises OOM beyond)."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.inner, self.fits = tiny_classifier(), fits

    def forward(self, input_ids, attention_mask, token_type_ids):
        if input_ids.shape[0] > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def test_out_of_memory_names_the_largest_batch_that_fits():
    with pytest.raises(torch.OutOfMemoryError, match=r"batch_size=16 \(16 per rank.*a per-rank batch of 4 fits.*batch_size=4\)"):
        kd.finetune(_SmallMemory(fits=5), toy_data(32), None, _cfg(batch_size=16))
    with pytest.raises(torch.OutOfMemoryError, match="not even one example fits"):
        kd.finetune(_SmallMemory(fits=0), toy_data(32), None, _cfg(batch_size=4))


# --------------------------------------------------------------------------- GPU


pytest_gpu = pytest.mark.gpu


def _cuda(x: dict) -> dict:
    return {k: v.cuda() for k, v in x.items()}


@pytest_gpu
@pytest.mark.parametrize("m,k,n", [(1, 64, 64), (16, 384, 1152), (17, 384, 384), (4096, 1024, 4096), (37, 13, 24)])
def test_gpu_int_matmul_equals_the_float64_reference(m, k, n):
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
    assert torch.equal(numerics.int_matmul(a, b), numerics.int_matmul_reference(a, b))


@pytest_gpu
@pytest.mark.parametrize("cfg", [qfx.QuantConfig(4, 4), qfx.QuantConfig(4, 4, symmetric=False), qfx.QuantConfig(8, 8)])
def test_gpu_twin_on_int8_tensor_cores_is_bit_identical_to_the_compiled_model(cfg, monkeypatch):
    """The QAT twin's accumulators come from torch._int_mm on the GPU, and the compiled model
    (fp32 float parts) still reproduces it bit for bit."""
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or real(a, b))
    model = make("bert_cls", layers=2, hidden=64, heads=2).cuda()
    twin = qfx.prepare_qat(model, example_kwargs=_cuda(inputs(2, 8)), config=cfg).eval()
    x = _cuda(inputs(3, 37, seed=5))
    with torch.no_grad():
        want = twin(**x).logits
    assert calls, "the twin did not use the int8 tensor cores"
    monkeypatch.setattr(torch, "_int_mm", real)
    compiled = qfx.compile(twin, mode=f"int{cfg.weight_bits}", target=qfx.detect_target().name, float_dtype=torch.float32)
    with torch.no_grad():
        got = compiled(**x).logits
    assert torch.equal(got, want), f"max diff {(got - want).abs().max():.3g}"


@pytest_gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_mixed_precision_distill_then_compile(precision):
    dev = torch.device("cuda")
    teacher, data = tiny_classifier(dropout=0.0).to(dev), toy_data(32)
    student = kd.make_student(teacher, W4A4, toy_data(4).batch([0, 1, 2, 3], dev)[0])
    res = kd.distill(teacher, student, data, data, _cfg(precision=precision, keep_best=False))
    assert res.steps_done == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    assert all(p.dtype == torch.float32 for p in student.parameters())
    cm = qfx.compile(student.eval(), mode="int4", target=qfx.detect_target().name, float_dtype=torch.float32)
    x = _cuda(toy_data(6, seed=3).batch(list(range(6)))[0])
    with torch.no_grad():
        assert torch.equal(cm(**x).logits, student(**x).logits)


@pytest_gpu
def test_gpu_compiled_training_forward_trains_and_leaves_an_eager_twin():
    """TrainConfig(compile=True): the KD losses (taps read through forward hooks) still reach
    the student under torch.compile, the weights move, and the returned graph is the eager
    twin that the compiled integer model reproduces bit for bit."""
    dev = torch.device("cuda")
    teacher, data = tiny_classifier(dropout=0.0).to(dev), toy_data(32)
    student = kd.make_student(teacher, W4A4, toy_data(4).batch([0, 1, 2, 3], dev)[0])
    before = _params(student)
    res = kd.distill(teacher, student, data, data, _cfg(precision="bf16", keep_best=False, compile=True, steps=6, eval_every=6))
    assert res.steps_done == 6 and all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    after = _params(student)
    assert any(not torch.equal(before[k], v) for k, v in after.items())
    assert type(student).__name__ != "OptimizedModule" and not hasattr(student, "_orig_mod")
    cm = qfx.compile(student.eval(), mode="int4", target=qfx.detect_target().name, float_dtype=torch.float32)
    x = _cuda(toy_data(6, seed=3).batch(list(range(6)))[0])
    with torch.no_grad():
        assert torch.equal(cm(**x).logits, student(**x).logits)
