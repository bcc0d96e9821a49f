r"""Decoder quantization entry point: weight-only and weight+activation 4-bit modes for causal LMs
(HF ``GPT2LMHeadModel``, ``LlamaForCausalLM`` and alike), acting on their nn.Linear / GPT-2 Conv1D
modules.

Modes (``mode=``): ``"w4a16"`` weight-only (activations stay float), ``"w4a8"`` and ``"w4a4"``
(token-wise dynamic activation quantization of every quantized linear's input, the paper's
scheme, :func:`qfx.numerics.fake_quantize`). Weight formats (``fmt=``): ``int4`` / ``int4_asym``
(group-wise), ``nf4`` / ``fp4`` (bitsandbytes blockwise absmax), each optionally with double
quantization of the block scales (:mod:`qfx.numerics`); round-to-nearest, or GPTQ
(:mod:`qfx.numerics.gptq`, needs ``calibration``); optionally after Hadamard rotations
(:func:`qfx.decoders.rotate.rotate_decoder`, Llama-style models).

What runs: each quantized linear becomes a :class:`QuantizedLinear` holding its packed 4-bit codes
and block parameters (the storage the memory numbers count), plus the dequantized weight it
multiplies with (computed once at construction: the CPU reference path); on a GPU the weight can
instead be decoded at each call (unfused, or inside a Triton GEMM: :mod:`qfx.backends.triton.weight_only`,
:func:`set_weight_path`). The LM head and the embeddings
stay float (``skip``), the KV path stays float; attention scores are not quantized.

QAT + KD (:func:`prepare_decoder_qat`, :func:`distill_decoder`, :func:`convert_decoder_qat`): the
same formats and modes with trainable float weights and straight-through gradients, distilled from
the float model (logit KL at every position + hidden-state MSE), then stored as above.

This is a separate entry point from ``qfx.prepare_qat`` / ``qfx.compile`` (the graph pipeline built
for encoders): it does not capture a graph, so it works on any decoder whose linears are modules.
"""
from __future__ import annotations

import copy
import itertools
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

import qfx.numerics as nx
from qfx.backends.triton import HAS_TRITON
from qfx.backends.triton.weight_only import code_table, dequantize_packed, weight_only_linear
from qfx.numerics.gptq import GPTQConfig, collect_hessians, gptq_quantize_weight, linear_weight, target_linears
from qfx.train.config import KDConfigBase, optimizer_step
from qfx.train.losses import KDWeights, kd_loss

__all__ = ["MODES", "WEIGHT_PATHS", "DecoderQuantizationWarning", "QuantizedLinear", "set_weight_path", "quantize_decoder",
           "MemoryReport", "decoder_memory", "QATLinear", "prepare_decoder_qat", "convert_decoder_qat", "DecoderKDConfig",
           "distill_decoder"]

#: activation bits per mode (16: float activations)
MODES = {"w4a16": 16, "w4a8": 8, "w4a4": 4}

# The expected W4A4 gap quoted in the warning. Paper (Wu et al. 2023, section 5): GPT-2 base trained
# from scratch, W4A4 after QAT + KD 20.46 vs 18.76 fp32 perplexity (+9 %), the gap concentrated in the
# first positions (over 100 ppl at the first tens of tokens for GPT-2 medium), while weight-only 4-bit
# nearly matches fp32. examples/decoder_failure.py measures the PTQ analogue on tiny models (RESULTS.md).
_W4A4_GAP_NOTE = (
    "expect a perplexity gap several times the W4A16 gap, concentrated at the first positions "
    "(Wu et al. 2023, sec. 5: GPT-2 W4A4 even after QAT+KD 20.46 vs 18.76 fp32 ppl, +9 %, while "
    "weight-only 4-bit is within ~1 %; measured here by examples/decoder_failure.py on small "
    "word-level models, H100: PTQ W4A4 +4.1 % (Llama) / +1.0 % (GPT-2) perplexity vs W4A16 int4 "
    "+0.6 % / +0.3 %; with rotate=True W4A4 +2.0 %; QAT+KD W4A4 +0.8 % / +0.6 %)"
)


class DecoderQuantizationWarning(UserWarning):
    """A decoder quantization mode known to lose accuracy was requested (W4A4 without rotation)."""


#: How a QuantizedLinear gets its weight at each call (``QuantizedLinear.weight_path``):
#: ``cached`` multiplies with ``weight_hat``, decoded once at construction (the CPU reference; fastest
#: on a GPU too, but it holds a full-size float weight, so it saves no memory while running);
#: ``dequant`` decodes the packed codes to the activation dtype at every call, then ``F.linear``
#: (:func:`qfx.backends.triton.weight_only.dequantize_packed`: the unfused weight-only path, honest about memory);
#: ``fused`` runs the Triton kernel that decodes inside the GEMM (:func:`qfx.backends.triton.weight_only.weight_only_linear`).
WEIGHT_PATHS = ("cached", "dequant", "fused")


class QuantizedLinear(nn.Module):
    """``y = q_a(x) @ W_hat^T + b`` with a 4-bit weight and optional token-wise activation quantization.

    Shapes: ``x [..., K]`` -> ``y [..., N]``. Buffers: ``codes`` (packed, ``[N, K / 2]`` uint8; int4
    codes as two's-complement nibbles, nf4 / fp4 as table indices), ``code_table [16]`` (the value of
    each code, :func:`qfx.backends.triton.weight_only.code_table`), ``block_scale`` / ``block_offset`` ``[N, K / g]``
    fp32 (double-quantized parameters stored decoded), and ``weight_hat [N, K]`` (the dequantized
    weight, in the original weight's dtype). ``weight_path`` (:data:`WEIGHT_PATHS`) picks how the
    weight is produced at each call; all three multiply with the same ``W_hat`` values.

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
        self.weight_path = "cached"
        self.out_features, self.in_features = weight4.shape
        codes = weight4.codes
        packed = nx.pack_int4(codes) if codes.dtype == torch.int8 else nx.pack_uint4(codes)
        self.register_buffer("codes", packed)
        self.register_buffer("code_table", code_table(weight4.fmt).to(codes.device))
        self.register_buffer("block_scale", nx.formats._resolve(weight4.scale).float())
        offset = nx.formats._resolve(weight4.offset)
        self.register_buffer("block_offset", None if offset is None else offset.float())
        self.register_buffer("weight_hat", nx.dequantize_weight_4bit(weight4).to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits < 16:
            x = nx.fake_quantize(x, self.act_bits, self.act_symmetric)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.weight_path == "fused":
            return weight_only_linear(x, self.codes, self.code_table, self.block_scale, self.block_offset, bias,
                                      signed_int=self.weight4.fmt.startswith("int4"))
        if self.weight_path == "dequant":
            w = dequantize_packed(self.codes, self.code_table, self.block_scale, self.block_offset, x.dtype)
        else:
            w = self.weight_hat.to(x.dtype)
        return nn.functional.linear(x, w, bias)

    def weight_nbytes(self) -> int:
        """Bytes of the stored 4-bit weight (codes + block parameters, double-quantized or not)."""
        return self.weight4.nbytes()

    def extra_repr(self) -> str:
        w = self.weight4
        dq = isinstance(w.scale, nx.DoubleQuantized)
        return (f"in={self.in_features}, out={self.out_features}, fmt={w.fmt}, block={w.block_size}, "
                f"double_quant={dq}, act_bits={self.act_bits}, act_symmetric={self.act_symmetric}, "
                f"weight_path={self.weight_path}")


def set_weight_path(model: nn.Module, path: str) -> nn.Module:
    """Set ``weight_path`` (:data:`WEIGHT_PATHS`) on every :class:`QuantizedLinear` of ``model`` (in place).

    ``path="fused"`` needs Triton and a GPU (or Triton's interpreter); ``path="dequant"`` runs anywhere.
    Returns ``model``. Example: ``set_weight_path(q, "fused")`` before timing generation.
    """
    if path not in WEIGHT_PATHS:
        raise ValueError(f"weight path {path!r} is not one of {WEIGHT_PATHS}")
    if path == "fused" and not HAS_TRITON:
        raise RuntimeError("weight path 'fused' needs Triton (it ships with CUDA builds of torch); "
                           "use 'dequant' (decode + matmul) or 'cached'")
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no QuantizedLinear: quantize it with quantize_decoder first")
    for m in layers:
        m.weight_path = path
    return model


def _check_mode(mode: str, fmt: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a decoder mode; expected one of {tuple(MODES)}")
    nx.formats._check_format(fmt)


def _quantized_linears(model: nn.Module, skip: Iterable[str], block_size: int) -> dict[str, nn.Module]:
    """The linears of ``model`` to quantize (every one outside ``skip``), each with an input size
    ``block_size`` divides; refused naming what is wrong otherwise."""
    targets = target_linears(model, skip)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear / Conv1D outside skip={tuple(skip)}: nothing to quantize")
    for name, mod in targets.items():
        k = linear_weight(mod).shape[1]
        if not isinstance(block_size, int) or block_size <= 0 or k % block_size:
            raise ValueError(f"block_size={block_size} does not divide K={k} of {name} "
                             f"({type(mod).__name__}); pick a divisor of every linear's input size")
    return targets


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def quantize_decoder(
    model: nn.Module,
    mode: str = "w4a16", fmt: str = "nf4", block_size: int = nx.DEFAULT_BLOCK_SIZE, double_quant: bool = False,
    gptq: bool = False, calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    rotate: bool = False, act_symmetric: bool = False, act_order: bool = False, damp: float = 0.01,
    skip: Iterable[str] = ("lm_head",), seed: int = 0, inplace: bool = False,
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
    _check_mode(mode, fmt)
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
        from qfx.decoders.rotate import rotate_decoder

        model = rotate_decoder(model, seed=seed, inplace=True)
    targets = _quantized_linears(model, skip, block_size)
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


# ----------------------------------------------------------------------------- QAT + KD
# Why not qfx.prepare_qat / qfx.train.distill (the encoder trainer): those capture a torch.export
# graph whose attention and roles they recognise, quantize weights symmetrically per row or group
# (no nf4 / fp4 / double quantization), and distil a sequence classifier (logits [B, C], dev
# accuracy). A causal LM needs the next-token distribution at every position and the 4-bit weight
# formats of this module, so decoders get module-level QAT here. What is reused: the numerics
# (qfx.numerics), the Logit term and the loss-weight validation of qfx.train.losses (kd_loss,
# KDWeights).


class QATLinear(nn.Module):
    """Trainable twin of :class:`QuantizedLinear`: ``y = q_a(x) @ W_hat(W)^T + b`` with the float
    ``weight [N, K]`` as the parameter and straight-through gradients (weight and activations).

    Invariant: the forward value of ``W_hat(W)`` is exactly ``dequantize_weight_4bit(quantize_weight_4bit(W))``
    (the STE adds ``W - W.detach()``, which is 0.0 exactly), so :meth:`to_quantized` gives a layer
    with the same outputs bit for bit.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, block_size: int,
                 double_quant: bool = False, act_bits: int = 16, act_symmetric: bool = False) -> None:
        super().__init__()
        nx.formats._check_format(fmt)
        if act_bits not in (4, 8, 16):
            raise ValueError(f"act_bits={act_bits!r}: expected 4, 8 or 16 (float activations)")
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.fmt, self.block_size, self.double_quant = fmt, block_size, double_quant
        self.act_bits, self.act_symmetric = act_bits, act_symmetric

    def quantized_weight(self) -> nx.Weight4:
        return nx.quantize_weight_4bit(self.weight.detach(), self.fmt, self.block_size, self.double_quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits < 16:
            x = nx.fake_quantize(x, self.act_bits, self.act_symmetric)
        w_hat = nx.dequantize_weight_4bit(self.quantized_weight()).to(self.weight.dtype)
        w = w_hat + (self.weight - self.weight.detach())  # value w_hat exactly, gradient to weight
        return nn.functional.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_quantized(self) -> QuantizedLinear:
        return QuantizedLinear(self.quantized_weight(), None if self.bias is None else self.bias.detach(),
                               self.act_bits, self.act_symmetric, dtype=self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, fmt={self.fmt}, block={self.block_size}, "
                f"double_quant={self.double_quant}, act_bits={self.act_bits}")


def prepare_decoder_qat(
    model: nn.Module,
    mode: str = "w4a4", fmt: str = "int4", block_size: int = nx.DEFAULT_BLOCK_SIZE, double_quant: bool = False,
    act_symmetric: bool = False, skip: Iterable[str] = ("lm_head",),
) -> nn.Module:
    """A trainable copy of the causal LM ``model`` whose linears (except ``skip``) are :class:`QATLinear`.

    Same modes, formats and checks as :func:`quantize_decoder`. To train a rotated model, rotate
    first (:func:`qfx.decoders.rotate.rotate_decoder`) and distil from the rotated float model, so
    that teacher and student hidden states live in one basis. After training,
    :func:`convert_decoder_qat` stores the weights as 4-bit codes.

    Example::

        >>> student = prepare_decoder_qat(teacher, mode="w4a4", fmt="int4")
        >>> distill_decoder(teacher, student, batches, DecoderKDConfig(steps=200))
        >>> q = convert_decoder_qat(student)
    """
    _check_mode(mode, fmt)
    model = copy.deepcopy(model)
    for name, mod in _quantized_linears(model, skip, block_size).items():
        _set_module(model, name, QATLinear(linear_weight(mod), mod.bias, fmt, block_size, double_quant,
                                           MODES[mode], act_symmetric))
    return model


def convert_decoder_qat(model: nn.Module) -> nn.Module:
    """A copy of a :func:`prepare_decoder_qat` model with every :class:`QATLinear` stored as a
    :class:`QuantizedLinear` (packed codes; the same outputs, bit for bit), in eval mode."""
    model = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, QATLinear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no QATLinear: prepare it with prepare_decoder_qat first")
    for name in names:
        _set_module(model, name, model.get_submodule(name).to_quantized())
    return model.eval()


@dataclass(frozen=True)
class DecoderKDConfig(KDConfigBase):
    """Knowledge distillation of a causal LM (all positions):

    ``loss = logit * T^2 KL(p_teacher(./T) || p_student(./T))  [per token, qfx.train.losses.kd_loss]
           + rep * sum_l MSE(h_student[l], h_teacher[l])       [every block's output hidden state]``

    The optimisation of :class:`qfx.train.config.KDConfigBase`: AdamW (``lr``, ``weight_decay``)
    with linear warm-up over ``warmup`` of the steps, then cosine (``decay``); gradients clipped
    to norm ``grad_clip``.
    """

    steps: int = 200
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.05
    decay: str = "cosine"
    logit: float = 1.0
    rep: float = 1.0
    temperature: float = 1.0
    log_every: int = 0  # 0: ten log lines

    def __post_init__(self) -> None:
        super().__post_init__()
        KDWeights(logit=self.logit, att=0.0, rep=self.rep, temperature=self.temperature)  # validates the weights


def _rep_loss(s_hidden, t_hidden, mask: torch.Tensor | None) -> torch.Tensor:
    total = torch.zeros((), device=s_hidden[0].device)
    for hs, ht in zip(s_hidden[1:], t_hidden[1:]):  # [0] is the (float, shared) embedding output
        d = (hs.float() - ht.float()).pow(2)
        if mask is None:
            total = total + d.mean()
        else:
            m = mask[..., None].to(d.dtype).expand_as(d)
            total = total + (d * m).sum() / m.sum().clamp_min(1)
    return total


def distill_decoder(
    teacher: nn.Module,
    student: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    config: DecoderKDConfig = DecoderKDConfig(),
    log=None,
) -> list[dict]:
    """Train ``student`` (a :func:`prepare_decoder_qat` model) to match ``teacher`` for ``config.steps``
    steps on ``batches`` (dicts with ``input_ids`` ``[B, T]``, optional ``attention_mask``; a list
    is cycled, an iterator gives one batch per step). Both models stay on their device; the student
    trains in fp32. Returns the log rows (step, loss and its terms, seconds); ``log`` gets each as
    a line.
    """
    if not any(isinstance(m, QATLinear) for m in student.modules()):
        raise ValueError("student has no QATLinear: build it with prepare_decoder_qat(teacher, ...)")
    kl_only = KDWeights(logit=1.0, att=0.0, rep=0.0, temperature=config.temperature)  # T^2 KL; weighted below
    params = [p for p in student.parameters() if p.requires_grad]
    opt, sched = config.optimizer(params)
    every = config.log_every or max(1, config.steps // 10)
    # Both in eval mode: dropout would make the student chase a noisy copy of the teacher's
    # (deterministic) function; gradients flow in eval mode all the same.
    teacher.eval()
    student.eval()
    if isinstance(batches, Sequence):
        if not batches:
            raise ValueError("batches is empty: pass dicts with 'input_ids' [B, T]")
        batches = itertools.cycle(batches)
    source = iter(batches)
    rows, t0 = [], time.time()
    for step in range(config.steps):
        batch = next(source, None)
        if batch is None:
            raise ValueError(f"batches ran out after {step} of {config.steps} steps: pass a list (cycled) or "
                             f"an iterator yielding at least steps={config.steps} batches")
        mask = batch.get("attention_mask")
        with torch.no_grad():
            t_out = teacher(**batch, output_hidden_states=True)
        s_out = student(**batch, output_hidden_states=True)
        if s_out.logits.shape != t_out.logits.shape:
            raise ValueError(f"teacher logits {tuple(t_out.logits.shape)} and student logits "
                             f"{tuple(s_out.logits.shape)} differ: the student must be prepared from the teacher")
        v = s_out.logits.shape[-1]
        terms: dict[str, torch.Tensor] = {}
        if config.logit:  # every scored position is one row of the KL's batch mean
            s_flat, t_flat = s_out.logits.reshape(-1, v), t_out.logits.reshape(-1, v)
            if mask is not None:
                keep = mask.reshape(-1).bool()
                s_flat, t_flat = s_flat[keep], t_flat[keep]
            rows_mask = torch.ones(s_flat.shape[0], 1, dtype=torch.bool, device=s_flat.device)
            terms["logit"], _ = kd_loss(s_flat, t_flat, None, rows_mask, kl_only)
        if config.rep:
            terms["rep"] = _rep_loss(s_out.hidden_states, t_out.hidden_states, mask)
        loss = config.logit * terms.get("logit", 0.0) + config.rep * terms.get("rep", 0.0)
        optimizer_step(loss, params, opt, sched, config.grad_clip)
        if step % every == 0 or step == config.steps - 1:
            row = {"step": step, "loss": float(loss.detach()), **{k: float(v_.detach()) for k, v_ in terms.items()},
                   "seconds": round(time.time() - t0, 2)}
            rows.append(row)
            if log is not None:
                log("  kd step {step:5d}  loss {loss:.4f}".format(**row)
                    + "".join(f"  {k} {row[k]:.4f}" for k in terms) + f"  ({row['seconds']:.0f} s)")
    return rows
