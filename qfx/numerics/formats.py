"""Weight-only 4-bit formats (int4 group-wise sym / asym, nf4, fp4) and double quantization of
the block scales, written once: decoders, GPTQ and the tests import these."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qfx.numerics.affine import EPS, QParams, _true_div, choose_qparams, dequantize, quantize

# =============================================================================================
# Weight-only 4-bit formats (issue 12): int4 group-wise (sym / asym), nf4 and fp4 blockwise
# absmax (the bitsandbytes formats), and double quantization of the block scales.
# =============================================================================================
# Weight-only 4-bit formats, written once (decoders, GPTQ and the tests import these).
#
# A weight ``W [N, K]`` is cut into blocks of ``g`` consecutive input channels of one row
# (``K % g == 0``; bitsandbytes' default ``g = 64``). Per block:
#
# * ``int4`` (symmetric): the formula of :func:`choose_qparams` with ``b = 4``:
#   ``S = max|x| / 7``, ``q = clamp(round(x / S), -8, 7)``, ``x_hat = S q``.
# * ``int4_asym``: the asymmetric formula of :func:`choose_qparams` (``S = (max - min) / 15``,
#   stored codes ``q in [-8, 7]``, ``x_hat = S q + c``).
# * ``nf4`` / ``fp4`` (bitsandbytes): ``A = max|x|`` (the block's absmax), the code is the index
#   of the table entry nearest to ``x / A`` (ties go to the lower entry, as bitsandbytes'
#   ``x > pivot`` decision trees do), ``x_hat = table[code] * A``. The tables are
#   :data:`NF4_CODE` and :data:`FP4_CODE` (16 entries each, code = index).
#
# Double quantization (QLoRA / bitsandbytes ``compress_statistics=True``) of a vector of block
# scales ``v`` (one per block): ``o = mean(v)``, then 8-bit blockwise quantization of ``v - o``
# in blocks of 256 with the signed *dynamic* map (:func:`dynamic_map_8bit`):
# ``B = max|v - o|`` per 256-block, ``u = argmin_j |DYN[j] - (v - o) / B|`` (uint8),
# ``v_hat = DYN[u] * B + o``. Error per scale: ``|v_hat - v| <= B * max_gap(DYN) / 2``.
#
# Divisions are true fp32 divisions (``x / A``), as everywhere in this module; bitsandbytes
# multiplies by ``1 / A``, which can move a value lying within one ulp of a pivot to the
# neighbouring code. Storage cost per parameter: :func:`weight_format_bits`.

# NF4 (QLoRA, Dettmers et al. 2023, arXiv:2305.14314, Appendix E): 16 values, code = index.
# Source: bitsandbytes csrc/kernels.cu, dDequantizeNF4 / dhDequantizeNF4 (commit c037a306e97c;
# the same values as bitsandbytes.functional.get_4bit_type("nf4")). Code 7 is the exact zero.
NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (bitsandbytes' E2M1 variant, exponent bias 3, no inf/nan): code bits s|e1 e0|m; the
# magnitudes of codes 0b000..0b111 are (0, 0.0625, 8, 12, 4, 6, 2, 3), normalised by 12 (the
# largest), sign bit 0b1000. Source: bitsandbytes csrc/kernels.cu, dDequantizeFP4Tree and the
# comment table in dQuantizeFP4 (commit c037a306e97c), whose fp32 literals 0.16666667f,
# 5.208333333e-03f, ... are the fp32 roundings of these fractions (tested).
_FP4_MAGNITUDES_TIMES_12 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_CODE_VALUES = tuple(m / 12.0 for m in _FP4_MAGNITUDES_TIMES_12) + tuple(
    -m / 12.0 for m in _FP4_MAGNITUDES_TIMES_12
)

WEIGHT_FORMATS = ("int4", "int4_asym", "nf4", "fp4")
DEFAULT_BLOCK_SIZE = 64  # bitsandbytes' 4-bit default blocksize
DOUBLE_QUANT_BLOCK_SIZE = 256  # bitsandbytes quantize_4bit(compress_statistics=True)


def nf4_code() -> torch.Tensor:
    """The NF4 table ``[16]`` fp32 (code = index; see :data:`NF4_CODE_VALUES`)."""
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)


def fp4_code() -> torch.Tensor:
    """The bitsandbytes FP4 table ``[16]`` fp32 (code = index, 0b1000 the sign bit)."""
    return torch.tensor(FP4_CODE_VALUES, dtype=torch.float64).float()


def dynamic_map_8bit() -> torch.Tensor:
    """bitsandbytes' signed 8-bit *dynamic* map ``[256]`` fp32, sorted ascending.

    The construction of Dettmers (2015), "8-Bit Approximations for Parallelism in Deep
    Learning", as bitsandbytes' ``create_dynamic_map(signed=True, max_exponent_bits=7)``
    defines it: for decade ``e = 0..6``, the ``2^e`` midpoints of ``2^e`` equal steps of
    ``[0.1, 1]`` scaled by ``10^(e - 6)``, with both signs (254 values), plus 0 and 1. Computed
    in fp32 like the original (fp32 linspace, fp32 midpoints, fp32 product).
    """
    vals: list[torch.Tensor] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, (1 << e) + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = float(10.0 ** (e - 6)) * mids
        vals += [scaled, -scaled]
    vals.append(torch.tensor([0.0, 1.0], dtype=torch.float32))
    return torch.cat(vals).sort().values


def _nearest_code(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the ascending ``table`` for each element of ``x``.

    Pivots are the midpoints of neighbours (computed in fp64, rounded to fp32); ``x`` exactly
    on a pivot goes to the lower entry, like bitsandbytes' ``if (x > pivot)`` trees.
    """
    t = table.to(x.device)
    pivots = ((t[:-1].double() + t[1:].double()) / 2).float()
    return torch.bucketize(x.contiguous(), pivots, right=False)


def _check_format(fmt: str, name: str = "fmt") -> None:
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(
            f"{name}={fmt!r} is not a weight format qfx knows; expected one of {WEIGHT_FORMATS} "
            f"(int4 = symmetric group-wise, int4_asym = asymmetric group-wise, nf4/fp4 = bitsandbytes)"
        )


def _blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[N, K] -> [N, K // g, g]`` with a clear error when ``g`` does not divide K."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    k = w.shape[-1]
    if not isinstance(block_size, int) or block_size <= 0 or k % block_size:
        raise ValueError(
            f"block_size={block_size!r} does not divide the input dimension K={k}; "
            f"pick a divisor of {k} (bitsandbytes uses 64, GPTQ commonly 128)"
        )
    return w.reshape(w.shape[0], k // block_size, block_size)


@dataclass(frozen=True)
class DoubleQuantized:
    """8-bit blockwise codes of a vector of block scales (see the section docstring).

    ``codes [n]`` uint8 indices into :func:`dynamic_map_8bit`, ``absmax [ceil(n / 256)]`` fp32,
    ``offset`` fp32 scalar tensor, ``shape`` the shape of the original scale tensor.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    offset: torch.Tensor
    shape: tuple[int, ...]
    block_size: int = DOUBLE_QUANT_BLOCK_SIZE

    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.absmax.numel() + 4


def double_quantize(v: torch.Tensor, block_size: int = DOUBLE_QUANT_BLOCK_SIZE) -> DoubleQuantized:
    """Compress fp32 block scales ``v`` (any shape) to 8-bit dynamic-map codes.

    Example::

        >>> s = torch.rand(4, 16) + 0.5
        >>> dq = double_quantize(s)
        >>> (double_dequantize(dq) - s).abs().max() < 0.01
        tensor(True)
    """
    if block_size <= 0:
        raise ValueError(f"block_size={block_size!r} must be positive (bitsandbytes uses 256)")
    flat = v.detach().float().reshape(-1)
    offset = flat.mean()
    centred = flat - offset
    n = centred.numel()
    pad = (-n) % block_size
    padded = torch.cat([centred, centred.new_zeros(pad)]).reshape(-1, block_size)
    absmax = padded.abs().amax(dim=-1).clamp_min(EPS)
    normed = padded / absmax.unsqueeze(-1)
    codes = _nearest_code(normed, dynamic_map_8bit()).reshape(-1)[:n].to(torch.uint8)
    return DoubleQuantized(codes=codes, absmax=absmax, offset=offset, shape=tuple(v.shape),
                           block_size=block_size)


def double_dequantize(dq: DoubleQuantized) -> torch.Tensor:
    """``v_hat = DYN[u] * B + o`` fp32, in the original shape."""
    table = dynamic_map_8bit().to(dq.codes.device)
    n = dq.codes.numel()
    per_elem = dq.absmax.repeat_interleave(dq.block_size)[:n]
    return (table[dq.codes.long()] * per_elem + dq.offset).reshape(dq.shape)


@dataclass(frozen=True)
class Weight4:
    """One 4-bit weight ``[N, K]`` in one of :data:`WEIGHT_FORMATS`.

    ``codes [N, K]``: int8 in ``[-8, 7]`` for int4 / int4_asym (qfx's signed codes), uint8
    table indices in ``[0, 15]`` for nf4 / fp4. ``scale [N, K // g]`` fp32 (``S``, or the
    absmax ``A`` for nf4 / fp4) or its :class:`DoubleQuantized` form; ``offset`` likewise for
    int4_asym, else None.
    """

    fmt: str
    block_size: int
    codes: torch.Tensor
    scale: torch.Tensor | DoubleQuantized
    offset: torch.Tensor | DoubleQuantized | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def nbytes(self) -> int:
        """Bytes of the packed storage: 4-bit codes plus the (double-quantized) scales."""
        total = self.codes.numel() // 2
        for part in (self.scale, self.offset):
            if isinstance(part, DoubleQuantized):
                total += part.nbytes()
            elif part is not None:
                total += 4 * part.numel()
        return total


def _resolve(part: torch.Tensor | DoubleQuantized | None) -> torch.Tensor | None:
    return double_dequantize(part) if isinstance(part, DoubleQuantized) else part


def weight_block_params(
    w: torch.Tensor, fmt: str, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-block parameters of ``w [N, K]``: (scale ``[N, K // g]``, offset or None), fp32."""
    _check_format(fmt)
    wb = _blocks(w.detach().float(), block_size)
    if fmt == "int4":
        return _true_div(wb.abs().amax(dim=-1).clamp_min(EPS), 7.0), None
    if fmt == "int4_asym":
        qp = choose_qparams(w, 4, symmetric=False, group_size=block_size)
        return qp.scale, qp.offset
    return wb.abs().amax(dim=-1).clamp_min(EPS), None


def encode_weight(
    w: torch.Tensor, fmt: str, scale: torch.Tensor, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """Codes of ``w [N, K]`` under given per-block parameters ``scale [N, G]`` (``G = K / g``).

    Also works on one column block (GPTQ): ``w [N, c]`` with ``scale [N, 1]``.
    """
    _check_format(fmt)
    n, k = w.shape
    g = k // scale.shape[-1]
    wb = w.float().reshape(n, scale.shape[-1], g)
    s = scale.float().unsqueeze(-1)
    if fmt == "int4":
        return quantize(w, QParams(scale, None), 4, g)
    if fmt == "int4_asym":
        return quantize(w, QParams(scale, offset), 4, g)
    table = nf4_code() if fmt == "nf4" else fp4_code()
    normed = wb / s
    if fmt == "nf4":
        codes = _nearest_code(normed, table)
    else:
        # fp4's codes are not in value order: search the 8 magnitudes, then set the sign bit
        # for x < 0 (so -0.0 and tiny negatives take code 0b1000, as in bitsandbytes).
        mags = table[:8].to(w.device)
        order = torch.argsort(mags)
        idx = _nearest_code(normed.abs(), mags[order])
        codes = order.to(w.device)[idx] + 8 * (normed < 0).long()
    return codes.reshape(n, k).to(torch.uint8)


def decode_weight(
    codes: torch.Tensor, fmt: str, scale: torch.Tensor, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """``x_hat`` fp32 ``[N, K]`` from codes and per-block parameters (inverse of :func:`encode_weight`)."""
    _check_format(fmt)
    n, k = codes.shape
    g = k // scale.shape[-1]
    if fmt in ("int4", "int4_asym"):
        return dequantize(codes, QParams(scale.float(), None if offset is None else offset.float()), g)
    table = (nf4_code() if fmt == "nf4" else fp4_code()).to(codes.device)
    vals = table[codes.long()].reshape(n, scale.shape[-1], g)
    return (vals * scale.float().unsqueeze(-1)).reshape(n, k)


def quantize_weight_4bit(
    w: torch.Tensor,
    fmt: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
    double_quant: bool = False,
) -> Weight4:
    """Round-to-nearest 4-bit weight ``w [N, K]`` -> :class:`Weight4`.

    With ``double_quant`` the codes are taken with the fp32 scales (as bitsandbytes does) and
    the scales are then stored double-quantized; :func:`dequantize_weight_4bit` uses the
    double-quantized scales.

    Example::

        >>> w = torch.randn(8, 128)
        >>> wq = quantize_weight_4bit(w, "nf4", block_size=64, double_quant=True)
        >>> dequantize_weight_4bit(wq).shape
        torch.Size([8, 128])
    """
    scale, offset = weight_block_params(w, fmt, block_size)
    codes = encode_weight(w, fmt, scale, offset)
    return pack_weight4(codes, fmt, block_size, scale, offset, double_quant)


def pack_weight4(
    codes: torch.Tensor,
    fmt: str,
    block_size: int,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    double_quant: bool,
) -> Weight4:
    """Assemble a :class:`Weight4` from codes and fp32 block parameters (GPTQ uses this)."""
    _check_format(fmt)
    if double_quant:
        return Weight4(fmt, block_size, codes, double_quantize(scale),
                       None if offset is None else double_quantize(offset))
    return Weight4(fmt, block_size, codes, scale, offset)


def dequantize_weight_4bit(wq: Weight4) -> torch.Tensor:
    """``W_hat [N, K]`` fp32 of a :class:`Weight4`."""
    return decode_weight(wq.codes, wq.fmt, _resolve(wq.scale), _resolve(wq.offset))


def fake_quantize_weight_4bit(
    w: torch.Tensor, fmt: str, block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = False
) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w.dtype`` with the straight-through gradient."""
    w_hat = dequantize_weight_4bit(quantize_weight_4bit(w, fmt, block_size, double_quant)).to(w.dtype)
    return w + (w_hat - w).detach()


def pack_uint4(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes in ``[0, 15]`` ``[..., K]`` (K even) into ``[..., K // 2]`` uint8,
    code ``2i`` in the low nibble (the order of :func:`pack_int4`; bitsandbytes puts code
    ``2i`` in the high nibble instead)."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"pack_uint4 takes uint8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_uint4 needs an even last dimension, got K={codes.shape[-1]}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("pack_uint4: codes outside [0, 15]")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_uint4`."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_uint4 takes uint8, got {packed.dtype}")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)


def weight_format_bits(fmt: str, block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = False) -> float:
    """Storage bits per weight parameter (codes plus block scales; large-matrix limit).

    int4 / nf4 / fp4: ``4 + 32 / g`` (one fp32 scale per block), int4_asym ``4 + 64 / g``
    (scale and offset). Double quantization stores each fp32 block parameter as 8 bits plus
    one fp32 absmax per 256 of them: ``4 + (8 + 32 / 256) / g`` per parameter tensor
    (nf4, g = 64: 4.127 bits, QLoRA's "0.127 bits per parameter" for the constants).
    """
    _check_format(fmt)
    per_param = (8.0 + 32.0 / DOUBLE_QUANT_BLOCK_SIZE) if double_quant else 32.0
    n_params = 2 if fmt == "int4_asym" else 1
    return 4.0 + n_params * per_param / block_size


__all__ = [
    "NF4_CODE_VALUES",
    "FP4_CODE_VALUES",
    "WEIGHT_FORMATS",
    "DEFAULT_BLOCK_SIZE",
    "DOUBLE_QUANT_BLOCK_SIZE",
    "nf4_code",
    "fp4_code",
    "dynamic_map_8bit",
    "DoubleQuantized",
    "double_quantize",
    "double_dequantize",
    "Weight4",
    "weight_block_params",
    "encode_weight",
    "decode_weight",
    "quantize_weight_4bit",
    "pack_weight4",
    "dequantize_weight_4bit",
    "fake_quantize_weight_4bit",
    "pack_uint4",
    "unpack_uint4",
    "weight_format_bits",
]
