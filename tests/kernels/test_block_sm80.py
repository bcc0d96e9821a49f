"""The Ampere block-scaled integer linear (backends/cutlass/block_linear.py, csrc/sm80_block_gemm.cu):
native INT4 mma (m16n8k64 s4) or m16n8k32 s8 with per-block fp32 promotion, against the definition.

On a GPU every output is compared whole with ``torch.equal`` against
:func:`qfx.numerics.int_linear_blocks_reference` run on the same GPU with torch ops. On an H100 the library
holds no sm_90 code for this kernel (it is built with the sm80 family: sm_80/86/89 SASS + compute_80 PTX), so
the driver JIT-compiles its compute_80 PTX: exactness is checked there, speed never is (s4 mma is emulated on
Hopper). On the CPU: the capability answers, the planner's choice and the bad-input errors.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from models import inputs, make

import qfx
from qfx import numerics as nx
from qfx.backends import CutlassBackend, LinearWork
from qfx.backends.cutlass import BadInput, _library
from qfx.backends.cutlass import block_linear as bl
from qfx.targets import get_target


def _work(k=768, n=3072, w_bits=4, a_bits=4, act_block=128, group=None):
    return LinearWork("layer0.ffn_in", n, k, w_bits, a_bits, False, group, False, act_block)


# ------------------------------------------------------------------------------------- CPU: capability


def test_capability_on_ampere_and_ada_targets_names_the_mma():
    for target in ("sm_80", "sm_86", "sm_89"):
        ok, why = bl.can_implement(_work(), get_target(target), require_library=False)
        assert ok and "m16n8k64 s4 (native INT4)" in why and "act_block=128" in why, why
    ok, why = bl.can_implement(_work(w_bits=8, a_bits=8), get_target("sm_86"), require_library=False)
    assert ok and "m16n8k32 s8" in why
    ok, why = bl.can_implement(_work(w_bits=4, a_bits=8), get_target("sm_86"), require_library=False)
    assert ok and "m16n8k32 s8" in why  # int4 weights unpacked once: INT4 mma needs both operands 4-bit


@pytest.mark.parametrize("work, target, reason", [
    (_work(), "sm_90", "on sm_90 the Triton block kernel"),
    (_work(act_block=None), "sm_86", "token-wise activations"),
    (_work(act_block=32), "sm_86", "use a multiple of 64"),
    (_work(act_block=96), "sm_86", "use a multiple of 64"),
    (_work(k=768, act_block=512), "sm_86", "does not divide K=768"),
    (_work(act_block=128, group=64), "sm_86", "do not hold whole act_block=128 blocks"),
    (_work(a_bits=16), "sm_86", "weight-only"),
])
def test_capability_refusals_say_why(work, target, reason):
    ok, why = bl.can_implement(work, get_target(target), require_library=False)
    assert not ok and reason in why, why


def test_capability_asks_the_library_for_the_kernel(monkeypatch):
    class Lib:
        path, archs = "libqfx_cutlass.so", ["90a"]

        def has(self, symbol):
            return False

    monkeypatch.setattr(_library, "load", lambda: (Lib(), ""))
    ok, why = bl.can_implement(_work(), get_target("sm_86"))
    assert not ok and "QFX_CUDA_ARCHS" in why  # no sm_8x arch built
    Lib.archs = ["80", "90a"]
    ok, why = bl.can_implement(_work(), get_target("sm_86"))
    assert not ok and bl.SYMBOL in why and "rebuild" in why
    Lib.has = lambda self, symbol: True
    assert bl.can_implement(_work(), get_target("sm_86"))[0]
    monkeypatch.setattr(_library, "load", lambda: (None, "libqfx_cutlass.so not built"))
    assert bl.can_implement(_work(), get_target("sm_86")) == (False, "libqfx_cutlass.so not built")


@pytest.mark.skipif(_library.load()[0] is None or not _library.load()[0].has(bl.SYMBOL),
                    reason="native library without the sm80 block kernel")
def test_the_library_has_the_tile_table_python_names():
    lib, _ = _library.load()
    assert lib.fn("qfx_sm80_block_linear_tiles")() == len(bl.TILES)
    assert lib.fn(bl.SYMBOL, argtypes=bl._ARGTYPES)(*[None] * 8, 1, 8, 192, 96, 1, 1, 0, 0, 0, None) == 5  # bad act_block


def test_tile_table_serves_every_m():
    assert [bl.tile_for(m).index for m in (1, 3, 256, 257, 4096, 1 << 40)] == [0, 0, 0, 1, 1, 1]
    assert [t.index for t in bl.TILES] == list(range(len(bl.TILES)))


# ------------------------------------------------------------------------------------- CPU: the planner


@contextlib.contextmanager
def _library_with_the_kernel(monkeypatch):
    class Lib:
        path, archs = "libqfx_cutlass.so", ["80", "90a"]

        def has(self, symbol):
            return True

    monkeypatch.setattr(_library, "load", lambda: (Lib(), ""))
    monkeypatch.setattr(CutlassBackend, "available", lambda self: (True, ""))
    yield


def _planned(target, cfg):
    from qfx.backends.triton import HAS_TRITON
    from qfx.passes import annotate, insert_fake_quant, lower_to_integer, plan, remove_dropout

    if not HAS_TRITON:
        pytest.skip("the block quantize kernel is Triton's")
    gm = qfx.capture(make("bert_cls", layers=1, hidden=128, heads=2), example_kwargs=inputs(2, 8))
    insert_fake_quant(annotate(gm, cfg))
    remove_dropout(gm)
    lower_to_integer(gm)
    return plan(gm, get_target(target))


def test_planner_puts_ampere_block_linears_on_the_sm80_kernel_and_their_quantizers_on_triton(monkeypatch):
    from qfx.schema import INT_LINEAR, QUANTIZE, arg, is_call

    with _library_with_the_kernel(monkeypatch):
        gm = _planned("sm_86", qfx.QuantConfig(4, 4, symmetric=False, act_block=64))
    linears = [n for n in gm.graph.nodes if is_call(n, INT_LINEAR)]
    assert linears and {arg(n, "backend") for n in linears} == {"cutlass"}
    assert all("m16n8k64 s4" in n.meta["qfx_plan"].reason for n in linears)
    quantizers = [n for n in gm.graph.nodes if is_call(n, QUANTIZE)]
    assert quantizers and {arg(n, "backend") for n in quantizers} == {"triton"}
    with _library_with_the_kernel(monkeypatch):  # Hopper: the Triton block kernel, the refusal recorded
        gm = _planned("sm_90", qfx.QuantConfig(4, 4, act_block=64))
    linears = [n for n in gm.graph.nodes if is_call(n, INT_LINEAR)]
    assert {arg(n, "backend") for n in linears} == {"triton"}
    refused = dict(linears[0].meta["qfx_plan"].refused)
    assert "on sm_90 the Triton block kernel" in refused["cutlass"]


# ------------------------------------------------------------------------------------- CPU: bad inputs


def _case(m, n, k, block, a_bits, w_bits, symmetric, grouped, device="cpu", seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2 + 0.3
    w = torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g)
    q, s, c = nx.quantize_activation(x, a_bits, symmetric, block=block)
    group = None if not grouped else (block if (k // block) % 2 else 2 * block)
    q_w, s_w = nx.quantize_weight(w, w_bits, group)
    bs = nx.weight_block_sums(q_w, block)
    packed = nx.pack_int4(q_w) if w_bits == 4 else q_w
    if lead is not None:  # leading token dims [B, S, K]
        q, s, c = q.reshape(*lead, k), s.reshape(*lead, -1), c.reshape(*lead, -1)
    return [t.to(device) for t in (q, s, c, q_w, packed, s_w, bs, bias)]


def _call(q, s, c, packed, s_w, bs, b, **kw):
    args = dict(a=q, a_scale=s, a_offset=c, w=packed, w_bits=4, w_scale=s_w, w_block_sums=bs, bias=b, gelu=False,
                out_dtype=torch.float16, a_bits=4, act_block=64)
    args.update(kw)
    return bl.int_linear_blocks(**args)


@pytest.mark.parametrize("change, match", [
    (dict(act_block=96), r"act_block=96: .*use a multiple of 64"),
    (dict(act_block=None), "token-wise"),
    (dict(w_bits=8), r"w has dtype torch.uint8.*expected int8 \[N, 256\]"),
    (dict(a_scale="bad"), "a_scale must be a torch.Tensor"),
    (dict(a_scale=torch.ones(5, 3)), r"a_scale has .*expected float32 \(5, 4\)"),
    (dict(a_offset=torch.ones(5, 4, dtype=torch.float64)), "a_offset has dtype torch.float64"),
    (dict(w_block_sums=None), r"w_block_sums is None; expected float32 \[72, 4\].*weight_block_sums"),
    (dict(w_scale=torch.ones(72, 3)), r"w_scale .*G dividing the 4 activation blocks"),
    (dict(bias=torch.ones(71)), r"bias has .*expected fp16 / bf16 / fp32 \[72\]"),
    (dict(out_dtype=torch.int32), "out_dtype=torch.int32"),
    (dict(a_bits=16), "4- or 8-bit codes"),
    (dict(), "a is on cpu; the cutlass backend needs CUDA tensors"),  # valid shapes: the device is next
])
def test_bad_inputs_name_the_parameter_and_the_fix(change, match):
    q, s, c, _, packed, s_w, bs, bias = _case(5, 72, 256, 64, 4, 4, False, False)
    with pytest.raises(BadInput, match=match):
        _call(q, s, c, packed, s_w, bs, bias, **change)


def test_bad_k_for_the_block():
    q, s, c, _, packed, s_w, bs, bias = _case(5, 72, 192, 64, 4, 4, False, False)
    with pytest.raises(BadInput, match="act_block=128 does not divide K=192"):
        _call(q, s[:, :1], c[:, :1], packed, s_w, bs[:, :1], bias, act_block=128)


# ------------------------------------------------------------------------------------- GPU: exactness

gpu = pytest.mark.gpu


def _gpu_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    lib, why = _library.load()
    if lib is None:
        return False, f"cutlass backend: {why}"
    if not lib.has(bl.SYMBOL):
        return False, f"{lib.path} has no {bl.SYMBOL} (built without an sm_8x arch)"
    if torch.cuda.get_device_capability()[0] not in (8, 9):
        return False, "the kernel runs on sm_8x (natively) and sm_90 (compute_80 PTX)"
    return True, ""


needs_kernel = pytest.mark.skipif(not _gpu_ready()[0], reason=_gpu_ready()[1])


@pytest.fixture
def on_this_gpu():
    """Natively on sm_8x; on an H100 through the library's compute_80 PTX (JIT)."""
    with bl.ptx_on_hopper():
        yield


#: (N, K, act_block): BERT-base / -large parts, and tile-boundary cases (N not a multiple of the 128-wide
#: tile nor of 8, K = 3 blocks of 64, one block of 256)
_SHAPES = [(768, 768, 128), (3072, 768, 128), (768, 3072, 256), (2304, 1024, 128), (200, 192, 64), (1000, 256, 256),
           (8, 64, 64)]
#: (symmetric, grouped weights, bias, GELU, out dtype): every flag on and off, every out dtype with GELU
_EPILOGUES = [(True, False, True, False, torch.float16), (False, True, True, True, torch.float32),
              (False, False, False, True, torch.bfloat16), (True, True, False, False, torch.bfloat16),
              (False, False, True, False, torch.float32), (True, False, True, True, torch.float16)]


def _check(m, n, k, block, a_bits, w_bits, epilogue, seed=0):
    symmetric, grouped, with_bias, gelu, out = epilogue
    q, s, c, q_w, packed, s_w, bs, bias = _case(m, n, k, block, a_bits, w_bits, symmetric, grouped, "cuda", seed)
    bias = bias if with_bias else None
    ref = nx.int_linear_blocks_reference(q, s, c, q_w, s_w, bs, bias, gelu, out)
    # the checked call always computes the offset term; the symmetric launcher skips it (exact: zeros)
    for sym in (False, True) if symmetric else (False,):
        got = bl.int_linear_blocks(q, s, c, packed, w_bits, s_w, bs, bias, gelu, out, a_bits, block, symmetric=sym)
        bad = (got != ref) & ~(got.isnan() & ref.isnan())
        assert not bad.any(), (f"M={m} N={n} K={k} B={block} a{a_bits}w{w_bits} {epilogue} sym={sym}: {int(bad.sum())} "
                               f"differ, max {(got.float() - ref.float()).abs().max().item():.3g}")
        assert torch.equal(got, ref)


@gpu
@needs_kernel
@pytest.mark.parametrize("m", [1, 3, 128, 4096])
@pytest.mark.parametrize("n,k,block", _SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_sm80_block_linear_equals_the_reference(on_this_gpu, m, n, k, block, bits):
    for i, epilogue in enumerate(_EPILOGUES):
        if epilogue[1] and k == block:  # one block: grouped weights are row-wise ones
            continue
        _check(m, n, k, block, bits, bits, epilogue, seed=m + i)


@gpu
@needs_kernel
@pytest.mark.parametrize("a_bits,w_bits", [(8, 4), (4, 8)])
def test_mixed_widths_run_int8_mma_exactly(on_this_gpu, a_bits, w_bits):
    for epilogue in _EPILOGUES[:3]:
        _check(300, 768, 768, 128, a_bits, w_bits, epilogue)


@gpu
@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_extreme_codes_are_exact(on_this_gpu, bits):
    """Every code at the range's ends: the nibble packing's sign and the int32 block sums at their largest."""
    lo, hi = nx.code_range(bits)
    m, n, k, block = 130, 136, 1024, 256
    for va, vw in ((lo, lo), (hi, hi), (lo, hi)):
        q = torch.full((m, k), va, dtype=torch.int8, device="cuda")
        q_w = torch.full((n, k), vw, dtype=torch.int8, device="cuda")
        q[::3, ::5] = hi  # not a constant matrix: rows and columns differ
        s = torch.rand(m, k // block, device="cuda") + 0.5
        c = torch.randn(m, k // block, device="cuda")
        s_w = torch.rand(n, 1, device="cuda") + 0.5
        bs = nx.weight_block_sums(q_w, block)
        w = nx.pack_int4(q_w.cpu()).cuda() if bits == 4 else q_w
        ref = nx.int_linear_blocks_reference(q, s, c, q_w, s_w, bs, None, False, torch.float32)
        assert torch.equal(bl.int_linear_blocks(q, s, c, w, bits, s_w, bs, None, False, torch.float32, bits, block), ref)


@gpu
@needs_kernel
def test_the_registered_op_and_leading_token_dims(on_this_gpu):
    q, s, c, q_w, packed, s_w, bs, bias = _case(6 * 37, 768, 768, 128, 4, 4, False, True, "cuda", lead=(6, 37))
    ref = nx.int_linear_blocks_reference(q.reshape(-1, 768), s.reshape(-1, 6), c.reshape(-1, 6), q_w, s_w, bs, bias,
                                         True, torch.float16).reshape(6, 37, 768)
    got = torch.ops.qfx.int_linear(q, s, c, packed, 4, s_w, bs, bias, True, torch.float16, 4, "cutlass", act_block=128)
    assert got.shape == (6, 37, 768) and torch.equal(got, ref)
    launcher = bl.BlockLinearLauncher(packed, 4, s_w, bs, bias, True, torch.float16, 4, 128)
    assert torch.equal(launcher(q, s, c), ref)
    assert launcher(q[:0], s[:0], c[:0]).shape == (0, 37, 768)


@gpu
@needs_kernel
def test_hopper_refuses_the_ampere_kernel_outside_the_test_switch():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("an sm_90 GPU only")
    q, s, c, _, packed, s_w, bs, bias = _case(5, 72, 256, 64, 4, 4, False, False, "cuda")
    with pytest.raises(BadInput, match="use backend 'triton' there"):
        _call(q, s, c, packed, s_w, bs, bias)
