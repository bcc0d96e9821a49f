"""Fused rotate + quantize (backends/triton/rotation_quant.py): the kernels give the unfused ops' codes bit
for bit, the LayerNorm fusion pass takes rotated readers, and the launch plan binds both."""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from models import inputs, make

import qfx
from qfx import numerics
from qfx.capture import normalize_inputs
from qfx.schema import ADD_LAYER_NORM_ROTATE_QUANTIZE, QUANTIZE, ROTATE, arg, is_call

HAS_TRITON = importlib.util.find_spec("triton") is not None
TESTS = Path(__file__).resolve().parents[1]  # tests/: models.py


def _rotated_compile(float_dtype=torch.float32, layers=2):
    """A rotated W4A4 BERT planned on the reference backend (the ops these tests fuse and bind)."""
    with warnings.catch_warnings(), qfx.backends.only("reference"):
        warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
        return qfx.compile(make("bert", layers=layers, hidden=64, heads=2).eval(), mode="int4", target="cpu",
                           config=qfx.QuantConfig(4, 4, symmetric=False, rotation=32), example_kwargs=inputs(2, 8),
                           float_dtype=float_dtype)


def test_norm_fusion_takes_rotated_layer_norm_readers_and_keeps_the_output():
    """add -> layer_norm -> rotate -> quantize becomes one add_layer_norm_rotate_quantize; on the
    reference backend that op is the unfused ops, so the model output is unchanged bit for bit."""
    from qfx.passes.fuse_norm_quant import fuse_add_layer_norm_quantize

    cm = _rotated_compile(torch.bfloat16)
    gm = cm.graph_module
    x = normalize_inputs(cm._capture, (), inputs(3, 11, seed=3))
    with torch.no_grad():
        before = gm(**x).last_hidden_state
    fused = fuse_add_layer_norm_quantize(copy.deepcopy(gm), torch.bfloat16, backend="reference",
                                         fits=lambda k, dtype: (True, ""), fits_rotated=lambda k, dtype, b: (True, ""))
    nodes = [n for n in fused.graph.nodes if is_call(n, ADD_LAYER_NORM_ROTATE_QUANTIZE)]
    # the LayerNorms that feed a quantize: embeddings, layer 0 (attention-out, FFN-out), layer 1 attention-out
    # (layer 1's FFN-out LayerNorm is the output)
    assert len(nodes) == fused.meta["qfx_fused_rotated_norms"] == fused.meta["qfx_fused_norms"][0] == 4
    assert all(arg(n, "block") == 32 for n in nodes)
    # the rotations left are those of the attention output and the GELU output (2 per layer)
    assert sum(is_call(n, ROTATE) for n in fused.graph.nodes) == 2 * 2
    with torch.no_grad():
        assert torch.equal(fused(**x).last_hidden_state, before)
    refused = fuse_add_layer_norm_quantize(copy.deepcopy(gm), torch.bfloat16, backend="reference",
                                           fits=lambda k, dtype: (True, ""),
                                           fits_rotated=lambda k, dtype, b: (False, "no Triton"))
    assert refused.meta["qfx_fused_norms"] == (0, "no Triton")


def test_fused_kernels_refuse_what_they_cannot_hold():
    from qfx.backends.triton.rotation_quant import fits, rotate_quantize

    if HAS_TRITON:
        assert fits(384, torch.float16, 128) == (True, "")
        assert "power of two" in fits(384, torch.float16, 96)[1]
        assert "up to 4096" in fits(8192, torch.float16, 128)[1]
        assert "fp16, bf16 or fp32" in fits(384, torch.float64, 128)[1]
        with pytest.raises(ValueError, match="bits=3"):
            rotate_quantize(torch.zeros(2, 64), numerics.rotation_signs(64), 32, 3, True)
    else:
        assert "Triton is not installed" in fits(384, torch.float16, 128)[1]
    with pytest.raises(ValueError, match="x: "):
        rotate_quantize(torch.zeros(2, 64, dtype=torch.float64), numerics.rotation_signs(64), 32, 4, True)


_INTERPRETED = textwrap.dedent('''
    import copy, itertools, sys, warnings
    import torch
    sys.path.insert(0, {tests!r})
    import qfx
    from models import inputs, make
    from qfx import numerics
    from qfx.capture import normalize_inputs
    from qfx.passes.fuse_norm_quant import fuse_add_layer_norm_quantize
    from qfx.backends.triton.rotation_quant import add_layer_norm_rotate_quantize, rotate_quantize
    from qfx.runtime.launch_plan import bind_launchers
    from qfx.schema import ADD_LAYER_NORM_ROTATE_QUANTIZE, QUANTIZE, ROTATE, arg, is_call, set_args

    torch.manual_seed(0)
    # 1. the kernels against the definitions (fp16 / fp32: the interpreter's bf16 rounding truncates)
    for dtype, bits, sym, (k, b, rows), clip in itertools.product(
            (torch.float16, torch.float32), (4, 8), (True, False), ((384, 128, 3), (64, 32, 5), (1536, 128, 1)),
            (None, (-1.5, 2.0))):
        x = (torch.randn(rows, k) * 3).to(dtype)
        x[0] = 0  # an all-zero token
        s = numerics.rotation_signs(k)
        ref = numerics.quantize_activation(numerics.rotate_blocks(x, s, b), bits, sym, clip)
        got = rotate_quantize(x, s, b, bits, sym, clip)
        assert all(torch.equal(g, r) for g, r in zip(got, ref)), ("rotate_quantize", dtype, bits, sym, k, clip)
        w, bias = (torch.rand(k) + 0.5).to(dtype), (torch.randn(k) * 0.1).to(dtype)
        for other in (None, torch.randn(rows, k).to(dtype)):
            y, *codes = add_layer_norm_rotate_quantize(x, other, w, bias, 1e-12, s, b, bits, sym, clip)
            ref = numerics.quantize_activation(numerics.rotate_blocks(y, s, b), bits, sym, clip)
            assert all(torch.equal(g, r) for g, r in zip(codes, ref)), ("add_layer_norm_rotate_quantize", dtype, k)
            ln = torch.nn.functional.layer_norm((x if other is None else x + other).float(), (k,), w.float(), bias.float(), 1e-12)
            assert torch.allclose(y.float(), ln, atol=2e-2, rtol=2e-3), (y.float() - ln).abs().max()

    # the rotation kernel (it shares the butterflies) is still rotate_blocks
    from qfx.backends.triton.rotation import rotate_triton
    for dtype in (torch.float16, torch.float32):
        x = (torch.randn(37, 384) * 4).to(dtype)
        s = numerics.rotation_signs(384)
        assert torch.equal(rotate_triton(x, s, 128), numerics.rotate_blocks(x, s, 128)), dtype

    # 2. the launch plan binds rotate -> quantize to one kernel: the whole model output is unchanged
    warnings.simplefilter("ignore")
    def compiled(dtype):  # planned on the reference backend: the ops this script binds
        with qfx.backends.only("reference"):
            return qfx.compile(make("bert", layers=2, hidden=64, heads=2).eval(), mode="int4", target="cpu",
                               config=qfx.QuantConfig(4, 4, symmetric=False, rotation=32), example_kwargs=inputs(2, 8),
                               float_dtype=dtype)
    cm = compiled(torch.float32)
    gm = copy.deepcopy(cm.graph_module)
    for node in gm.graph.nodes:
        if is_call(node, QUANTIZE) and is_call(arg(node, "x"), ROTATE):
            set_args(node, backend="cutlass")
    gm.recompile()
    plan = bind_launchers(gm)
    assert sorted(v for v in plan.bound.values()) == ["cutlass+rotate"] * 8, plan.bound
    x = normalize_inputs(cm._capture, (), inputs(3, 11, seed=3))
    with torch.no_grad():
        assert torch.equal(plan.module(**x).last_hidden_state, cm.graph_module(**x).last_hidden_state)

    # 3. the fused LayerNorm readers bound to the Triton kernel (fp16 float parts): close to the reference
    cm = compiled(torch.float16)
    fused = fuse_add_layer_norm_quantize(copy.deepcopy(cm.graph_module), torch.float16, backend="reference",
                                         fits=lambda k, dtype: (True, ""))
    ref = fused(**x).last_hidden_state
    for node in fused.graph.nodes:
        if is_call(node, ADD_LAYER_NORM_ROTATE_QUANTIZE):
            set_args(node, backend="cutlass")
    fused.recompile()
    plan = bind_launchers(fused)
    assert sum(v == "cutlass" for v in plan.bound.values()) == 4, plan.bound
    with torch.no_grad():
        got = plan.module(**x).last_hidden_state
    assert torch.allclose(got.float(), ref.float(), atol=0.1), (got.float() - ref.float()).abs().max()
    print("ok")
''')


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (CPU-only torch)")
def test_fused_kernels_and_their_binding_under_the_triton_interpreter():
    """On the CPU, through TRITON_INTERPRET=1 (set before Triton compiles anything: a subprocess)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _INTERPRETED.format(tests=str(TESTS))], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_fused_kernels_are_the_unfused_ops_bit_for_bit(dtype, monkeypatch):
    import qfx.backends.triton.rotation_quant as rqk
    from qfx.backends.triton.rotation import rotate_triton
    from qfx.backends.triton.rotation_quant import add_layer_norm_rotate_quantize, rotate_quantize

    for (k, b, rows), bits, sym in [((384, 128, 1), 4, False), ((384, 128, 4099), 4, False), ((1536, 128, 37), 4, True),
                                    ((768, 64, 37), 8, True), ((3072, 128, 130), 8, False), ((64, 32, 5), 4, False)]:
        x = (torch.randn(rows, k, device="cuda") * 4).to(dtype)
        s = numerics.rotation_signs(k).cuda()
        rotated = rotate_triton(x, s, b)  # the unfused GPU path: kernel, then the quantizer
        assert torch.equal(rotated, numerics.rotate_blocks(x, s, b))
        ref = numerics.quantize_activation(rotated, bits, sym)
        got = rotate_quantize(x, s, b, bits, sym)
        assert all(torch.equal(g, r) for g, r in zip(got, ref)), (k, b, rows, bits, sym)
        assert all(torch.equal(g, r[:1]) for g, r in zip(rotate_quantize(x[:1], s, b, bits, sym), ref))  # row-count invariant
        launcher = rqk.RotateQuantizeLauncher(s, b, bits, sym, None, unfused=lambda t: (None,) * 3)
        monkeypatch.setattr(rqk, "SMALL_VALUES", rows * k)  # the largest tensor the fused kernel takes
        assert all(torch.equal(g, r) for g, r in zip(launcher(x), ref))
        assert launcher(torch.cat([x, x[:1]])) == (None,) * 3  # one row more: the two-kernel path
        monkeypatch.undo()
        if k <= 1024 and dtype != torch.float32:
            w, bias = torch.rand(k, device="cuda").to(dtype) + 0.5, (torch.randn(k, device="cuda") * 0.1).to(dtype)
            other = torch.randn_like(x)
            y, *codes = add_layer_norm_rotate_quantize(x, other, w, bias, 1e-12, s, b, bits, sym)
            ref = numerics.quantize_activation(numerics.rotate_blocks(y, s, b), bits, sym)
            assert all(torch.equal(g, r) for g, r in zip(codes, ref))
            ln = torch.nn.functional.layer_norm(x + other, (k,), w, bias, 1e-12)
            assert torch.allclose(y.float(), ln.float(), atol=3e-2, rtol=1e-2), (y.float() - ln.float()).abs().max()


@pytest.mark.gpu
def test_gpu_rotated_model_runs_the_fused_kernels():
    """fp32 float parts: rotate + quantize fused at run time and still the twin bit for bit; fp16
    (the default): the LayerNorm readers run add_layer_norm_rotate_quantize, close to the twin."""
    target = qfx.detect_target()
    model = make("bert", layers=2, hidden=128, heads=2).eval().cuda()
    cfg = qfx.QuantConfig(4, 4, symmetric=False, rotation=64)
    qat = qfx.prepare_qat(model, example_kwargs={k: v.cuda() for k, v in inputs(2, 8).items()}, config=cfg).eval()
    x = {k: v.cuda() for k, v in inputs(3, 37, seed=5).items()}
    with torch.no_grad():
        twin = qat(**x).last_hidden_state
        # padded (remove_padding=False): the whole output, padding positions included, is the twin's
        exact = qfx.compile(qat, mode="int4", target=target.name, float_dtype=torch.float32, remove_padding=False)
        assert torch.equal(exact(**x).last_hidden_state, twin)
        big = {k: v.cuda() for k, v in inputs(128, 64, seed=6).items()}  # 8,192 tokens: the large-tensor path
        assert torch.equal(exact(**big).last_hidden_state, qat(**big).last_hidden_state)
        bound = exact.launch_plan.bound
        fast = qfx.compile(qat, mode="int4", target=target.name)
        for _ in range(3):
            got = fast(**x).last_hidden_state.float()
    assert "cutlass+rotate" in bound.values(), bound
    gm = fast.graph_module
    assert sum(is_call(n, ADD_LAYER_NORM_ROTATE_QUANTIZE) for n in gm.graph.nodes) == gm.meta["qfx_fused_rotated_norms"] == 4
    assert torch.allclose(got, twin, atol=5e-2, rtol=5e-2), (got - twin).abs().max()
