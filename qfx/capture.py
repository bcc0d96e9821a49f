"""Capture an encoder as a torch.fx GraphModule (level L1: aten graph) with torch.export.

transformers >= 5 has no fx tracer and ``torch.fx.symbolic_trace`` fails on HF BERT, so qfx
uses ``torch.export.export(..., strict=False)`` and unlifts the result (``ep.module()``): a
GraphModule whose parameters keep the model's qualified names, called with the model's own
arguments and returning its own output structure (HF ``ModelOutput`` classes are pytrees).
"""
from __future__ import annotations

import copy
import difflib
import inspect
import traceback
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["capture", "CaptureInfo", "capture_info", "QfxCaptureError"]

_INTEGER_INPUTS = {torch.int64, torch.int32, torch.long}


class QfxCaptureError(RuntimeError):
    """torch.export could not capture the model; the message names the op and the fix."""


@dataclass
class CaptureInfo:
    """What capture learned about the model, kept in ``gm.meta["qfx_capture"]``."""

    model_class: str
    source: nn.Module  # the captured module (its weights live on in the GraphModule)
    input_names: tuple[str, ...]
    max_seq_len: int | None
    dynamic: bool
    device: torch.device
    dtype: torch.dtype
    example_kwargs: dict[str, Any] = field(repr=False, default_factory=dict)
    #: per tensor input, each dim's name when dynamic ("batch", "seq", "tokens") or its size
    #: when the graph fixes it (a feature dim), e.g. {"input_ids": ("batch", "seq")}
    dims: dict[str, tuple[str | int, ...]] = field(default_factory=dict)
    #: per tensor input, the dtype the graph was captured with (export bakes it in)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)


def capture_info(gm: torch.fx.GraphModule) -> CaptureInfo:
    info = getattr(gm, "meta", {}).get("qfx_capture")
    if info is None:
        raise ValueError("this GraphModule was not made by qfx.capture (no qfx_capture metadata)")
    return info


def _max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        # RoBERTa reserves padding_idx + 1 positions before the first token.
        if getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
            n -= getattr(cfg, "pad_token_id", 1) + 1
        return n
    return None


#: optional encoder inputs filled with their HF defaults when the caller leaves them out, so
#: the captured graph takes every input the model takes (name -> default from input_ids)
_DEFAULT_INPUTS = {
    "attention_mask": torch.ones_like,
    "token_type_ids": torch.zeros_like,
}


def _bind_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """All inputs as keyword arguments (export's dynamic_shapes are keyed by name).

    Keywords that ``forward`` only takes through ``**kwargs`` keep their own names (HF
    forwards end in ``**kwargs``: a misspelt ``atention_mask`` lands there)."""
    sig = inspect.signature(model.forward)
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"inputs do not match {type(model).__name__}.forward: {e}") from None
    out = {}
    for k, v in bound.arguments.items():
        if sig.parameters[k].kind is inspect.Parameter.VAR_KEYWORD:
            out.update({kk: vv for kk, vv in v.items() if vv is not None})
        elif v is not None:
            out[k] = v
    return out


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _named_params(model: nn.Module) -> list[str]:
    return [p.name for p in inspect.signature(model.forward).parameters.values()
            if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]


def _with_defaults(params, kwargs: dict[str, Any]) -> dict[str, Any]:
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        return kwargs
    filled = dict(kwargs)
    for name, default in _DEFAULT_INPUTS.items():
        if name in params and name not in filled:
            filled[name] = default(ids)
    return filled


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dim_names(v: torch.Tensor, ids_shape: tuple[int, ...] | None = None) -> tuple[str | None, ...]:
    """Which dims of an example input qfx makes dynamic, named by what an encoder does with
    them; None: static. Token ids / masks ``[batch, seq, ...]``: batch and seq (so is a float
    tensor shaped like the token ids: a float mask). Other float inputs keep their last dim
    static: it is the feature dim a Linear reads (``[tokens, hidden]``, ``[batch, seq, hidden]``)."""
    if v.is_floating_point() and tuple(v.shape) != ids_shape:
        if v.dim() == 1:
            return (None,)
        if v.dim() == 2:
            return ("tokens", None)
        return ("batch", "seq") + (None,) * (v.dim() - 2)
    return ("batch", "seq")[: v.dim()] + (None,) * max(0, v.dim() - 2)


def _widen(t: torch.Tensor, names: tuple[str | None, ...]) -> torch.Tensor:
    """Grow dynamic dims of size 1 to 2: export specializes size-1 dims to constants."""
    for d, name in enumerate(names):
        if name is not None and t.shape[d] == 1:
            t = torch.cat([t, t], dim=d)
    return t


def _example_and_shapes(kwargs: dict[str, Any], dynamic: bool, max_seq: int | None):
    bound = {"seq": max_seq or (1 << 20)}
    dims = {name: torch.export.Dim(name, min=1, max=bound.get(name, 1 << 20)) for name in ("batch", "seq", "tokens")}
    examples, shapes, names = {}, {}, {}
    ids = [tuple(v.shape) for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point()]
    ids_shape = ids[0] if ids else None
    for name, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            if v.numel() == 0:
                raise ValueError(f"example input {name!r} is empty (shape {tuple(v.shape)}); pass a real batch")
            # A slice of a larger batch has strides export would tie to its sizes
            # ("Constraints violated (seq)"): capture a contiguous copy (same values).
            v = v.contiguous()
            names[name] = _dim_names(v, ids_shape)
            if dynamic:
                v = _widen(v, names[name])
                shapes[name] = {d: dims[n] for d, n in enumerate(names[name]) if n is not None} or None
            else:
                shapes[name] = None
        else:
            shapes[name] = None
        examples[name] = v
    return examples, shapes, names


def _refine_from_suggested_fixes(e: BaseException, shapes: dict) -> dict | None:
    """``shapes`` with torch.export's suggested fixes applied (None when it suggests none)."""
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

    for exc in _exception_chain(e):
        text = str(exc)
        if "Suggested fixes:" not in text:
            continue
        # Keep the fixes block only ("  seq = 8" lines): the parser reads nothing else.
        block = text.split("Suggested fixes:", 1)[1].splitlines()
        fixes = []
        for line in block[1:] if block and not block[0].strip() else block:
            if not line.strip():
                break
            fixes.append(line)
        try:
            return refine_dynamic_shapes_from_suggested_fixes("Suggested fixes:\n" + "\n".join(fixes), shapes)
        except Exception:  # a message this torch cannot parse back: report the original error
            return None
    return None


def _recorded_dims(v: torch.Tensor, spec) -> tuple[str | int, ...]:
    """Each dim of example ``v`` as capture left it: the name of its dynamic dim, or its size
    when static (a feature dim, or one the model fixed)."""
    spec = spec or {}
    out = []
    for d in range(v.dim()):
        dim = spec.get(d)
        out.append(dim.__name__ if isinstance(dim, torch.export.Dim) else int(dim) if isinstance(dim, int) else int(v.shape[d]))
    return tuple(out)


def _exception_chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _failing_module(model: nn.Module, e: BaseException) -> str | None:
    """Qualified name of the innermost submodule of ``model`` whose forward was running."""
    names = {id(m): (n or type(model).__name__) for n, m in model.named_modules()}
    found = None
    for exc in _exception_chain(e):
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            owner = frame.f_locals.get("self")
            if id(owner) in names:
                found = names[id(owner)]
    return found


def _user_line(e: BaseException) -> str:
    """The user-code line torch.export blames, when it names one."""
    for exc in _exception_chain(e):
        lines = str(exc).splitlines()
        for i, line in enumerate(lines):
            if "following call raised this error" in line and i + 1 < len(lines):
                return f"\n  at {lines[i + 1].strip()}"
    return ""


def capture(
    model: nn.Module,
    example_args: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    dynamic: bool = True,
) -> torch.fx.GraphModule:
    """Capture ``model`` as an aten-level fx GraphModule with dynamic batch and sequence.

    Args:
        model: an ``nn.Module`` (e.g. a HF BertModel); captured in eval mode.
        example_args / example_kwargs: one valid call, e.g. a tokenizer's output.
        dynamic: make dim 0 (batch) and dim 1 (sequence) of every input dynamic.

    Returns:
        GraphModule with ``gm.meta["qfx_capture"]``; ``gm(**inputs)`` returns what
        ``model(**inputs)`` returns.

    The graph is specialised to the device and dtype the model had when captured (export
    bakes device and dtype constants of the mask arithmetic into it); ``qfx.compile``
    therefore re-captures the float model on the target's device.

    Example::

        >>> gm = qfx.capture(bert, example_kwargs=dict(tokenizer(["hi"], return_tensors="pt")))
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.fx.GraphModule) and "qfx_capture" in getattr(model, "meta", {}):
        raise ValueError("model is already a qfx-captured GraphModule; capture the original nn.Module")
    kwargs = _bind_inputs(model, tuple(example_args), dict(example_kwargs or {}))
    named = _named_params(model)
    # A tensor forward takes only through **kwargs whose name is close to a parameter's is
    # almost surely misspelt (HF forwards would silently ignore it).
    misspelt = [k for k, v in kwargs.items() if k not in named and isinstance(v, torch.Tensor) and _did_you_mean(k, named)]
    if misspelt:
        raise ValueError(
            f"example input {misspelt[0]!r} is not a parameter of {type(model).__name__}.forward "
            f"(it takes {named}){_did_you_mean(misspelt[0], named)}"
        )
    kwargs = _with_defaults(inspect.signature(model.forward).parameters, kwargs)
    if not kwargs:
        raise ValueError("capture needs example inputs: pass example_args or example_kwargs (e.g. input_ids)")
    max_seq = _max_positions(model)
    examples, shapes, dim_names = _example_and_shapes(kwargs, dynamic, max_seq)
    seq_lens = [v.shape[d] for k, v in examples.items() for d, n in enumerate(dim_names.get(k, ())) if n == "seq"]
    if max_seq is not None and any(s > max_seq for s in seq_lens):
        raise ValueError(f"example sequence length {max(seq_lens)} exceeds the model's maximum {max_seq}")
    was_training = model.training
    model.eval()
    try:
        # Trace SDPA through its math kernel: the fused CUDA kernels' alignment checks would
        # specialise the dynamic sequence length ("Constraints violated (seq)", torch 2.11).
        # The captured aten op still picks its kernel at run time.
        with sdpa_kernel([SDPBackend.MATH]):
            try:
                ep = torch.export.export(model, (), examples, dynamic_shapes=shapes, strict=False)
            except Exception as e:
                # The model constrains a dim qfx made dynamic (a position table of fixed
                # length, a range): adopt export's own suggested fixes once and record them,
                # so the dims are what the model does with them, and check_inputs enforces it.
                refined = _refine_from_suggested_fixes(e, shapes) if dynamic else None
                if refined is None:
                    raise
                shapes = refined
                ep = torch.export.export(model, (), examples, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # torch.export raises many types; we re-raise one with advice
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = _failing_module(model, e)
        raise QfxCaptureError(
            f"qfx.capture: torch.export could not capture {type(model).__name__}"
            f"{f' (in module {where})' if where else ''}: {first}{_user_line(e)}\n"
            "What to do: pass example inputs exactly as the model's forward takes them; use "
            "attn_implementation='sdpa' or 'eager'; move data-dependent Python control flow out "
            "of forward; or capture the submodule that holds the encoder (e.g. model.get_encoder())."
        ) from e
    finally:
        model.train(was_training)
    gm = ep.module()
    _install_input_normalizer(gm)
    # ep.module() forbids train()/eval(); qfx graphs handle dropout themselves (the QAT
    # pipeline turns it into nn.Dropout modules), so restore nn.Module's own methods.
    gm.train = types.MethodType(nn.Module.train, gm)
    gm.eval = types.MethodType(nn.Module.eval, gm)
    some = next(iter(model.parameters()), None)
    dims = {k: _recorded_dims(examples[k], shapes.get(k)) for k in dim_names}
    gm.meta["qfx_capture"] = CaptureInfo(
        model_class=type(model).__name__,
        source=model,
        input_names=tuple(examples),
        max_seq_len=max_seq,
        dynamic=dynamic,
        device=some.device if some is not None else torch.device("cpu"),
        dtype=some.dtype if some is not None else torch.float32,
        example_kwargs=kwargs,
        dims=dims,
        dtypes={k: v.dtype for k, v in examples.items() if isinstance(v, torch.Tensor)},
    )
    return gm


def normalize_inputs(info: CaptureInfo, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The caller's inputs as the keyword arguments the graph was captured with.

    Positional arguments are bound by the source model's signature; optional inputs the
    caller left out get their HF defaults (mask of ones, token types of zeros); inputs the
    graph does not take are an error naming them. Then :func:`check_inputs` runs.
    """
    params = inspect.signature(info.source.forward).parameters
    kwargs = _with_defaults(params, _bind_inputs(info.source, args, kwargs))
    extra = sorted(set(kwargs) - set(info.input_names))
    if extra:
        name = extra[0]
        known = [p for p in params if params[p].kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
        if name not in known:  # not a parameter of forward at all: most likely misspelt
            raise ValueError(
                f"{name!r} is not an input of {info.model_class}.forward{_did_you_mean(name, info.input_names)} "
                f"(the model was captured with {list(info.input_names)})"
            )
        raise ValueError(
            f"input {name!r} was not part of the example the model was captured with "
            f"({list(info.input_names)}); pass it in example_kwargs when capturing"
        )
    missing = sorted(set(info.input_names) - set(kwargs))
    if missing:
        raise ValueError(f"missing inputs {missing}: the model was captured with {list(info.input_names)}")
    check_inputs(info, kwargs)
    return {name: kwargs[name] for name in info.input_names}


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_device(info: CaptureInfo, kwargs: dict) -> None:
    """A captured graph runs on the device it was captured on: export bakes that device into
    it (mask arithmetic, ``arange``, device asserts), so ``.to(other)`` cannot move it."""
    for name, v in kwargs.items():
        if isinstance(v, torch.Tensor) and not _same_device(v.device, info.device):
            raise ValueError(
                f"{name} is on {v.device}, but this graph was captured on {info.device} and runs only there "
                f"(torch.export bakes the device into the graph); pass inputs on {info.device}, or capture on "
                f"{v.device}: move the model and the example inputs there before qfx.prepare_qat"
            )


def _normalize_hook(module: torch.fx.GraphModule, args: tuple, kwargs: dict):
    """Forward pre-hook of every qfx graph: callers may pass what the source model takes."""
    info = module.meta["qfx_capture"]
    kwargs = normalize_inputs(info, args, kwargs)
    check_device(info, kwargs)
    return (), kwargs


def _install_input_normalizer(gm: torch.fx.GraphModule) -> None:
    """Register :func:`_normalize_hook` (first, before export's own input-spec check), and keep
    it on deep copies: GraphModule.__deepcopy__ rebuilds the module and drops hooks."""
    gm.register_forward_pre_hook(_normalize_hook, with_kwargs=True, prepend=True)

    def __deepcopy__(self, memo):
        res = torch.fx.GraphModule.__deepcopy__(self, memo)
        res.meta = copy.deepcopy(self.meta, memo)
        _install_input_normalizer(res)
        return res

    type(gm).__deepcopy__ = __deepcopy__  # the class is private to this instance (fx makes one per module)


def _spelled(dims: tuple[str | int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def check_inputs(info: CaptureInfo, kwargs: dict) -> None:
    """Reject inputs the captured graph cannot serve, naming the parameter, what was given and
    what is expected. Metadata only (dtype, rank, sizes): no copy, no device sync.

    Checks, per tensor input: the dtype it was captured with (token ids stay integer); its
    rank; its fixed (feature) dims; that inputs sharing a dynamic dim agree on its size (an
    ``attention_mask`` as long as ``input_ids``); no empty batch or sequence; no sequence
    longer than the model supports.
    """
    sizes: dict[str, tuple[str, int]] = {}  # dim name -> (first input with it, its size)
    for name, v in kwargs.items():
        if not isinstance(v, torch.Tensor):
            continue
        want = info.dtypes.get(name)
        if want is not None and v.dtype != want:
            if not want.is_floating_point and v.is_floating_point():
                fix = f"token ids are integers: pass {name}.long() (or the tokenizer's output as is)"
            else:
                fix = f"pass {name}.to({want})"
            raise ValueError(f"{name} has dtype {v.dtype}, expected {want} (the dtype it was captured with); {fix}")
        dims = info.dims.get(name)
        if dims is not None and v.dim() != len(dims):
            hint = f"; add the batch dim: {name}.unsqueeze(0)" if v.dim() == len(dims) - 1 else ""
            raise ValueError(
                f"{name} is {v.dim()}-D (shape {tuple(v.shape)}), expected {len(dims)}-D {_spelled(dims)}{hint}"
            )
        if v.dim() == 0:
            continue
        if v.shape[0] == 0:
            raise ValueError(f"{name} has an empty batch (shape {tuple(v.shape)}); pass at least one sequence")
        if v.dim() >= 2 and v.shape[1] == 0:
            raise ValueError(f"{name} has an empty sequence (shape {tuple(v.shape)})")
        for d, dim in enumerate(dims or ()):
            size = int(v.shape[d])
            if isinstance(dim, int):
                if size != dim:
                    raise ValueError(
                        f"{name} has size {size} in dim {d} (shape {tuple(v.shape)}), expected {dim}: "
                        f"the graph was captured with {name} of shape {_spelled(dims)}"
                    )
                continue
            if dim == "seq" and info.max_seq_len is not None and size > info.max_seq_len:
                raise ValueError(
                    f"{name} has sequence length {size}, longer than the model supports "
                    f"({info.max_seq_len}); truncate the input (tokenizer(..., truncation=True, max_length={info.max_seq_len}))"
                )
            first = sizes.setdefault(dim, (name, size))
            if first[1] != size:
                raise ValueError(
                    f"{name} has {dim} size {size} (shape {tuple(v.shape)}), but {first[0]} has {first[1]}: "
                    f"inputs sharing the {dim} dim must match (e.g. an attention_mask as long as input_ids)"
                )
        if dims is None and info.max_seq_len is not None and v.dim() >= 2 and v.dtype in _INTEGER_INPUTS and v.shape[1] > info.max_seq_len:
            raise ValueError(
                f"{name} has sequence length {v.shape[1]}, longer than the model supports "
                f"({info.max_seq_len}); truncate the input (tokenizer(..., truncation=True, max_length={info.max_seq_len}))"
            )
