"""GPU tests of the CUTLASS backend: exact int32 accumulators, the dequant epilogue within the
bound of EPILOGUES.md, int4 handling, CUDA graphs, and the bad-input errors.

Skips cleanly without CUDA or without the built native library.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qfx import numerics

qc = pytest.importorskip("qfx.backends.cutlass")
from qfx.backends.cutlass import BadInput, _library  # noqa: E402
from qfx.backends.cutlass.configs import CONFIGS  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not qc.available()[0], reason=f"cutlass backend: {qc.available()[1]}"),
]

K_SIZES = (768, 1024, 3072, 4096)
# M not a multiple of any tile (64/128/256) and M = 1; N a multiple of 8 only.
M_SIZES = (1, 77, 200, 1000)


def _built(arch: str, operand: str | None = None) -> list[str]:
    from qfx.backends.cutlass import _library
    lib, _ = _library.load()
    return [c.name for c in CONFIGS if lib and c.name in lib.configs and c.arch == arch
            and (operand is None or c.operand == operand)]


def _codes(shape, bits, gen):
    lo, hi = numerics.code_range(bits)
    return torch.randint(lo, hi + 1, shape, dtype=torch.int8, generator=gen).cuda()


def _on_hopper() -> bool:
    return torch.cuda.get_device_capability() == (9, 0)


# ------------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("config", _built("sm90a") or ["<none built>"])
@pytest.mark.parametrize("k", K_SIZES)
def test_sm90_int32_accumulators_exact(config, k):
    if config == "<none built>" or not _on_hopper():
        pytest.skip("needs an sm_90 GPU and sm90a kernels")
    gen = torch.Generator().manual_seed(k)
    for m, n, bits in ((77, 256, 8), (1000, 768, 4), (1, 136, 8)):
        a, b = _codes((m, k), bits, gen), _codes((n, k), bits, gen)
        got = qc.int_matmul(a, b, config=config)
        assert torch.equal(got.cpu(), numerics.int_matmul_reference(a.cpu(), b.cpu()))


@pytest.mark.parametrize("value_a,value_b", [(-8, -8), (7, 7), (-8, 7), (-128, -128),
                                             (127, 127), (-128, 127)])
@pytest.mark.parametrize("k", K_SIZES)
def test_extreme_values_exact(value_a, value_b, k):
    m, n = 300, 264
    a = torch.full((m, k), value_a, dtype=torch.int8, device="cuda")
    b = torch.full((n, k), value_b, dtype=torch.int8, device="cuda")
    got = qc.int_matmul(a, b)
    assert torch.equal(got, torch.full((m, n), value_a * value_b * k, dtype=torch.int32,
                                       device="cuda"))


@pytest.mark.parametrize("m", M_SIZES + (4096 + 3,))
def test_default_dispatch_exact_any_m(m):
    gen = torch.Generator().manual_seed(m)
    a, b = _codes((m, 1024), 8, gen), _codes((3072, 1024), 8, gen)
    got = qc.int_matmul(a, b)
    want = numerics.int_matmul_reference(a, b)  # float64 on the GPU: exact at these sizes
    assert torch.equal(got, want)


@pytest.mark.parametrize("config", _built("sm80") or ["<none built>"])
def test_sm80_kernels_exact_through_ptx_jit(config):
    """Ampere INT4/INT8 kernels: on a Hopper they JIT from compute_80 PTX (slow, exact)."""
    if config == "<none built>":
        pytest.skip("no sm80 kernels built")
    gen = torch.Generator().manual_seed(1)
    bits = 4 if "_s4_" in config else 8
    for m, n, k in ((77, 256, 768), (130, 136, 1024)):
        a, b = _codes((m, k), bits, gen), _codes((n, k), bits, gen)
        got = qc.int_matmul(a, b, bits=bits, config=config)
        assert torch.equal(got.cpu(), numerics.int_matmul_reference(a.cpu(), b.cpu()))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 600), n_blocks=st.integers(1, 64), k_blocks=st.integers(1, 64),
       bits=st.sampled_from([4, 8]), seed=st.integers(0, 2**16))
def test_property_any_aligned_shape_is_exact(m, n_blocks, k_blocks, bits, seed):
    """Any M, any N % 8 == 0, any K % 16 == 0: default dispatch gives the exact product."""
    gen = torch.Generator().manual_seed(seed)
    n, k = 8 * n_blocks, 16 * k_blocks
    a, b = _codes((m, k), bits, gen), _codes((n, k), bits, gen)
    assert torch.equal(qc.int_matmul(a, b), numerics.int_matmul_reference(a, b))


def test_unpack_int4_matches_numerics():
    gen = torch.Generator().manual_seed(3)
    q = _codes((136, 1024), 4, gen).cpu()
    packed = numerics.pack_int4(q).cuda()
    assert torch.equal(qc.unpack_int4(packed).cpu(), q)


# ------------------------------------------------------------------------------- epilogue

def _bound(ref, terms, out_dtype):
    """EPILOGUES.md: |out - ref| <= u*|ref| + 2^-20 * (sum of |terms|) + tiny."""
    unit = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-23}[out_dtype]
    return unit * ref.abs() + 2.0**-20 * terms + 2.0**-24


def _linear_case(m, n, k, w_bits, a_bits, symmetric, with_bias, gen):
    x = torch.randn(m, k, generator=gen) * 3
    q_a, s_a, c_a = numerics.quantize_activation(x, a_bits, symmetric=symmetric)
    wf = torch.randn(n, k, generator=gen) * 0.05
    q_w, s_w = numerics.quantize_weight(wf, w_bits)
    ws = numerics.weight_offset_sum(q_w, s_w)
    bias = torch.randn(n, generator=gen) if with_bias else None
    return q_a, s_a, c_a, q_w, s_w, ws, bias


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 4), (4, 8)])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int_linear_within_bound(symmetric, w_bits, a_bits, gelu, out_dtype):
    gen = torch.Generator().manual_seed(w_bits * 10 + a_bits + int(symmetric) + 2 * int(gelu))
    m, n, k = 333, 768, 1024
    q_a, s_a, c_a, q_w, s_w, ws, bias = _linear_case(m, n, k, w_bits, a_bits, symmetric, True,
                                                     gen)
    ref = numerics.int_linear_reference(q_a, s_a, c_a, q_w, s_w, ws, bias, gelu, torch.float32)
    w = numerics.pack_int4(q_w) if w_bits == 4 else q_w
    got = qc.int_linear(q_a.cuda(), s_a.cuda(), c_a.cuda(), w.cuda(), w_bits, s_w.cuda(),
                        ws.cuda(), bias.cuda(), gelu, out_dtype, a_bits=a_bits).float().cpu()
    acc = numerics.int_matmul_reference(q_a, q_w).float()
    terms = (acc * s_a[:, None] * s_w.reshape(1, n)).abs() + (c_a[:, None] * ws[None]).abs() \
        + bias.abs()[None]
    err = (got - ref).abs()
    assert torch.isfinite(got).all()
    assert (err <= _bound(ref, terms, out_dtype)).all(), f"max err {err.max():.3g}"


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("config", [None, *(_built("sm90a") if torch.cuda.is_available() and _on_hopper() else [])])
def test_int_linear_bit_identical_to_the_reference_on_the_gpu(config, symmetric, gelu, out_dtype):
    """The epilogue runs numerics.int_linear_reference's fp32 ops in its order, one rounding each
    (no fma), and torch's GELU expression: the same GPU gives the same bits, GELU included."""
    gen = torch.Generator().manual_seed(5 + int(symmetric) + 2 * int(gelu))
    m, n, k = 257, 512, 768
    q_a, s_a, c_a, q_w, s_w, ws, bias = _linear_case(m, n, k, 8, 8, symmetric, True, gen)
    args = [t.cuda() for t in (q_a, s_a, c_a, q_w, s_w, ws, bias)]
    ref = numerics.int_linear_reference(*args, gelu, out_dtype)  # torch ops on the same GPU
    got = qc.int_linear(args[0], args[1], None if symmetric else args[2], args[3], 8, args[4], args[5], args[6], gelu, out_dtype, config=config)
    diff = (got.float() - ref.float()).abs()
    assert torch.equal(got, ref), f"{int((got != ref).sum())} of {got.numel()} differ, max {diff.max():.3g}"


@pytest.mark.parametrize("config", _built("sm90a") or ["<none built>"])
def test_every_sm90_config_dequant(config):
    if config == "<none built>" or not _on_hopper():
        pytest.skip("needs an sm_90 GPU and sm90a kernels")
    gen = torch.Generator().manual_seed(7)
    m, n, k = 515, 1024, 768
    q_a, s_a, c_a, q_w, s_w, ws, _ = _linear_case(m, n, k, 8, 8, False, False, gen)
    ref = numerics.int_linear_reference(q_a, s_a, c_a, q_w, s_w, ws, None, False, torch.float32)
    got = qc.int_linear(q_a.cuda(), s_a.cuda(), c_a.cuda(), q_w.cuda(), 8, s_w.cuda(), ws.cuda(),
                        None, False, torch.float16, config=config).float().cpu()
    acc = numerics.int_matmul_reference(q_a, q_w).float()
    terms = (acc * s_a[:, None] * s_w.reshape(1, n)).abs() + (c_a[:, None] * ws[None]).abs()
    assert ((got - ref).abs() <= _bound(ref, terms, torch.float16)).all()


def test_int_linear_leading_dims_and_no_offsets():
    gen = torch.Generator().manual_seed(11)
    q_a, s_a, c_a, q_w, s_w, ws, bias = _linear_case(2 * 70, 256, 768, 8, 8, True, True, gen)
    ref = numerics.int_linear_reference(q_a, s_a, c_a, q_w, s_w, ws, bias, False, torch.float32)
    got = qc.int_linear(q_a.reshape(2, 70, 768).cuda(), s_a.reshape(2, 70).cuda(), None,
                        q_w.cuda(), 8, s_w.cuda(), None, bias.half().cuda(), False,
                        torch.float16)
    assert got.shape == (2, 70, 256)
    torch.testing.assert_close(got.float().cpu().reshape(140, 256), ref, rtol=2e-3, atol=2e-3)


def test_cuda_graph_capture_replays_same_result():
    gen = torch.Generator().manual_seed(5)
    q_a, s_a, c_a, q_w, s_w, ws, bias = _linear_case(256, 1024, 1024, 4, 4, False, True, gen)
    args = [t.cuda() for t in (q_a, s_a, c_a, numerics.pack_int4(q_w), s_w, ws, bias)]
    call = lambda: qc.int_linear(args[0], args[1], args[2], args[3], 4, args[4], args[5],  # noqa
                                 args[6], True, torch.float16)
    eager = call()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # warm-up: caches the unpacked weight outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


# ------------------------------------------------------------------------------- bad input

def _ok_operands():
    return (torch.zeros(64, 768, dtype=torch.int8, device="cuda"),
            torch.zeros(256, 768, dtype=torch.int8, device="cuda"))


@pytest.mark.parametrize("mutate,match", [
    (lambda a, b: (a.float(), b), "dtype"),
    (lambda a, b: (a.cpu(), b), "CUDA"),
    (lambda a, b: (a.t().contiguous().t(), b), "contiguous"),
    (lambda a, b: (a[:, :760], b[:, :760]), "contiguous"),
    (lambda a, b: (a[:, :760].contiguous(), b[:, :760].contiguous()), "multiple of 16"),
    (lambda a, b: (a, b[:252].contiguous()), "multiple of 8"),
    (lambda a, b: (a, b[:, :512].contiguous()), "K mismatch"),
    (lambda a, b: (torch.empty(64 * 768 + 1, dtype=torch.int8, device="cuda")[1:].view(64, 768),
                   b), "aligned"),
])
def test_bad_inputs_raise_before_launch(mutate, match):
    a, b = mutate(*_ok_operands())
    with pytest.raises(BadInput, match=match):
        qc.int_matmul(a, b)


def test_group_wise_weights_rejected():
    a, w = _ok_operands()
    with pytest.raises(BadInput, match="group-wise"):
        qc.int_linear(a, torch.ones(64, device="cuda"), None, w, 8,
                      torch.ones(256, 6, device="cuda"), None, None, False, torch.float16)
    assert not qc.can_implement(None, 256, 768, 8, 8, group=128)[0]


def test_registered_op_under_torch_compile():
    """qfx::int_linear with backend="cutlass" runs eagerly, compiled (fake impl) and equal."""
    gen = torch.Generator().manual_seed(13)
    q_a, s_a, c_a, q_w, s_w, ws, bias = _linear_case(200, 512, 768, 8, 8, False, True, gen)
    args = [t.cuda() for t in (q_a, s_a, c_a, q_w, s_w, ws, bias)]

    def layer(a, sa, ca, w, sw, wsum, b):
        return torch.ops.qfx.int_linear(a, sa, ca, w, 8, sw, wsum, b, True, torch.float16, 8,
                                        "cutlass")

    eager = layer(*args)
    compiled = torch.compile(layer, fullgraph=True)(*args)
    assert torch.equal(eager, compiled)
    acc = torch.ops.qfx.int_matmul(args[0], args[3], "cutlass")
    assert torch.equal(acc, numerics.int_matmul_reference(args[0], args[3]))


@pytest.mark.parametrize("config", _built("sm80", "s4") or ["<none built>"])
def test_sm80_int4_linear_through_ptx_jit(config):
    """W4A4 on the native-INT4 path (packed operands + unfused epilogue), checked via PTX JIT."""
    if config == "<none built>":
        pytest.skip("no sm80 INT4 kernels built")
    gen = torch.Generator().manual_seed(17)
    m, n, k = 150, 256, 1024
    q_a, s_a, c_a, q_w, s_w, ws, bias = _linear_case(m, n, k, 4, 4, False, True, gen)
    ref = numerics.int_linear_reference(q_a, s_a, c_a, q_w, s_w, ws, bias, True, torch.float32)
    got = qc.int_linear(q_a.cuda(), s_a.cuda(), c_a.cuda(), numerics.pack_int4(q_w).cuda(), 4,
                        s_w.cuda(), ws.cuda(), bias.cuda(), True, torch.float32, a_bits=4,
                        config=config).cpu()
    acc = numerics.int_matmul_reference(q_a, q_w).float()
    terms = (acc * s_a[:, None] * s_w.reshape(1, n)).abs() + (c_a[:, None] * ws[None]).abs() \
        + bias.abs()[None]
    assert ((got - ref).abs() <= _bound(ref, terms, torch.float32)).all()
    with pytest.raises(BadInput, match="INT4 x INT4"):
        qc.int_linear(q_a.cuda(), s_a.cuda(), c_a.cuda(), numerics.pack_int4(q_w).cuda(), 4,
                      s_w.cuda(), ws.cuda(), None, False, torch.float16, a_bits=8, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits, symmetric, clip", [(4, True, None), (4, False, None), (8, True, None),
                                                   (8, False, None), (4, False, (-2.0, 3.0))])
def test_quantize_kernel_is_bit_identical_to_numerics(dtype, bits, symmetric, clip):
    if not qc.available()[0] or not _library.load()[0].has("qfx_quantize_rows"):
        pytest.skip("native library without the quantize kernel")
    gen = torch.Generator().manual_seed(bits * 10 + symmetric)
    # warp-per-row kernel (K a multiple of one 16-byte vector, <= 16 vectors a lane) and the
    # block kernel it falls back to (odd K, long rows)
    for rows, k in [(1, 64), (37, 768), (300, 3072), (5, 1000), (4, 1001), (3, 8200)]:
        x = (torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 8 + 0.5).to(dtype)
        x[0, :] = 0  # an all-zero token: the eps path
        lo, hi = clip if clip else (None, None)
        q, s, c = qc.quantize(x.cuda(), bits, symmetric, lo, hi)
        rq, rs, rc = numerics.quantize_activation(x, bits, symmetric, clip)
        assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs) and torch.equal(c.cpu(), rc)


@pytest.mark.gpu
@pytest.mark.parametrize("bits, symmetric", [(8, True), (8, False), (4, True), (4, False)])
def test_quantize_kernel_rounds_near_half_integer_quotients_like_true_division(bits, symmetric):
    """Codes of quotients within a few ulp of k + 1/2 (ties included, where rint rounds half to
    even) equal numerics.py's correctly rounded division, over millions of such elements: the
    kernels multiply by the reciprocal only where that cannot round to the other side of a
    half-integer and divide everywhere else (quantize_kernels.cu, rounded_quotient)."""
    if not qc.available()[0] or not _library.load()[0].has("qfx_quantize_rows"):
        pytest.skip("native library without the quantize kernel")
    gen = torch.Generator().manual_seed(11 * bits + symmetric)
    rows, k = 4096, 768
    half = 2 ** (bits - 1)
    step = torch.rand(rows, 1, generator=gen, dtype=torch.float64) * 3 + 1e-3
    base = torch.randint(-half, half - 1, (rows, k), generator=gen).double() + 0.5
    jitter = torch.randint(-3, 4, (rows, k), generator=gen).double() * 2.0 ** -22
    x = ((base + jitter * base.abs()) * step).float()
    x[:, 0] = (half - 1) * step[:, 0]  # the row's max|x| fixes the scale near `step`
    x[:, 1] = -half * step[:, 0]
    for name, xs in (("near ties", x), ("scaled", x * 0.7)):
        q, s, c = qc.quantize(xs.cuda(), bits, symmetric)
        rq, rs, rc = numerics.quantize_activation(xs, bits, symmetric)
        assert torch.equal(s.cpu(), rs) and torch.equal(c.cpu(), rc), name
        assert torch.equal(q.cpu(), rq), (name, int((q.cpu() != rq).sum()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits, symmetric, clip", [(4, True, None), (8, False, None), (4, False, (-0.2, 3.0))])
def test_quantize_kernel_with_gelu_equals_torch_gelu_then_quantize(dtype, bits, symmetric, clip):
    """The fused GELU (fuse_gelu_quantize) hands the quantizer exactly what torch's gelu on the
    same GPU would: codes, scales and offsets bit-identical, on every kernel path."""
    if not qc.available()[0] or not _library.load()[0].has("qfx_quantize_rows"):
        pytest.skip("native library without the quantize kernel")
    gen = torch.Generator().manual_seed(bits * 10 + symmetric + 7)
    for rows, k in [(1, 64), (37, 768), (300, 3072), (64, 4096), (4, 1001), (3, 8200)]:
        x = (torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 6).to(dtype).cuda()
        lo, hi = clip if clip else (None, None)
        got = qc.quantize(x, bits, symmetric, lo, hi, gelu=True)
        ref = numerics.quantize_activation(torch.nn.functional.gelu(x), bits, symmetric, clip)  # torch on the GPU
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), (rows, k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits, symmetric, clip", [(8, True, None), (4, False, None), (8, False, (-0.1, 6.0))])
def test_quantize_kernel_with_gelu_matches_torch_for_every_16_bit_input(dtype, bits, symmetric, clip):
    """Every finite fp16 / bf16 value goes through the fused GELU + quantize (the FFN
    intermediate's kernel, K = 3072): codes, scales and offsets equal torch's gelu on the same GPU
    then numerics.py's quantizer, so the kernel's erf agrees with torch's on every 16-bit input,
    not only on random ones. Values are sorted by magnitude into rows, so each row's scale fits
    its values and every code is informative."""
    if not qc.available()[0] or not _library.load()[0].has("qfx_quantize_rows"):
        pytest.skip("native library without the quantize kernel")
    bits_all = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16)
    values = bits_all.view(dtype).float()
    values = values[torch.isfinite(values)]
    values = values[values.abs().argsort()]
    k = 3072
    pad = -values.numel() % k  # the largest values again, to fill the last row
    values = torch.cat((values, values[values.numel() - pad:]))
    gen = torch.Generator().manual_seed(bits + 2 * symmetric)
    x = values.view(-1, k)[:, torch.randperm(k, generator=gen)].to(dtype).cuda()
    lo, hi = clip if clip else (None, None)
    got = qc.quantize(x, bits, symmetric, lo, hi, gelu=True)
    ref = numerics.quantize_activation(torch.nn.functional.gelu(x), bits, symmetric, clip)  # torch on the GPU
    for name, a, b in zip(("codes", "scale", "offset"), got, ref):
        assert torch.equal(a, b), (name, int((a != b).sum()))


@pytest.mark.gpu
def test_quantize_op_routes_to_the_kernel_and_matches_reference():
    if not qc.available()[0] or not _library.load()[0].has("qfx_quantize_rows"):
        pytest.skip("native library without the quantize kernel")
    x = torch.randn(2, 50, 384, device="cuda", dtype=torch.float16).transpose(0, 1)  # non-contiguous
    got = torch.ops.qfx.quantize(x, 4, False, None, None, "cutlass")
    ref = torch.ops.qfx.quantize(x, 4, False, None, None, "reference")
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
