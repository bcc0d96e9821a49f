r"""Decoder quantization entry point: weight-only and weight+activation 4-bit modes for causal LMs
(HF ``GPT2LMHeadModel``, ``LlamaForCausalLM`` and alike), acting on their nn.Linear / GPT-2 Conv1D
modules.

Modes (``mode=``): ``"w4a16"`` weight-only (activations stay float), ``"w4a8"`` and ``"w4a4"``
(token-wise dynamic activation quantization of every quantized linear's input, the paper's
scheme, :func:`qfx.numerics.fake_quantize`). Weight formats (``fmt=``): ``int4`` / ``int4_asym``
(group-wise), ``nf4`` / ``fp4`` (bitsandbytes blockwise absmax), each optionally with double
quantization of the block scales (:mod:`qfx.numerics`); round-to-nearest, or GPTQ
(:mod:`qfx.gptq`, needs ``calibration``); optionally after Hadamard rotations
(:func:`qfx.passes.rotate.rotate_decoder`, Llama-style models).

What runs: each quantized linear becomes a :class:`QuantizedLinear` holding its packed 4-bit codes
and block parameters (the storage the memory numbers count), plus the dequantized weight it
multiplies with (computed once at construction: this is the CPU reference path; a GPU weight-only
GEMM that dequantizes in its mainloop is not part of this module). The LM head and the embeddings
stay float (``skip``), the KV path stays float; attention scores are not quantized.

This is a separate entry point from ``qfx.prepare_qat`` / ``qfx.compile`` (the graph pipeline built
for encoders): it does not capture a graph, so it works on any decoder whose linears are modules.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from qfx import numerics as nx
from qfx.gptq import GPTQConfig, collect_hessians, gptq_quantize_weight, linear_weight, target_linears

__all__ = ["MODES", "DecoderQuantizationWarning", "QuantizedLinear", "quantize_decoder", "MemoryReport", "decoder_memory"]

#: activation bits per mode (16: float activations)
MODES = {"w4a16": 16, "w4a8": 8, "w4a4": 4}

# The expected W4A4 gap quoted in the warning. Paper (Wu et al. 2023, section 5): GPT-2 base trained
# from scratch, W4A4 after QAT + KD 20.46 vs 18.76 fp32 perplexity (+9 %), the gap concentrated in the
# first positions (over 100 ppl at the first tens of tokens for GPT-2 medium), while weight-only 4-bit
# nearly matches fp32. examples/decoder_failure.py measures the PTQ analogue on tiny models (RESULTS.md).
_W4A4_GAP_NOTE = (
    "expect a perplexity gap several times the W4A16 gap, concentrated at the first positions "
    "(Wu et al. 2023, sec. 5: GPT-2 W4A4 even after QAT+KD 20.46 vs 18.76 fp32 ppl, +9 %, while "
    "weight-only 4-bit is within ~1 %; measured here by examples/decoder_failure.py, PTQ on tiny "
    "char-level models: W4A4 +5.7 % (Llama) / +3.5 % (GPT-2) perplexity vs W4A16 +0.5 %; with "
    "rotate=True W4A4 +1.9 %)"
)


class DecoderQuantizationWarning(UserWarning):
    """A decoder quantization mode known to lose accuracy was requested (W4A4 without rotation)."""


class QuantizedLinear(nn.Module):
    """``y = q_a(x) @ W_hat^T + b`` with a 4-bit weight and optional token-wise activation quantization.

    Shapes: ``x [..., K]`` -> ``y [..., N]``. Buffers: ``codes`` (packed, ``[N, K / 2]`` uint8; int4
    codes as two's-complement nibbles, nf4 / fp4 as table indices), the block parameters, and
    ``weight_hat [N, K]`` (the dequantized weight, in the original weight's dtype).

    Example::

        >>> wq = nx.quantize_weight_4bit(torch.randn(16, 64), "nf4")
        >>> QuantizedLinear(wq, None, act_bits=16)(torch.randn(2, 64)).shape
        torch.Size([2, 16])
    """

    def __init__(self, weight4: nx.Weight4, bias: torch.Tensor | None, act_bits: int = 16,
                 act_symmetric: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if act_bits not in (4, 8, 16):
            raise ValueError(f"act_bits={act_bits!r}: expected 4, 8 or 16 (float activations)")
        self.weight4 = weight4
        self.act_bits = act_bits
        self.act_symmetric = act_symmetric
        self.out_features, self.in_features = weight4.shape
        codes = weight4.codes
        packed = nx.pack_int4(codes) if codes.dtype == torch.int8 else nx.pack_uint4(codes)
        self.register_buffer("codes", packed)
        self.register_buffer("weight_hat", nx.dequantize_weight_4bit(weight4).to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits < 16:
            x = nx.fake_quantize(x, self.act_bits, self.act_symmetric)
        return nn.functional.linear(x, self.weight_hat.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def weight_nbytes(self) -> int:
        """Bytes of the stored 4-bit weight (codes + block parameters, double-quantized or not)."""
        return self.weight4.nbytes()

    def extra_repr(self) -> str:
        w = self.weight4
        dq = isinstance(w.scale, nx.DoubleQuantized)
        return (f"in={self.in_features}, out={self.out_features}, fmt={w.fmt}, block={w.block_size}, "
                f"double_quant={dq}, act_bits={self.act_bits}, act_symmetric={self.act_symmetric}")


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def quantize_decoder(
    model: nn.Module,
    mode: str = "w4a16",
    fmt: str = "nf4",
    block_size: int = nx.DEFAULT_BLOCK_SIZE,
    double_quant: bool = False,
    gptq: bool = False,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    rotate: bool = False,
    act_symmetric: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    skip: Iterable[str] = ("lm_head",),
    seed: int = 0,
    inplace: bool = False,
) -> nn.Module:
    """Quantize a causal decoder's linears to 4-bit weights (and 8 / 4-bit activations).

    ``model``: an HF causal LM (GPT-2 Conv1D or nn.Linear linears). ``block_size`` must divide
    every quantized linear's K. ``gptq=True`` needs ``calibration`` (keyword-argument batches for
    ``model(**batch)``). ``rotate=True`` (Llama-style RMSNorm models only) folds Hadamard rotations
    first. Returns the quantized model (a copy unless ``inplace``). W4A4 without rotation warns
    (:class:`DecoderQuantizationWarning`) with the expected gap.

    Example::

        >>> q = quantize_decoder(llama, mode="w4a16", fmt="nf4", double_quant=True)
        >>> q4 = quantize_decoder(llama, mode="w4a4", fmt="int4", rotate=True, gptq=True, calibration=batches)
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a decoder mode; expected one of {tuple(MODES)}")
    nx._check_format(fmt)
    if gptq and calibration is None:
        raise ValueError("gptq=True needs calibration data: pass calibration=[{'input_ids': ...}, ...] "
                         "(batches of the training distribution), or use gptq=False (round-to-nearest)")
    act_bits = MODES[mode]
    if act_bits == 4 and not rotate:
        warnings.warn(f"quantize_decoder(mode='w4a4') without rotate=True: {_W4A4_GAP_NOTE}. "
                      f"Use rotate=True (Llama-style models), or mode='w4a8' / 'w4a16'.",
                      DecoderQuantizationWarning, stacklevel=2)
    if not inplace:
        model = copy.deepcopy(model)
    if rotate:
        from qfx.passes.rotate import rotate_decoder

        model = rotate_decoder(model, seed=seed, inplace=True)
    targets = target_linears(model, skip)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear / Conv1D outside skip={tuple(skip)}: nothing to quantize")
    for name, mod in targets.items():
        k = linear_weight(mod).shape[1]
        if k % block_size:
            raise ValueError(f"block_size={block_size} does not divide K={k} of {name} "
                             f"({type(mod).__name__}); pick a divisor of every linear's input size")
    hessians = collect_hessians(model, calibration, targets) if gptq else {}
    cfg = GPTQConfig(fmt, block_size, act_order=act_order, damp=damp, double_quant=double_quant) if gptq else None
    with torch.no_grad():
        for name, mod in targets.items():
            w = linear_weight(mod).detach()
            if gptq:
                wq = gptq_quantize_weight(w, hessians[name], cfg)
            else:
                wq = nx.quantize_weight_4bit(w, fmt, block_size, double_quant)
            _set_module(model, name, QuantizedLinear(wq, mod.bias, act_bits, act_symmetric, dtype=w.dtype))
    return model


@dataclass(frozen=True)
class MemoryReport:
    """Weight storage of a (quantized) decoder: ``quantized_params`` in QuantizedLinear modules stored
    in ``quantized_bytes``; ``float_params`` (embeddings, head, norms, biases) at their dtype."""

    quantized_params: int
    quantized_bytes: int
    float_params: int
    float_bytes: int

    @property
    def bits_per_quantized_param(self) -> float:
        return 8.0 * self.quantized_bytes / max(self.quantized_params, 1)

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.float_bytes


def decoder_memory(model: nn.Module, float_bytes_per_param: int | None = None) -> MemoryReport:
    """Count the weight storage of ``model`` (tied parameters once). ``float_bytes_per_param``
    overrides the float parameters' element size (2: as if stored in fp16)."""
    qp = qb = 0
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            qp += mod.in_features * mod.out_features
            qb += mod.weight_nbytes()
    fp = fb = 0
    for p in model.parameters():  # deduplicated: tied embeddings count once
        fp += p.numel()
        fb += p.numel() * (float_bytes_per_param or p.element_size())
    return MemoryReport(qp, qb, fp, fb)
