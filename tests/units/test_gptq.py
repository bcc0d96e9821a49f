"""GPTQ (qfx.numerics.gptq): never worse than round-to-nearest on its calibration objective, the codes
are a valid Weight4, act_order / groups / double quant, Hessians from a decoder, bad input."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qfx import numerics as nx
from qfx.numerics.gptq import GPTQConfig, collect_hessians, gptq_quantize_weight, quantize_error, target_linears


def _problem(seed=0, n=48, k=128, t=1024, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * 0.3
    x = torch.randn(t, k, generator=g) @ mix  # correlated inputs, as real activations are
    x[:, 3] *= 15.0  # one outlier channel
    w = torch.randn(n, k, generator=g)
    h = 2 * x.T @ x / t
    return w.to(device), h.to(device)


@pytest.mark.parametrize("fmt", nx.WEIGHT_FORMATS)
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_not_worse_than_rtn(fmt, group, act_order):
    w, h = _problem()
    wq = gptq_quantize_weight(w, h, GPTQConfig(fmt, group, act_order=act_order))
    rtn = nx.quantize_weight_4bit(w, fmt, group)
    e_gptq = quantize_error(w, nx.dequantize_weight_4bit(wq), h)
    e_rtn = quantize_error(w, nx.dequantize_weight_4bit(rtn), h)
    assert e_gptq <= e_rtn
    assert e_gptq < 0.5 * e_rtn  # on correlated inputs GPTQ is much better, not just equal
    assert wq.codes.shape == w.shape and wq.fmt == fmt and wq.block_size == group
    lo, hi = (-8, 7) if fmt.startswith("int4") else (0, 15)
    assert lo <= int(wq.codes.min()) and int(wq.codes.max()) <= hi


def test_gptq_on_identity_hessian_is_rtn():
    """With H = I columns are independent: GPTQ has nothing to compensate and equals RTN."""
    w, _ = _problem(k=64)
    wq = gptq_quantize_weight(w, torch.eye(64), GPTQConfig("int4", 32, damp=0.0))
    assert torch.equal(wq.codes, nx.quantize_weight_4bit(w, "int4", 32).codes)


def test_gptq_double_quant_and_dead_inputs():
    w, h = _problem(k=64)
    h[5, :] = 0
    h[:, 5] = 0  # an input that never fires
    wq = gptq_quantize_weight(w, h, GPTQConfig("nf4", 64, double_quant=True))
    assert isinstance(wq.scale, nx.DoubleQuantized)
    w_hat = nx.dequantize_weight_4bit(wq)
    assert torch.equal(w_hat[:, 5], torch.zeros(48))
    assert quantize_error(w, w_hat, h) < quantize_error(w, nx.dequantize_weight_4bit(nx.quantize_weight_4bit(w, "nf4", 64)), h)


def test_hessians_from_a_decoder_and_gptq_per_linear():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    calib = [{"input_ids": torch.randint(0, 61, (4, 32), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    mods = target_linears(model)
    assert "lm_head" not in mods and len(mods) == 7
    hs = collect_hessians(model, calib, mods)
    assert set(hs) == set(mods)
    for name, mod in mods.items():
        h = hs[name]
        assert h.shape == (mod.in_features, mod.in_features) and torch.allclose(h, h.T)
        wq = gptq_quantize_weight(mod.weight, h, GPTQConfig("int4", 64))
        e_g = quantize_error(mod.weight, nx.dequantize_weight_4bit(wq), h)
        e_r = quantize_error(mod.weight, nx.dequantize_weight_4bit(nx.quantize_weight_4bit(mod.weight, "int4", 64)), h)
        assert e_g <= e_r, name


def test_gptq_refuses_indivisible_groups_unknown_formats_wrong_hessians_and_missing_calibration():
    w, h = _problem(k=96)
    with pytest.raises(ValueError, match="group_size=64 does not divide|block_size=64 does not divide"):
        gptq_quantize_weight(w, h, GPTQConfig("int4", 64))
    with pytest.raises(ValueError, match="fmt='int3'"):
        GPTQConfig("int3")
    with pytest.raises(ValueError, match="hessian has shape"):
        gptq_quantize_weight(w, h[:10, :10], GPTQConfig("int4", 32))
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="needs calibration data"):
        collect_hessians(model, None, {"0": model[0]})
    with pytest.raises(ValueError, match="needs calibration data"):
        collect_hessians(model, [], {"0": model[0]})


@pytest.mark.gpu
def test_gptq_on_gpu_matches_cpu_objective():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    w, h = _problem()
    e_cpu = quantize_error(w, nx.dequantize_weight_4bit(gptq_quantize_weight(w, h, GPTQConfig("int4", 32))), h)
    wq = gptq_quantize_weight(w.cuda(), h.cuda(), GPTQConfig("int4", 32))
    assert wq.codes.is_cuda
    e_gpu = quantize_error(w.cuda(), nx.dequantize_weight_4bit(wq), h.cuda())
    e_rtn = quantize_error(w, nx.dequantize_weight_4bit(nx.quantize_weight_4bit(w, "int4", 32)), h)
    assert e_gpu <= e_rtn and e_gpu == pytest.approx(e_cpu, rel=0.05)  # fp32 Cholesky on the GPU


# --------------------------------------------------------------------------- encoder QAT models: gptq_init


def _bert_qat(config):
    import qfx
    from models import inputs, make

    return qfx.prepare_qat(make("bert", layers=2, hidden=64, heads=2, seed=1), example_kwargs=inputs(2, 8), config=config)


def test_gptq_init_lowers_every_objective_and_keeps_the_twin_exact():
    """GPTQ's objective is at most round-to-nearest's per weight (strictly lower in total); the
    weights it writes are what QAT trains and compile quantizes: compiled == twin still."""
    import qfx
    from models import inputs

    from qfx.train.gptq_init import gptq_init

    qat = _bert_qat(qfx.QuantConfig(4, 4, symmetric=False, rotation=32)).train()
    before = {k: v.clone() for k, v in qat.named_parameters()}
    errs = gptq_init(qat, [inputs(4, 16, seed=s) for s in range(3)])
    assert len(errs) == 2 * 6
    assert all(g <= r * (1 + 1e-9) for r, g in errs.values())
    assert sum(g for _, g in errs.values()) < 0.9 * sum(r for r, _ in errs.values())
    changed = [k for k, v in qat.named_parameters() if not torch.equal(v, before[k])]
    assert sorted(changed) == sorted(errs)  # only the quantized weights moved
    assert qat.training  # the mode is restored (calibration ran in eval: no dropout)
    qat.eval()
    x = inputs(3, 11, seed=9)
    with torch.no_grad():
        assert torch.equal(qfx.compile(qat, mode="int4", target="cpu")(**x).last_hidden_state, qat(**x).last_hidden_state)


def test_gptq_init_refuses_what_it_cannot_round():
    import qfx
    from models import inputs, make

    from qfx.train.gptq_init import gptq_init

    batches = [inputs(2, 8)]
    with pytest.raises(ValueError, match=r"linear layer0.q is W8A8 sym: use QuantConfig\(weight_bits=4"):
        gptq_init(_bert_qat(qfx.QuantConfig(8, 8)), batches)
    with pytest.raises(ValueError, match="W4A16"):
        gptq_init(_bert_qat(qfx.QuantConfig(4, 16)), batches)
    with pytest.raises(ValueError, match="result of qfx.prepare_qat"):
        gptq_init(make("bert", layers=1, hidden=64, heads=2), batches)
    with pytest.raises(ValueError, match="calibration"):
        gptq_init(_bert_qat(qfx.QuantConfig(4, 4)), [])
