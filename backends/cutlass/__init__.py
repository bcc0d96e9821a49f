"""CUTLASS integer GEMMs for qfx: int8/int4 tensor-core GEMMs with the dequant fused.

Plain Python functions over CUDA tensors with the semantics of ``qfx::int_matmul`` and
``qfx::int_linear`` (see :mod:`qfx.ops`, :mod:`qfx.numerics` and EPILOGUES.md); ``ops.py``
registers them as the ``"cutlass"`` backend. The native library (C ABI, no libtorch) is built by
``pip install -e .`` from the config table in ``configs.py``.

* sm_90 (Hopper): CUTLASS 3.x warp-specialized wgmma int8 GEMMs. int4 codes run on them
  sign-extended to int8 (bit-identical accumulators); packed int4 weights are expanded to int8
  once per weight tensor and cached (2x the packed bytes). fp16 output: fused epilogue;
  bf16/fp32 output: int32 GEMM + one epilogue kernel.
* sm_80/86/89: CUTLASS 2.x INT4 (mma m16n8k64) and INT8 (m16n8k32) GEMMs, int32 output, then the
  epilogue kernel.

Example::

    >>> from qfx.backends import cutlass as qc
    >>> ok, why = qc.available()
    >>> acc = qc.int_matmul(a, b)   # a [M,K], b [N,K] int8 CUDA tensors -> int32 [M,N]
"""
from __future__ import annotations

import ctypes
import weakref

import torch

from . import _library
from ._validate import BadInput, check_multiple, check_same_device, check_tensor
from .configs import ARCH_GROUPS, KernelConfig, by_name
from .dispatch import choose

__all__ = ["available", "can_implement", "int_matmul", "int_linear", "unpack_int4",
           "family_for", "BadInput"]

_MAX_EXACT_K = (2**31 - 1) // (128 * 128)  # int8 x int8 codes never overflow int32 below this
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available() -> tuple[bool, str]:
    """(True, "") when the native library is loaded and a CUDA device is present."""
    lib, why = _library.load()
    if lib is None:
        return False, why
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    return True, ""


def family_for(sm: int, built_archs: list[str]) -> tuple[str | None, str]:
    """Kernel family serving compute capability ``sm`` (e.g. 90) given the built archs."""
    if 90 <= sm < 100:
        if "90a" in built_archs:
            return "sm90a", ""
        return None, f"library built for {built_archs}, not 90a: rebuild with QFX_CUDA_ARCHS=90a"
    if 80 <= sm < 90:
        if set(built_archs) & set(ARCH_GROUPS["sm80"]):
            return "sm80", ""  # sm_80 SASS runs on 8.x; compute_80 PTX covers the rest
        return None, (f"library built for {built_archs}, no sm_8x: rebuild with "
                      f"QFX_CUDA_ARCHS including {sm}")
    return None, f"sm_{sm} is not supported by the cutlass backend (sm_80..sm_90 only)"


def _target_sm(target) -> int:
    if isinstance(target, int):
        return target
    sm = getattr(target, "sm", None)
    if sm is not None:
        return int(sm)
    digits = "".join(ch for ch in str(target) if ch.isdigit())
    if not digits:
        raise ValueError(f"target={target!r} names no sm version (e.g. 'sm_90')")
    return int(digits)


def can_implement(m, n: int | None = None, k: int | None = None, w_bits: int = 8,
                  a_bits: int = 8, group: int | None = None, target="sm_90",
                  require_library: bool = True) -> tuple[bool, str]:
    """Whether an int_linear / int_matmul of this shape and precision runs here, and why not.

    Call as ``can_implement(m, n, k, w_bits, a_bits, group, target)`` (``m`` may be None:
    dynamic) or ``can_implement(work, target)`` with a ``qfx.backends.LinearWork``.
    ``group``: weight quantization group size along K (None = per row); only per-row weights
    are supported. ``target``: "sm_90", 90, or a ``qfx.targets.Target``.
    """
    if hasattr(m, "n") and hasattr(m, "k"):  # a LinearWork
        work = m
        target = n if n is not None else target
        m, n, k = None, work.n, work.k
        w_bits, a_bits, group = work.w_bits, work.a_bits, work.group_size
    if group is not None:
        return False, "group-wise weight scales are not supported by the cutlass epilogue"
    if a_bits not in (4, 8):
        return False, f"a_bits={a_bits}: the cutlass backend runs integer activations only"
    if w_bits not in (4, 8):
        return False, f"w_bits={w_bits}: only 4 and 8 bits"
    sm = _target_sm(target)
    built = [a for members in ARCH_GROUPS.values() for a in members]
    if require_library:
        lib, why = _library.load()
        if lib is None:
            return False, why
        built = lib.archs
    family, why = family_for(sm, built)
    if family is None:
        return False, why
    k_align = 32 if (family == "sm80" and w_bits == a_bits == 4) else 16
    if k % k_align:
        return False, f"K={k} is not a multiple of {k_align} (16-byte rows of A and B)"
    if n % 8:
        return False, f"N={n} is not a multiple of 8 (16-byte output rows)"
    if k > _MAX_EXACT_K:
        return False, f"K={k} could overflow the int32 accumulator (max {_MAX_EXACT_K})"
    if m is not None and m < 0:
        return False, f"M={m} < 0"
    return True, ""


# ---------------------------------------------------------------------------------------------
# Launch plumbing

_SM_COUNT: dict[int, int] = {}
_WORKSPACE_BYTES: dict[tuple, int] = {}


def _lib() -> _library.Library:
    lib, why = _library.load()
    if lib is None:
        raise RuntimeError(f"qfx cutlass backend unavailable: {why}")
    return lib


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _family(device: torch.device, lib: _library.Library) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    family, why = family_for(10 * major + minor, lib.archs)
    if family is None:
        raise BadInput(f"device {device} (sm_{major}{minor}): {why}")
    return family


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _args(device, a, b, d, m, n, k, epi=None, gelu=False, out_dtype=torch.float16):
    epi = epi or {}
    return _library.QfxGemmArgs(
        a=a, b=b, d=d.data_ptr(),
        a_scale=_ptr(epi.get("a_scale")), a_offset=_ptr(epi.get("a_offset")),
        w_scale=_ptr(epi.get("w_scale")), w_offset_sum=_ptr(epi.get("w_offset_sum")),
        bias=_ptr(epi.get("bias")), m=m, n=n, k=k, gelu=int(gelu),
        out_dtype=_library.DTYPE_CODES[str(out_dtype).removeprefix("torch.")],
        sm_count=_sm_count(device), splits=1, workspace=None, workspace_bytes=0,
        stream=torch.cuda.current_stream(device).cuda_stream)


def _run(lib, cfg: KernelConfig, kind: str, args, device) -> None:
    """Run entry point ``qfx_<cfg>_<kind>`` with a workspace from the caching allocator.

    Temporaries (workspace, packed operands) may be freed once the launch is queued: the
    caching allocator reuses a block only for work queued later on the same stream.
    """
    args.splits = cfg.splits
    key = (cfg.name, kind, args.m, args.n, args.k, args.sm_count)
    ws = _WORKSPACE_BYTES.get(key)
    if ws is None:
        ws = lib.fn(f"qfx_{cfg.symbol}_workspace_{kind}", ctypes.c_size_t)(ctypes.byref(args))
        _WORKSPACE_BYTES[key] = ws
    workspace = torch.empty(ws, dtype=torch.uint8, device=device) if ws else None
    if workspace is not None:
        args.workspace, args.workspace_bytes = workspace.data_ptr(), ws
    _library.check(lib.fn(f"qfx_{cfg.symbol}_{kind}")(ctypes.byref(args)), f"{cfg.name} {kind}")


def _family_and_operand(device, lib, config: str | None, w_bits: int, a_bits: int):
    """Kernel family and operand type: INT4 tensor cores only where native (sm_8x) and asked."""
    if config is None:
        family = _family(device, lib)
        return family, ("s4" if family == "sm80" and w_bits == a_bits == 4 else "s8")
    cfg = by_name(config)
    if cfg.operand == "s4" and not w_bits == a_bits == 4:
        raise BadInput(f"config {config!r} is an INT4 x INT4 kernel; it needs 4-bit codes on both "
                       f"sides (got w_bits={w_bits}, a_bits={a_bits})")
    return cfg.arch, cfg.operand


def _pick(lib, family: str, operand: str, m: int, n: int, k: int, config: str | None):
    if config is not None:
        cfg = by_name(config)
        if cfg.name not in lib.configs:
            raise BadInput(f"config {config!r} is not in the built library {lib.path}")
        return cfg
    cfg = choose(family, operand, m, n, k, lib.configs)
    if cfg is None:
        raise BadInput(f"no built {family} {operand} kernel for M={m} N={n} K={k}")
    return cfg


# ---------------------------------------------------------------------------------------------
# int4 handling

# id(packed weight) -> (weakref to it, (data_ptr, version), int8 codes). Keyed by id, not by
# the tensor (tensor == tensor is elementwise); the weakref drops the entry with the weight.
_UNPACKED: dict[int, tuple] = {}


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Packed int4 ``[N, K/2]`` uint8 (qfx.numerics.pack_int4 order) -> int8 codes ``[N, K]``.

    One kernel; the result is 2x the packed bytes.
    """
    check_tensor(packed, "w (packed int4)", (torch.uint8,), ndim=2, aligned=True)
    check_multiple(packed.shape[1], 8, "w.shape[1] (packed bytes per row)",
                   "the unpack kernel reads 8 bytes per thread")
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.int8,
                      device=packed.device)
    lib = _lib()
    f = lib.fn("qfx_unpack_int4", argtypes=[ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong,
                                            ctypes.c_int, ctypes.c_void_p])
    _library.check(f(packed.data_ptr(), out.data_ptr(), packed.numel(), _sm_count(packed.device),
                     torch.cuda.current_stream(packed.device).cuda_stream), "unpack_int4")
    return out


def _unpacked_weight(w: torch.Tensor) -> torch.Tensor:
    """int8 codes of a packed weight, cached per weight tensor (invalidated by in-place edits)."""
    key = id(w)
    hit = _UNPACKED.get(key)
    stamp = (w.data_ptr(), w._version)
    if hit is not None and hit[0]() is w and hit[1] == stamp:
        return hit[2]
    codes = unpack_int4(w)
    if not torch.cuda.is_current_stream_capturing():
        _UNPACKED[key] = (weakref.ref(w, lambda _, key=key: _UNPACKED.pop(key, None)), stamp,
                          codes)
    return codes


def _pack_rows_int4(x: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] ``[R, K]`` -> packed ``[R, K/2]`` (no range check: no host sync)."""
    nib = x.view(torch.uint8) & 0x0F
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()


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
    lib = _lib()
    family, operand = _family_and_operand(device, lib, config, bits, bits)
    cfg = _pick(lib, family, operand, m, n, k, config)
    check_multiple(k, cfg.k_align, "K", f"{cfg.operand} rows move in 16-byte chunks")
    check_multiple(n, cfg.n_align, "N", "output rows must stay 16-byte aligned")
    out = torch.empty(m, n, dtype=torch.int32, device=device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    if k > _MAX_EXACT_K:
        raise BadInput(f"K={k} could overflow the int32 accumulator (max {_MAX_EXACT_K})")
    if operand == "s4":
        a, b = _pack_rows_int4(a), _pack_rows_int4(b)
    _run(lib, cfg, "s32", _args(device, a.data_ptr(), b.data_ptr(), out, m, n, k), device)
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
    lib = _lib()
    family, operand = _family_and_operand(device, lib, config, w_bits, a_bits)
    cfg = _pick(lib, family, operand, m, n, k, config)
    check_multiple(k, cfg.k_align, "K", f"{cfg.operand} rows move in 16-byte chunks")
    check_multiple(n, cfg.n_align, "N", "output rows must stay 16-byte aligned")
    if k > _MAX_EXACT_K:
        raise BadInput(f"K={k} could overflow the int32 accumulator (max {_MAX_EXACT_K})")

    out = torch.empty(m, n, dtype=out_dtype, device=device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    # Operands as the kernel reads them; held here until their launch is queued.
    if operand == "s4":
        a_op, w_op = _pack_rows_int4(a2), w
    else:
        a_op, w_op = a2, (_unpacked_weight(w) if w_bits == 4 else w)
    a_ptr, w_ptr = a_op.data_ptr(), w_op.data_ptr()
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    epi = {"a_scale": a_scale, "a_offset": a_offset, "w_scale": w_scale,
           "w_offset_sum": w_offset_sum, "bias": bias}
    if family == "sm90a" and out_dtype == torch.float16:
        _run(lib, cfg, "dequant",
             _args(device, a_ptr, w_ptr, out, m, n, k, epi, gelu, out_dtype), device)
        return out.reshape(*lead, n)
    acc = torch.empty(m, n, dtype=torch.int32, device=device)
    _run(lib, cfg, "s32", _args(device, a_ptr, w_ptr, acc, m, n, k), device)
    args = _args(device, acc.data_ptr(), None, out, m, n, k, epi, gelu, out_dtype)
    _library.check(lib.fn("qfx_dequant_epilogue")(ctypes.byref(args)), "dequant epilogue")
    return out.reshape(*lead, n)


_QUANTIZE_ARGTYPES = [ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int,
                      ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_void_p,
                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]


def quantize(x, bits, symmetric, clip_lo=None, clip_hi=None):
    """Token-wise quantization of ``x [..., K]`` in one kernel, bit-identical to
    :func:`qfx.numerics.quantize_activation`: (int8 codes, scale [...], offset [...])."""
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
    rows = q.numel() // k if k else 0
    if rows == 0:
        return q, scale, offset
    fn = _lib().fn("qfx_quantize_rows", argtypes=_QUANTIZE_ARGTYPES)
    has_clip = clip_lo is not None
    status = fn(x.data_ptr(), _library.DTYPE_CODES[str(x.dtype).removeprefix("torch.")], rows, k, bits,
                int(bool(symmetric)), int(has_clip), float(clip_lo if has_clip else 0.0),
                float(clip_hi if has_clip else 0.0), q.data_ptr(), scale.data_ptr(), offset.data_ptr(),
                torch.cuda.current_stream(x.device).cuda_stream)
    _library.check(status, "quantize")
    return q, scale, offset


def register() -> None:
    """Plug :func:`int_matmul` and :func:`int_linear` into ``qfx.ops`` as backend "cutlass".

    Called on import; the ops' fake implementations live in qfx/ops.py, so graphs that use
    ``backend="cutlass"`` export, compile (torch.compile) and capture (CUDA graphs).
    """
    from qfx import ops

    ops.register_impl("int_matmul", "cutlass", lambda a, b: int_matmul(a, b))
    ops.register_impl("int_linear", "cutlass", int_linear)
    lib, _ = _library.load()
    if lib is not None and lib.has("qfx_quantize_rows"):
        ops.register_impl("quantize", "cutlass", quantize)


register()
