"""Lockstep verification: does each integer linear reproduce its fake-quant twin?

For every quantized linear of a QAT graph (L3), record the tensors it sees on a real input
(raw activation ``x``, fake-quant activation ``x_hat``, fake-quant weight ``w_hat``, bias,
output ``y_fq``). Feed the same raw ``x`` to the compiled model's integer op (with its stored
weight codes and its backend) and compare with the bound

    |y_int - y_fq| <= (K + 8) * 2^-24 * (|x_hat| @ |w_hat|.T + |b|)  +  2^-(p+1) * |y_fq|

``y_fq`` is computed by the integer path itself (:func:`qfx.numerics.fake_quant.integer_linear`), so on
the device the twin ran on, with fp32 outputs, the error is 0 (``max_abs_error == 0``, tested
on the CPU and on the GPU). The bound is what holds across devices and output dtypes: the
first term bounds fp32 rounding of a K-term dot product and of the dequantization (the integer
accumulator itself is exact), and ``p`` is the output dtype's mantissa width (the final
rounding; 0 for fp32 outputs). Comparing per linear, on the same input, keeps the check exact
in spirit: end to end, a rounding difference can move a later activation across a
quantization step, which no rounding bound covers.

The per-linear checks cannot see what happens *between* the linears (a weight stored under
the wrong linear's name, a float part computed differently), so :func:`compare_linears` also
compares the whole model output (:func:`compare_outputs`) and raises
:class:`OutputMismatchError` when it differs: bit for bit where the compiled model runs on
the twin's device in the twin's dtype, within ``output_tol`` elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch.fx import GraphModule, Interpreter

from qfx.capture import capture_info, normalize_inputs
from qfx.numerics.fake_quant import ActFakeQuant
from qfx.schema import INT_LINEAR, LINEAR_OPS, META_LINEAR, META_PARTS, arg, weight_owner
from qfx.runtime import CompiledModel

__all__ = ["LinearCheck", "OutputCheck", "OutputMismatchError", "compare_linears", "compare_outputs", "dot_error_bound"]

_MANTISSA = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}


@dataclass(frozen=True)
class LinearCheck:
    name: str
    max_abs_error: float
    max_bound_ratio: float  # max |err| / bound over elements; <= 1 passes

    @property
    def ok(self) -> bool:
        return self.max_bound_ratio <= 1.0


def dot_error_bound(
    x_hat: torch.Tensor, w_hat: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
    out_dtype: torch.dtype, dot_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Elementwise bound of :mod:`qfx.runtime.verify` for ``y = x_hat @ w_hat.T + bias``.

    ``dot_dtype`` is the precision the float side of the integer path computes in: fp32 for
    integer linears (exact accumulator, fp32 epilogue); the activation dtype for weight-only.
    """
    k = x_hat.shape[-1]
    unit = 2.0 ** -_MANTISSA[dot_dtype]
    mag = x_hat.abs().double() @ w_hat.abs().double().T
    if bias is not None:
        mag = mag + bias.abs().double()
    rounding = 0.0 if out_dtype == torch.float32 else 2.0 ** -_MANTISSA[out_dtype]
    return (k + 8) * unit * mag + rounding * y.abs().double() + 1e-30


class _Recorder(Interpreter):
    def __init__(self, gm: GraphModule):
        super().__init__(gm, garbage_collect_values=False)  # raw inputs are read after use
        self.records: dict[str, tuple] = {}

    def run_node(self, n):
        out = super().run_node(n)
        info = n.meta.get(META_LINEAR)
        if n.op == "call_function" and n.target in LINEAR_OPS and info is not None and info.spec is not None:
            x_node = n.args[0]
            is_fq = x_node.op == "call_module" and isinstance(self.module.get_submodule(x_node.target), ActFakeQuant)
            x_raw = self.env[x_node.args[0]] if is_fq else self.env[x_node]
            bias = self.env[n.args[2]] if len(n.args) > 2 and n.args[2] is not None else None
            seen = (x_raw, self.env[x_node], self.env[n.args[1]], bias, out)
            if info.name in self.records:  # two linears under one label: their checks would mix
                raise RuntimeError(f"qfx internal error: two linears of the QAT graph are both called {info.name!r}")
            self.records[info.name] = tuple(None if t is None else t.detach() for t in seen)
        return out


def _int_node(compiled: CompiledModel, name: str) -> tuple:
    """The integer op computing linear ``name`` and the columns of its output that are it
    (a slice of the wider GEMM when fuse_qkv merged it with its neighbours)."""
    found = []
    for node in compiled.graph_module.graph.nodes:
        info = node.meta.get(META_LINEAR)
        if info is None or node.target in LINEAR_OPS:
            continue
        start = 0
        for part in node.meta.get(META_PARTS, (info,)):
            if part.name == name:
                found.append((node, slice(start, start + part.out_features)))
            start += part.out_features
    if len(found) != 1:  # 0: not lowered; 2+: one label on two linears (their weights would mix)
        raise RuntimeError(f"qfx internal error: {len(found)} integer ops of the compiled model compute linear {name!r}, expected 1")
    return found[0]


@dataclass(frozen=True)
class OutputCheck:
    """The compiled model's whole output against its QAT twin's, on one input."""

    max_abs_error: float
    max_abs_twin: float  # max |twin output|: the scale of the error
    exact: bool  # True: same device and dtype as the twin, so the outputs must be equal
    tol: float  # allowed |error| / (1 + |twin|) elementwise when not exact

    @property
    def ok(self) -> bool:
        return self.max_abs_error == 0.0 if self.exact else self.max_abs_error <= self.tol * (1.0 + self.max_abs_twin)


class OutputMismatchError(AssertionError):
    """The compiled model's output differs from its QAT twin's beyond what verify allows."""


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def compare_outputs(qat: GraphModule, compiled: CompiledModel, *args: Any, output_tol: float = 3e-2, **kwargs: Any) -> OutputCheck:
    """Compare every output tensor of ``compiled`` with its QAT twin's on the same inputs.

    Exact (error 0) when ``compiled`` runs on the twin's device type with the twin's float
    dtype (the integer path is the twin's forward); otherwise, where a rounding difference may
    flip an activation code, ``|y - y_twin| <= output_tol * (1 + max|y_twin|)``: loose, but a
    weight applied by the wrong linear moves the output by several percent of its maximum.

    Example::

        >>> check = compare_outputs(qat, qfx.compile(qat, target="cpu"), **batch)
        >>> check.exact, check.max_abs_error
        (True, 0.0)
    """
    was_training = qat.training
    qat.eval()  # the compiled model is inference: compare with the twin's dropout off
    try:
        with torch.no_grad():
            twin = qat(*args, **kwargs)
            got = compiled(*args, **kwargs)
    finally:
        qat.train(was_training)
    a, b = _flat_tensors(twin), _flat_tensors(got)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise OutputMismatchError(
            f"the compiled model returns {[tuple(t.shape) for t in b]}, its QAT twin {[tuple(t.shape) for t in a]}"
        )
    route = getattr(compiled, "last_route", None)
    mask = kwargs.get("attention_mask")
    if route is not None and route.path == "packed" and isinstance(mask, torch.Tensor):
        # a packed call computes real tokens only (zeros at padding, where the twin computes values
        # no caller reads): [B, S, ...] outputs are compared at the real tokens, every other whole
        a, b = _real_tokens(a, mask), _real_tokens(b, mask)
    twin_dev = capture_info(qat).device
    exact = compiled.device.type == twin_dev.type and all(x.dtype == y.dtype for x, y in zip(a, b) if x.is_floating_point())
    err = max((float((x.double().cpu() - y.double().cpu()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)
    scale = max((float(x.double().abs().max()) for x in a if x.numel() and x.is_floating_point()), default=0.0)
    return OutputCheck(err, scale, exact, output_tol)


def _real_tokens(tensors: list[torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
    """Each ``[B, S, ...]`` tensor (B, S: ``mask``'s shape) at the real tokens; others unchanged."""
    return [t[mask.to(t.device) != 0] if t.shape[:2] == mask.shape else t for t in tensors]


def compare_linears(qat: GraphModule, compiled: CompiledModel, *args: Any, output_tol: float = 3e-2, **kwargs: Any) -> list[LinearCheck]:
    """Run ``qat`` on the inputs and check every quantized linear of ``compiled`` in lockstep,
    then the whole output (:func:`compare_outputs`).

    Returns one :class:`LinearCheck` per quantized linear (``.ok``: within the bound). Raises
    :class:`OutputMismatchError` when the whole outputs differ (bit for bit on the twin's own
    device and dtype; beyond ``output_tol`` elsewhere) even if every linear checks out: a
    weight under the wrong label, or float parts that differ, cannot hide behind them.

    Example::

        >>> checks = compare_linears(qat, compiled, **batch)
        >>> all(c.ok for c in checks)
        True
    """
    raw_args, raw_kwargs = args, dict(kwargs)
    kwargs = normalize_inputs(capture_info(qat), args, kwargs)
    flat = fx_pytree.tree_flatten_spec(((), kwargs), qat._in_spec)
    rec = _Recorder(qat)
    was_training = qat.training
    qat.eval()
    try:
        with torch.no_grad():
            rec.run(*flat)
    finally:
        qat.train(was_training)
    whole = compare_outputs(qat, compiled, *raw_args, output_tol=output_tol, **raw_kwargs)
    if not whole.ok:
        kind = "bit for bit (same device and dtype as the twin)" if whole.exact else f"within output_tol={output_tol}"
        raise OutputMismatchError(
            f"the compiled model's output differs from its QAT twin's by up to {whole.max_abs_error:.3g} "
            f"(max |twin| {whole.max_abs_twin:.3g}); expected equal {kind}. A weight applied by the wrong "
            "linear or a float part computed differently does this; please report it with compiled.report()"
        )
    gm = compiled.graph_module
    checks = []
    for name, (x_raw, x_hat, w_hat, bias, y_fq) in rec.records.items():
        node, cols = _int_node(compiled, name)
        dev = compiled.device
        owner = weight_owner(node)
        buf = lambda attr: gm.get_buffer(f"{owner}.{attr}")  # noqa: E731
        fused = len(node.meta.get(META_PARTS, ())) > 1
        # a fused op reads its concatenated bias buffer; its output columns ``cols`` are this linear
        b = buf("bias").to(dev) if fused and bias is not None else (None if bias is None else bias.to(dev))
        if node.target == INT_LINEAR:
            qnode = arg(node, "a").args[0]  # getitem(quantize(...), 0)
            bits, sym, lo, hi, qbackend = (arg(qnode, a) for a in ("bits", "symmetric", "clip_lo", "clip_hi", "backend"))
            out_dtype = arg(node, "out_dtype")
            # Quantize the very values the fake-quant graph saw (fp32), so both sides hold the
            # same codes; the compiled model itself feeds its fp16 activations here.
            x_in = x_raw.to(device=dev)
            block = arg(node, "act_block")  # block-scaled codes (QuantConfig(act_block=...)) or None
            q, s, c = torch.ops.qfx.quantize(x_in, bits, sym, lo, hi, qbackend, act_block=block)
            b = None if b is None else b.to(out_dtype)
            y = torch.ops.qfx.int_linear(q, s, c, buf("w_codes"), arg(node, "w_bits"), buf("w_scale"), buf("w_offset_sum"), b, False, out_dtype, arg(node, "a_bits"), arg(node, "backend"), act_block=block)
            dot_dtype = torch.float32
        else:
            out_dtype = x_raw.dtype if dev.type == "cpu" else torch.float16
            x_in = x_raw.to(device=dev, dtype=out_dtype)
            y = torch.ops.qfx.weight_only_linear(x_in, buf("w_codes"), arg(node, "w_bits"), buf("w_scale"), None if b is None else b.to(out_dtype), arg(node, "backend"))
            dot_dtype = out_dtype
        err = (y[..., cols].double().cpu() - y_fq.double()).abs()
        bound = dot_error_bound(x_hat, w_hat, bias, y_fq, out_dtype, dot_dtype)
        checks.append(LinearCheck(name, float(err.max()), float((err / bound).max())))
    return checks
