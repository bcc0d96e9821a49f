"""The block-scaled Triton kernels (backends/triton/block_gemm.py) against the definition.

On the GPU every output is compared whole with ``torch.equal`` against the reference run on the
same GPU with torch ops (qfx.numerics), over an M/N/K table with odd sizes; on the CPU the same
kernels run under ``TRITON_INTERPRET=1`` (where erf is not torch's CPU erf: the GELU epilogue is
checked there only through codes of fp16 values, fixed inputs; the GPU checks it everywhere).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from models import inputs, make

import qfx
from qfx import numerics as nx
from qfx.backends.triton import HAS_TRITON

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


def _case(m, n, k, block, a_bits, w_bits, symmetric, grouped, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 2 + 0.3).to(device)
    w = torch.randn(n, k, generator=g).to(device)
    bias = torch.randn(n, generator=g).to(device)
    q, s, c = nx.quantize_activation(x, a_bits, symmetric, block=block)
    q_w, s_w = nx.quantize_weight(w.cpu(), w_bits, 2 * block if grouped else None)
    bs = nx.weight_block_sums(q_w, block)
    packed = nx.pack_int4(q_w) if w_bits == 4 else q_w
    return q, s, c, q_w.to(device), packed.to(device), s_w.to(device), bs.to(device), bias


_INTERPRETED = """
import torch
from qfx import numerics as nx
from qfx.backends.triton import block_gemm as bg
from test_block_gemm import _case
for sym, w_bits, grouped, gelu in [(True, 4, False, False), (False, 8, True, True), (False, 4, False, True)]:
    q, s, c, q_w, packed, s_w, bs, bias = _case(37, 256, 256, 64, 4, w_bits, sym, grouped, "cpu")
    for out in (torch.float32, torch.float16):
        ref = nx.int_linear_blocks_reference(q, s, c, q_w, s_w, bs, bias, False, out)
        assert torch.equal(bg.int_linear_blocks(q, s, c, packed, w_bits, s_w, bs, bias, False, out, 4, 64, symmetric=sym), ref)
    y = nx.int_linear_blocks_reference(q, s, c, q_w, s_w, bs, bias, False, torch.float16)
    want = nx.quantize_activation(y, 8, not sym, None, gelu, block=64)
    got = bg.int_linear_blocks_quantize(q, s, c, packed, w_bits, s_w, bs, bias, torch.float16, 64, 8, not sym, None, gelu)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    x = torch.randn(37, 256).half()
    want = nx.quantize_activation(x, 4, sym, (-1.0, 1.5), gelu, block=64)
    assert all(torch.equal(a, b) for a, b in zip(bg.quantize_blocks(x, 4, sym, -1.0, 1.5, gelu, 64), want))
# many tiles, a partial group of tile rows and partial tiles (a small tile config)
bg.CONFIGS = (bg.BlockConfig(max_m=1 << 62, block_m=32, block_n=128, warps=4, stages=2, group_m=2),)
q, s, c, q_w, packed, s_w, bs, bias = _case(300, 384, 256, 128, 8, 8, False, False, "cpu")
ref = nx.int_linear_blocks_reference(q, s, c, q_w, s_w, bs, bias)
assert torch.equal(bg.int_linear_blocks(q, s, c, packed, 8, s_w, bs, bias, False, torch.float32, 8, 128), ref)
y = nx.int_linear_blocks_reference(q, s, c, q_w, s_w, bs, bias, False, torch.float16)
got = bg.int_linear_blocks_quantize(q, s, c, packed, 8, s_w, bs, bias, torch.float16, 128, 4, True, None, False)
assert all(torch.equal(a, b) for a, b in zip(got, nx.quantize_activation(y, 4, True, block=128)))
# the tuner's tiles (benchmarks/gemm.py --tuned-out, config=): a tile never changes a result
for bm, bn, warps, stages in [(64, 64, 4, 4), (128, 256, 8, 3), (256, 64, 8, 3)]:
    tile = bg.BlockConfig(1 << 62, bm, bn, warps, stages)
    assert torch.equal(bg.int_linear_blocks(q, s, c, packed, 8, s_w, bs, bias, False, torch.float32, 8, 128, config=tile), ref)
    got = bg.int_linear_blocks_quantize(q, s, c, packed, 8, s_w, bs, bias, torch.float16, 128, 4, True, None, False,
                                        config=tile)
    assert all(torch.equal(a, b) for a, b in zip(got, nx.quantize_activation(y, 4, True, block=128))), tile
print("interpreted kernels exact")
"""


@needs_triton
def test_block_kernels_under_the_triton_interpreter():
    """On the CPU, through TRITON_INTERPRET=1 (set before Triton compiles anything: a subprocess)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.path.dirname(__file__) + os.pathsep + os.path.dirname(os.path.dirname(__file__))
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(_INTERPRETED)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and "interpreted kernels exact" in run.stdout, run.stderr[-3000:]


def bind_block_launch_plan(compiled, producers: bool = True):
    """The compiled model's launch plan with backend 'triton' bound (BINDERS['triton'] =
    qfx.runtime.block_binding.binder) and, with ``producers``, the FFN-in producers bound as one kernel
    (qfx.runtime.block_binding.bind_producers), without them otherwise: made by patching qfx/runtime/launch_plan.py
    for one call, whether or not it already does either itself. Returns the plan."""
    from qfx.runtime import block_binding as bb
    from qfx.runtime import launch_plan

    launch_plan.BINDERS.setdefault("triton", bb.binder)
    rotate_quantize, bind_producers = launch_plan._bind_rotate_quantize, bb.bind_producers

    def with_producers(gm, graph, plan):
        rotate_quantize(gm, graph, plan)
        for name in bind_producers(gm, graph) if producers else ():
            plan.bound[name] = "triton+quantize"

    launch_plan._bind_rotate_quantize = with_producers
    bb.bind_producers = lambda gm, graph: []  # a later call finds nothing left to bind (or must not bind)
    try:
        compiled._plan, compiled._graphs = None, None  # the CUDA-graph pool replays the plan it captured
        return compiled.launch_plan
    finally:
        launch_plan._bind_rotate_quantize, bb.bind_producers = rotate_quantize, bind_producers


_INTERPRETED_PRODUCER = """
import torch
import qfx
from models import inputs, make
from qfx.backends.triton import block_gemm as bg
from qfx.runtime import block_binding as bb
from test_block_gemm import bind_block_launch_plan
bg.register()
for cfg in (qfx.QuantConfig(4, 4, symmetric=False, act_block=64, weight_group=128), qfx.QuantConfig(8, 8, act_block=32)):
    qat = qfx.prepare_qat(make("bert_cls", layers=1, hidden=128, heads=2), example_kwargs=inputs(2, 8), config=cfg).eval()
    compiled = qfx.compile(qat, mode=f"int{cfg.weight_bits}", target="cpu")
    bb.rebind_block_ops(compiled.graph_module)
    x = inputs(3, 11, seed=2)
    assert set(bind_block_launch_plan(compiled, producers=False).bound.values()) == {"triton"}
    unfused = compiled(**x).logits
    assert bind_block_launch_plan(compiled).bound["layer0.ffn_in"] == "triton+quantize"
    assert torch.equal(compiled(**x).logits, unfused)
print("producer exact")
"""


@needs_triton
def test_ffn_in_producer_binding_equals_the_unfused_kernels_under_the_interpreter():
    """Bound as one kernel (GEMM + GELU + block quantize, the FFN intermediate never written), the
    model computes what the two kernels compute (the same erf here, so exact on the CPU too)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.path.dirname(__file__) + os.pathsep + os.path.dirname(os.path.dirname(__file__))
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(_INTERPRETED_PRODUCER)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0 and "producer exact" in run.stdout, run.stderr[-3000:]


_INTERPRETED_MODEL = """
import torch
import qfx
from models import inputs, make
from qfx.backends.triton import block_gemm as bg
from qfx.runtime import block_binding as bb
from qfx.schema import QUANTIZE, arg, is_call, set_args
bg.register()
cfg = qfx.QuantConfig(4, 4, symmetric=False, act_block=64, weight_group=128)
qat = qfx.prepare_qat(make("bert_cls", layers=1, hidden=128, heads=2), example_kwargs=inputs(2, 8), config=cfg).eval()
compiled = qfx.compile(qat, mode="int4", target="cpu")
assert bb.rebind_block_ops(compiled.graph_module) == 8  # 4 GEMMs (q, k, v fused) and 4 quantizers
for node in compiled.graph_module.graph.nodes:  # the interpreter's erf is not torch's: GELU codes on the reference
    if is_call(node, QUANTIZE) and arg(node, "gelu"):
        set_args(node, backend="reference")
compiled.graph_module.recompile()
x = inputs(3, 11, seed=2)
assert torch.equal(compiled(**x).logits, qat(**x).logits)
print("interpreted model exact")
"""


@needs_triton
def test_block_scaled_model_on_the_triton_kernels_under_the_interpreter_is_its_twin():
    """The glue end to end (dispatch, fused q/k/v, packed int4, grouped weights, asymmetric offsets,
    leading token dims): compiled on the Triton kernels == the QAT twin, on the CPU."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(__file__))
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(_INTERPRETED_MODEL)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0 and "interpreted model exact" in run.stdout, run.stderr[-3000:]


@needs_triton
def test_written_erf_form_1_is_the_erff_nvcc_emits():
    """Ahead of time (nvcc and Triton's ptxas, no GPU): the kernels' erf form 1 compiles for sm_90 to
    the same fp32 constants as the erff of this machine's nvcc (for nvcc 13.0; form 2 is the older
    libdevice's), with non-flushing fmas as nvcc's; erf_form() picks between the forms on the GPU."""
    import re
    import shutil
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qfx.backends.triton import block_gemm_kernels as kernels

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc here")
    with tempfile.TemporaryDirectory() as tmp:
        cu = os.path.join(tmp, "erf.cu")
        with open(cu, "w") as f:
            f.write('extern "C" __global__ void k(const float* x, float* y) { y[threadIdx.x] = erff(x[threadIdx.x]); }\n')
        out = subprocess.run([nvcc, "-arch=sm_90", "-ptx", "-O3", cu, "-o", cu + ".ptx"], capture_output=True, text=True)
        if out.returncode:
            pytest.skip(f"nvcc cannot compile for sm_90 here: {out.stderr[-300:]}")
        nvcc_ptx = open(cu + ".ptx").read()
    version = re.search(r"Cuda compilation tools, release ([0-9.]+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                                                     text=True).stdout)
    sig = {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "ERF": "constexpr", "BLOCK": "constexpr"}
    forms = {}
    for form in (1, 2):
        try:
            forms[form] = triton.compile(ASTSource(kernels.erf_probe_kernel, sig, {"ERF": form, "BLOCK": 1024}),
                                         target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}).asm["ptx"]
        except RuntimeError as e:
            pytest.skip(f"Triton cannot compile for sm_90 here: {e}")
    consts = {name: set(re.findall(r"0f[0-9A-F]{8}", ptx)) - {"0f00000000"} for name, ptx in [("nvcc", nvcc_ptx), *forms.items()]}
    assert consts[1] != consts[2]
    if version and version.group(1).startswith("13."):
        assert consts["nvcc"] == consts[1]
    else:
        assert consts["nvcc"] in (consts[1], consts[2]), "this nvcc's erff is neither written form"
    assert "fma.rn.ftz" not in forms[1] and "fma.rn.f32" in forms[1]


def test_block_gemm_compiles_for_sm90_to_pipelined_int8_wgmma_without_fma():
    """Ahead of time, no GPU needed (Triton's bundled ptxas): the large-M config of the GEMM compiles for
    sm_90 to s8 x s8 -> s32 wgmma, its int8 tiles are staged through shared memory (as the runtime
    specializes 16-divisible pointers and K), and our fp32 arithmetic has no fma (exp2 / erf inside
    libdevice keep theirs, as in torch's GELU)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qfx.backends.triton import block_gemm as bg
    from qfx.backends.triton import block_gemm_kernels as kernels

    cfg = bg.config_for(1 << 20)
    sig = {**{p: "*i8" for p in ("a_ptr", "w_ptr")}, **{p: "*fp32" for p in ("sa_ptr", "ca_ptr", "sw_ptr", "bs_ptr", "bias_ptr")},
           "out_ptr": "*fp16", **{d: "i32" for d in ("M", "N", "K", "J", "G")}}
    consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=128, SUB=1, HAS_OFFSET=True, GROUPED=False,
                  HAS_BIAS=True, GELU=False, STAGES=cfg.stages, GROUP_M=cfg.group_m, ERF=0)
    sig.update({c: "constexpr" for c in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 7, 9, 10)}  # pointers, N, K
    try:
        compiled = triton.compile(ASTSource(kernels.block_linear_kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": cfg.warps, "num_stages": cfg.stages, "enable_fp_fusion": False})
    except RuntimeError as e:  # a Triton build without the NVIDIA backend or its ptxas
        pytest.skip(f"Triton cannot compile for sm_90 here: {e}")
    ptx = compiled.asm["ptx"]
    assert ".s32.s8.s8" in ptx and "wgmma.mma_async" in ptx
    assert "fma.rn.f32" not in ptx and "mul.rn.f32" in ptx and "add.rn.f32" in ptx
    assert "cvt.rn.f32.s32" not in ptx  # each K block's int32 sum: the exact integer add + fp32 subtract
    assert compiled.metadata.shared >= cfg.stages * (cfg.block_m + cfg.block_n) * 128


gpu = pytest.mark.gpu
_ON_GPU = torch.cuda.is_available() and HAS_TRITON
needs_gpu = pytest.mark.skipif(not _ON_GPU, reason="needs a CUDA GPU and Triton")

#: (M, N, K): odd M, one tile, several tiles, tails; K = 1, 2, 6 and 24 blocks of 128
_SHAPES = [(1, 256, 128), (17, 384, 256), (129, 768, 768), (1000, 256, 3072), (4096, 3072, 768)]
#: (symmetric, grouped weights, GELU, out dtype): every flag on and off, fp32 GELU (erf's last bit) included
_EPILOGUES = [(True, False, False, torch.float16), (False, True, True, torch.float32),
              (False, False, True, torch.float16), (True, True, False, torch.float32)]


@gpu
@needs_gpu
@pytest.mark.parametrize("m,n,k", _SHAPES)
@pytest.mark.parametrize("a_bits,w_bits", [(4, 4), (8, 8)])
def test_block_linear_equals_the_reference_on_the_gpu(m, n, k, a_bits, w_bits):
    from qfx.backends.triton import block_gemm as bg

    bg.register()
    for symmetric, grouped, gelu, out in _EPILOGUES:
        q, s, c, q_w, packed, s_w, bs, bias = _case(m, n, k, 128, a_bits, w_bits, symmetric, grouped and k > 128, "cuda")
        ref = nx.int_linear_blocks_reference(q, s, c, q_w, s_w, bs, bias, gelu, out)
        got = bg.int_linear_blocks(q, s, c, packed, w_bits, s_w, bs, bias, gelu, out, a_bits, 128, symmetric=symmetric)
        assert torch.equal(got, ref), (symmetric, grouped, gelu, out, (got.float() - ref.float()).abs().max().item())
        if symmetric:  # the op (always the offset term) equals the kernel that skips it
            assert torch.equal(torch.ops.qfx.int_linear(q, s, c, packed, w_bits, s_w, bs, bias, gelu, out, a_bits,
                                                        "triton", act_block=128), ref)


@gpu
@needs_gpu
@pytest.mark.parametrize("m", [3, 4096])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_ffn_in_producer_codes_equal_the_unfused_graph_on_the_gpu(m, dtype):
    from qfx.backends.triton import block_gemm as bg

    for symmetric, q_symmetric, gelu, clip in [(True, True, True, None), (False, False, True, (-0.5, 4.0)),
                                               (False, True, False, None)]:
        q, s, c, q_w, packed, s_w, bs, bias = _case(m, 3072, 768, 128, 4, 4, symmetric, False, "cuda", seed=m)
        y = nx.int_linear_blocks_reference(q, s, c, q_w, s_w, bs, bias, False, dtype)  # what the graph stores
        want = nx.quantize_activation(y, 4, q_symmetric, clip, gelu, block=128)
        got = bg.int_linear_blocks_quantize(q, s, c, packed, 4, s_w, bs, bias, dtype, 128, 4, q_symmetric, clip, gelu,
                                            symmetric=symmetric)
        for a, b, what in zip(got, want, ("codes", "scale", "offset")):
            assert torch.equal(a, b), (what, symmetric, q_symmetric, gelu, clip)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_block_quantize_equals_the_definition_on_the_gpu(dtype):
    from qfx.backends.triton import block_gemm as bg

    bg.register()
    x = (torch.randn(1000, 768, device="cuda") * 3).to(dtype)
    for bits, symmetric, gelu, clip in [(4, True, True, None), (8, False, True, (-1.0, 2.0)), (4, False, False, None),
                                        (8, True, False, (-1.0, 2.0))]:
        want = nx.quantize_activation(x, bits, symmetric, clip, gelu, block=128)
        lo, hi = (None, None) if clip is None else clip
        got = torch.ops.qfx.quantize(x, bits, symmetric, lo, hi, "triton", gelu, act_block=128)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (bits, symmetric, gelu, clip)


def _cuda(x: dict) -> dict:
    return {k: v.cuda() for k, v in x.items()}


@gpu
@needs_gpu
@pytest.mark.parametrize("cfg", [qfx.QuantConfig(4, 4, act_block=128), qfx.QuantConfig(4, 4, symmetric=False, act_block=128),
                                 qfx.QuantConfig(8, 8, act_block=128)])
def test_gpu_block_scaled_compiled_fp32_is_its_twin_bit_for_bit(cfg):
    """fp32 float parts: the compiled block-scaled model (Triton kernels) equals its QAT twin on the GPU."""
    from qfx.backends.triton import block_gemm as bg
    from qfx.runtime import block_binding as bb

    bg.register()
    model = make("bert_cls", layers=2, hidden=128, heads=2).cuda()
    qat = qfx.prepare_qat(model, example_kwargs=_cuda(inputs(2, 8)), config=cfg).eval()
    compiled = qfx.compile(qat, mode=f"int{cfg.weight_bits}", target=qfx.detect_target().name, float_dtype=torch.float32)
    assert bb.rebind_block_ops(compiled.graph_module) > 0
    x = _cuda(inputs(3, 37, seed=5))
    with torch.no_grad():
        twin = qat(**x).logits
        for producers in (False, True):  # the FFN-in producer bound as one kernel, or GEMM then quantize
            plan = bind_block_launch_plan(compiled, producers)
            assert ("triton+quantize" in plan.bound.values()) == producers
            got = compiled(**x).logits
            assert torch.equal(got, twin), f"producers={producers}: max diff {(got - twin).abs().max():.3g}"
