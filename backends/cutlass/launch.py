"""The lean launch layer: one ctypes call per kernel, everything else decided before the call.

Two kinds of callers use it:

* :mod:`.ops` (the checked, general API behind ``qfx::int_linear`` & co.) validates its inputs,
  then calls :func:`run_gemm` / :func:`quantize_rows`;
* the runtime binds every integer op of a compiled graph to a launcher made once at compile
  time (:class:`LinearLauncher`, :class:`QuantizeLauncher`). The compiler made every tensor
  these launchers see (contiguous codes, fp32 scales, aligned buffers), so they check nothing
  per call: the weights are unpacked / converted once, the argument struct is built once, the
  kernel config and workspace are chosen once per M and cached.

Per call a launcher does: one ``torch.empty`` for the output, a few field stores into a
ctypes struct, one ctypes call, one status check.
"""
from __future__ import annotations

import ctypes
import weakref

import torch

import qfx.backends.cutlass._library as _library
from qfx.targets import mma_operand

from ._validate import BadInput
from .capability import family_for
from .configs import KernelConfig, by_name
from .dispatch import choose

__all__ = ["library", "sm_count", "device_family", "pick_config", "run_gemm", "unpack_int4_into", "unpacked_int4",
           "pack_rows_int4", "quantize_rows", "LinearLauncher", "QuantizeLauncher", "AddLayerNormQuantizeLauncher",
           "add_layer_norm_fits", "add_layer_norm_row_fits", "ADD_LN_DTYPES", "BadInput"]


_SM_COUNT: dict[int, int] = {}
_WORKSPACE_BYTES: dict[tuple, int] = {}
_QUANTIZE_ARGTYPES = [ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int,
                      ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_int,
                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
_ADD_LN_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                    ctypes.c_longlong, ctypes.c_longlong, ctypes.c_float, ctypes.c_int, ctypes.c_int,
                    ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p,
                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
#: the fused add + LayerNorm + quantize kernel holds a row in one warp's registers
ADD_LN_MAX_K = 1024
#: the float dtypes the fused add + LayerNorm + quantize kernel reads
ADD_LN_DTYPES = (torch.float16, torch.bfloat16)
_UNPACK_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p]


def library() -> _library.Library:
    lib, why = _library.load()
    if lib is None:
        raise RuntimeError(f"qfx cutlass backend unavailable: {why}")
    return lib


def sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def device_family(device: torch.device, lib: _library.Library) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    family, why = family_for(10 * major + minor, lib.archs)
    if family is None:
        raise BadInput(f"device {device} (sm_{major}{minor}): {why}")
    return family


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def dtype_code(dtype: torch.dtype) -> int:
    return _library.DTYPE_CODES[str(dtype).removeprefix("torch.")]


def pick_config(lib, family: str, operand: str, m: int, n: int, k: int,
                config: str | None = None) -> KernelConfig:
    if config is not None:
        cfg = by_name(config)
        if cfg.name not in lib.configs:
            raise BadInput(f"config {config!r} is not in the built library {lib.path}")
        return cfg
    cfg = choose(family, operand, m, n, k, lib.configs)
    if cfg is None:
        raise BadInput(f"no built {family} {operand} kernel for M={m} N={n} K={k}")
    return cfg


def _workspace_bytes(lib, cfg: KernelConfig, kind: str, args) -> int:
    key = (cfg.name, kind, args.m, args.n, args.k, args.sm_count)
    ws = _WORKSPACE_BYTES.get(key)
    if ws is None:
        ws = lib.fn(f"qfx_{cfg.symbol}_workspace_{kind}", ctypes.c_size_t)(ctypes.byref(args))
        _WORKSPACE_BYTES[key] = ws
    return ws


def run_gemm(lib, cfg: KernelConfig, kind: str, args, device) -> None:
    """Run entry point ``qfx_<cfg>_<kind>`` with a workspace from the caching allocator.

    Temporaries (workspace, packed operands) may be freed once the launch is queued: the
    caching allocator reuses a block only for work queued later on the same stream.
    """
    args.splits = cfg.splits
    ws = _workspace_bytes(lib, cfg, kind, args)
    workspace = torch.empty(ws, dtype=torch.uint8, device=device) if ws else None
    if workspace is not None:
        args.workspace, args.workspace_bytes = workspace.data_ptr(), ws
    _library.check(lib.fn(f"qfx_{cfg.symbol}_{kind}")(ctypes.byref(args)), f"{cfg.name} {kind}")


def unpack_int4_into(packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Packed int4 ``[N, K/2]`` uint8 -> int8 codes ``out [N, K]`` (one kernel, no checks)."""
    f = library().fn("qfx_unpack_int4", argtypes=_UNPACK_ARGTYPES)
    _library.check(f(packed.data_ptr(), out.data_ptr(), packed.numel(), sm_count(packed.device),
                     _stream(packed.device)), "unpack_int4")
    return out


# id(packed weight) -> (weakref to it, (data_ptr, version), int8 codes). Keyed by id, not by
# the tensor (tensor == tensor is elementwise); the weakref drops the entry with the weight.
_UNPACKED: dict[int, tuple] = {}


def unpacked_int4(packed: torch.Tensor) -> torch.Tensor:
    """The int8 codes ``[N, K]`` of a packed int4 weight ``[N, K/2]``, unpacked once per weight
    tensor and kept while it lives (an in-place edit of the weight unpacks again): the one
    cache of unpacked weights, shared by the checked ops and the launchers a compiled model
    binds, so a weight read both ways is unpacked once. Nothing is cached while a CUDA graph is
    being captured (the codes would live in the graph's private pool)."""
    key = id(packed)
    hit = _UNPACKED.get(key)
    stamp = (packed.data_ptr(), packed._version)
    if hit is not None and hit[0]() is packed and hit[1] == stamp:
        return hit[2]
    codes = unpack_int4_into(packed, torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.int8,
                                                 device=packed.device))
    if not torch.cuda.is_current_stream_capturing():
        _UNPACKED[key] = (weakref.ref(packed, lambda _, key=key: _UNPACKED.pop(key, None)), stamp, codes)
    return codes


def pack_rows_int4(x: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] ``[R, K]`` -> packed ``[R, K/2]`` (no range check: no host sync)."""
    nib = x.view(torch.uint8) & 0x0F
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()


def quantize_rows(x: torch.Tensor, bits: int, symmetric: bool, clip: tuple[float, float] | None,
                  q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, gelu: bool = False) -> None:
    """Token-wise quantization of contiguous ``x [rows, K]`` (of ``gelu(x)`` with ``gelu``) into
    preallocated outputs."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if rows == 0:
        return
    fn = library().fn("qfx_quantize_rows", argtypes=_QUANTIZE_ARGTYPES)
    lo, hi = clip if clip is not None else (0.0, 0.0)
    status = fn(x.data_ptr(), dtype_code(x.dtype), rows, k, bits, int(bool(symmetric)),
                int(clip is not None), float(lo), float(hi), int(bool(gelu)), q.data_ptr(), scale.data_ptr(),
                offset.data_ptr(), _stream(x.device))
    _library.check(status, "quantize")


class QuantizeLauncher:
    """``qfx::quantize`` bound at compile time: ``(x) -> (codes, scale, offset)``."""

    def __init__(self, bits: int, symmetric: bool, clip: tuple[float, float] | None, gelu: bool = False) -> None:
        lib = library()
        if not lib.has("qfx_quantize_rows"):
            raise RuntimeError(f"{lib.path} has no quantize kernel: rebuild the native library")
        self.bits, self.symmetric, self.clip = bits, symmetric, clip
        self._fn = lib.fn("qfx_quantize_rows", argtypes=_QUANTIZE_ARGTYPES)
        self._sym, self._has_clip, self._gelu = int(bool(symmetric)), int(clip is not None), int(bool(gelu))
        self._lo, self._hi = (float(clip[0]), float(clip[1])) if clip is not None else (0.0, 0.0)

    def __call__(self, x: torch.Tensor):
        x = x.contiguous()  # an activation view (e.g. after a transpose) is copied once
        lead, k = x.shape[:-1], x.shape[-1]
        q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        scale = torch.empty(lead, dtype=torch.float32, device=x.device)
        offset = torch.empty(lead, dtype=torch.float32, device=x.device)
        rows = q.numel() // k
        if rows:
            status = self._fn(x.data_ptr(), dtype_code(x.dtype), rows, k, self.bits, self._sym,
                              self._has_clip, self._lo, self._hi, self._gelu, q.data_ptr(), scale.data_ptr(),
                              offset.data_ptr(), torch.cuda.current_stream(x.device).cuda_stream)
            if status:
                _library.check(status, "quantize")
        return q, scale, offset


class LinearLauncher:
    """``qfx::int_linear`` bound at compile time to its weights and a kernel family.

    Args:
        w: int8 codes ``[N, K]`` or packed int4 ``[N, K/2]`` (``w_bits=4``), on the GPU.
        w_scale ``[N]`` / ``[N, 1]``, w_offset_sum ``[N]`` or None, bias ``[N]`` or None.
        gelu, out_dtype, w_bits, a_bits: as in ``qfx::int_linear``.

    The weight operand is made once in the form the kernel reads (int4 codes sign-extended to
    int8 on sm_90, whose tensor cores have no INT4), the bias once in fp32.
    """

    def __init__(self, w, w_bits, w_scale, w_offset_sum, bias, gelu, out_dtype, a_bits,
                 config: str | None = None) -> None:
        lib = library()
        self._lib = lib
        device = w.device
        self.family = device_family(device, lib)
        self.operand = mma_operand(self.family, w_bits, a_bits)
        self.n = w.shape[0]
        self.k = w.shape[1] * (2 if w_bits == 4 else 1)
        if self.operand == "s8" and w_bits == 4:
            w = unpacked_int4(w)  # shared with the checked ops: one copy per weight
        self.w = w.contiguous()
        self.w_scale = w_scale.reshape(-1).float().contiguous()
        self.w_offset_sum = None if w_offset_sum is None else w_offset_sum.float().contiguous()
        self.bias = None if bias is None else bias.float().contiguous()
        self.out_dtype = out_dtype
        self.config = config
        # sm_90 with fp16 output: dequant fused into the GEMM epilogue; otherwise int32 GEMM
        # + the epilogue kernel.
        self.fused = self.family == "sm90a" and out_dtype == torch.float16
        self._args = _library.QfxGemmArgs(
            a=None, b=self.w.data_ptr(), d=None, a_scale=None, a_offset=None,
            w_scale=self.w_scale.data_ptr(),
            w_offset_sum=None if self.w_offset_sum is None else self.w_offset_sum.data_ptr(),
            bias=None if self.bias is None else self.bias.data_ptr(), m=0, n=self.n, k=self.k,
            gelu=int(bool(gelu)), out_dtype=dtype_code(out_dtype), sm_count=sm_count(device),
            splits=1, workspace=None, workspace_bytes=0, stream=None)
        self._ref = ctypes.byref(self._args)
        self._epilogue = lib.fn("qfx_dequant_epilogue")
        self._by_m: dict[int, tuple] = {}

    def _for_m(self, m: int, device) -> tuple:
        """(gemm entry point, workspace tensor or None, splits) for this M, made once."""
        hit = self._by_m.get(m)
        if hit is None:
            cfg = pick_config(self._lib, self.family, self.operand, m, self.n, self.k, self.config)
            kind = "dequant" if self.fused else "s32"
            self._args.m, self._args.splits = m, cfg.splits
            ws = _workspace_bytes(self._lib, cfg, kind, self._args)
            workspace = torch.empty(ws, dtype=torch.uint8, device=device) if ws else None
            hit = (self._lib.fn(f"qfx_{cfg.symbol}_{kind}"), workspace, ws, cfg.splits, cfg.name)
            self._by_m[m] = hit
        return hit

    def __call__(self, a: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor | None):
        lead = a.shape[:-1]
        m = a.numel() // self.k
        device = a.device
        out = torch.empty((*lead, self.n), dtype=self.out_dtype, device=device)
        if m == 0:
            return out
        fn, workspace, ws, splits, _ = self._for_m(m, device)
        if self.operand == "s4":
            a = pack_rows_int4(a.reshape(m, self.k))
        args = self._args
        args.a = a.data_ptr()
        args.a_scale = a_scale.data_ptr()
        args.a_offset = None if a_offset is None else a_offset.data_ptr()
        args.m = m
        args.splits = splits
        args.workspace = None if workspace is None else workspace.data_ptr()
        args.workspace_bytes = ws
        args.stream = torch.cuda.current_stream(device).cuda_stream
        if self.fused:
            args.d = out.data_ptr()
            status = fn(self._ref)
            if status:
                _library.check(status, "int_linear (fused dequant)")
            return out
        acc = torch.empty((m, self.n), dtype=torch.int32, device=device)
        args.d = acc.data_ptr()
        status = fn(self._ref)
        if status:
            _library.check(status, "int_linear (s32)")
        # The epilogue kernel reads the accumulator through ``a`` and writes ``d``.
        args.a, args.d = acc.data_ptr(), out.data_ptr()
        status = self._epilogue(self._ref)
        if status:
            _library.check(status, "dequant epilogue")
        return out


def add_layer_norm_row_fits(k: int, dtype: torch.dtype) -> tuple[bool, str]:
    """The fused add + LayerNorm + quantize kernel's row rule, without loading the library (the
    planner asks it with no GPU): fp16 / bf16 rows (torch's LayerNorm is kept in fp32, where the
    compiled model must stay bit-identical to its twin) of K a multiple of 8 up to
    :data:`ADD_LN_MAX_K`."""
    if dtype not in ADD_LN_DTYPES:
        return False, f"float parts in {dtype}: the fused kernel reads fp16 / bf16"
    if k % 8 or k > ADD_LN_MAX_K:
        return False, f"K={k}: the fused kernel takes K a multiple of 8 up to {ADD_LN_MAX_K}"
    return True, ""


def add_layer_norm_fits(k: int, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the fused add + LayerNorm + quantize kernel takes rows of ``k`` ``dtype`` values
    here: :func:`add_layer_norm_row_fits` and a library that has the kernel."""
    ok, why = add_layer_norm_row_fits(k, dtype)
    if not ok:
        return ok, why
    lib, why = _library.load()
    if lib is None:
        return False, why
    if not lib.has("qfx_add_layer_norm_quantize"):
        return False, f"{lib.path} has no fused add + LayerNorm + quantize kernel: rebuild it"
    return True, ""


class AddLayerNormQuantizeLauncher:
    """``qfx::add_layer_norm_quantize`` bound at compile time (eps, bits, clip):
    ``(a, b, weight, bias) -> (y, codes, scale, offset)``, one kernel."""

    def __init__(self, eps: float, bits: int, symmetric: bool, clip: tuple[float, float] | None) -> None:
        self._fn = library().fn("qfx_add_layer_norm_quantize", argtypes=_ADD_LN_ARGTYPES)
        self.eps, self.bits = float(eps), int(bits)
        self._sym, self._has_clip = int(bool(symmetric)), int(clip is not None)
        self._lo, self._hi = (float(clip[0]), float(clip[1])) if clip is not None else (0.0, 0.0)

    def __call__(self, a, b, weight, bias):
        a = a.contiguous()
        b = None if b is None else b.contiguous()
        k = a.shape[-1]
        y = torch.empty_like(a)
        q = torch.empty(a.shape, dtype=torch.int8, device=a.device)
        scale = torch.empty(a.shape[:-1], dtype=torch.float32, device=a.device)
        offset = torch.empty(a.shape[:-1], dtype=torch.float32, device=a.device)
        status = self._fn(a.data_ptr(), None if b is None else b.data_ptr(), weight.data_ptr(),
                          bias.data_ptr(), dtype_code(a.dtype), a.numel() // k, k, self.eps, self.bits,
                          self._sym, self._has_clip, self._lo, self._hi, y.data_ptr(), q.data_ptr(),
                          scale.data_ptr(), offset.data_ptr(), torch.cuda.current_stream(a.device).cuda_stream)
        if status:
            _library.check(status, "add + LayerNorm + quantize")
        return y, q, scale, offset
