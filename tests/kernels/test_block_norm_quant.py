"""Residual add + LayerNorm + block-scaled quantize in one kernel (backends/triton/norm_block_quant.py) and
the pass that fuses it (passes/fuse_norm_quant.py, ``QuantConfig(act_block=B)``).

What is exact (the token-wise fused kernel's contract, backends/cutlass/EPILOGUES.md): the codes, scales
and offsets equal ``numerics.quantize_activation(y, ..., block=B)`` of the ``y`` the kernel returns, whole
outputs compared with ``torch.equal``; ``y`` is torch's LayerNorm up to the fp32 rounding of the mean and
variance (another summation order), so the pass fuses only with fp16 / bf16 float parts. On the reference
backend the fused op is the unfused ops, so the pass leaves a model's output unchanged bit for bit; with
fp32 float parts it keeps torch's LayerNorm and compiled == twin. On the CPU the kernel runs under
``TRITON_INTERPRET=1`` (fp16 / fp32: the interpreter's bf16 conversion truncates); the GPU tests
(``-m gpu``) check every float dtype on the GPU.
"""
from __future__ import annotations

import copy
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
from qfx import numerics as nx
from qfx.backends.triton import HAS_TRITON
from qfx.capture import normalize_inputs
from qfx.schema import ADD_LAYER_NORM_QUANTIZE, QUANTIZE, arg, is_call, set_args

TESTS = Path(__file__).resolve().parents[1]  # tests/: models.py
REPO = TESTS.parent
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
_FITS = lambda k, dtype, block: (True, "")  # noqa: E731  (the kernel's rule: its own test below)


def _qat(cfg, layers=2, hidden=64, seed=0, family="bert_cls", device="cpu"):
    """A QAT twin captured on ``device`` (torch.export bakes the device into the graph)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make(family, layers=layers, hidden=hidden, heads=2, seed=seed).to(device)
        example = {k: v.to(device) for k, v in inputs(2, 8).items()}
        return qfx.prepare_qat(model, example_kwargs=example, config=cfg).eval()


def _compile(cfg, float_dtype, layers=2):
    qat = _qat(cfg, layers)
    with warnings.catch_warnings(), qfx.backends.only("reference"):
        warnings.simplefilter("ignore")
        return qat, qfx.compile(qat, mode=f"int{cfg.weight_bits}", target="cpu", float_dtype=float_dtype)


def _fused(gm):
    return [n for n in gm.graph.nodes if is_call(n, ADD_LAYER_NORM_QUANTIZE)]


def test_fits_refuses_what_the_kernel_cannot_hold():
    from qfx.backends.triton.norm_block_quant import add_layer_norm_quantize_blocks, fits

    if HAS_TRITON:
        assert fits(768, torch.float16, 128) == (True, "")
        assert fits(4096, torch.bfloat16, 64) == (True, "")
        assert "power of two >= 16 dividing K=768" in fits(768, torch.float16, 96)[1]
        assert "power of two >= 16 dividing K=768" in fits(768, torch.float16, 8)[1]
        assert "up to 4096" in fits(8192, torch.float16, 128)[1]
        assert "fp16, bf16 or fp32" in fits(768, torch.float64, 128)[1]
        with pytest.raises(ValueError, match="bits=3"):
            add_layer_norm_quantize_blocks(torch.zeros(2, 64), None, torch.ones(64), torch.zeros(64), 1e-12, 3, True,
                                           None, None, 32)
    else:
        assert "needs Triton" in fits(768, torch.float16, 128)[1]
    with pytest.raises(ValueError, match="add_layer_norm_quantize: "):
        add_layer_norm_quantize_blocks(torch.zeros(2, 64, dtype=torch.float64), None, torch.ones(64), torch.zeros(64),
                                       1e-12, 4, True, None, None, 32)


def test_the_block_form_of_the_op_on_the_reference_is_layer_norm_then_the_block_quantizer():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 64, generator=g) * 3, torch.randn(2, 5, 64, generator=g)
    w, bias = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g) * 0.1
    y, q, s, c = torch.ops.qfx.add_layer_norm_quantize(a, b, w, bias, 1e-12, 4, False, -2.0, 3.0, "reference",
                                                       act_block=16)
    ln = torch.nn.functional.layer_norm(a + b, (64,), w, bias, 1e-12)
    assert torch.equal(y, ln) and s.shape == c.shape == (2, 5, 4)
    assert all(torch.equal(g, r) for g, r in zip((q, s, c), nx.quantize_activation(ln, 4, False, (-2.0, 3.0), block=16)))
    on_cpu = torch.ops.qfx.add_layer_norm_quantize(a, b, w, bias, 1e-12, 4, False, -2.0, 3.0, "cpu", act_block=16)
    assert all(torch.equal(g, r) for g, r in zip(on_cpu, (y, q, s, c)))  # the CPU backend's block form: the same bits
    with pytest.raises(RuntimeError, match="act_block=16"):  # a backend without the block form: an error, no token-wise run
        torch.ops.qfx.add_layer_norm_quantize(a, b, w, bias, 1e-12, 4, False, None, None, "cutlass", act_block=16)


@pytest.mark.parametrize("cfg", [qfx.QuantConfig(4, 4, symmetric=False, act_block=32), qfx.QuantConfig(8, 8, act_block=64)])
def test_block_scaled_layer_norms_get_the_fused_op_and_the_output_stays_exact_on_the_reference(cfg):
    """add -> layer_norm -> quantize(act_block=B) becomes one add_layer_norm_quantize(act_block=B); on
    the reference backend that op is the unfused ops: the whole model output is unchanged bit for bit."""
    from qfx.passes.fuse_norm_quant import fuse_add_layer_norm_quantize

    _, cm = _compile(cfg, torch.bfloat16)
    gm = cm.graph_module
    x = normalize_inputs(cm._capture, (), inputs(3, 11, seed=3))
    with torch.no_grad():
        before = gm(**x).logits
    fused = fuse_add_layer_norm_quantize(copy.deepcopy(gm), torch.bfloat16, backend="cutlass",
                                         block_backend="reference", fits_block=_FITS)
    nodes = _fused(fused)
    # the LayerNorms that feed a quantize: embeddings, layer 0 (attention-out, FFN-out), layer 1 attention-out
    # (layer 1's FFN-out LayerNorm feeds the float pooler); each with its residual add but the embeddings'
    assert fused.meta["qfx_fused_norms"] == (4, "") and len(nodes) == 4
    assert sum(arg(n, "b") is not None for n in nodes) == 3
    assert all(arg(n, "act_block") == cfg.act_block and arg(n, "backend") == "reference" for n in nodes)
    assert all(arg(n, "symmetric") == cfg.symmetric for n in nodes)
    assert not [n for n in fused.graph.nodes if is_call(n, QUANTIZE) and is_call(arg(n, "x"), torch.ops.aten.layer_norm.default)]
    with torch.no_grad():
        assert torch.equal(fused(**x).logits, before)


def test_block_scaled_layer_norms_are_left_with_the_reason_where_the_kernel_cannot_run():
    from qfx.passes.fuse_norm_quant import fuse_add_layer_norm_quantize

    cfg = qfx.QuantConfig(4, 4, act_block=32)
    qat, cm = _compile(cfg, torch.bfloat16)
    gm = cm.graph_module
    no_triton = fuse_add_layer_norm_quantize(copy.deepcopy(gm), torch.bfloat16, block_backend="reference",
                                             fits_block=lambda k, dtype, block: (False, "needs Triton"))
    assert no_triton.meta["qfx_fused_norms"] == (0, "needs Triton") and not _fused(no_triton)
    # planned on another backend than the block kernel's (here: the reference, the kernel 'triton')
    other = fuse_add_layer_norm_quantize(copy.deepcopy(gm), torch.bfloat16, fits_block=_FITS)
    assert other.meta["qfx_fused_norms"][0] == 0 and "backend 'triton'" in other.meta["qfx_fused_norms"][1]
    # a token-wise pass over the same backend does not take block-scaled quantizes for token-wise ones
    token = fuse_add_layer_norm_quantize(copy.deepcopy(gm), torch.bfloat16, backend="reference", block_backend="triton",
                                         fits=lambda k, dtype: (True, ""), fits_block=_FITS)
    assert not _fused(token) and "act_block=32" in token.meta["qfx_fused_norms"][1]
    # fp32 float parts: torch's LayerNorm kept, and the compiled model is its twin bit for bit
    _, cm32 = _compile(cfg, torch.float32)
    kept = fuse_add_layer_norm_quantize(copy.deepcopy(cm32.graph_module), torch.float32, block_backend="reference",
                                        fits_block=_FITS)
    assert kept.meta["qfx_fused_norms"][0] == 0 and not _fused(kept)
    x = inputs(3, 11, seed=4)
    with torch.no_grad():
        assert torch.equal(kept(**normalize_inputs(cm32._capture, (), x)).logits, qat(**x).logits)


def test_fused_block_norms_pack_with_padding_removal():
    """remove_padding (the last GPU pass) runs the fused block op on the real tokens only: the same
    outputs on those tokens, bit for bit, on the reference."""
    from qfx.passes.fuse_norm_quant import fuse_add_layer_norm_quantize
    from qfx.passes.unpad import remove_padding

    _, cm = _compile(qfx.QuantConfig(4, 4, symmetric=False, act_block=32), torch.bfloat16)
    gm = fuse_add_layer_norm_quantize(copy.deepcopy(cm.graph_module), torch.bfloat16, block_backend="reference",
                                      fits_block=_FITS)
    unpadded = remove_padding(copy.deepcopy(gm))
    assert unpadded.meta["qfx_unpad"].startswith("on:"), unpadded.meta["qfx_unpad"]
    assert all(n.meta.get("qfx_tokens") == "packed" for n in _fused(unpadded)) and len(_fused(unpadded)) == 4
    x = inputs(3, 12, seed=1)
    x["attention_mask"][0, 5:] = 0
    x = normalize_inputs(cm._capture, (), x)
    with torch.no_grad():
        want, got = gm(**x).logits, unpadded(**x).logits
    assert torch.equal(got, want)


_INTERPRETED = textwrap.dedent('''
    import copy, itertools, warnings
    import torch
    import qfx
    from models import inputs, make
    from qfx import numerics as nx
    from qfx.backends.triton import norm_block_quant as nbq
    from qfx.capture import normalize_inputs
    from qfx.passes.fuse_norm_quant import fuse_add_layer_norm_quantize
    from qfx.runtime.launch_plan import bind_launchers
    from qfx.schema import ADD_LAYER_NORM_QUANTIZE, is_call, set_args

    torch.manual_seed(0)
    # 1. the kernel against the definition: many rows per program, padded blocks (K / B not a power of two),
    #    one row per program (K = 2048), an all-zero token, clip, both offsets, with and without the residual
    for dtype, bits, sym, (rows, k, block), clip in itertools.product(
            (torch.float16, torch.float32), (4, 8), (True, False), ((37, 96, 16), (5, 384, 128), (3, 2048, 128)),
            (None, (-1.5, 2.0))):
        a = (torch.randn(rows, k) * 3 + 0.5).to(dtype)
        a[0] = 0
        w, bias = (torch.rand(k) + 0.5).to(dtype), (torch.randn(k) * 0.1).to(dtype)
        for other in (None, torch.randn(rows, k).to(dtype)):
            lo, hi = (None, None) if clip is None else clip
            got = torch.ops.qfx.add_layer_norm_quantize(a, other, w, bias, 1e-12, bits, sym, lo, hi, "triton",
                                                        act_block=block)
            y = got[0]
            want = nx.quantize_activation(y, bits, sym, clip, block=block)
            assert y.dtype == dtype and got[2].shape == (rows, k // block), got[2].shape
            assert all(torch.equal(g, r) for g, r in zip(got[1:], want)), (dtype, bits, sym, rows, k, block, clip)
            s = a if other is None else a + other
            ln = torch.nn.functional.layer_norm(s.float(), (k,), w.float(), bias.float(), 1e-12)
            assert torch.allclose(y.float(), ln, atol=2e-2, rtol=2e-3), (y.float() - ln).abs().max()
            one = nbq.add_layer_norm_quantize_blocks(a[1:2], None if other is None else other[1:2], w, bias, 1e-12,
                                                     bits, sym, lo, hi, block)
            assert all(torch.equal(g, r[1:2]) for g, r in zip(one, got)), "a token's outputs depend on the batch"

    # 2. a block-scaled model (fp16 float parts): the pass fuses its LayerNorms, the launch plan binds the fused
    #    op to the kernel, and the output is the reference-fused graph's up to LayerNorm rounding
    warnings.simplefilter("ignore")
    cfg = qfx.QuantConfig(4, 4, symmetric=False, act_block=32)
    qat = qfx.prepare_qat(make("bert_cls", layers=2, hidden=64, heads=2), example_kwargs=inputs(2, 8), config=cfg).eval()
    with qfx.backends.only("reference"):
        cm = qfx.compile(qat, mode="int4", target="cpu", float_dtype=torch.float16)
    fused = fuse_add_layer_norm_quantize(copy.deepcopy(cm.graph_module), torch.float16, block_backend="reference",
                                         fits_block=lambda k, dtype, block: (True, ""))
    x = normalize_inputs(cm._capture, (), inputs(3, 11, seed=3))
    with torch.no_grad():
        ref = fused(**x).logits
        assert torch.equal(ref, cm.graph_module(**x).logits)
    nodes = [n for n in fused.graph.nodes if is_call(n, ADD_LAYER_NORM_QUANTIZE)]
    assert len(nodes) == 4
    for node in nodes:
        set_args(node, backend="triton")
    fused.recompile()
    plan = bind_launchers(fused)
    assert sum(v == "triton" for v in plan.bound.values()) == 4, (plan.bound, plan.unbound)
    with torch.no_grad():
        got = plan.module(**x).logits
        assert torch.allclose(got.float(), ref.float(), atol=5e-2), (got.float() - ref.float()).abs().max()
        assert torch.allclose(fused(**x).logits.float(), got.float(), atol=5e-2)  # the op through the dispatcher
    print("interpreted block norm exact")
''')


@needs_triton
def test_block_norm_kernel_under_the_triton_interpreter():
    """On the CPU, through TRITON_INTERPRET=1 (set before Triton compiles anything: a subprocess)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "interpreted block norm exact" in run.stdout, run.stderr[-3000:]


@needs_triton
@pytest.mark.parametrize("dtype,k", [("fp16", 768), ("bf16", 1024), ("fp32", 4096)])
def test_block_norm_kernel_compiles_for_sm90_without_fma(dtype, k):
    """Ahead of time, no GPU needed (Triton's bundled ptxas): the kernel compiles for sm_90 with the
    launcher's constants, with IEEE divisions (the quantizer's) and no contracted fma."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qfx.backends.triton import norm_block_quant as nbq
    from qfx.backends.triton import norm_block_quant_kernels as kernels

    nb, rows = nbq._tile(k, 128)
    sig = {**{p: f"*{dtype}" for p in ("a_ptr", "b_ptr", "w_ptr", "bias_ptr", "y_ptr")}, "q_ptr": "*i8",
           "qs_ptr": "*fp32", "qc_ptr": "*fp32", "M": "i32", "K": "i32", "ln_eps": "fp32", "clip_lo": "fp32",
           "clip_hi": "fp32"}
    consts = dict(HAS_B=True, B=128, NB=nb, BLOCK=rows, BITS=4, SYMMETRIC=False, HAS_CLIP=True, EPS=nx.EPS)
    sig.update({c: "constexpr" for c in consts})
    try:
        compiled = triton.compile(ASTSource(kernels.add_layer_norm_block_quantize_kernel, sig, consts),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": nbq.WARPS, "enable_fp_fusion": False})
    except RuntimeError as e:  # a Triton build without the NVIDIA backend or its ptxas
        pytest.skip(f"Triton cannot compile for sm_90 here: {e}")
    ptx = compiled.asm["ptx"]
    assert "div.rn.f32" in ptx and "fma.rn.f32" not in ptx


# --------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and Triton")


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_block_norm_kernel_codes_are_the_definition_of_its_y(dtype):
    from qfx.backends.triton import norm_block_quant as nbq

    for (rows, k, block), bits, sym, clip in [((1, 768, 128), 4, False, None), ((37, 768, 128), 4, True, None),
                                              ((4099, 1024, 128), 8, False, (-1.0, 2.5)), ((5, 384, 64), 8, True, None),
                                              ((130, 4096, 128), 4, False, None), ((64, 96, 32), 4, True, (-0.5, 0.5))]:
        a = (torch.randn(rows, k, device="cuda") * 3 + 0.5).to(dtype)
        a[0] = 0
        other = torch.randn_like(a)
        w = (torch.rand(k, device="cuda") + 0.5).to(dtype)
        bias = (torch.randn(k, device="cuda") * 0.1).to(dtype)
        lo, hi = (None, None) if clip is None else clip
        for b in (other, None):
            got = torch.ops.qfx.add_layer_norm_quantize(a, b, w, bias, 1e-12, bits, sym, lo, hi, "triton", act_block=block)
            want = nx.quantize_activation(got[0], bits, sym, clip, block=block)
            for g, r, what in zip(got[1:], want, ("codes", "scale", "offset")):
                assert torch.equal(g, r), (what, rows, k, block, bits, sym, clip)
            ln = torch.nn.functional.layer_norm(a if b is None else a + b, (k,), w, bias, 1e-12)
            assert torch.allclose(got[0].float(), ln.float(), atol=3e-2, rtol=1e-2), (got[0].float() - ln.float()).abs().max()
            one = nbq.add_layer_norm_quantize_blocks(a[-1:], None if b is None else b[-1:], w, bias, 1e-12, bits, sym,
                                                     lo, hi, block)
            assert all(torch.equal(g, r[-1:]) for g, r in zip(one, got)), "a token's outputs depend on the batch"


def _cuda(x: dict) -> dict:
    return {k: v.cuda() for k, v in x.items()}


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [qfx.QuantConfig(4, 4, symmetric=False, act_block=128), qfx.QuantConfig(8, 8, act_block=128)])
def test_gpu_block_scaled_model_fuses_its_layer_norms_and_runs_the_kernel(cfg, dtype):
    """qfx.compile on the GPU (fp16 / bf16 float parts): every LayerNorm feeding a block-scaled quantize is one
    fused op on backend 'triton', the launch plan binds it, and the model agrees with the same graph whose fused
    ops run on the reference (torch's LayerNorm; the same everywhere else) up to LayerNorm rounding."""
    qat = _qat(cfg, layers=2, hidden=256, family="bert", device="cuda")
    compiled = qfx.compile(qat, mode=f"int{cfg.weight_bits}", target=qfx.detect_target().name, float_dtype=dtype)
    gm = compiled.graph_module
    nodes = _fused(gm)
    assert gm.meta["qfx_fused_norms"][0] == len(nodes) == 4, gm.meta["qfx_fused_norms"]
    assert all(arg(n, "backend") == "triton" and arg(n, "act_block") == 128 for n in nodes)
    plan = compiled.launch_plan
    assert all(plan.bound.get(n.name) == "triton" for n in nodes), (plan.bound, plan.unbound)
    x = _cuda(inputs(3, 37, seed=5))
    ref_gm = copy.deepcopy(gm)
    for node in _fused(ref_gm):
        set_args(node, backend="reference")
    ref_gm.recompile()
    with torch.no_grad():
        got = compiled(**x).last_hidden_state.float()
        ref = ref_gm(**normalize_inputs(compiled._capture, (), x)).last_hidden_state.float()
        twin = qat(**x).last_hidden_state.float()
    real = x["attention_mask"].bool()
    assert torch.isfinite(got[real]).all()
    cos = torch.nn.functional.cosine_similarity(got[real], ref[real], dim=-1)
    assert cos.min() > 0.995, cos.min()
    assert torch.nn.functional.cosine_similarity(got[real], twin[real], dim=-1).min() > 0.95
