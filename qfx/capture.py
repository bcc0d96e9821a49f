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
import itertools
import re
import traceback
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["capture", "CaptureInfo", "capture_info", "QfxCaptureError", "FixedDimWarning"]

_INTEGER_INPUTS = {torch.int64, torch.int32, torch.long}


class QfxCaptureError(RuntimeError):
    """torch.export could not capture the model; the message names the op and the fix."""


class FixedDimWarning(UserWarning):
    """The model fixed or guarded a dim qfx captures as dynamic; the message names it and the fix."""


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
    #: per tensor input, the dims qfx made dynamic but the model fixed (Canine: its sequence)
    fixed_by_model: dict[str, tuple[int, ...]] = field(default_factory=dict)


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


def _recorded_dims(v: torch.Tensor, spec) -> tuple[str | int, ...]:
    """Each dim of example ``v`` as capture left it: the name of its dynamic dim, or its size
    when static (a feature dim, or one the model fixed)."""
    return tuple(dim.__name__ if isinstance(dim, torch.export.Dim) else int(dim) if isinstance(dim, int) else int(v.shape[d])
                 for d, dim in ((d, (spec or {}).get(d)) for d in range(v.dim())))


def _exception_chain(e: BaseException | None):  # e, its cause, its cause's cause ...
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _refine_from_suggested_fixes(e: BaseException, shapes: dict) -> dict | None:
    """``shapes`` with torch.export's suggested fixes applied (None when it suggests none)."""
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

    for exc in _exception_chain(e):
        text = str(exc)
        if "Suggested fixes:" not in text:
            continue
        # Keep the fixes block only ("  seq = 8" lines): the parser reads nothing else.
        fixes = list(itertools.takewhile(str.strip, text.split("Suggested fixes:", 1)[1].lstrip("\n").splitlines()))
        try:
            return refine_dynamic_shapes_from_suggested_fixes("Suggested fixes:\n" + "\n".join(fixes), shapes)
        except Exception:  # a message this torch cannot parse back: report the original error
            return None
    return None


_GUARD = re.compile(r"Not all values of (\w+) = (L\['\w+'\]\.size\(\)\[\d+\]) in the specified range .*? satisfy the generated guard (.+?)\.?$")


def _violated_guards(e: BaseException) -> dict[str, list[str]]:
    """A constraint violation's guards by dim, in the dim's name: ``{"seq": ["((-1) + seq) != 1"]}``."""
    found: dict[str, list[str]] = {}
    for exc in _exception_chain(e):
        for line in str(exc).splitlines():
            m = _GUARD.search(line.strip())
            if m:
                dim, source, guard = m.groups()
                guard = guard.replace(source, dim)
                if guard not in found.setdefault(dim, []):
                    found[dim].append(guard)
    return found


def _fixed_dims_message(model_class: str, fixed: dict[str, int], guarded: dict[str, list[str]]) -> str:
    """The warning for dims the model fixed (``{"seq": 8}``) or guarded (``{"seq": ["seq != 2"]}``)."""
    said = [f"{model_class} fixes {dim} to {size} (torch.export specialised it: the forward depends on its value, "
            f"e.g. a table of that length or a Python loop over chunks), so the captured graph takes {dim} == {size} only. "
            f"What to do: pad every input to {dim} = {size} (tokenizer(..., padding='max_length', "
            f"max_length={size})), or capture with an example of the {dim} you will serve" for dim, size in fixed.items()]
    said += [f"{model_class}'s forward guards {dim} ({'; '.join(g[:3])}{' ...' if len(g) > 3 else ''}), so a call "
             f"whose {dim} breaks a guard is refused. What to do: pad such inputs" for dim, g in guarded.items()]
    return "; ".join(said)


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


def _advice(model_class: str, e: BaseException) -> str:
    """Why and what to do, by the kind of failure (torch's first line alone names no fix)."""
    if any(type(x).__name__ == "GuardOnDataDependentSymNode" for x in _exception_chain(e)):
        return (f"Why: {model_class} computes a size or a branch from its inputs' values (data-dependent: u0, u1, ... "
                "stand for such values); torch.export needs one graph for all inputs of a shape. What to do: qfx cannot "
                f"capture {model_class} as it is; capture a model whose shapes and branches depend on input shapes only")
    if _violated_guards(e):
        return (f"Why: {model_class}'s forward constrains {', '.join(_violated_guards(e))} beyond what qfx can express. "
                "What to do: capture with dynamic=False (the graph then takes the example's shapes only)")
    return ("What to do: pass example inputs exactly as the model's forward takes them; use attn_implementation='sdpa' "
            "or 'eager'; move data-dependent Python control flow out of forward; or capture the submodule that holds "
            "the encoder (e.g. model.get_encoder()).")


def _export(model: nn.Module, examples: dict, shapes: dict, dynamic: bool):
    """torch.export; where the model constrains a dynamic dim, once more with export's suggested fixes
    (a fixed dim, a range) or, for guards no range expresses (MobileBERT: ``seq != 2``), with DYNAMIC
    dims whose guards the graph checks when called. Returns (program, its shapes, guards by dim)."""
    def run(dynamic_shapes):
        return torch.export.export(model, (), examples, dynamic_shapes=dynamic_shapes, strict=False)

    try:
        return run(shapes), shapes, {}
    except Exception as e:
        refined = _refine_from_suggested_fixes(e, shapes) if dynamic else None
        relaxed = {k: {d: torch.export.Dim.DYNAMIC for d in spec} if spec else spec for k, spec in shapes.items()}
        for retry, guarded in ((refined, {}), (relaxed if dynamic and _violated_guards(e) else None, _violated_guards(e))):
            try:
                if retry is not None:
                    return run(retry), (shapes if guarded else retry), guarded
            except Exception:  # noqa: BLE001 - the next retry, or the first failure (it names the guards)
                continue
        raise


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
    # A tensor forward takes only through **kwargs, named close to a parameter: misspelt (HF would ignore it).
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
            ep, final, guarded = _export(model, examples, shapes, dynamic)
    except Exception as e:  # torch.export raises many types; we re-raise one with advice
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = _failing_module(model, e)
        raise QfxCaptureError(
            f"qfx.capture: torch.export could not capture {type(model).__name__}"
            f"{f' (in module {where})' if where else ''}: {first}{_user_line(e)}\n{_advice(type(model).__name__, e)}"
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
    dims = {k: _recorded_dims(examples[k], final.get(k)) for k in dim_names}
    fixed = {k: tuple(d for d, dim in (shapes.get(k) or {}).items() if isinstance(dims[k][d], int)) for k in dims}
    fixed_sizes = {shapes[k][d].__name__: dims[k][d] for k, ds in fixed.items() for d in ds}
    if fixed_sizes or guarded:
        warnings.warn(_fixed_dims_message(type(model).__name__, fixed_sizes, guarded), FixedDimWarning, stacklevel=2)
    gm.meta["qfx_capture"] = CaptureInfo(
        model_class=type(model).__name__, source=model, input_names=tuple(examples), max_seq_len=max_seq,
        dynamic=dynamic, device=some.device if some is not None else torch.device("cpu"),
        dtype=some.dtype if some is not None else torch.float32, example_kwargs=kwargs, dims=dims,
        dtypes={k: v.dtype for k, v in examples.items() if isinstance(v, torch.Tensor)},
        fixed_by_model={k: ds for k, ds in fixed.items() if ds},
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
            fix = (f"token ids are integers: pass {name}.long() (or the tokenizer's output as is)"
                   if not want.is_floating_point and v.is_floating_point() else f"pass {name}.to({want})")
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
                    why = (f"{info.model_class} fixed this dim when captured (its forward depends on its value): pad "
                           f"inputs to {dim}, or capture with an example of the size you serve"
                           if d in info.fixed_by_model.get(name, ()) else f"the graph was captured with {name} of shape {_spelled(dims)}")
                    raise ValueError(f"{name} has size {size} in dim {d} (shape {tuple(v.shape)}), expected {dim}: {why}")
                continue
            if dim == "seq":
                _check_length(info, name, size)
            first = sizes.setdefault(dim, (name, size))
            if first[1] != size:
                raise ValueError(
                    f"{name} has {dim} size {size} (shape {tuple(v.shape)}), but {first[0]} has {first[1]}: "
                    f"inputs sharing the {dim} dim must match (e.g. an attention_mask as long as input_ids)"
                )
        if dims is None and v.dim() >= 2 and v.dtype in _INTEGER_INPUTS:
            _check_length(info, name, int(v.shape[1]))


def _check_length(info: CaptureInfo, name: str, size: int) -> None:
    if info.max_seq_len is not None and size > info.max_seq_len:
        raise ValueError(
            f"{name} has sequence length {size}, longer than the model supports "
            f"({info.max_seq_len}); truncate the input (tokenizer(..., truncation=True, max_length={info.max_seq_len}))"
        )
