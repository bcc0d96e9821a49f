"""Public entry points: prepare_qat (float model -> trainable QAT graph) and compile."""
from __future__ import annotations

import copy
import sys
import warnings
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from qfx.capture import capture, capture_info
from qfx.config import QuantConfig, config_for_mode, parse_mode
from qfx.pipeline import COMPILE_PASSES, QAT_PASSES, PassContext, run_passes
from qfx.runtime.report import build_report
from qfx.runtime import Buckets, CompiledModel
from qfx.targets import get_target

__all__ = ["prepare_qat", "compile", "is_qat_model", "PostTrainingQuantizationWarning"]

_QAT_STAGE = "qat"


class PostTrainingQuantizationWarning(UserWarning):
    """A float model was compiled to integers without QAT (dynamic activations, no calibration)."""


def is_qat_model(model: Any) -> bool:
    return isinstance(model, GraphModule) and getattr(model, "meta", {}).get("qfx_stage") == _QAT_STAGE


def _is_sentence_transformer(model: Any) -> bool:
    """A sentence_transformers.SentenceTransformer (checked without importing the optional package)."""
    st = sys.modules.get("sentence_transformers")
    return st is not None and isinstance(model, st.SentenceTransformer)


def _check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ValueError(f"parameter {name!r} contains NaN or Inf; qfx cannot quantize it (fix or reload the weights)")


def prepare_qat(
    model: nn.Module,
    example_args: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    config: QuantConfig | None = None,
    skip: tuple[str, ...] = (),
) -> GraphModule:
    """Capture a copy of ``model`` and insert fake-quant on every quantizable linear (L3).

    The result trains with any torch optimizer (straight-through gradients reach the float
    weights), returns what ``model`` returns, and prints readable module names such as
    ``layer3.ffn_in.weight_fq``. ``model`` itself is left untouched. Its quantized linears
    compute the integer path itself (:func:`qfx.numerics.fake_quant.integer_linear`), so
    ``qfx.compile`` of it reproduces its outputs bit for bit on the same device when the float
    parts keep its dtype. It runs on the device it was captured on: move ``model`` and the
    example inputs there first.

    Example::

        >>> qat = qfx.prepare_qat(bert, example_kwargs=batch, config=qfx.QuantConfig(4, 4))
        >>> qat.train(); loss = loss_fn(qat(**batch).logits); loss.backward()
    """
    if _is_sentence_transformer(model):  # sentence-transformers in and out (qfx.embeddings)
        from qfx.embeddings import st as _st

        return _st.prepare_qat_sentence_transformer(model, example_args, example_kwargs, config, skip)
    if is_qat_model(model):
        raise ValueError("model is already prepared for QAT (qfx.prepare_qat was applied to it); pass the original float model")
    if isinstance(model, CompiledModel):
        raise ValueError("model is a qfx CompiledModel; prepare_qat takes the original float model")
    config = config if config is not None else QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a qfx.QuantConfig, got {type(config).__name__}")
    _check_finite(model)
    source = copy.deepcopy(model)
    gm = capture(source, example_args, example_kwargs)
    gm = run_passes(gm, QAT_PASSES, PassContext(config=config, skip=tuple(skip)))
    gm.meta.update(qfx_stage=_QAT_STAGE, qfx_config=config, qfx_skip=tuple(skip))
    gm.train(model.training)
    return gm


def _resolve_config(model, mode: str | None, config: QuantConfig | None) -> tuple[QuantConfig | None, tuple[str, ...], str]:
    # mode is parsed once (qfx.config.parse_mode); None: inferred from a QAT model's trained config
    mode = parse_mode(mode, model.meta["qfx_config"] if is_qat_model(model) else None)
    if is_qat_model(model):
        trained: QuantConfig = model.meta["qfx_config"]
        if config is not None and config != trained:
            raise ValueError(f"config={config} differs from the config the model was trained with ({trained}); omit config")
        expected = {"int4": 4, "int8": 8}.get(mode)
        if expected is None or trained.weight_bits != expected:
            raise ValueError(
                f"mode={mode!r} does not match the QAT model ({trained.tag}); use mode='int{trained.weight_bits}'"
            )
        return trained, model.meta["qfx_skip"], "QAT (fake-quant weights trained)"
    cfg = config if config is not None else config_for_mode(mode)
    if cfg is not None and mode == "fp16":
        raise ValueError("mode='fp16' does not quantize; drop config or choose mode='int4'/'int8'")
    if cfg is not None and cfg.weight_bits != {"int4": 4, "int8": 8}[mode]:
        raise ValueError(f"mode={mode!r} does not match config.weight_bits={cfg.weight_bits}")
    if cfg is None:
        return None, (), "float model (no quantization)"
    warnings.warn(
        f"qfx.compile: {type(model).__name__} is a float model, so this is post-training quantization "
        f"({cfg.tag}, dynamic token-wise activations, no calibration, no QAT); expect an accuracy drop "
        "at 4 bits. Train with qfx.prepare_qat first for the paper's accuracy.",
        PostTrainingQuantizationWarning,
        stacklevel=3,
    )
    return cfg, (), "post-training quantization (no QAT)"


def _float_source(model) -> nn.Module:
    """The float nn.Module to capture for the target, carrying the current (trained) weights."""
    if not is_qat_model(model):
        return model
    info = capture_info(model)
    source = copy.deepcopy(info.source)
    # The QAT graph keeps the source's parameter names; parameters forward never reads are
    # absent from it and keep their values (strict=False).
    trained = {k: v.detach() for k, v in model.named_parameters()}
    result = source.load_state_dict(trained, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"QAT graph parameters not found in the source model: {result.unexpected_keys}")
    return source


def compile(
    model: nn.Module,
    mode: str = "int4",
    target: str = "cpu",
    example_args: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    config: QuantConfig | None = None,
    skip: tuple[str, ...] = (),
    float_dtype: torch.dtype | None = None,
    cuda_graphs: bool | None = None,
    buckets: Buckets | None = None,
    tune: Any = None,
    remove_padding: bool = False,
) -> CompiledModel:
    """Compile a float or QAT-prepared encoder to integer ops for ``target``.

    Args:
        model: a float ``nn.Module`` (post-training quantization, with a warning) or the result
            of :func:`qfx.prepare_qat` (its trained weights and config are used).
        mode: ``"int4"`` (W4A4), ``"int8"`` (W8A8) or ``"fp16"`` (no quantization).
        target: ``"cpu"`` (exact reference backend) or a GPU: ``"sm_80"``, ``"sm_86"``,
            ``"sm_89"``, ``"sm_90"``.
        example_args / example_kwargs: one valid call (defaults to the QAT model's example).
        config: a :class:`QuantConfig` for float models (overrides the mode's default).
        skip: linears to keep in float (names like ``"layer3.ffn_in"``, roles, ``"layer3"``).
        float_dtype: dtype of everything that is not an integer GEMM (embeddings, LayerNorm,
            attention, residual adds, linear outputs). Default: float16 on GPU targets and in
            ``mode="fp16"``, float32 on the CPU. ``torch.float32`` on a GPU keeps the compiled
            model numerically closest to an fp32-trained QAT twin, at some speed.
        cuda_graphs: on a GPU, replay one CUDA graph per (batch, seq) bucket (default True;
            ``False``: every call launches its kernels directly).
        buckets: the :class:`qfx.Buckets` calls are padded into (default: batch 1..256,
            seq 16..512 in tensor-core-friendly steps, capped at the model's maximum).
        remove_padding: run the token-wise ops (GEMMs, quantize, LayerNorm, GELU, residual
            adds) on the real tokens of a padded batch only, packed from ``attention_mask``,
            and give attention its padded layout back around it (:mod:`qfx.passes.unpad`).
            Outputs at real tokens are unchanged (bit for bit on the CPU); padded positions of
            ``[batch, seq, ...]`` outputs are zero. Default off until measured on the GPU;
            ``runtime_report()`` says whether it is on and why not where it cannot apply.
        tune: per layer part (qkv, attn_out, ffn_in, ffn_out), keep the trained precision or
            run fp16, whichever is faster for the scenario: ``None`` (no tuning), ``True`` (the
            example call's batch x seq) or a :class:`qfx.tune.Scenario` (several buckets: the
            summed latency decides; one graph per model). Measured on a GPU of the target's
            family (cached on disk), else modelled; the report gives each part's reason
            (:mod:`qfx.tune.select`).

    Example::

        >>> cm = qfx.compile(qat_model, mode="int4", target="cpu")
        >>> cm(**batch).logits; print(cm.report())
    """
    if isinstance(model, CompiledModel):  # before anything else tries to capture it
        raise ValueError(
            f"model is already a qfx CompiledModel (mode={model.report().mode!r}, target={model.report().target!r}); "
            "qfx.compile takes the float nn.Module or the qfx.prepare_qat model: compile that one again"
        )
    if _is_sentence_transformer(model):  # sentence-transformers in and out (qfx.embeddings)
        from qfx.embeddings import st as _st

        if tune is not None:
            raise ValueError("tune=... is not supported for a SentenceTransformer yet; compile its transformer module")
        if remove_padding:
            raise ValueError("remove_padding=True is not supported for a SentenceTransformer yet; compile its transformer module")
        return _st.compile_sentence_transformer(model, mode, target, example_args, example_kwargs, config, skip, float_dtype)
    tgt = get_target(target)
    cfg, trained_skip, origin = _resolve_config(model, mode, config)
    skip = tuple(skip) or trained_skip
    if tgt.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"target={target!r} needs a CUDA GPU and none is visible; compile with target='cpu'")
    if not is_qat_model(model) and isinstance(model, GraphModule) and "qfx_capture" in getattr(model, "meta", {}):
        raise ValueError("compile takes the original nn.Module or a qfx.prepare_qat model, not a bare capture")
    if is_qat_model(model) and not example_args and not example_kwargs:
        example_kwargs = capture_info(model).example_kwargs
    source = _float_source(model)
    _check_finite(source)
    device = torch.device("cuda") if tgt.device == "cuda" else torch.device("cpu")
    if float_dtype is None:
        run_dtype = torch.float16 if (tgt.device == "cuda" or mode == "fp16") else torch.float32
    elif float_dtype in (torch.float16, torch.bfloat16, torch.float32):
        run_dtype = float_dtype
    else:
        raise ValueError(f"float_dtype={float_dtype!r}: use torch.float16, torch.bfloat16 or torch.float32")
    master = {k: v.detach().float().clone() for k, v in source.named_parameters()}
    runner = copy.deepcopy(source).to(device=device, dtype=run_dtype).eval()
    # float example inputs (features, inputs_embeds) take the float parts' dtype, as the model does;
    # token ids and masks keep theirs
    def _example(v):
        if not isinstance(v, torch.Tensor):
            return v
        return v.to(device=device, dtype=run_dtype) if v.is_floating_point() else v.to(device)

    moved_args = tuple(_example(a) for a in example_args)
    moved_kwargs = {k: _example(v) for k, v in (example_kwargs or {}).items()}
    gm = capture(runner, moved_args, moved_kwargs)
    decision = None
    if tune is not None:  # parts where fp16 is faster join skip (qfx/tune/select.py)
        from qfx.tune.select import tune_for_compile
        decision = tune_for_compile(gm, tune, tgt, cfg, skip, run_dtype)
        skip = tuple(skip) + decision.skip
    rotated = dict(model.meta.get("qfx_rotated", {})) if is_qat_model(model) else None  # trained as W R
    ctx = PassContext(config=cfg, skip=skip, target=tgt, master_weights=master, float_dtype=run_dtype,
                      remove_padding=bool(remove_padding), rotated_weights=rotated)
    gm = run_passes(gm, COMPILE_PASSES, ctx)
    report = build_report(gm, mode=mode, target=tgt, origin=origin, run_dtype=run_dtype)
    if decision is not None:
        decision.apply_to_report(report)
    return CompiledModel(gm, report, gm.meta["qfx_capture"], device, cuda_graphs=cuda_graphs, buckets=buckets, target=tgt)
