"""Lockstep verification: does each integer linear reproduce its fake-quant twin?

For every quantized linear of a QAT graph (L3), record the tensors it sees on a real input
(raw activation ``x``, fake-quant activation ``x_hat``, fake-quant weight ``w_hat``, bias,
output ``y_fq``). Feed the same raw ``x`` to the compiled model's integer op (with its stored
weight codes and its backend) and compare with the bound

    |y_int - y_fq| <= (K + 8) * 2^-24 * (|x_hat| @ |w_hat|.T + |b|)  +  2^-(p+1) * |y_fq|

``y_fq`` is computed by the integer path itself (:func:`qfx.fake_quant.integer_linear`), so on
the device the twin ran on, with fp32 outputs, the error is 0 (``max_abs_error == 0``, tested
on the CPU and on the GPU). The bound is what holds across devices and output dtypes: the
first term bounds fp32 rounding of a K-term dot product and of the dequantization (the integer
accumulator itself is exact), and ``p`` is the output dtype's mantissa width (the final
rounding; 0 for fp32 outputs). Comparing per linear, on the same input, keeps the check exact
in spirit: end to end, a rounding difference can move a later activation across a
quantization step, which no rounding bound covers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx._pytree as fx_pytree
from torch.fx import GraphModule, Interpreter

from qfx.capture import capture_info, normalize_inputs
from qfx.fake_quant import ActFakeQuant
from qfx.passes.annotate import LINEAR_OPS
from qfx.runtime import CompiledModel

__all__ = ["LinearCheck", "compare_linears", "dot_error_bound"]

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
    """Elementwise bound of :mod:`qfx.verify` for ``y = x_hat @ w_hat.T + bias``.

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
        info = n.meta.get("qfx")
        if n.op == "call_function" and n.target in LINEAR_OPS and info is not None and info.spec is not None:
            x_node = n.args[0]
            is_fq = x_node.op == "call_module" and isinstance(self.module.get_submodule(x_node.target), ActFakeQuant)
            x_raw = self.env[x_node.args[0]] if is_fq else self.env[x_node]
            bias = self.env[n.args[2]] if len(n.args) > 2 and n.args[2] is not None else None
            seen = (x_raw, self.env[x_node], self.env[n.args[1]], bias, out)
            self.records[info.name] = tuple(None if t is None else t.detach() for t in seen)
        return out


def _int_node(compiled: CompiledModel, name: str) -> tuple:
    """The integer op computing linear ``name`` and the columns of its output that are it
    (a slice of the wider GEMM when fuse_qkv merged it with its neighbours)."""
    for node in compiled.graph_module.graph.nodes:
        info = node.meta.get("qfx")
        if info is None or node.target in LINEAR_OPS:
            continue
        start = 0
        for part in node.meta.get("qfx_parts", (info,)):
            if part.name == name:
                return node, slice(start, start + part.out_features)
            start += part.out_features
    raise KeyError(name)


def compare_linears(qat: GraphModule, compiled: CompiledModel, *args: Any, **kwargs: Any) -> list[LinearCheck]:
    """Run ``qat`` on the inputs and check every quantized linear of ``compiled`` in lockstep."""
    kwargs = normalize_inputs(capture_info(qat), args, kwargs)
    flat = fx_pytree.tree_flatten_spec(((), kwargs), qat._in_spec)
    rec = _Recorder(qat)
    with torch.no_grad():
        rec.run(*flat)
    gm = compiled.graph_module
    checks = []
    for name, (x_raw, x_hat, w_hat, bias, y_fq) in rec.records.items():
        node, cols = _int_node(compiled, name)
        dev = compiled.device
        owner = node.args[3].target.rpartition(".")[0]  # the module holding this op's weight codes
        buf = lambda attr: gm.get_buffer(f"{owner}.{attr}")  # noqa: E731
        fused = len(node.meta.get("qfx_parts", ())) > 1
        # a fused op reads its concatenated bias buffer; its output columns ``cols`` are this linear
        b = buf("bias").to(dev) if fused and bias is not None else (None if bias is None else bias.to(dev))
        if node.target == torch.ops.qfx.int_linear.default:
            qnode = node.args[0].args[0]
            _, bits, sym, lo, hi, qbackend = qnode.args
            out_dtype = node.args[9]
            # Quantize the very values the fake-quant graph saw (fp32), so both sides hold the
            # same codes; the compiled model itself feeds its fp16 activations here.
            x_in = x_raw.to(device=dev)
            q, s, c = torch.ops.qfx.quantize(x_in, bits, sym, lo, hi, qbackend)
            b = None if b is None else b.to(out_dtype)
            y = torch.ops.qfx.int_linear(q, s, c, buf("w_codes"), node.args[4], buf("w_scale"), buf("w_offset_sum"), b, False, out_dtype, node.args[10], node.args[-1])
            dot_dtype = torch.float32
        else:
            out_dtype = x_raw.dtype if dev.type == "cpu" else torch.float16
            x_in = x_raw.to(device=dev, dtype=out_dtype)
            y = torch.ops.qfx.weight_only_linear(x_in, buf("w_codes"), node.args[2], buf("w_scale"), None if b is None else b.to(out_dtype), node.args[-1])
            dot_dtype = out_dtype
        err = (y[..., cols].double().cpu() - y_fq.double()).abs()
        bound = dot_error_bound(x_hat, w_hat, bias, y_fq, out_dtype, dot_dtype)
        checks.append(LinearCheck(name, float(err.max()), float((err / bound).max())))
    return checks
