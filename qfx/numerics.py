r"""The quantization formulas of qfx, written once.

Every other part of qfx (the QAT fake-quant modules, the CPU reference backend, the kernel
tests, the compile-time weight packing) imports these functions; none re-derives them.

Notation: ``b`` bits, ``x`` a float vector (one weight row, one weight group, or one token's
activations), ``q`` its stored integer code, ``S`` the scale and ``c`` the offset.

Symmetric (weights always; activations when ``symmetric=True``)::

    S = max(max|x|, eps) / (2^(b-1) - 1)
    q = clamp(round(x / S), -2^(b-1), 2^(b-1) - 1)
    x_hat = S * q                                  (c = 0)

Asymmetric (activations when ``symmetric=False``; ``z = min(x)``)::

    S = max(max(x) - min(x), eps) / (2^b - 1)
    u = clamp(round((x - z) / S), 0, 2^b - 1)      (the paper prints 2^(b-1)-1 here: a typo,
                                                    it would waste half the code range)
    q = u - 2^(b-1)                                (stored signed, so int4/int8 tensor cores
                                                    take it; same bits as a signed code)
    x_hat = S * u + z = S * q + c,   c = z + 2^(b-1) * S

* ``round`` is round-half-to-even (``torch.round``; ``rintf`` in CUDA), applied to the IEEE
  fp32 quotient ``x / S`` (a true division, not a multiplication by ``1/S``: the two differ
  in the last bit and so can pick different codes). The same holds for the divisions that
  make ``S``; torch's CUDA kernels divide by a Python scalar through its reciprocal, so this
  module always divides by a tensor.
* All parameter arithmetic is fp32, whatever the input dtype.
* ``eps = 1e-8`` keeps ``S > 0`` for an all-zero row / token (then every code is 0 and
  ``x_hat == 0`` exactly for symmetric, ``x_hat == z == 0`` for asymmetric).
* ``clip=(lo, hi)``: activations are clamped to ``[lo, hi]`` before the parameters are taken.
* Granularity: weights ``[N, K]`` per output row (one ``S`` per row) or per group of ``g``
  consecutive input channels (``K % g == 0``; ``S`` has shape ``[N, K // g]``); activations
  per token (one ``S``, ``c`` per row of the flattened ``[M, K]``).

Error bound (tested): inside the clip range ``|x_hat - x| <= S / 2`` (plus fp32 rounding of
the two float operations, at most ``2 * 2^-24 * (|x| + |c|)``).

int4 packing (:func:`pack_int4`): two codes per byte along the last (K) dimension; code
``2i`` in the low nibble and ``2i + 1`` in the high nibble, each as a two's-complement
nibble. A packed ``[N, K]`` matrix is ``[N, K // 2]`` uint8, K contiguous: the order of
CUTLASS ``int4b_t`` arrays, so kernels read it without reordering.

Integer linear algebra (:func:`int_linear_reference`): with activation codes ``q_a``
(scale ``S_a[m]``, offset ``c_a[m]``) and weight codes ``q_w`` (scale ``s_w[n, g]``)::

    acc_g[m, n] = sum_{k in group g} q_a[m, k] * q_w[n, k]          (exact int32)
    y[m, n] = S_a[m] * sum_g s_w[n, g] * acc_g[m, n]  +  c_a[m] * ws[n]  +  bias[n]
    ws[n]   = sum_g s_w[n, g] * sum_{k in g} q_w[n, k]               (precomputed once)

which equals ``x_hat @ w_hat.T + bias`` in exact arithmetic. In fp32 the order is fixed:
``((acc * S_a) * s_w + c_a * ws) + bias``, each operation rounded once (no fma), then GELU as
``y * 0.5 * (1 + erf(y * sqrt(1/2)))``. The QAT graph's linears compute exactly this
(:func:`qfx.fake_quant.integer_linear`), and so do the GPU kernels
(backends/cutlass/EPILOGUES.md): on one device the twin and the compiled model agree bit for bit.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = [
    "EPS",
    "QParams",
    "code_range",
    "choose_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_weight",
    "quantize_activation",
    "pack_int4",
    "unpack_int4",
    "int_matmul_reference",
    "int_matmul",
    "int_linear_reference",
    "weight_offset_sum",
    "max_exact_k",
]

EPS = 1e-8
_SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class QParams:
    """Scale and offset of one quantized tensor; both fp32, broadcastable to its groups."""

    scale: torch.Tensor
    offset: torch.Tensor | None  # None for symmetric (offset 0)


def _check_bits(bits: int, name: str = "bits") -> None:
    if bits not in _SUPPORTED_BITS:
        raise ValueError(f"{name}={bits!r} is not supported: qfx quantizes to 4 or 8 bits")


def code_range(bits: int) -> tuple[int, int]:
    """The stored (signed) code range ``[-2^(b-1), 2^(b-1) - 1]``, for both schemes."""
    _check_bits(bits)
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View ``[..., K]`` as ``[..., K // g, g]`` (or ``[..., 1, K]`` for a whole row)."""
    k = x.shape[-1]
    g = k if group_size is None else group_size
    if g <= 0 or k % g != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the input dimension K={k}; "
            f"pick a divisor of {k} or use whole rows (group_size=None)"
        )
    return x.reshape(*x.shape[:-1], k // g, g)


def _true_div(num: torch.Tensor, den: float) -> torch.Tensor:
    """``num / den`` as an IEEE division on every device: torch's CUDA kernels divide by a
    Python scalar as a multiplication by its reciprocal, which differs in the last bit."""
    return num / torch.full_like(num, den)


def choose_qparams(
    x: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_size: int | None = None,
) -> QParams:
    """Scale (and offset) per row of ``x`` (last dim), or per group of ``group_size``.

    Returns tensors of shape ``[..., K // g]`` (``[..., 1]`` for whole rows), fp32.
    """
    _check_bits(bits)
    xg = _grouped(x.detach().float(), group_size)
    if symmetric:
        absmax = xg.abs().amax(dim=-1)
        scale = _true_div(absmax.clamp_min(EPS), float((1 << (bits - 1)) - 1))
        return QParams(scale=scale, offset=None)
    lo = xg.amin(dim=-1)
    hi = xg.amax(dim=-1)
    scale = _true_div((hi - lo).clamp_min(EPS), float((1 << bits) - 1))
    offset = lo + float(1 << (bits - 1)) * scale
    return QParams(scale=scale, offset=offset)


def quantize(x: torch.Tensor, qp: QParams, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Integer codes (int8 tensor, values in :func:`code_range`) of ``x`` under ``qp``."""
    lo_code, hi_code = code_range(bits)
    xg = _grouped(x.float(), group_size)
    scale = qp.scale.unsqueeze(-1)
    if qp.offset is None:
        q = torch.round(xg / scale)
    else:
        # u = round((x - z) / S) with z = c - 2^(b-1) S; then q = u - 2^(b-1).
        zero = qp.offset.unsqueeze(-1) - float(1 << (bits - 1)) * scale
        q = torch.round((xg - zero) / scale) - float(1 << (bits - 1))
    q = q.clamp(lo_code, hi_code)
    return q.reshape(x.shape).to(torch.int8)


def dequantize(q: torch.Tensor, qp: QParams, group_size: int | None = None) -> torch.Tensor:
    """``x_hat = S * q + c`` in fp32."""
    qg = _grouped(q.float(), group_size)
    out = qg * qp.scale.unsqueeze(-1)
    if qp.offset is not None:
        out = out + qp.offset.unsqueeze(-1)
    return out.reshape(q.shape)


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_size: int | None = None,
    clip: tuple[float, float] | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` with the straight-through estimator for gradients.

    Forward: the exact fp32 values the integer path computes with. Backward: identity
    inside the clip range, zero outside it (the gradient of the clamp).
    """
    xc = x if clip is None else x.clamp(clip[0], clip[1])
    qp = choose_qparams(xc, bits, symmetric, group_size)
    x_hat = dequantize(quantize(xc, qp, bits, group_size), qp, group_size).to(x.dtype)
    return xc + (x_hat - xc).detach()


def quantize_weight(
    w: torch.Tensor, bits: int, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric weight codes ``[N, K]`` int8 and scales ``[N, K // g]`` fp32."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    qp = choose_qparams(w, bits, symmetric=True, group_size=group_size)
    return quantize(w, qp, bits, group_size), qp.scale


def quantize_activation(
    x: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip: tuple[float, float] | None = None,
    gelu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-wise codes of ``x [..., K]``: (int8 codes, scale ``[...]``, offset ``[...]``).

    The offset is all zeros for symmetric activations, so kernels can take one signature.
    ``gelu``: the codes of ``torch.nn.functional.gelu(x)`` (exact erf, evaluated in fp32 and
    rounded to ``x.dtype`` as torch does), i.e. exactly what a separate GELU node would hand to
    this quantizer; clipping applies after the GELU.
    """
    if gelu:
        x = torch.nn.functional.gelu(x)
    xc = x.float() if clip is None else x.float().clamp(clip[0], clip[1])
    qp = choose_qparams(xc, bits, symmetric)
    q = quantize(xc, qp, bits)
    scale = qp.scale.squeeze(-1)
    offset = torch.zeros_like(scale) if qp.offset is None else qp.offset.squeeze(-1)
    return q, scale, offset


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 codes ``[..., K]`` (int8, values in [-8, 7], K even) into ``[..., K // 2]`` uint8."""
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int4 takes int8 codes, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got K={q.shape[-1]}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4: codes outside the int4 range [-8, 7]")
    nib = q.to(torch.uint8) & 0x0F  # two's-complement nibble
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[..., K // 2]`` uint8 -> ``[..., K]`` int8 codes."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 takes uint8, got {packed.dtype}")
    lo = (packed & 0x0F).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    lo = torch.where(lo >= 8, lo - 16, lo)
    hi = torch.where(hi >= 8, hi - 16, hi)
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], -1).to(torch.int8)


def max_exact_k(a_bits: int, w_bits: int) -> int:
    """Largest K whose int32 dot product of codes can never overflow int32."""
    worst = (1 << (a_bits - 1)) * (1 << (w_bits - 1))
    return (2**31 - 1) // worst


def _check_int_codes(a: torch.Tensor, b: torch.Tensor) -> None:
    """The contract of both exact accumulators: int8 codes, one K, no int32 overflow."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise ValueError(f"int_matmul takes int8 codes, got a={a.dtype}, b={b.dtype}")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"int_matmul: K mismatch, a has K={a.shape[-1]}, b has K={b.shape[-1]}")
    if a.shape[-1] > max_exact_k(8, 8):
        raise ValueError(f"int_matmul: K={a.shape[-1]} could overflow int32")


def int_matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` of int8 codes ``a [M, K]``, ``b [N, K]`` -> int32 ``[M, N]``.

    Computed in float64, which is exact here: every partial sum is an integer of magnitude
    at most ``128 * 128 * K < 2^53``.
    """
    _check_int_codes(a, b)
    return (a.double() @ b.double().T).to(torch.int32)


#: torch._int_mm's CUDA contract (cuBLASLt IMMA): M > 16 rows, K and N multiples of 8.
_INT_MM_MIN_M, _INT_MM_ALIGN = 17, 8


def _int_mm_refusal(device: torch.device, k: int, n: int) -> str | None:
    """Why :func:`int_matmul` does not run ``[M, K] @ [N, K].T`` on int8 tensor cores on
    ``device`` (None: it does). M is padded, so only the device, K, N and the build matter."""
    if not hasattr(torch, "_int_mm"):
        return "this torch has no torch._int_mm"
    if device.type != "cuda":
        return f"on {device.type}, the float64 path is the reference"
    if k % _INT_MM_ALIGN or n % _INT_MM_ALIGN:
        return f"K={k}, N={n}: torch._int_mm needs both to be multiples of {_INT_MM_ALIGN}"
    return None


def int_matmul(a: torch.Tensor, b: torch.Tensor, tensor_cores: bool | None = None) -> torch.Tensor:
    """Exact ``a @ b.T`` of int8 codes ``a [M, K]``, ``b [N, K]`` -> int32 ``[M, N]``, on int8
    tensor cores (``torch._int_mm``) where they run, else :func:`int_matmul_reference`.

    Both paths return the same integers: tensor cores accumulate in int32, which is exact for
    every K qfx accepts (``K <= max_exact_k(8, 8)``), and int4 codes are int8 values in
    [-8, 7]. ``tensor_cores=None`` chooses (CUDA and K, N multiples of 8); True forces
    ``torch._int_mm`` (tests call it on the CPU, where torch implements it too); False forces
    the float64 reference. M <= 16 is padded with zero rows to 17: the rows are independent,
    and the padding is sliced off.

    Example::

        >>> a = torch.randint(-8, 8, (3, 64), dtype=torch.int8); b = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
        >>> torch.equal(int_matmul(a, b, tensor_cores=True), int_matmul_reference(a, b))
        True
    """
    why = _int_mm_refusal(a.device, a.shape[-1], b.shape[0]) if tensor_cores is None else (None if tensor_cores else "tensor_cores=False")
    if why is not None:
        return int_matmul_reference(a, b)
    _check_int_codes(a, b)
    m = a.shape[0]
    if m < _INT_MM_MIN_M:  # cuBLASLt's int8 GEMM refuses M <= 16
        a = torch.cat([a, a.new_zeros(_INT_MM_MIN_M - m, a.shape[1])])
    # b.T of a row-major [N, K] is the column-major [K, N] operand cuBLASLt's IMMA path wants.
    return torch._int_mm(a.contiguous(), b.contiguous().T)[:m]


def weight_offset_sum(q_w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``ws[n] = sum_g s_w[n, g] * sum_{k in g} q_w[n, k]`` (fp32), the asymmetric correction."""
    groups = w_scale.shape[-1]
    sums = q_w.reshape(q_w.shape[0], groups, -1).double().sum(dim=-1)
    return (sums * w_scale.double()).sum(dim=-1).float()


def int_linear_reference(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    a_offset: torch.Tensor,
    q_w: torch.Tensor,
    w_scale: torch.Tensor,
    w_offset_sum: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The integer linear layer: exact int32 accumulation, then the fp32 epilogue.

    Shapes: ``a [M, K]`` int8, ``a_scale, a_offset [M]``, ``q_w [N, K]`` int8 (unpacked),
    ``w_scale [N, G]`` (G = 1 for row-wise), ``w_offset_sum [N]``, ``bias [N]`` or None.
    The fp32 operation order below is the reference the GPU epilogue is bounded against.
    """
    n, k = q_w.shape
    groups = w_scale.shape[-1]
    if groups == 1:
        acc = int_matmul(a, q_w).float()
        y = acc * a_scale.float().unsqueeze(-1) * w_scale.float().reshape(1, n)
    else:
        g = k // groups
        y = torch.zeros(a.shape[0], n, dtype=torch.float32, device=a.device)
        for j in range(groups):
            acc_g = int_matmul(a[:, j * g:(j + 1) * g], q_w[:, j * g:(j + 1) * g])
            y = y + acc_g.float() * w_scale[:, j].float().reshape(1, n)
        y = y * a_scale.float().unsqueeze(-1)
    y = y + a_offset.float().unsqueeze(-1) * w_offset_sum.float().reshape(1, n)
    if bias is not None:
        y = y + bias.float().reshape(1, n)
    if gelu:
        y = torch.nn.functional.gelu(y)
    return y.to(out_dtype)


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


__all__ += [
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


# -- input rotation (QuaRot-style, online) ----------------------------------------------------------
#
# A quantized linear may read its input rotated: ``y = quant(x R) @ quant(W R)^T + b``, which
# equals ``x W^T + b`` in exact arithmetic for any orthogonal ``R`` (``R R^T = I``). What changes
# is the distribution of the quantized tensors: a BERT LayerNorm output carries a few outlier
# channels that make token-wise 4-bit codes of every other channel collapse to 0 or +-1; the
# rotation spreads each outlier over its block, so the token's range shrinks and the codes carry
# information again (QuaRot, Ashkboos et al. 2024; here online, because a post-LN encoder's
# residual stream passes through LayerNorms that do not commute with a rotation).
#
#     R = diag(s) . blockdiag(H_b, ..., H_b) / sqrt(b)      [K, K], K % b == 0
#
# ``s`` in {-1, +1}^K is a fixed pseudo-random sign vector (a function of K alone, the same on
# every machine and torch version: splitmix64), ``H_b`` Sylvester's Hadamard matrix of a power
# of two ``b`` (entries +-1). Online, per token and block, by the fast Walsh-Hadamard transform:
# log2(b) stages of pairwise sums and differences in fp32 (fp64 for fp64 inputs), then one
# multiplication by ``1/sqrt(b)`` (fp32) and one rounding to the input's dtype. Why not a GEMM
# by ``H_b``: a GEMM's summation order depends on the kernel the library picks for the number
# of rows, so the same token would round differently in the QAT graph (its batch) and in the
# compiled graph (a padded bucket). The transform is a fixed sequence of IEEE additions: one
# token's result is the same bits at any batch size, on the CPU and on a GPU.

_SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
_U64 = (1 << 64) - 1


def rotation_signs(k: int) -> torch.Tensor:
    """The sign vector ``s`` [k] (fp32, entries +-1) of the input rotation of width ``k``:
    deterministic (splitmix64 seeded by ``k``), so a model rotated at ``prepare_qat`` time and
    the graph ``compile`` rebuilds use the same rotation."""
    if k <= 0:
        raise ValueError(f"k={k!r}: a rotation needs a positive width")
    state = (_SPLITMIX_GAMMA * (k + 1)) & _U64
    out = []
    for _ in range(k):
        state = (state + _SPLITMIX_GAMMA) & _U64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
        z ^= z >> 31
        out.append(1.0 if z >> 63 else -1.0)
    return torch.tensor(out, dtype=torch.float32)


def hadamard_matrix(b: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix ``H_b`` [b, b] in fp64 (entries +-1, ``H H^T = b I``, symmetric),
    ``b`` a power of two."""
    if b <= 0 or b & (b - 1):
        raise ValueError(f"b={b!r}: a Sylvester Hadamard matrix needs a power-of-two size")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotation_matrix(k: int, block: int) -> torch.Tensor:
    """The dense orthogonal ``R`` [k, k] (fp64) that :func:`rotate_blocks` applies: what the
    weights are multiplied by (``W <- W R``) and what tests compare against."""
    if k % block:
        raise ValueError(f"rotation block {block} does not divide K={k}")
    h = hadamard_matrix(block) / math.sqrt(block)
    return rotation_signs(k).double().unsqueeze(1) * torch.block_diag(*([h] * (k // block)))


@functools.lru_cache(maxsize=None)
def rotation_scale(block: int) -> float:
    """``1/sqrt(block)`` rounded to fp32 (returned as the Python float of that fp32 value): the
    one normalisation both :func:`rotate_blocks` and the GPU kernel multiply by."""
    return float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32))


def _walsh_hadamard(y: torch.Tensor, b: int) -> torch.Tensor:
    """``H_b`` applied to every consecutive block of ``b`` in the last dim (unnormalized), by
    log2(b) butterfly stages: at stride ``h`` the pair ``(u, v)`` becomes ``(u + v, u - v)``."""
    shape = y.shape
    rows = y.reshape(-1, shape[-1] // b, b)
    h = 1
    while h < b:
        pairs = rows.unflatten(-1, (b // (2 * h), 2, h))
        u, v = pairs[..., 0, :], pairs[..., 1, :]
        rows = torch.stack((u + v, u - v), dim=-2).flatten(-3)
        h *= 2
    return rows.reshape(shape)


def rotate_blocks(x: torch.Tensor, signs: torch.Tensor, block: int, transpose: bool = False) -> torch.Tensor:
    """``x @ R`` (or ``x @ R^T`` with ``transpose``) over the last dim, returned in ``x``'s dtype:
    ``signs`` = :func:`rotation_signs` (fp32), ``block`` the power-of-two ``b``. Computed in fp32
    (fp64 for fp64 ``x``) by the fast Walsh-Hadamard transform, so each token's result does not
    depend on how many tokens are rotated with it (see the section comment). The one
    implementation: the QAT graph and every compiled graph run it (``qfx::rotate``)."""
    if block <= 0 or block & (block - 1) or x.shape[-1] % block:
        raise ValueError(f"block={block!r} must be a power of two dividing the last dim {x.shape[-1]}")
    work = torch.promote_types(x.dtype, torch.float32)
    s = signs.to(work)
    scale = rotation_scale(block)  # an fp32 value: exact in fp32 and in fp64
    y = x.to(work)
    if transpose:
        y = _walsh_hadamard(y, block) * scale * s
    else:
        y = _walsh_hadamard(y * s, block) * scale
    return y.to(x.dtype)


__all__ += ["rotation_signs", "hadamard_matrix", "rotation_matrix", "rotation_scale", "rotate_blocks"]
