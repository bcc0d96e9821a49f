"""The CPU backend (qfx.backends.cpu) against the float64 reference, bit for bit.

Kernels over an M / N / K table with odd sizes, int8 and int4 codes, symmetric and asymmetric
activations, grouped weights, bias, GELU; the whole model: compiled (cpu backend) == compiled
(reference backend) == QAT twin; planning: the backend is chosen when the CPU has int8
dot-product instructions and refused, with the reason in the report, when it has not.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from models import inputs, make

import qfx
from qfx import numerics
from qfx.backends import backends_for, only
from qfx.backends.cpu import CpuBackend, int8_path, isa, kernels
from qfx.backends.reference import _add_layer_norm_quantize as ref_add_layer_norm_quantize
from qfx.backends.reference import _int_linear as ref_int_linear
from qfx.backends.reference import _quantize as ref_quantize
from qfx.targets import get_target

pytestmark = pytest.mark.skipif(int8_path().isa is None, reason=f"no int8 fast path here: {int8_path().why}")

#: (M, N, K): odd sizes, M <= 16 (padded), M = 1, BERT-like widths
SHAPES = [(1, 8, 16), (5, 7, 13), (16, 24, 32), (17, 33, 64), (64, 48, 96), (130, 96, 384)]


def _weights(n, k, w_bits, group, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    q_w, s_w = numerics.quantize_weight(w, w_bits, group)
    ws = numerics.weight_offset_sum(q_w, s_w)
    stored = numerics.pack_int4(q_w) if w_bits == 4 else q_w
    return stored, s_w, ws, torch.randn(n, generator=g)


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, tuple) else torch.equal(a, b)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, False)])
def test_int_linear_equals_reference(m, n, k, bits, symmetric):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + n)) * 4
    a, sa, ca = numerics.quantize_activation(x, bits, symmetric)
    w, s_w, ws, bias = _weights(n, k + k % 2, bits, None, k) if bits == 4 else _weights(n, k, bits, None, k)
    if bits == 4 and k % 2:
        a = torch.nn.functional.pad(a, (0, 1))  # int4 packing needs an even K
    for b, gelu in ((bias, False), (None, True)):
        got = kernels.int_linear(a, sa, ca, w, bits, s_w, ws, b, gelu, torch.float32, bits)
        want = ref_int_linear(a, sa, ca, w, bits, s_w, ws, b, gelu, torch.float32, bits)
        assert torch.equal(got, want), (m, n, k, bits, symmetric, gelu, (got - want).abs().max())


@pytest.mark.parametrize("group", [16, 32])
def test_grouped_weights_equal_reference(group):
    m, n, k = 37, 24, 96
    a, sa, ca = numerics.quantize_activation(torch.randn(3, m, k), 4, False)
    w, s_w, ws, bias = _weights(n, k, 4, group, group)
    got = kernels.int_linear(a, sa, ca, w, 4, s_w, ws, bias, False, torch.float16, 4)
    want = ref_int_linear(a, sa, ca, w, 4, s_w, ws, bias, False, torch.float16, 4)
    assert got.shape == (3, m, n) and got.dtype == torch.float16
    assert torch.equal(got, want)


@pytest.mark.parametrize("m,n,k,block", [(1, 8, 32, 16), (5, 24, 64, 32), (17, 33, 128, 64), (130, 48, 384, 128)])
@pytest.mark.parametrize("bits,symmetric,grouped", [(8, True, False), (8, False, False), (4, False, False), (4, True, True)])
def test_block_scaled_int_linear_equals_reference(m, n, k, block, bits, symmetric, grouped):
    """qfx::int_linear with act_block on the CPU backend: one exact GEMM per block (prepacked per
    block), the reference's promotion order: the same bits, whole output, with and without GELU."""
    from qfx.backends.reference import _int_linear_blocks as ref_int_linear_blocks

    x = torch.randn(3, m, k, generator=torch.Generator().manual_seed(m + k)) * 3
    a, sa, ca = numerics.quantize_activation(x, bits, symmetric, block=block)
    group = 2 * block if grouped and k % (2 * block) == 0 else None
    w, s_w, _, bias = _weights(n, k, bits, group, n + block)
    bs = numerics.weight_block_sums(numerics.unpack_int4(w) if bits == 4 else w, block)
    for b, gelu, out in ((bias, False, torch.float32), (None, True, torch.float16)):
        got = kernels.int_linear_blocks(a, sa, ca, w, bits, s_w, bs, b, gelu, out, bits, block)
        want = ref_int_linear_blocks(a, sa, ca, w, bits, s_w, bs, b, gelu, out, bits, block)
        assert got.shape == (3, m, n) and got.dtype == out
        assert torch.equal(got, want), (m, n, k, block, bits, symmetric, grouped, gelu)
    wrong = 16 if block != 16 else 8  # scales of another block size
    with pytest.raises(ValueError, match=f"act_block={wrong}\\): a_scale has {k // block} blocks"):
        kernels.int_linear_blocks(a, sa, ca, w, bits, s_w, bs, None, False, torch.float32, bits, wrong)


def test_int_matmul_is_exact_at_the_code_extremes():
    a = torch.full((19, 4096), -128, dtype=torch.int8)
    b = torch.full((9, 4096), -128, dtype=torch.int8)
    assert torch.equal(kernels.int_matmul(a, b), numerics.int_matmul_reference(a, b))
    assert int(kernels.int_matmul(a, b)[0, 0]) == 128 * 128 * 4096


@pytest.mark.parametrize("shape", [(1, 1, 32), (2, 9, 48), (3, 128, 384)])
@pytest.mark.parametrize("bits,symmetric,clip,gelu", [(8, True, None, False), (8, False, None, True),
                                                      (4, False, (-3.0, 5.0), False), (4, True, None, True)])
def test_quantize_equals_reference(shape, bits, symmetric, clip, gelu):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[-1])) * 3
    lo, hi = (None, None) if clip is None else clip
    assert _equal(kernels.quantize(x, bits, symmetric, lo, hi, gelu), ref_quantize(x, bits, symmetric, lo, hi, gelu))


def test_add_layer_norm_quantize_equals_reference():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 11, 64, generator=g), torch.randn(2, 11, 64, generator=g)
    weight, bias = torch.randn(64, generator=g), torch.randn(64, generator=g)
    for other in (b, None):
        got = kernels.add_layer_norm_quantize(a, other, weight, bias, 1e-12, 8, False, None, None)
        want = ref_add_layer_norm_quantize(a, other, weight, bias, 1e-12, 8, False, None, None)
        assert _equal(got, want)


def test_weights_are_prepared_once_and_again_after_an_update():
    w, *_ = _weights(8, 32, 4, None, 0)
    first = kernels._prepared(w, 4, 1)
    assert kernels._prepared(w, 4, 1) is first
    a, sa, ca = numerics.quantize_activation(torch.randn(5, 32), 4, True)
    s_w, ws = torch.ones(8, 1), torch.zeros(8)
    before = kernels.int_linear(a, sa, ca, w, 4, s_w, ws, None, False, torch.float32, 4)
    w.copy_(numerics.pack_int4(-numerics.unpack_int4(w).clamp(-7, 7)))  # a new version: prepared again
    assert kernels._prepared(w, 4, 1) is not first
    after = kernels.int_linear(a, sa, ca, w, 4, s_w, ws, None, False, torch.float32, 4)
    assert torch.equal(after, ref_int_linear(a, sa, ca, w, 4, s_w, ws, None, False, torch.float32, 4))
    assert not torch.equal(after, before)


@pytest.mark.parametrize("k", [1536, 3072, 4096])
def test_accumulators_past_2_to_24_are_exact(k):
    """|acc| up to 128 * 128 * K > 2^24: the fp32 value must be the exact integer, rounded once."""
    g = torch.Generator().manual_seed(k)
    a = torch.randint(100, 128, (19, k), dtype=torch.int8, generator=g)
    a[::2] = -a[::2] - 1
    w = torch.randint(100, 128, (24, k), dtype=torch.int8, generator=g)
    w[12:, ::3] = -128  # rows 0-11 all positive: |acc| > 2^24 against the odd rows of a
    ones, zeros = torch.ones(19), torch.zeros(19)
    s_w, ws = torch.ones(24, 1), torch.zeros(24)
    got = kernels.int_linear(a, ones, zeros, w, 8, s_w, ws, None, False, torch.float32, 8)
    assert torch.equal(got, ref_int_linear(a, ones, zeros, w, 8, s_w, ws, None, False, torch.float32, 8))
    assert got.abs().max() > 2**24


@pytest.mark.parametrize("mode,config", [("int8", None), ("int4", qfx.QuantConfig(4, 4, symmetric=False))])
def test_compiled_on_cpu_backend_equals_reference_and_twin(mode, config):
    model = make("bert_cls", layers=2)
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=config or qfx.QuantConfig(8, 8)).eval()
    fast = qfx.compile(qat, mode=mode, target="cpu")
    with only("reference"):
        ref = qfx.compile(qat, mode=mode, target="cpu")
    assert {r.backend for r in fast.report().quantized} == {"cpu"}
    assert {r.backend for r in ref.report().quantized} == {"reference"}
    for batch, seq in ((3, 9), (1, 5), (4, 16)):
        x = inputs(batch, seq, seed=batch)
        with torch.no_grad():
            twin = qat(**x).logits
        assert torch.equal(fast(**x).logits, ref(**x).logits)
        assert torch.equal(fast(**x).logits, twin)


def test_cpu_without_int8_instructions_plans_the_reference(monkeypatch):
    monkeypatch.setattr(isa, "cpu_flags", lambda: frozenset({"sse4_2", "avx2", "fma"}))
    ok, why = CpuBackend().available()
    assert not ok and "no int8 dot-product instructions" in why
    model = make("bert", layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
        cm = qfx.compile(model, mode="int8", target="cpu", example_kwargs=inputs(2, 8))
    rows = cm.report().quantized
    assert rows and all(r.backend == "reference" and "no int8 dot-product instructions" in r.note for r in rows)


def test_onednn_switched_off_is_refused(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    path = int8_path()
    assert path.isa is None and "mkldnn.enabled = False" in path.why


def test_weight_only_and_small_blocks_are_refused_with_the_reason():
    from qfx.backends import LinearWork

    cpu = get_target("cpu")
    weight_only = LinearWork("l.ffn_in", 64, 32, 4, 16, True, 32, False)
    ok, why = CpuBackend().can_implement(weight_only, cpu)
    assert not ok and "weight-only" in why
    assert CpuBackend().can_implement(LinearWork("l.qkv", 96, 32, 8, 8, True, None, False), cpu)[0]
    assert CpuBackend().can_implement(LinearWork("l.qkv", 96, 32, 4, 4, True, None, False, act_block=16), cpu)[0]
    ok, why = CpuBackend().can_implement(LinearWork("l.qkv", 96, 32, 4, 4, True, None, False, act_block=4), cpu)
    assert not ok and "act_block=4 is not a multiple of 8" in why


def test_only_rejects_unknown_names_and_backends_the_target_lacks():
    with pytest.raises(ValueError, match="name one or more"):
        with only("fast"):
            pass
    with only("cutlass"), pytest.raises(ValueError, match="none of these backends serves target 'cpu'"):
        backends_for(get_target("cpu"))


def test_a_new_thread_count_gets_its_own_compiled_loops():
    x = torch.randn(300, 96, generator=torch.Generator().manual_seed(5))
    want = ref_quantize(x, 8, False, None, None)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert _equal(kernels.quantize(x, 8, False, None, None), want)
        threads_compiled = {key[1] for key in kernels._COMPILED if key[0] is numerics.quantize_activation}
        assert threads_compiled >= {1, 2}
    finally:
        torch.set_num_threads(before)


def test_many_bias_widths_compile_each_loop_once():
    """A model with many linear widths (CANINE: 27 linears over a dozen shapes) must not recompile
    the epilogue per width: biases are Parameters, whose sizes Dynamo would take as static. With
    a recompile limit of 1 and failure on hitting it, 10 widths run through one compiled loop."""
    import torch._dynamo

    a, sa, ca = numerics.quantize_activation(torch.randn(9, 32, generator=torch.Generator().manual_seed(3)), 8, False)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for n in range(17, 27):
            w, s_w, ws, bias = _weights(n, 32, 8, None, n)
            bias = torch.nn.Parameter(bias, requires_grad=False)  # as a model hands it over
            got = kernels.int_linear(a, sa, ca, w, 8, s_w, ws, bias, False, torch.float32, 8)
            assert torch.equal(got, ref_int_linear(a, sa, ca, w, 8, s_w, ws, bias, False, torch.float32, 8)), n


def test_bound_launchers_give_the_ops_bits(monkeypatch):
    """qfx.runtime.cpu_binding.bind, the runtime's binder for "cpu": the lean graph calls the
    kernels without the dispatcher, and the output is unchanged bit for bit."""
    from qfx.runtime.cpu_binding import bind
    from qfx.runtime import launch_plan

    qat = qfx.prepare_qat(make("bert_cls", layers=2), example_kwargs=inputs(2, 8), config=qfx.QuantConfig(4, 4, symmetric=False)).eval()
    x = inputs(3, 9, seed=3)
    monkeypatch.delitem(launch_plan.BINDERS, "cpu")  # first through the ops (the dispatcher)
    through_ops = qfx.compile(qat, mode="int4", target="cpu")
    want = through_ops(**x).logits
    monkeypatch.setitem(launch_plan.BINDERS, "cpu", bind)
    bound = qfx.compile(qat, mode="int4", target="cpu")
    assert torch.equal(bound(**x).logits, want)
    assert set(bound.launch_plan.bound.values()) == {"cpu"} and len(bound.launch_plan.bound) == 2 * 2 * 4


def test_the_prepacked_onednn_linear_only_with_amx():
    """oneDNN's int8 linear runs s8 x s8 as its reference matmul on AVX512-VNNI without AMX (an
    AMD EPYC: ~1,000x slower than torch._int_mm); the backend takes it only with AMX-INT8."""
    from qfx.backends.cpu import kernels

    assert kernels.onednn_linear("AVX512-VNNI") is None and kernels.onednn_linear("AVX-VNNI") is None
    assert kernels.onednn_linear(None) is None
    assert (kernels.onednn_linear("AMX-INT8") is not None) == hasattr(torch.ops.onednn, "qlinear_pointwise")
    assert kernels.GEMM == ("oneDNN int8 linear, prepacked weights" if kernels._ONEDNN is not None else "torch._int_mm")
