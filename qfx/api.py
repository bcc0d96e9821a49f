"""Public entry points: prepare_qat (float model -> trainable QAT graph) and compile.

A model that wraps an encoder (a sentence-transformers ``SentenceTransformer``: tokenizer,
encoder, pooling) is served by a :class:`WrapperAdapter` that its own package registers here
(:func:`register_wrapper_adapter`), so this module imports no such package: qfx.embeddings.st
registers the SentenceTransformer adapter when imported, and ``import qfx`` imports it.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from qfx.capture import capture, capture_info
from qfx.config import MODES, QuantConfig, config_for_mode, mode_of, parse_mode
from qfx.pipeline import COMPILE_PASSES, QAT_PASSES, PassContext, run_passes
from qfx.runtime.report import build_report
from qfx.runtime import Buckets, CompiledModel
from qfx.runtime.compiled import check_input_values
from qfx.runtime.packed import AUTO_MIN_PADDING, AUTO_SYNC_MIN_POSITIONS, resolve_remove_padding
from qfx.schema import (META_CAPTURE, META_CONFIG, META_ROTATED, META_SKIP, META_STAGE, META_UNPAD, META_UNPAD_MIN_PADDING,
                        META_UNPAD_SYNC_MIN_POSITIONS)
from qfx.targets import Target, get_target

__all__ = ["prepare_qat", "compile", "is_qat_model", "PostTrainingQuantizationWarning", "WrapperAdapter",
           "register_wrapper_adapter", "wrapper_adapter_of", "require_device"]

_QAT_STAGE = "qat"
#: dtypes the float parts of a compiled model may run in (``compile(float_dtype=...)``)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: modes of :func:`qfx.decoders.quantize_decoder` that name no encoder mode, with their activation
#: bits (qfx.decoders.quantize.MODES; its third, "w4a4", is also a spelling of the encoder mode int4)
_DECODER_ONLY_MODES = {"w4a16": 16, "w4a8": 8}


class PostTrainingQuantizationWarning(UserWarning):
    """A float model was compiled to integers without QAT (dynamic activations, no calibration)."""


def is_qat_model(model: Any) -> bool:
    return isinstance(model, GraphModule) and getattr(model, "meta", {}).get(META_STAGE) == _QAT_STAGE


# --------------------------------------------------------------------------- wrapper adapters

@dataclass(frozen=True)
class WrapperAdapter:
    """How :func:`prepare_qat`, :func:`compile` and :func:`qfx.train.gptq_init.gptq_init` treat a
    model that wraps an encoder. The wrapper's package supplies the functions and registers them
    (:func:`register_wrapper_adapter`); the API only dispatches.

    Attributes:
        name: what the wrapper is called in messages (``"SentenceTransformer"``).
        matches: ``model -> bool``: True for the wrappers served (must not import an optional package).
        encoder_of: ``wrapper -> nn.Module``: the encoder inside (float, QAT graph or compiled).
        prepare_qat: ``(wrapper, example_args, example_kwargs, config, skip) -> wrapper`` whose
            encoder is :func:`prepare_qat` of the original's.
        compile: ``(wrapper, mode, target, example_args, example_kwargs, config, skip, float_dtype,
            remove_padding=...) -> wrapper`` whose encoder is :func:`compile` of the original's; it
            receives the values :func:`compile` parsed (canonical mode, :class:`qfx.targets.Target`,
            float dtype). The other options of :func:`compile` are refused for wrappers.
        run: ``(wrapper, data) -> Any``: one run of the wrapper on ``data`` in its own input form (a
            list of texts for a SentenceTransformer); calibration hooks on the encoder see it.

    Example::

        >>> register_wrapper_adapter(WrapperAdapter("SentenceTransformer", is_sentence_transformer,
        ...     encoder_of, prepare_qat_sentence_transformer, compile_sentence_transformer, encode_texts))
    """

    name: str
    matches: Callable[[Any], bool]
    encoder_of: Callable[[Any], nn.Module]
    prepare_qat: Callable[..., Any]
    compile: Callable[..., Any]
    run: Callable[[Any, Any], Any]


_WRAPPER_ADAPTERS: dict[str, WrapperAdapter] = {}


def register_wrapper_adapter(adapter: WrapperAdapter) -> None:
    """Serve the wrappers ``adapter.matches`` accepts with ``adapter`` (replaces one of the same name)."""
    if not isinstance(adapter, WrapperAdapter):
        raise ValueError(f"adapter must be a qfx.api.WrapperAdapter, got {type(adapter).__name__}")
    _WRAPPER_ADAPTERS[adapter.name] = adapter


def wrapper_adapter_of(model: Any) -> WrapperAdapter | None:
    """The registered adapter that serves ``model``, or None for a plain encoder."""
    return next((a for a in _WRAPPER_ADAPTERS.values() if a.matches(model)), None)


def _check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ValueError(f"parameter {name!r} contains NaN or Inf; qfx cannot quantize it (fix or reload the weights)")


#: inputs that carry indices into an embedding table (HF's names), so integers
_INDEX_INPUTS = ("input_ids", "token_type_ids", "position_ids")


def _declared_kwargs(forward: Callable, params: Mapping[str, inspect.Parameter]) -> frozenset[str]:
    """The keys ``forward``'s ``**kwargs: Unpack[SomeTypedDict]`` declares (HF's
    ``TransformersKwargs``: ``output_hidden_states``, ``output_attentions``, ...); none without one."""
    var_kw = next((n for n, p in params.items() if p.kind is p.VAR_KEYWORD), None)
    if var_kw is None:
        return frozenset()
    try:
        hint = typing.get_type_hints(forward).get(var_kw)
    except (NameError, TypeError, AttributeError):  # an annotation that does not resolve declares nothing
        return frozenset()
    spec = next((a for a in typing.get_args(hint) if typing.is_typeddict(a)), None)
    return frozenset(spec.__required_keys__ | spec.__optional_keys__) if spec is not None else frozenset()


def _check_example(model: nn.Module, example_args: tuple, example_kwargs: dict[str, Any] | None) -> None:
    """Refuse, before capture, an example that capture would fail on with a raw message or take
    wrongly: a key ``forward`` does not name (:func:`_check_example_keys`), lists / numpy arrays /
    meta tensors, and token ids in a float dtype."""
    params = inspect.signature(model.forward).parameters
    named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    kwargs = dict(example_kwargs or {})
    _check_example_keys(model, params, named, kwargs)
    values = dict(zip(named, example_args), **kwargs)
    check_input_values(values, "example input ")
    for name in _INDEX_INPUTS:
        v = values.get(name)
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
            raise ValueError(
                f"example input {name} has dtype {v.dtype}; token ids index an embedding table, so they are "
                f"integers: pass {name}.long() (tokenizers return int64)"
            )


def _check_example_keys(model: nn.Module, params: Mapping[str, inspect.Parameter], named: list[str],
                        kwargs: dict[str, Any]) -> None:
    """Each example key must be a named parameter of ``forward``: one that its ``**kwargs`` takes
    would become an input the captured graph requires on every call. An HF option declared by
    the ``**kwargs`` (``output_hidden_states``) is set on the model's config instead."""
    declared = _declared_kwargs(model.forward, params)
    for key in kwargs:
        if not named or key in named:
            continue
        close = difflib.get_close_matches(key, named, n=1)
        if key in declared and hasattr(getattr(model, "config", None), key):
            fix = f"set model.config.{key} = {kwargs[key]!r} before capturing instead"
        else:
            fix = f"drop it{f' (did you mean {close[0]!r}?)' if close else ''}"
        swallowed = (", so its **kwargs would take it and the captured model would require it on every call"
                     if any(p.kind is p.VAR_KEYWORD for p in params.values()) else "")
        raise ValueError(
            f"example_kwargs[{key!r}]: {key!r} is not a named parameter of {type(model).__name__}.forward "
            f"(those are {named}){swallowed}: {fix}"
        )


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
    adapter = wrapper_adapter_of(model)
    if adapter is not None:  # e.g. a SentenceTransformer in and out (qfx.embeddings.st)
        return adapter.prepare_qat(model, example_args, example_kwargs, config, skip)
    if is_qat_model(model):
        raise ValueError("model is already prepared for QAT (qfx.prepare_qat was applied to it); pass the original float model")
    if isinstance(model, CompiledModel):
        raise ValueError("model is a qfx CompiledModel; prepare_qat takes the original float model")
    config = config if config is not None else QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a qfx.QuantConfig, got {type(config).__name__}")
    _check_finite(model)
    _check_example(model, example_args, example_kwargs)
    source = copy.deepcopy(model)
    gm = capture(source, example_args, example_kwargs)
    gm = run_passes(gm, QAT_PASSES, PassContext(config=config, skip=tuple(skip)))
    gm.meta.update({META_STAGE: _QAT_STAGE, META_CONFIG: config, META_SKIP: tuple(skip)})
    gm.train(model.training)
    return gm


def _trained_config(model: Any) -> QuantConfig | None:
    return model.meta[META_CONFIG] if is_qat_model(model) else None


def _resolve_config(model, mode: str, config: QuantConfig | None) -> tuple[QuantConfig | None, tuple[str, ...], str]:
    """(config to compile with, linears to keep in float, where the weights come from) for the
    parsed ``mode``."""
    if config is not None and not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a qfx.QuantConfig or None, got {type(config).__name__}")
    trained = _trained_config(model)
    if trained is not None:
        if config is not None and config != trained:
            raise ValueError(f"config={config} differs from the config the model was trained with ({trained}); omit config")
        if mode != mode_of(trained):
            raise ValueError(f"mode={mode!r} does not match the QAT model ({trained.tag}); use mode={mode_of(trained)!r}")
        return trained, model.meta[META_SKIP], "QAT (fake-quant weights trained)"
    cfg = config if config is not None else config_for_mode(mode)
    if cfg is not None and mode == "fp16":
        raise ValueError("mode='fp16' does not quantize; drop config or choose mode='int4'/'int8'")
    if cfg is not None and mode_of(cfg) != mode:
        raise ValueError(f"mode={mode!r} does not match config.weight_bits={cfg.weight_bits}; use mode={mode_of(cfg)!r}")
    if cfg is None:
        return None, (), "float model (no quantization)"
    scales = ("token-wise" if cfg.act_block is None else
              f"block-scaled (one scale per token per {cfg.act_block} input channels)")
    warnings.warn(
        f"qfx.compile: {type(model).__name__} is a float model, so this is post-training quantization "
        f"({cfg.tag}, dynamic {scales} activations, no calibration, no QAT); expect an accuracy drop "
        "at 4 bits. Train with qfx.prepare_qat first for the paper's accuracy.",
        PostTrainingQuantizationWarning,
        stacklevel=3,
    )
    return cfg, (), "post-training quantization (no QAT)"


def _refuse_decoder_mode(model: Any, mode: Any) -> None:
    """``mode="w4a16" | "w4a8"`` belongs to :func:`qfx.decoders.quantize_decoder`: name it (and, for
    an encoder, the compile call that gives the same precision)."""
    key = mode.strip().lower() if isinstance(mode, str) else None
    if key not in _DECODER_ONLY_MODES:
        return
    act_bits = _DECODER_ONLY_MODES[key]
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate() and not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(
            f"mode={mode!r} is a decoder mode: qfx.compile compiles encoders (modes {MODES}), and "
            f"{type(model).__name__} is a causal LM; quantize it with "
            f"qfx.decoders.quantize_decoder(model, mode={key!r}) (fmt=, block_size=, gptq=: see its docstring)"
        )
    raise ValueError(
        f"mode={mode!r} is a mode of qfx.decoders.quantize_decoder (causal LMs); for this encoder, 4-bit weights "
        f"with {'float' if act_bits == 16 else f'{act_bits}-bit'} activations are "
        f"qfx.compile(model, mode='int4', config=qfx.QuantConfig(weight_bits=4, act_bits={act_bits}))"
    )


def _run_dtype(float_dtype: torch.dtype | None, target: Target, mode: str) -> torch.dtype:
    """The dtype of the float parts: ``float_dtype``, else fp16 on a GPU or in mode fp16, else fp32."""
    if float_dtype is None:
        return torch.float16 if (target.device == "cuda" or mode == "fp16") else torch.float32
    if float_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"float_dtype={float_dtype!r}: use torch.float16, torch.bfloat16 or torch.float32")
    return float_dtype


def require_device(target: "str | Target") -> Target:
    """The parsed ``target``; a ValueError with the fix when its device is not present here
    (a GPU target on a machine without a visible CUDA GPU)."""
    tgt = get_target(target)
    if tgt.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"target={tgt.name!r} needs a CUDA GPU and none is visible; use target='cpu'")
    return tgt


def _refuse_compiled(model: Any) -> None:
    if isinstance(model, CompiledModel):  # before anything else tries to capture it
        raise ValueError(
            f"model is already a qfx CompiledModel (mode={model.report().mode!r}, target={model.report().target!r}); "
            "qfx.compile takes the float nn.Module or the qfx.prepare_qat model: compile that one again"
        )


def _refuse_wrapper_options(adapter: WrapperAdapter, **given_options: bool) -> None:
    """Options the wrapper path does not pass on are refused, not dropped (``name=True``: given)."""
    given = [name for name, is_given in given_options.items() if is_given]
    if given:
        raise ValueError(
            f"{', '.join(f'{n}=...' for n in given)}: not supported for a {adapter.name} yet; compile its encoder "
            "(qfx.compile(encoder, ...) of qfx.api.wrapper_adapter_of(model).encoder_of(model)) to use them"
        )


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
    remove_padding: bool | str = "auto",
) -> CompiledModel:
    """Compile a float or QAT-prepared encoder to integer ops for ``target``.

    Args:
        model: a float ``nn.Module`` (post-training quantization, with a warning) or the result
            of :func:`qfx.prepare_qat` (its trained weights and config are used), or a wrapper
            with a registered :class:`WrapperAdapter` (a ``SentenceTransformer``: one comes back).
        mode: ``"int4"`` (4-bit weights), ``"int8"`` (8-bit weights) or ``"fp16"`` (no
            quantization), in any case and as ``"w4a4"`` / ``"w8a8"`` / ``"half"``
            (:func:`qfx.config.parse_mode`), or ``None``: the QAT model's trained width. The
            activation bits come from the config (``QuantConfig(4, 16)``: weight-only).
            A causal LM's ``"w4a16"`` / ``"w4a8"`` is :func:`qfx.decoders.quantize_decoder`'s.
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
        remove_padding: run a padded call on its real tokens only, packed from
            ``attention_mask`` (embeddings, GEMMs, quantize, LayerNorm, GELU, residual adds and
            varlen attention; :mod:`qfx.passes.unpad`). ``"auto"`` (default): on for GPU targets
            where the graph can be packed, off on the CPU (:mod:`qfx.runtime.packed` says why);
            ``True``: on for any target, a ValueError where the graph cannot be packed;
            ``False``: off. Per call, only calls with padding run packed, and only where that is
            exact (else the padded graph runs): outputs at real tokens and per-sequence outputs
            equal the padded model's (bit for bit on the CPU); padded positions of
            ``[batch, seq, ...]`` outputs of a packed call are zero. ``runtime_report()`` says
            whether it is on, why not, and which path each call took.
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
    _refuse_compiled(model)
    adapter = wrapper_adapter_of(model)
    encoder = adapter.encoder_of(model) if adapter is not None else model
    _refuse_decoder_mode(encoder, mode)
    # parsed once; everything below reads only the parsed values
    mode = parse_mode(mode, _trained_config(encoder))
    tgt = require_device(target)
    run_dtype = _run_dtype(float_dtype, tgt, mode)
    requested, remove_padding = remove_padding, resolve_remove_padding(remove_padding, tgt)  # "auto" | True | False
    if adapter is not None:  # e.g. a SentenceTransformer in and out (qfx.embeddings.st)
        _refuse_wrapper_options(adapter, cuda_graphs=cuda_graphs is not None, buckets=buckets is not None,
                                tune=tune is not None)
        return adapter.compile(model, mode, tgt, example_args, example_kwargs, config, skip, run_dtype,
                               remove_padding=remove_padding)
    if not is_qat_model(model) and isinstance(model, GraphModule) and META_CAPTURE in getattr(model, "meta", {}):
        raise ValueError("compile takes the original nn.Module or a qfx.prepare_qat model, not a bare capture")
    if is_qat_model(model) and not example_args and not example_kwargs:
        example_kwargs = capture_info(model).example_kwargs
    source = _float_source(model)
    _check_finite(source)
    _check_example(source, example_args, example_kwargs)
    cfg, trained_skip, origin = _resolve_config(model, mode, config)
    skip = tuple(skip) or trained_skip
    device = torch.device("cuda") if tgt.device == "cuda" else torch.device("cpu")
    gm = _capture_for_target(source, device, run_dtype, example_args, example_kwargs)
    rotated = dict(model.meta.get(META_ROTATED, {})) if is_qat_model(model) else None  # trained as W R
    master = {k: v.detach().float().clone() for k, v in source.named_parameters()}
    ctx = PassContext(config=cfg, skip=skip, target=tgt, master_weights=master, float_dtype=run_dtype,
                      remove_padding=remove_padding, rotated_weights=rotated)
    gm = run_passes(gm, COMPILE_PASSES, ctx, stop_after="annotate")
    decision = None
    if tune is not None:  # parts where fp16 is faster stay float, chosen on the annotated graph (qfx/tune/select.py)
        from qfx.tune.select import tune_for_compile
        decision = tune_for_compile(gm, tune, tgt, cfg, run_dtype)
        gm = decision.apply_to_graph(gm)
    gm = run_passes(gm, COMPILE_PASSES, ctx, start_after="annotate")
    _check_remove_padding(gm, requested, remove_padding, tgt)
    report = build_report(gm, mode=mode, target=tgt, origin=origin, run_dtype=run_dtype)
    if decision is not None:
        decision.apply_to_report(report)
    return CompiledModel(gm, report, gm.meta[META_CAPTURE], device, cuda_graphs=cuda_graphs, buckets=buckets, target=tgt)


def _check_remove_padding(gm: GraphModule, requested: Any, remove_padding: bool | str, target: Target) -> None:
    """``remove_padding=True`` on a graph the pass could not pack is an error naming why; with
    ``"auto"`` resolved off (the CPU target) the report says so."""
    done = str(gm.meta.get(META_UNPAD, ""))
    if remove_padding == "auto" and done.startswith("on"):
        gm.meta[META_UNPAD_MIN_PADDING] = AUTO_MIN_PADDING
        gm.meta[META_UNPAD_SYNC_MIN_POSITIONS] = AUTO_SYNC_MIN_POSITIONS
    if remove_padding is True and not done.startswith("on"):
        raise ValueError(f"remove_padding=True: this model cannot run packed ({done.removeprefix('off: ')}); "
                         "compile with remove_padding='auto' (packs where it can, else runs padded) or False")
    if requested is not False and remove_padding is False:
        gm.meta[META_UNPAD] = (f"off (remove_padding='auto' packs on GPU targets only; for target {target.name} "
                               "remove_padding=True packs, bit for bit at real tokens)")


def _capture_for_target(source: nn.Module, device: torch.device, run_dtype: torch.dtype,
                        example_args: tuple, example_kwargs: dict[str, Any] | None) -> GraphModule:
    """Capture a copy of ``source`` on ``device`` with its float parts in ``run_dtype``."""
    runner = copy.deepcopy(source).to(device=device, dtype=run_dtype).eval()

    # float example inputs (features, inputs_embeds) take the float parts' dtype, as the model does;
    # token ids and masks keep theirs
    def _example(v):
        if not isinstance(v, torch.Tensor):
            return v
        return v.to(device=device, dtype=run_dtype) if v.is_floating_point() else v.to(device)

    moved_args = tuple(_example(a) for a in example_args)
    moved_kwargs = {k: _example(v) for k, v in (example_kwargs or {}).items()}
    return capture(runner, moved_args, moved_kwargs)
