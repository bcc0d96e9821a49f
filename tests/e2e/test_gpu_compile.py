"""GPU: compiled models on the visible GPU reproduce their fake-quant twins (lockstep bound),
say which backend runs each linear, and replay under a CUDA graph."""
from __future__ import annotations

import copy

import pytest
import torch
from models import inputs, make

import qfx
from qfx.runtime.verify import compare_linears

pytestmark = pytest.mark.gpu


def _cuda(x: dict) -> dict:
    return {k: v.cuda() for k, v in x.items()}


@pytest.mark.parametrize("cfg", [qfx.QuantConfig(4, 4), qfx.QuantConfig(4, 4, symmetric=False), qfx.QuantConfig(8, 8)])
def test_gpu_compile_matches_fake_quant_per_linear(cfg):
    target = qfx.detect_target()
    model = make("bert_cls", layers=2, hidden=64, heads=2)
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=cfg).eval()
    compiled = qfx.compile(qat, mode=f"int{cfg.weight_bits}", target=target.name)
    x = inputs(3, 37, seed=5)
    checks = compare_linears(qat, compiled, **x)
    assert len(checks) == 12 and all(c.ok for c in checks), [c for c in checks if not c.ok]
    with torch.no_grad():
        a, b = qat(**x).logits, compiled(**x).logits.float().cpu()
    assert torch.allclose(a, b, atol=3e-2, rtol=3e-2)  # fp16 activations end to end
    print(compiled.report().render(width=160))


@pytest.mark.parametrize("cfg", [qfx.QuantConfig(4, 4), qfx.QuantConfig(4, 4, symmetric=False), qfx.QuantConfig(8, 8)])
def test_gpu_compiled_fp32_is_bit_identical_to_its_twin(cfg):
    """With fp32 float parts the compiled model computes exactly what its fake-quant twin
    computes on the same GPU: same codes, exact accumulators, the same epilogue ops."""
    target = qfx.detect_target()
    model = make("bert_cls", layers=2, hidden=64, heads=2).cuda()  # the twin is captured on the GPU it runs on
    qat = qfx.prepare_qat(model, example_kwargs=_cuda(inputs(2, 8)), config=cfg).eval()
    compiled = qfx.compile(qat, mode=f"int{cfg.weight_bits}", target=target.name, float_dtype=torch.float32)
    x = _cuda(inputs(3, 37, seed=5))
    with torch.no_grad():
        twin, got = qat(**x).logits, compiled(**x).logits
    assert torch.equal(got, twin), f"max diff {(got - twin).abs().max():.3g}"


def test_gpu_report_names_the_backend_and_its_reasons():
    target = qfx.detect_target()
    model = make("bert_cls", layers=1, hidden=64, heads=2)
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=qfx.QuantConfig(4, 4)).eval()
    rep = qfx.compile(qat, mode="int4", target=target.name).report()
    ok, why = qfx.backends.CutlassBackend().available()
    backends = {r.backend for r in rep.quantized}
    assert backends == ({"cutlass"} if ok else {"reference"}), (backends, why)
    if not ok:
        assert all(why in r.note for r in rep.quantized)


def test_gpu_compiled_model_replays_under_a_cuda_graph():
    target = qfx.detect_target()
    model = make("bert_cls", layers=2, hidden=64, heads=2)
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=qfx.QuantConfig(4, 4)).eval()
    # the padded graph: a packed one sizes its token index on the host (not capturable as one graph)
    gm = qfx.compile(qat, mode="int4", target=target.name, remove_padding=False).graph_module
    x = _cuda({**inputs(4, 32, seed=2), "token_type_ids": torch.zeros(4, 32, dtype=torch.long)})
    with torch.no_grad():
        eager = gm(**x).logits.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                gm(**x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = gm(**x).logits
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.slow
def test_gpu_real_minilm_int4(minilm_w4a4, minilm_model):
    qat, other = minilm_w4a4
    compiled = qfx.compile(qat, mode="int4", target=qfx.detect_target().name)
    checks = compare_linears(qat, compiled, **other)
    assert len(checks) == 36 and all(c.ok for c in checks), [c for c in checks if not c.ok]
    # the twin of the same model captured on the GPU, and its fp32 compilation: the same bits
    x = _cuda(other)
    qat_gpu = qfx.prepare_qat(copy.deepcopy(minilm_model).cuda(), example_kwargs=x, config=qfx.QuantConfig(4, 4)).eval()
    exact = qfx.compile(qat_gpu, mode="int4", target=qfx.detect_target().name, float_dtype=torch.float32)
    with torch.no_grad():
        twin, got = qat_gpu(**x).logits, exact(**x).logits
    assert torch.equal(got, twin), f"max diff {(got - twin).abs().max():.3g}"


@pytest.mark.parametrize("remove_padding", [False, "auto"])
def test_gpu_programmatic_dependent_launch_changes_no_bit(remove_padding):
    """qfx's kernels launched with programmatic dependent launch (on for sm_90: each waits for the
    kernel before it, csrc/qfx_launch.cuh) give the same outputs bit for bit as plain launches,
    replayed from CUDA graphs and launched directly; the runtime report says which ran."""
    import contextlib

    from qfx.backends.cutlass._library import load, plain_launches

    lib, why = load()
    if lib is None or not lib.has("qfx_set_pdl"):
        pytest.skip(f"native library: {why or 'built before PDL'}")
    target = qfx.detect_target()
    model = make("bert_cls", layers=2, hidden=64, heads=2)
    qat = qfx.prepare_qat(model, example_kwargs=inputs(2, 8), config=qfx.QuantConfig(8, 8)).eval()
    x = _cuda(inputs(6, 48, seed=4))
    outs = {}
    for on in (1, 0):
        with contextlib.nullcontext() if on else plain_launches():
            for graphs in (True, False):
                cm = qfx.compile(qat, mode="int8", target=target.name, remove_padding=remove_padding, cuda_graphs=graphs)
                with torch.no_grad():
                    for _ in range(3):  # capture, then replays
                        logits = cm(**x).logits
                torch.cuda.synchronize()
                outs[on, graphs] = logits.clone()
    for graphs in (True, False):
        assert torch.equal(outs[1, graphs], outs[0, graphs]), graphs
    assert f"programmatic dependent launch of qfx's CUDA kernels: {lib.pdl[1]}" in cm.runtime_report()
    if torch.cuda.get_device_capability() >= (9, 0):
        assert lib.pdl[0], lib.pdl
