"""qfx.backends.triton.weight_only: the unfused dequantize path equals qfx.numerics code for code; the fused
Triton weight-only GEMM against it over an M sweep (odd M, N, K tails; every format, offsets, bias),
under Triton's CPU interpreter here and compiled on a GPU; QuantizedLinear's three weight paths agree."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from qfx import numerics as nx
from qfx.backends.triton import HAS_TRITON
from qfx.backends.triton.weight_only import code_table, dequantize_packed, weight_only_linear

M_SWEEP = (1, 5, 16, 17, 64, 65)  # each launch configuration and its edges


def _packed(fmt: str, n: int, k: int, g: int, double_quant: bool = False, device="cpu"):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)).to(device) * 0.05
    wq = nx.quantize_weight_4bit(w, fmt, g, double_quant)
    codes = nx.pack_int4(wq.codes) if wq.codes.dtype == torch.int8 else nx.pack_uint4(wq.codes)
    scale, offset = nx.formats._resolve(wq.scale), nx.formats._resolve(wq.offset)
    return wq, codes, code_table(fmt).to(device), scale, offset


@pytest.mark.parametrize("fmt", nx.WEIGHT_FORMATS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_packed_equals_numerics(fmt, double_quant):
    wq, codes, table, scale, offset = _packed(fmt, 24, 256, 64, double_quant)
    ref = nx.dequantize_weight_4bit(wq)
    assert torch.equal(dequantize_packed(codes, table, scale, offset), ref)
    assert torch.equal(dequantize_packed(codes, table, scale, offset, torch.float16), ref.half())


def test_code_table_decodes_signed_nibbles():
    q = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)
    nib = nx.pack_int4(q)
    lo_hi = torch.stack((nib & 15, nib >> 4), -1).reshape(-1).long()
    assert torch.equal(code_table("int4")[lo_hi], q.reshape(-1).float())


def check_fused_against_reference(device: str) -> None:
    """The fused kernel equals x @ W_hat^T: in fp32 (IEEE products) to summation-order rounding;
    in fp16 / bf16 no worse than twice the error of F.linear on the same dequantized weight (fp64 truth)."""
    n, k, g = 48, 192, 64  # N and K not multiples of the tiles: masked tails
    dtypes = (torch.float32, torch.float16) if device == "cpu" else (torch.float32, torch.float16, torch.bfloat16)
    for fmt in nx.WEIGHT_FORMATS:
        _, codes, table, scale, offset = _packed(fmt, n, k, g, device=device)
        bias = torch.randn(n, device=device)
        w64 = dequantize_packed(codes, table, scale, offset, torch.float64)
        for m in M_SWEEP:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device)
            for dt in dtypes:
                xd, bd = x.to(dt), bias.to(dt)
                y = weight_only_linear(xd, codes, table, scale, offset, bd)
                assert y.shape == (m, n) and y.dtype == dt
                if fmt.startswith("int4"):  # two's-complement decoding: the same values as the table
                    assert torch.equal(weight_only_linear(xd, codes, table, scale, offset, bd, signed_int=True), y)
                truth = F.linear(xd.double(), w64, bd.double())
                err = (y.double() - truth).abs()
                if dt == torch.float32:  # K + 1 fp32 additions, any order: (K + 8) 2^-24 (|x| @ |w|^T + |b|)
                    bound = (k + 8) * 2.0**-24 * (xd.double().abs() @ w64.abs().T + bd.double().abs())
                    assert (err <= bound).all(), (fmt, m, dt, (err - bound).max().item())
                else:
                    ref = F.linear(xd.float(), dequantize_packed(codes, table, scale, offset, dt).float(), bd.float()).to(dt)
                    bound = 2 * (ref.double() - truth).abs().max().item() + 1e-6
                    assert err.max().item() <= bound, (fmt, m, dt, err.max().item(), bound)
        y3 = weight_only_linear(torch.randn(2, 3, k, device=device), codes, table, scale, offset)  # leading dims kept
        assert y3.shape == (2, 3, n)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_fused_kernel_under_the_triton_interpreter():
    # The interpreter is chosen when Triton is first imported, and transformers imports it early in
    # this process: run the checks in a fresh one.
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fused kernel ok" in proc.stdout


@pytest.mark.skipif(not HAS_TRITON or os.environ.get("TRITON_INTERPRET") == "1", reason="needs Triton's compiler")
@pytest.mark.parametrize("dtype, config, signed", [("fp16", 0, False), ("bf16", 1, True), ("fp32", 2, False)])
def test_fused_kernel_compiles_for_sm90_without_a_gpu(dtype, config, signed):
    """Triton compiles to a cubin offline: each launch configuration builds for an H100 (sm_90)
    and fits its shared memory, so the GPU run cannot fail on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import qfx.backends.triton.weight_only as dk

    dk._import_triton()
    fn = triton.jit(dk._w4_linear_kernel)
    cfg = dk.LAUNCH_CONFIGS[config][1]
    ptr = {"x_ptr": dtype, "codes_ptr": "u8", "table_ptr": "fp32", "scale_ptr": "fp32", "offset_ptr": "fp32",
           "bias_ptr": dtype, "y_ptr": dtype}
    ints = ("M", "N", "K", "n_groups", "group_size", "stride_xm", "stride_ym")
    const = {"HAS_OFFSET": True, "HAS_BIAS": True, "IEEE": dtype == "fp32", "SIGNED_INT": signed,
             **{k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}}
    sig = {**{k: "*" + v for k, v in ptr.items()}, **{k: "i32" for k in ints}, **{k: "constexpr" for k in const}}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg["num_warps"]})
    except RuntimeError as e:  # no ptxas for this Triton build: nothing to check here
        if "ptxas" in str(e).lower():
            pytest.skip(f"Triton cannot compile offline here: {e}")
        raise
    assert len(kernel.asm["cubin"]) > 0
    assert kernel.metadata.shared <= 227 * 1024  # an H100's shared memory per block


def test_dequantize_and_weight_only_linear_refuse_mismatched_codes_scales_and_shapes():
    _, codes, table, scale, offset = _packed("nf4", 16, 128, 64)
    with pytest.raises(ValueError, match="scale must be"):
        dequantize_packed(codes, table, scale[:, :1].repeat(1, 3))
    with pytest.raises(ValueError, match="packed"):
        dequantize_packed(codes.to(torch.int8), table, scale)
    with pytest.raises(ValueError, match="block size g=1 must be even"):
        dequantize_packed(codes, table, scale.repeat(1, 64))
    if HAS_TRITON and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match=r"codes \[N, K/2\] = \(16, 64\) do not match K=96"):
            weight_only_linear(torch.randn(2, 96), codes, table, scale)
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            weight_only_linear(torch.randn(2, 128), codes, table, scale)


@pytest.mark.gpu
def test_fused_kernel_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    check_fused_against_reference("cuda")


@pytest.mark.gpu
def test_weight_paths_agree_on_gpu_and_benchmark_runs():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from transformers import LlamaConfig, LlamaForCausalLM

    from qfx.backends.triton.weight_only import benchmark_weight_only_linear
    from qfx.decoders import quantize_decoder, set_weight_path

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    q = quantize_decoder(m.half().cuda().eval(), mode="w4a16", fmt="nf4", block_size=32)
    ids = torch.randint(0, 61, (3, 20), device="cuda")
    outs = {}
    for path in ("cached", "dequant", "fused"):
        with torch.no_grad():
            outs[path] = set_weight_path(q, path)(input_ids=ids).logits.float()
    assert torch.equal(outs["cached"], outs["dequant"])  # the same fp16 weight, the same cuBLAS call
    assert (outs["fused"] - outs["cached"]).abs().max() < 2e-2 * outs["cached"].abs().max()
    rows = benchmark_weight_only_linear([(1, 256, 512), (16, 256, 512)], repeats=5)
    assert all(r["fused_us"] > 0 and r["fused_max_abs_err"] <= 1e-2 * r["ref_max_abs"] + 1e-3 for r in rows)


if __name__ == "__main__":  # run by test_fused_kernel_under_the_triton_interpreter with TRITON_INTERPRET=1
    check_fused_against_reference("cpu")
    print("fused kernel ok")
