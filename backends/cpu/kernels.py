"""The CPU backend's implementations of qfx's integer ops: the reference's bits, at int8 speed.

* GEMM: :func:`qfx.numerics.int_matmul` with ``tensor_cores=True``, i.e. ``torch._int_mm``
  (oneDNN's s8 GEMM, int32 accumulation: exact for every K qfx accepts, so the accumulator
  equals :func:`qfx.numerics.int_matmul_reference`'s). torch's CPU ``_int_mm`` takes any M, K,
  N; the M <= 16 padding int_matmul does for cuBLASLt costs a copy of at most 16 rows. A
  grouped weight (``w_scale [N, G]``) runs one GEMM per group, as the reference does. int4
  codes are int8 values in [-8, 7]: a packed weight is unpacked once and kept (per weight tensor
  and version, :func:`_unpacked`).
* Epilogue and activation quantizer: element-wise fp32 arithmetic, compiled by Inductor into one
  loop each. Inductor's C++ is built with ``-ffp-contract=off`` and never reassociates float
  arithmetic, so every operation rounds once, in the order written: the bits of eager torch.
  The quantizer is :func:`qfx.numerics.quantize_activation` itself and the epilogue
  :func:`qfx.numerics.int_linear_epilogue` itself (the reference's own). GELU is
  left to ATen (``torch.nn.functional.gelu``, as the reference and the twin call it): Inductor's
  erf differs from ATen's in the last bit. tests/kernels/test_cpu_backend.py checks every op
  against the reference bit for bit.
* Where no C++ compiler is found for Inductor, the same functions run eagerly (same bits,
  slower); :data:`EPILOGUE` says which, and the backend's plan reason repeats it.

Threads: torch's intra-op threads (``torch.set_num_threads``) for the GEMMs, ATen and the
compiled loops alike.
"""
from __future__ import annotations

import shutil
import types
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from qfx import numerics
from qfx.backends.cpu.isa import int8_path
# the reference's: the add and LayerNorm by ATen (the twin's bits); block codes by ATen too (Inductor's loops for the
# per-block reductions ran ~10x slower than ATen's on MiniLM), so the CPU backend registers these very functions
from qfx.backends.reference import _add_layer_norm
from qfx.backends.reference import _add_layer_norm_quantize_blocks as add_layer_norm_quantize_blocks
from qfx.backends.reference import _quantize_blocks as quantize_blocks

__all__ = ["EPILOGUE", "GEMM", "quantize", "int_matmul", "int_linear", "add_layer_norm_quantize",
           "add_layer_norm_rotate_quantize", "int_linear_blocks", "quantize_blocks", "add_layer_norm_quantize_blocks"]


def _inductor_compiler() -> str | None:
    """The C++ compiler Inductor would build with, or None when there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return shutil.which(get_cpp_compiler())
    except Exception:  # no compiler on PATH: get_cpp_compiler raises
        return None


#: how the epilogue and quantizer run: "inductor" (compiled, one loop) or "eager" (ATen ops)
EPILOGUE = "inductor" if _inductor_compiler() else "eager"


def _epilogue_in_place(acc: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor, w_scale: torch.Tensor,
                       w_offset_sum: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`qfx.numerics.int_linear_epilogue` written over ``acc[0]`` (fp32 accumulators, a
    buffer of our own): one loop that reads each element and writes it back, no new output
    buffer to fault in."""
    y = numerics.int_linear_epilogue(acc, a_scale, a_offset, w_scale, w_offset_sum, bias)
    acc[0].copy_(y)
    return acc[0]


#: (function, key) -> its compiled copy; see _run
_COMPILED: dict[tuple, Callable] = {}


def _key(value) -> object:
    """What Dynamo would specialize a compiled function on: a tensor's dtype, which of its sizes
    are 0 or 1, whether it is contiguous; any other argument's value."""
    if isinstance(value, torch.Tensor):
        return value.dtype, tuple(d <= 1 for d in value.shape), value.is_contiguous()
    return value


def _run(fn: Callable, *args):
    """``fn(*args)`` compiled by Inductor, with dynamic sizes, once per specialization key
    (:func:`_key` of every argument, grad / inference mode) and torch thread count (Inductor
    writes it into the loops it generates). Each key gets a copy of ``fn`` with its own code object, so no code object is
    compiled twice: Dynamo keeps its variants per code object up to a small limit, and a process
    that runs several models (bits, clips, dtypes, batch 1 and more) would otherwise exhaust it."""
    if EPILOGUE != "inductor":
        return fn(*args)
    # detached: a plain tensor (not a Parameter, whose sizes Dynamo takes as static) and not a
    # view (Dynamo guards a view's base sizes too); the same data, no copy
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    key = (fn, torch.get_num_threads(), torch.is_grad_enabled(), torch.is_inference_mode_enabled(), *map(_key, args))
    found = _COMPILED.get(key)
    if found is None:
        code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{len(_COMPILED)}")
        copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        found = _COMPILED[key] = torch.compile(copy, fullgraph=True, dynamic=True)
    return found(*args)


#: the GEMM: with AMX-INT8, oneDNN's int8 linear on weights reordered once for the tiles
#: (torch.ops.onednn, what Inductor's x86 int8 path calls); elsewhere torch._int_mm. Why not the
#: int8 linear everywhere: on an AVX512-VNNI CPU without AMX (seen on an AMD EPYC, torch 2.13 and
#: 2.14, oneDNN 3.12) it runs s8 x s8 as oneDNN's reference matmul (``ref_int8`` under
#: ONEDNN_VERBOSE), about 1,000 times slower than torch._int_mm on the same CPU; both are exact.
def onednn_linear(isa: str | None):
    """``torch.ops.onednn`` where its int8 linear is the GEMM for a CPU with ``isa`` (the
    :func:`qfx.backends.cpu.isa.int8_path` name), else None (torch._int_mm)."""
    return torch.ops.onednn if isa == "AMX-INT8" and hasattr(torch.ops.onednn, "qlinear_pointwise") else None


_ONEDNN = onednn_linear(int8_path().isa)
GEMM = "oneDNN int8 linear, prepacked weights" if _ONEDNN is not None else "torch._int_mm"


def _operand(codes: torch.Tensor) -> tuple:
    """One weight group's GEMM operand: int8 codes ``[N, Kg]``, reordered once for oneDNN."""
    if _ONEDNN is None:
        return (codes,)
    n = codes.shape[0]
    return (_ONEDNN.qlinear_prepack(codes.contiguous(), None), torch.ones(n), torch.zeros(n, dtype=torch.long))


def _accumulate(a: torch.Tensor, operand: tuple) -> torch.Tensor:
    """Exact ``a @ codes.T`` of int8 codes: int32, or (oneDNN) its fp32 value ``acc.float()``.

    oneDNN accumulates s8 x s8 in int32 and converts once to fp32 (round to nearest even, as
    ``Tensor.float()``); with unit scales, no zero point (a zero point is compensated in float
    there: inexact past 2^24) and no bias, that is the reference's ``acc.float()`` exactly.
    """
    if _ONEDNN is None:
        return numerics.int_matmul(a, operand[0], tensor_cores=True)
    packed, ones, zero_points = operand
    return _ONEDNN.qlinear_pointwise(a.contiguous(), 1.0, 0, packed, ones, zero_points, None, 1.0, 0,
                                     torch.float32, "none", [], "")


#: id(stored weight) -> (weak reference, version, GEMM operand per group); see _prepared
_PREPARED: dict[int, tuple[weakref.ref, int, tuple]] = {}


def _prepared(w: torch.Tensor, w_bits: int, groups: int) -> tuple:
    """The GEMM operand of each weight group or activation block (``groups`` column slices, int4
    codes unpacked to int8), made once per weight tensor and version: later calls reuse it."""
    hit = _PREPARED.get(id(w))
    if hit is not None and hit[0]() is w and hit[1] == w._version and len(hit[2]) == groups:
        return hit[2]
    codes = numerics.unpack_int4(w) if w_bits == 4 else w
    g = codes.shape[1] // groups
    operands = tuple(_operand(codes[:, j * g:(j + 1) * g]) for j in range(groups))
    _PREPARED[id(w)] = (weakref.ref(w, lambda _, key=id(w): _PREPARED.pop(key, None)), w._version, operands)
    return operands


def quantize(x, bits, symmetric, clip_lo, clip_hi, gelu=False):
    """qfx::quantize: :func:`qfx.numerics.quantize_activation`, compiled (GELU by ATen first)."""
    if gelu:
        x = F.gelu(x)
    clip = None if clip_lo is None else (clip_lo, clip_hi)
    lead, k = x.shape[:-1], x.shape[-1]
    q, scale, offset = _run(numerics.quantize_activation, x.reshape(-1, k), bits, symmetric, clip)
    return q.reshape(x.shape), scale.reshape(lead), offset.reshape(lead)


def int_matmul(a, b):
    """qfx::int_matmul: exact int32 ``a @ b.T`` through torch._int_mm."""
    return numerics.int_matmul(a, b, tensor_cores=True)


def int_linear(a, a_scale, a_offset, w, w_bits, w_scale, w_offset_sum, bias, gelu, out_dtype, a_bits=8):
    """qfx::int_linear: exact GEMMs (one per weight group), then the reference's epilogue."""
    lead, k = a.shape[:-1], a.shape[-1]
    a2 = a.reshape(-1, k)
    groups = w_scale.shape[-1]
    g = k // groups
    operands = _prepared(w, w_bits, groups)
    if groups == 1:
        acc = _accumulate(a2, operands[0]).unsqueeze(0)  # a view: no copy of the accumulator
    else:
        acc = torch.stack([_accumulate(a2[:, j * g:(j + 1) * g], op) for j, op in enumerate(operands)])
    epilogue = _epilogue_in_place if acc.dtype == torch.float32 else numerics.int_linear_epilogue
    y = _run(epilogue, acc, a_scale.reshape(-1), a_offset.reshape(-1), w_scale, w_offset_sum, bias)
    if gelu:
        y = F.gelu(y)
    return y.to(out_dtype).reshape(*lead, y.shape[-1])


def int_linear_blocks(a, a_scale, a_offset, w, w_bits, w_scale, w_block_sums, bias, gelu, out_dtype, a_bits, act_block):
    """qfx::int_linear with ``act_block``: one exact GEMM per activation block (weights prepared
    once per block), then :func:`qfx.numerics.int_linear_blocks_epilogue`, the reference's order."""
    lead, k = a.shape[:-1], a.shape[-1]
    blocks = k // act_block
    if a_scale.shape[-1] != blocks or k % act_block:
        raise ValueError(f"qfx::int_linear(act_block={act_block}): a_scale has {a_scale.shape[-1]} blocks, K={k}")
    a2 = a.reshape(-1, k)
    operands = _prepared(w, w_bits, blocks)
    sums = (_accumulate(a2[:, j * act_block:(j + 1) * act_block], op) for j, op in enumerate(operands))
    y = numerics.int_linear_blocks_epilogue(sums, a_scale.reshape(-1, blocks), a_offset.reshape(-1, blocks), w_scale,
                                            w_block_sums, bias, step=_promote_block)
    if gelu:
        y = F.gelu(y)
    return y.to(out_dtype).reshape(*lead, y.shape[-1])


def _promote_block(*args):
    """numerics.promote_block compiled (one pass over p and the block's sum instead of ATen's four)."""
    return _run(numerics.promote_block, *args)


def add_layer_norm_quantize(a, b, weight, bias, eps, bits, symmetric, clip_lo, clip_hi):
    """qfx::add_layer_norm_quantize: the add and LayerNorm by ATen (the twin's bits), compiled quantizer."""
    y = _add_layer_norm(a, b, weight, bias, eps)
    return (y, *quantize(y, bits, symmetric, clip_lo, clip_hi))


def add_layer_norm_rotate_quantize(a, b, weight, bias, eps, signs, block, bits, symmetric, clip_lo, clip_hi):
    """qfx::add_layer_norm_rotate_quantize: as above, the codes of the rotated LayerNorm output."""
    y = _add_layer_norm(a, b, weight, bias, eps)
    return (y, *quantize(numerics.rotate_blocks(y, signs, block), bits, symmetric, clip_lo, clip_hi))
