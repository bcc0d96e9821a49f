r"""Block-scaled integer linears on sm_80/86/89 (``QuantConfig(act_block=B)``, issue 23 item 5).

The kernel (``csrc/sm80_block_gemm.cu``, entry ``qfx_sm80_block_linear``) computes
:func:`qfx.numerics.int_linear_blocks_reference` operation for operation (backends/cutlass/EPILOGUES.md,
"Block-scaled activations"): per activation block an exact int32 sum on the integer tensor cores
(``mma.sync m16n8k64 s4`` when both operands are 4-bit: native INT4, the activation codes packed to
nibbles between shared memory and the MMA registers; ``m16n8k32 s8`` otherwise, int4 weights then
unpacked once to int8), promoted in registers to the fp32 accumulator with that block's scale, offset
term and group scale, every operation rounded once (``__fmul_rn`` / ``__fadd_rn``); then the row-wise
weight scale, bias, torch's exact-erf GELU and the rounding to the out dtype.

It is the ``"cutlass"`` implementation of the block-scaled ``qfx::int_linear`` (``act_block`` set) and
what :class:`qfx.backends.CutlassBackend` offers the planner for sm_80/86/89 targets; on sm_90 the Triton
block kernel (wgmma s8) runs block-scaled linears. The library compiles the kernel with the sm80 family
(sm_80/86/89 SASS and compute_80 PTX), so an H100 can JIT and run it: exact there, never timed there
(Hopper emulates s4 mma). The checked op refuses a Hopper unless :func:`ptx_on_hopper` is active (tests).

Constraints: ``act_block`` a multiple of 64 (one pipeline stage is 64 codes of K), ``K % act_block == 0``,
weight groups holding whole blocks; any M, any N. Tiles are data (:data:`TILES`, the same rows as the
``.cu`` file's table).
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
from dataclasses import dataclass

import torch

import qfx.backends.cutlass._library as _library
from qfx.targets import mma_operand

from ._validate import BadInput, check_tensor
from .capability import MAX_EXACT_K, family_for, target_sm
from .launch import dtype_code, library, unpacked_int4

__all__ = ["SYMBOL", "CHUNK_K", "TILES", "BlockTile", "tile_for", "block_refusal", "can_implement",
           "check_block_inputs", "int_linear_blocks", "int_linear_blocks_op", "ptx_on_hopper", "BlockLinearLauncher"]

SYMBOL = "qfx_sm80_block_linear"
#: K codes per pipeline stage of the kernel: an activation block is a whole number of stages
CHUNK_K = 64
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ARGTYPES = [ctypes.c_void_p] * 8 + [ctypes.c_int] * 9 + [ctypes.c_void_p]


@dataclass(frozen=True)
class BlockTile:
    """One row of the kernel's tile table (``launch<>`` in csrc/sm80_block_gemm.cu): serves M up to ``max_m``."""

    index: int
    max_m: int
    block_m: int
    block_n: int
    warps: tuple[int, int]
    stages: int


#: small M: 32-row tiles (more CTAs); large M: 128 x 128 tiles, 8 warps of 64 x 32
TILES = (BlockTile(0, 256, 32, 128, (1, 4), 3), BlockTile(1, 1 << 62, 128, 128, (2, 4), 3))


def tile_for(m: int) -> BlockTile:
    return next(t for t in TILES if m <= t.max_m)


_PTX_ON_HOPPER: contextvars.ContextVar[bool] = contextvars.ContextVar("qfx_sm80_block_ptx", default=False)


@contextlib.contextmanager
def ptx_on_hopper():
    """Inside this block the checked op also runs on sm_90, through the library's compute_80 PTX (JIT):
    exact, slow (s4 mma is emulated there), for the tests that check the Ampere kernel on an H100."""
    token = _PTX_ON_HOPPER.set(True)
    try:
        yield
    finally:
        _PTX_ON_HOPPER.reset(token)


def block_refusal(k: int, act_block, w_bits: int, a_bits: int, group_size: int | None = None) -> str | None:
    """Why the kernel cannot take this linear (pure Python), None when it can."""
    if act_block is None:
        return "token-wise activations: this kernel takes block-scaled ones (act_block) only"
    if a_bits >= 16:
        return "weight-only linears have no activation blocks"
    if a_bits not in (4, 8) or w_bits not in (4, 8):
        return f"w_bits={w_bits}, a_bits={a_bits}: the sm80 block kernel takes 4- or 8-bit codes"
    if not isinstance(act_block, int) or act_block <= 0 or act_block % CHUNK_K:
        return (f"act_block={act_block}: the sm80 block kernel walks K in {CHUNK_K}-code stages; use a multiple of "
                f"{CHUNK_K} (QuantConfig(act_block=128))")
    if k <= 0 or k % act_block:
        return f"act_block={act_block} does not divide K={k}; choose a divisor of K (a multiple of {CHUNK_K})"
    if group_size is not None and group_size % act_block:
        return f"weight groups of {group_size} channels do not hold whole act_block={act_block} blocks"
    if k > MAX_EXACT_K:
        return f"K={k} could overflow the int32 accumulator (max {MAX_EXACT_K})"
    return None


def can_implement(work, target, require_library: bool = True) -> tuple[bool, str]:
    """Whether the sm80 block kernel runs ``work`` (a :class:`qfx.backends.LinearWork`) on ``target``."""
    why = block_refusal(work.k, work.act_block, work.w_bits, work.a_bits, work.group_size)
    if why is not None:
        return False, f"{work.name}: {why}"
    sm = target_sm(target)
    if not 80 <= sm < 90:
        return False, (f"sm_{sm}: the CUTLASS backend's block-scaled kernel is the Ampere / Ada one (native INT4 mma); "
                       "on sm_90 the Triton block kernel (wgmma s8) runs block-scaled linears")
    if require_library:
        lib, why = _library.load()
        if lib is None:
            return False, why
        family, why = family_for(sm, lib.archs)
        if family is None:
            return False, why
        if not lib.has(SYMBOL):
            return False, f"{lib.path} has no {SYMBOL}: rebuild the native library (pip install -e .)"
    operand = mma_operand("sm80", work.w_bits, work.a_bits)
    mma = "m16n8k64 s4 (native INT4)" if operand == "s4" else "m16n8k32 s8"
    return True, f"CUTLASS-backend sm80 block-scaled GEMM: mma {mma}, per-block fp32 promotion (act_block={work.act_block})"


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


def check_block_inputs(a, a_scale, a_offset, w, w_bits, w_scale, w_block_sums, bias, out_dtype, a_bits,
                       act_block) -> tuple[int, int, int, int]:
    """Shapes and dtypes (metadata only, any device): (M, N, K, weight groups G); a :class:`BadInput`
    naming the parameter and the fix otherwise."""
    if w_bits not in (4, 8) or a_bits not in (4, 8):
        raise BadInput(f"w_bits={w_bits}, a_bits={a_bits}: the sm80 block kernel takes 4- or 8-bit codes")
    for name, t in (("a", a), ("a_scale", a_scale), ("w", w), ("w_scale", w_scale)):
        if not isinstance(t, torch.Tensor):
            raise BadInput(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if a.dtype != torch.int8 or a.dim() < 1:
        raise BadInput(f"a has dtype {a.dtype}, shape {_shape(a)}; expected int8 codes [..., K]")
    k = a.shape[-1]
    why = block_refusal(k, act_block, w_bits, a_bits)
    if why is not None:
        raise BadInput(why)
    m, blocks = a.numel() // k if k else 0, k // act_block
    lead = tuple(a.shape[:-1])
    w_dtype = torch.uint8 if w_bits == 4 else torch.int8
    if w.dtype != w_dtype or w.dim() != 2 or w.shape[1] * (2 if w_bits == 4 else 1) != k:
        want = f"packed int4 uint8 [N, {k // 2}]" if w_bits == 4 else f"int8 [N, {k}]"
        raise BadInput(f"w has dtype {w.dtype}, shape {_shape(w)}; with w_bits={w_bits} and K={k} expected {want}")
    n = w.shape[0]
    for name, t in (("a_scale", a_scale), ("a_offset", a_offset)):
        if t is not None and (t.dtype != torch.float32 or _shape(t) != (*lead, blocks)):
            raise BadInput(f"{name} has dtype {t.dtype}, shape {_shape(t)}; expected float32 {(*lead, blocks)} "
                           f"(one per token per block of act_block={act_block})")
    groups = w_scale.shape[1] if w_scale.dim() == 2 else 1
    if w_scale.dtype != torch.float32 or w_scale.numel() != n * groups or w_scale.shape[0] != n or blocks % groups:
        raise BadInput(f"w_scale has dtype {w_scale.dtype}, shape {_shape(w_scale)}; expected float32 [{n}] or [{n}, G] "
                       f"with G dividing the {blocks} activation blocks (weight groups hold whole blocks)")
    if a_offset is not None and (not isinstance(w_block_sums, torch.Tensor) or w_block_sums.dtype != torch.float32
                                 or _shape(w_block_sums) != (n, blocks)):
        got = f"{w_block_sums.dtype}, shape {_shape(w_block_sums)}" if isinstance(w_block_sums, torch.Tensor) else "None"
        raise BadInput(f"w_block_sums is {got}; expected float32 [{n}, {blocks}] "
                       f"(qfx.numerics.weight_block_sums(q_w, {act_block}))")
    if bias is not None and (bias.dtype not in _OUT_DTYPES or _shape(bias) != (n,)):
        raise BadInput(f"bias has dtype {bias.dtype}, shape {_shape(bias)}; expected fp16 / bf16 / fp32 [{n}]")
    if out_dtype not in _OUT_DTYPES:
        raise BadInput(f"out_dtype={out_dtype}; expected one of {_OUT_DTYPES}")
    return m, n, k, groups


def _check_device(device: torch.device, lib) -> None:
    major, minor = torch.cuda.get_device_capability(device)
    if not lib.has(SYMBOL):
        raise BadInput(f"{lib.path} has no {SYMBOL}: rebuild the native library with an sm_8x arch in QFX_CUDA_ARCHS")
    if major == 8:
        return
    if major == 9 and _PTX_ON_HOPPER.get():
        return
    raise BadInput(f"device {device} is sm_{major}{minor}: the sm80 block kernel runs on sm_80/86/89 (on sm_90 only "
                   "through its compute_80 PTX, inside qfx.backends.cutlass.block_linear.ptx_on_hopper(), for tests); "
                   "use backend 'triton' there")


class BlockLinearLauncher:
    """The block-scaled ``qfx::int_linear`` bound once to its weights: ``(a, a_scale, a_offset) -> y``.
    The weight operand is made once in the form the kernel reads (packed int4 for s4, int8 codes for s8),
    the bias once in fp32. ``symmetric``: the codes' offsets are zeros, so the offset term is skipped
    (exact: it adds +-0 to a value that is never -0)."""

    def __init__(self, w, w_bits, w_scale, w_block_sums, bias, gelu, out_dtype, a_bits, act_block,
                 symmetric: bool = False) -> None:
        self._fn = library().fn(SYMBOL, argtypes=_ARGTYPES)
        self.s4 = mma_operand("sm80", w_bits, a_bits) == "s4"
        self.w = (w if self.s4 or w_bits == 8 else unpacked_int4(w)).contiguous()
        self.n, self.k = w.shape[0], w.shape[1] * (2 if w_bits == 4 else 1)
        self.w_scale = w_scale.float().reshape(self.n, -1).contiguous()
        self.groups = self.w_scale.shape[1]
        self.w_block_sums = None if w_block_sums is None else w_block_sums.float().contiguous()
        self.bias = None if bias is None else bias.float().contiguous()
        self.gelu, self.out_dtype, self.act_block, self.symmetric = bool(gelu), out_dtype, int(act_block), bool(symmetric)
        self._dtype = dtype_code(out_dtype)

    def __call__(self, a, a_scale, a_offset):
        lead = a.shape[:-1]
        a2 = a.reshape(-1, self.k)
        m = a2.shape[0]
        out = torch.empty((*lead, self.n), dtype=self.out_dtype, device=a.device)
        if m == 0:
            return out
        offset = None if self.symmetric or a_offset is None else a_offset.contiguous()
        status = self._fn(a2.data_ptr(), self.w.data_ptr(), out.data_ptr(), a_scale.contiguous().data_ptr(),
                          None if offset is None else offset.data_ptr(), self.w_scale.data_ptr(),
                          None if self.w_block_sums is None else self.w_block_sums.data_ptr(),
                          None if self.bias is None else self.bias.data_ptr(), m, self.n, self.k, self.act_block,
                          self.groups, int(self.s4), int(self.gelu), self._dtype, tile_for(m).index,
                          torch.cuda.current_stream(a.device).cuda_stream)
        if status:
            _library.check(status, "sm80 block-scaled int_linear")
        return out


def int_linear_blocks(a, a_scale, a_offset, w, w_bits, w_scale, w_block_sums, bias, gelu, out_dtype, a_bits,
                      act_block, *, symmetric: bool = False) -> torch.Tensor:
    """The block-scaled integer linear on the sm80 block kernel, checked: equals
    :func:`qfx.numerics.int_linear_blocks_reference` bit for bit (``w`` packed int4 ``[N, K/2]`` for
    ``w_bits=4``; ``symmetric=True`` skips the offset term, exact when ``a_offset`` is zeros)."""
    check_block_inputs(a, a_scale, a_offset, w, w_bits, w_scale, w_block_sums, bias, out_dtype, a_bits, act_block)
    check_tensor(a.reshape(-1, a.shape[-1]), "a", (torch.int8,), aligned=True)
    check_tensor(w, "w", (w.dtype,), aligned=True)
    for name, t in (("a_scale", a_scale), ("a_offset", a_offset), ("w_scale", w_scale),
                    ("w_block_sums", w_block_sums), ("bias", bias)):
        if t is not None:
            check_tensor(t, name, (t.dtype,))
    devices = {t.device for t in (a, a_scale, a_offset, w, w_scale, w_block_sums, bias) if t is not None}
    if len(devices) > 1:
        raise BadInput(f"tensors are on different devices: {sorted(map(str, devices))}; move them to one GPU")
    lib = library()
    _check_device(a.device, lib)
    launcher = BlockLinearLauncher(w, w_bits, w_scale, w_block_sums, bias, gelu, out_dtype, a_bits, act_block,
                                   symmetric=symmetric or a_offset is None)
    return launcher(a, a_scale, a_offset)


def int_linear_blocks_op(a, a_scale, a_offset, w, w_bits, w_scale, w_block_sums, bias, gelu, out_dtype, a_bits,
                         act_block):
    """``qfx::int_linear(..., 'cutlass', act_block=B)`` (registered by :func:`qfx.backends.cutlass.register`):
    always the offset term (zeros for symmetric codes add nothing)."""
    return int_linear_blocks(a, a_scale, a_offset, w, w_bits, w_scale, w_block_sums, bias, gelu, out_dtype, a_bits,
                             act_block)
