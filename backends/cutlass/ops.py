"""The checked API of the CUTLASS backend: ``int_matmul``, ``int_linear``, ``quantize``,
``unpack_int4`` over any CUDA tensors, each validated first (every error names the tensor and
the fix), then launched through :mod:`.launch`. These are the implementations registered for
``qfx::int_linear`` & co. (backend ``"cutlass"``); a compiled model's runtime binds its ops to
:class:`.launch.LinearLauncher` instead and skips the checks (it made those tensors itself).
"""
from __future__ import annotations

import ctypes

import torch

from qfx.targets import mma_operand

import qfx.backends.cutlass._library as _library
from ._validate import BadInput, check_multiple, check_same_device, check_tensor
from .capability import MAX_EXACT_K
from .configs import by_name
from .launch import (AddLayerNormQuantizeLauncher, add_layer_norm_fits, device_family, dtype_code, library, pack_rows_int4, pick_config, quantize_rows,
                     run_gemm, sm_count, unpack_int4_into, unpacked_int4)

__all__ = ["int_matmul", "int_linear", "quantize", "unpack_int4", "add_layer_norm_quantize", "add_layer_norm_rotate_quantize"]

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _args(device, a, b, d, m, n, k, epi=None, gelu=False, out_dtype=torch.float16):
    epi = epi or {}
    return _library.QfxGemmArgs(
        a=a, b=b, d=d.data_ptr(),
        a_scale=_ptr(epi.get("a_scale")), a_offset=_ptr(epi.get("a_offset")),
        w_scale=_ptr(epi.get("w_scale")), w_offset_sum=_ptr(epi.get("w_offset_sum")),
        bias=_ptr(epi.get("bias")), m=m, n=n, k=k, gelu=int(gelu),
        out_dtype=dtype_code(out_dtype),
        sm_count=sm_count(device), splits=1, workspace=None, workspace_bytes=0,
        stream=torch.cuda.current_stream(device).cuda_stream)


def _family_and_operand(device, lib, config: str | None, w_bits: int, a_bits: int):
    """Kernel family and operand type: INT4 tensor cores only where native (sm_8x) and asked."""
    if config is None:
        family = device_family(device, lib)
        return family, mma_operand(family, w_bits, a_bits)
    cfg = by_name(config)
    if cfg.operand == "s4" and not w_bits == a_bits == 4:
        raise BadInput(f"config {config!r} is an INT4 x INT4 kernel; it needs 4-bit codes on both "
                       f"sides (got w_bits={w_bits}, a_bits={a_bits})")
    return cfg.arch, cfg.operand


# ---------------------------------------------------------------------------------------------
# int4 handling

def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Packed int4 ``[N, K/2]`` uint8 (qfx.numerics.pack_int4 order) -> int8 codes ``[N, K]``.

    One kernel; the result is 2x the packed bytes.
    """
    check_tensor(packed, "w (packed int4)", (torch.uint8,), ndim=2, aligned=True)
    check_multiple(packed.shape[1], 8, "w.shape[1] (packed bytes per row)",
                   "the unpack kernel reads 8 bytes per thread")
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.int8,
                      device=packed.device)
    unpack_int4_into(packed, out)
    return out



# ---------------------------------------------------------------------------------------------
# The ops


def int_matmul(a: torch.Tensor, b: torch.Tensor, *, bits: int = 8,
               config: str | None = None) -> torch.Tensor:
    """Exact ``a @ b.T``: int8 ``a [M, K]``, ``b [N, K]`` -> int32 ``[M, N]``.

    ``bits=4`` declares that every code is in [-8, 7]; on sm_80/86/89 the INT4 tensor-core
    kernel then runs (operands packed on the fly). ``config`` forces a row of configs.py
    (tests, autotuner); e.g. an ``sm80_*`` config on a Hopper runs through PTX JIT.
    """
    check_tensor(a, "a", (torch.int8,), ndim=2, aligned=True)
    check_tensor(b, "b", (torch.int8,), ndim=2, aligned=True)
    device = check_same_device(a=a, b=b)
    (m, k), (n, kb) = a.shape, b.shape
    if k != kb:
        raise BadInput(f"K mismatch: a is {tuple(a.shape)}, b is {tuple(b.shape)} (b is [N, K])")
    lib = library()
    family, operand = _family_and_operand(device, lib, config, bits, bits)
    cfg = pick_config(lib, family, operand, m, n, k, config)
    check_multiple(k, cfg.k_align, "K", f"{cfg.operand} rows move in 16-byte chunks")
    check_multiple(n, cfg.n_align, "N", "output rows must stay 16-byte aligned")
    out = torch.empty(m, n, dtype=torch.int32, device=device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    if k > MAX_EXACT_K:
        raise BadInput(f"K={k} could overflow the int32 accumulator (max {MAX_EXACT_K})")
    if operand == "s4":
        a, b = pack_rows_int4(a), pack_rows_int4(b)
    run_gemm(lib, cfg, "s32", _args(device, a.data_ptr(), b.data_ptr(), out, m, n, k), device)
    return out


def int_linear(a, a_scale, a_offset, w, w_bits, w_scale, w_offset_sum, bias, gelu, out_dtype,
               *, a_bits: int = 8, config: str | None = None) -> torch.Tensor:
    """The integer linear layer of :func:`qfx.numerics.int_linear_reference`, on the GPU.

    ``out[m, n] = maybe_gelu(acc[m,n]*a_scale[m]*w_scale[n] + a_offset[m]*w_offset_sum[n]
    + bias[n])`` in fp32, rounded once to ``out_dtype``. Shapes: ``a [..., K]`` int8,
    ``a_scale, a_offset [...]`` f32 (``a_offset`` may be None: symmetric), ``w`` int8 ``[N, K]``
    (w_bits=8) or packed uint8 ``[N, K/2]`` (w_bits=4), ``w_scale [N, 1]`` or ``[N]`` f32,
    ``w_offset_sum [N]`` f32 or None, ``bias [N]`` f16/f32 or None. EPILOGUES.md has the
    maths and the error bound.
    """
    if w_bits not in (4, 8):
        raise BadInput(f"w_bits={w_bits}: the cutlass backend takes 4 or 8")
    check_tensor(a, "a", (torch.int8,), aligned=True)
    lead, k = tuple(a.shape[:-1]), a.shape[-1]
    a2 = a.reshape(-1, k)
    m = a2.shape[0]
    w_dtype = torch.int8 if w_bits == 8 else torch.uint8
    check_tensor(w, "w", (w_dtype,), ndim=2, aligned=True)
    n = w.shape[0]
    w_k = w.shape[1] * (2 if w_bits == 4 else 1)
    if w_k != k:
        raise BadInput(f"K mismatch: a has K={k}, w {tuple(w.shape)} with w_bits={w_bits} "
                       f"has K={w_k}")
    if w_scale is not None and w_scale.dim() == 2 and w_scale.shape[1] != 1:
        raise BadInput(f"w_scale has shape {tuple(w_scale.shape)}: group-wise scales are not "
                       "supported by the cutlass backend; use the reference backend")
    check_tensor(a_scale, "a_scale", (torch.float32,), shape=lead)
    if a_offset is not None:
        check_tensor(a_offset, "a_offset", (torch.float32,), shape=lead)
    check_tensor(w_scale, "w_scale", (torch.float32,))
    if w_scale.numel() != n:
        raise BadInput(f"w_scale has shape {tuple(w_scale.shape)}; expected [{n}, 1] or [{n}]")
    if w_offset_sum is not None:
        check_tensor(w_offset_sum, "w_offset_sum", (torch.float32,), shape=(n,))
    if bias is not None:
        check_tensor(bias, "bias", (torch.float16, torch.bfloat16, torch.float32), shape=(n,))
    if out_dtype not in _OUT_DTYPES:
        raise BadInput(f"out_dtype={out_dtype}; expected one of {_OUT_DTYPES}")
    device = check_same_device(a=a, a_scale=a_scale, a_offset=a_offset, w=w, w_scale=w_scale,
                               w_offset_sum=w_offset_sum, bias=bias)
    lib = library()
    family, operand = _family_and_operand(device, lib, config, w_bits, a_bits)
    cfg = pick_config(lib, family, operand, m, n, k, config)
    check_multiple(k, cfg.k_align, "K", f"{cfg.operand} rows move in 16-byte chunks")
    check_multiple(n, cfg.n_align, "N", "output rows must stay 16-byte aligned")
    if k > MAX_EXACT_K:
        raise BadInput(f"K={k} could overflow the int32 accumulator (max {MAX_EXACT_K})")

    out = torch.empty(m, n, dtype=out_dtype, device=device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    # Operands as the kernel reads them; held here until their launch is queued.
    if operand == "s4":
        a_op, w_op = pack_rows_int4(a2), w
    else:
        a_op, w_op = a2, (unpacked_int4(w) if w_bits == 4 else w)
    a_ptr, w_ptr = a_op.data_ptr(), w_op.data_ptr()
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    epi = {"a_scale": a_scale, "a_offset": a_offset, "w_scale": w_scale,
           "w_offset_sum": w_offset_sum, "bias": bias}
    if family == "sm90a" and out_dtype == torch.float16:
        run_gemm(lib, cfg, "dequant",
             _args(device, a_ptr, w_ptr, out, m, n, k, epi, gelu, out_dtype), device)
        return out.reshape(*lead, n)
    acc = torch.empty(m, n, dtype=torch.int32, device=device)
    run_gemm(lib, cfg, "s32", _args(device, a_ptr, w_ptr, acc, m, n, k), device)
    args = _args(device, acc.data_ptr(), None, out, m, n, k, epi, gelu, out_dtype)
    _library.check(lib.fn("qfx_dequant_epilogue")(ctypes.byref(args)), "dequant epilogue")
    return out.reshape(*lead, n)


def quantize(x, bits, symmetric, clip_lo=None, clip_hi=None, gelu=False):
    """Token-wise quantization of ``x [..., K]`` (of ``gelu(x)`` with ``gelu``) in one kernel,
    bit-identical to :func:`qfx.numerics.quantize_activation`: (int8 codes, scale [...], offset [...])."""
    if bits not in (4, 8):
        raise BadInput(f"bits={bits}: the cutlass quantize kernel takes 4 or 8")
    if isinstance(x, torch.Tensor):
        x = x.contiguous()  # an activation view (e.g. after a transpose) is copied, not refused
    check_tensor(x, "x", _OUT_DTYPES)
    if (clip_lo is None) != (clip_hi is None):
        raise BadInput("clip_lo and clip_hi go together: pass both or neither")
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(lead, dtype=torch.float32, device=x.device)
    offset = torch.empty(lead, dtype=torch.float32, device=x.device)
    clip = None if clip_lo is None else (clip_lo, clip_hi)
    quantize_rows(x, bits, symmetric, clip, q, scale, offset, gelu)
    return q, scale, offset


def add_layer_norm_quantize(a, b, weight, bias, eps, bits, symmetric, clip_lo=None, clip_hi=None):
    """``y = layer_norm(a + b)`` and the token-wise codes of ``y`` in one kernel (fp16 / bf16,
    K a multiple of 8 up to 1024); the codes equal :func:`quantize` of the returned ``y``."""
    if bits not in (4, 8):
        raise BadInput(f"bits={bits}: the fused kernel takes 4 or 8")
    k = a.shape[-1]
    ok, why = add_layer_norm_fits(k, a.dtype)
    if not ok:
        raise BadInput(why)
    for name, t in (("a", a), ("b", b), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(t.contiguous(), name, (a.dtype,))
    if b is not None and b.shape != a.shape:
        raise BadInput(f"b has shape {tuple(b.shape)}; expected a's shape {tuple(a.shape)}")
    if tuple(weight.shape) != (k,) or tuple(bias.shape) != (k,):
        raise BadInput(f"weight / bias have shapes {tuple(weight.shape)} / {tuple(bias.shape)}; expected ({k},)")
    check_same_device(a=a, b=b, weight=weight, bias=bias)
    if (clip_lo is None) != (clip_hi is None):
        raise BadInput("clip_lo and clip_hi go together: pass both or neither")
    clip = None if clip_lo is None else (clip_lo, clip_hi)
    return AddLayerNormQuantizeLauncher(eps, bits, symmetric, clip)(a, b, weight, bias)


def add_layer_norm_rotate_quantize(a, b, weight, bias, eps, signs, block, bits, symmetric, clip_lo=None, clip_hi=None):
    """``y = layer_norm(a + b)`` and the token-wise codes of ``rotate(y)`` in one kernel (Triton,
    :mod:`qfx.backends.triton.rotation_quant`); the codes equal :func:`quantize` of ``rotate(y)`` for the
    returned ``y``."""
    from qfx.backends.triton.rotation_quant import AddLayerNormRotateQuantizeLauncher, fits

    if bits not in (4, 8):
        raise BadInput(f"bits={bits}: the fused kernel takes 4 or 8")
    k = a.shape[-1]
    ok, why = fits(k, a.dtype, block)
    if not ok:
        raise BadInput(why)
    for name, t in (("a", a), ("b", b), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(t.contiguous(), name, (a.dtype,))
    check_tensor(signs.contiguous(), "signs", _OUT_DTYPES)  # +-1: exact in any float dtype
    if b is not None and b.shape != a.shape:
        raise BadInput(f"b has shape {tuple(b.shape)}; expected a's shape {tuple(a.shape)}")
    if tuple(weight.shape) != (k,) or tuple(bias.shape) != (k,) or tuple(signs.shape) != (k,):
        raise BadInput(f"weight / bias / signs have shapes {tuple(weight.shape)} / {tuple(bias.shape)} / "
                       f"{tuple(signs.shape)}; expected ({k},)")
    check_same_device(a=a, b=b, weight=weight, bias=bias, signs=signs)
    if (clip_lo is None) != (clip_hi is None):
        raise BadInput("clip_lo and clip_hi go together: pass both or neither")
    clip = None if clip_lo is None else (clip_lo, clip_hi)
    return AddLayerNormRotateQuantizeLauncher(eps, signs, block, bits, symmetric, clip)(
        a, b, weight.contiguous(), bias.contiguous())
