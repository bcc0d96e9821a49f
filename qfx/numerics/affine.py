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
(:func:`qfx.numerics.fake_quant.integer_linear`), and so do the GPU kernels
(backends/cutlass/EPILOGUES.md): on one device the twin and the compiled model agree bit for bit.

Block-scaled activations (``QuantConfig(act_block=B)``, :func:`int_linear_blocks_reference`):
the activation of token ``m`` has one scale ``S_a[m, j]`` (and offset ``c_a[m, j]``) per block
``j`` of ``B`` consecutive input channels (the formulas above with the block as the vector;
:func:`quantize_activation` with ``block=B``). With ``J = K / B`` blocks::

    acc_j[m, n] = sum_{k in block j} q_a[m, k] * q_w[n, k]        (exact int32, |acc_j| < 2^24)
    bs[n, j]    = sum_{k in block j} q_w[n, k]                     (an integer, stored as fp32)
    t_j = acc_j * S_a[m, j]                                       (the promotion of block j)
    t_j = t_j + c_a[m, j] * bs[n, j]                              (asymmetric only)
    t_j = t_j * s_w[n, g(j)]                                      (grouped weights only)
    p   = ((0 + t_0) + t_1) + ... + t_{J-1}                        (blocks in K order)
    y   = p * s_w[n]                                              (row-wise weights only)
    y   = y + bias[n];  GELU as above

every operation an fp32 operation rounded once (no fma), in exactly this order. ``acc_j`` fits
fp32 exactly, so its conversion is exact; a symmetric activation's zero offsets would add
``+-0`` to a ``t_j`` that is never ``-0``, so kernels may skip that line for symmetric codes.
Grouped weights need ``g % B == 0`` (each block lies in one weight group). It equals
``x_hat @ w_hat.T + bias`` in exact arithmetic, like the token-wise form.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
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
    "int_linear_epilogue",
    "int_linear_reference",
    "int_linear_blocks_epilogue",
    "promote_block",
    "int_linear_blocks_reference",
    "weight_offset_sum",
    "weight_block_sums",
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
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-wise codes of ``x [..., K]``: (int8 codes, scale ``[...]``, offset ``[...]``); with
    ``block=B``, block-scaled: scale and offset ``[..., K // B]``, one per token per block.

    The offset is all zeros for symmetric activations, so kernels can take one signature.
    ``gelu``: the codes of ``torch.nn.functional.gelu(x)`` (exact erf, evaluated in fp32 and
    rounded to ``x.dtype`` as torch does), i.e. exactly what a separate GELU node would hand to
    this quantizer; clipping applies after the GELU.
    """
    if gelu:
        x = torch.nn.functional.gelu(x)
    if block is not None and (block <= 0 or x.shape[-1] % block):
        raise ValueError(f"act_block={block} does not divide the activation's K={x.shape[-1]}; "
                         f"choose a divisor of {x.shape[-1]} (QuantConfig(act_block=...)) or None")
    xc = x.float() if clip is None else x.float().clamp(clip[0], clip[1])
    qp = choose_qparams(xc, bits, symmetric, block)
    q = quantize(xc, qp, bits, block)
    scale = qp.scale if block is not None else qp.scale.squeeze(-1)
    offset = torch.zeros_like(scale) if qp.offset is None else qp.offset.reshape(scale.shape)
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


def int_linear_epilogue(acc: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor, w_scale: torch.Tensor,
                        w_offset_sum: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The integer linear's fp32 epilogue, without its GELU and output cast: ``((acc * S_a) * s_w
    + c_a * ws) + bias`` for row-wise weight scales; for grouped ones ``((0 + acc_0 * s_w[:, 0])
    + acc_1 * s_w[:, 1] + ...) * S_a``, then the same ``+ c_a * ws + bias``.

    ``acc [G, M, N]``: one exact accumulator per weight group (int32, or its exact fp32 value),
    ``a_scale, a_offset [M]``, ``w_scale [N, G]``, ``w_offset_sum [N]``, ``bias [N]`` or None.
    The one statement of this order: :func:`int_linear_reference` and the CPU backend call it.
    """
    n = w_scale.shape[0]
    sa = a_scale.float().unsqueeze(-1)
    if acc.shape[0] == 1:
        y = acc[0].float() * sa * w_scale.float().reshape(1, n)
    else:
        y = torch.zeros(acc.shape[1], n, dtype=torch.float32, device=acc.device)
        for j in range(acc.shape[0]):
            y = y + acc[j].float() * w_scale[:, j].float().reshape(1, n)
        y = y * sa
    y = y + a_offset.float().unsqueeze(-1) * w_offset_sum.float().reshape(1, n)
    if bias is not None:
        y = y + bias.float().reshape(1, n)
    return y


def int_linear_reference(
    a: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor,  # the activation codes and parameters
    q_w: torch.Tensor, w_scale: torch.Tensor, w_offset_sum: torch.Tensor,  # the weight's
    bias: torch.Tensor | None, gelu: bool = False, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The integer linear layer: exact int32 accumulation, then the fp32 epilogue.

    Shapes: ``a [M, K]`` int8, ``a_scale, a_offset [M]``, ``q_w [N, K]`` int8 (unpacked),
    ``w_scale [N, G]`` (G = 1 for row-wise), ``w_offset_sum [N]``, ``bias [N]`` or None.
    The fp32 operation order (:func:`int_linear_epilogue`) is the reference the GPU epilogue is
    bounded against.
    """
    groups = w_scale.shape[-1]
    if groups == 1:
        acc = int_matmul(a, q_w).unsqueeze(0)
    else:
        g = q_w.shape[1] // groups
        acc = torch.stack([int_matmul(a[:, j * g:(j + 1) * g], q_w[:, j * g:(j + 1) * g]) for j in range(groups)])
    y = int_linear_epilogue(acc, a_scale, a_offset, w_scale, w_offset_sum, bias)
    if gelu:
        y = torch.nn.functional.gelu(y)
    return y.to(out_dtype)


def weight_block_sums(q_w: torch.Tensor, block: int) -> torch.Tensor:
    """``bs[n, j] = sum_{k in block j} q_w[n, k]`` of codes ``[N, K]`` -> ``[N, K // block]`` fp32
    (integers, exact): the weight factor of a block-scaled linear's offset term."""
    n, k = q_w.shape
    if k % block:
        raise ValueError(f"act_block={block} does not divide the weight's K={k}")
    return q_w.reshape(n, k // block, block).to(torch.int32).sum(dim=-1).float()


def promote_block(p: torch.Tensor, acc: torch.Tensor, a_scale_j: torch.Tensor, a_offset_j: torch.Tensor | None,
                  w_block_sums_j: torch.Tensor, w_scale_j: torch.Tensor | None) -> torch.Tensor:
    """One block's step of :func:`int_linear_blocks_epilogue`: ``p + (acc * S_a_j + c_a_j * bs_j) [* s_w_j]``.

    ``p [M, N]`` fp32, ``acc [M, N]`` the block's exact sum (int32 or its fp32 value), ``a_scale_j,
    a_offset_j [M, 1]`` (``a_offset_j`` None: symmetric), ``w_block_sums_j [1, N]``, ``w_scale_j
    [1, N]`` the weight group's scale (None: row-wise weights, applied after the last block)."""
    t = acc.float() * a_scale_j
    if a_offset_j is not None:  # zeros (symmetric) leave t unchanged: t is never -0
        t = t + a_offset_j * w_block_sums_j
    if w_scale_j is not None:
        t = t * w_scale_j
    return p + t


def int_linear_blocks_epilogue(
    block_sums: Iterable[torch.Tensor], a_scale: torch.Tensor, a_offset: torch.Tensor | None,
    w_scale: torch.Tensor, w_block_sums: torch.Tensor, bias: torch.Tensor | None, step: Callable = promote_block,
) -> torch.Tensor:
    """The block-scaled linear's fp32 promotion and epilogue, without its GELU and output cast:
    ``p = sum_j (acc_j * S_a[:, j] + c_a[:, j] * bs[:, j]) [* s_w group of j]``, blocks in order from
    ``p = 0`` (:func:`promote_block`), then ``p * s_w + bias`` (row-wise weights) or ``p + bias`` (grouped).

    ``block_sums``: the exact ``a_j @ q_w_j.T`` of each block j in order, ``[M, N]`` int32 or its
    exact fp32 value; ``a_scale, a_offset [M, J]`` (``a_offset`` None or zeros for symmetric codes),
    ``w_scale [N, G]``, ``w_block_sums [N, J]``, ``bias [N]`` or None; ``step``: :func:`promote_block`
    or a compiled copy of it (the CPU backend's). The one statement of this order:
    :func:`int_linear_blocks_reference` and the CPU backend call it.
    """
    (m, blocks), n, groups = a_scale.shape, w_scale.shape[0], w_scale.shape[-1]
    s_a, s_w = a_scale.float(), w_scale.float()
    c_a = None if a_offset is None else a_offset.float()
    p = torch.zeros(m, n, dtype=torch.float32, device=a_scale.device)
    for j, acc in enumerate(block_sums):
        p = step(p, acc, s_a[:, j:j + 1], None if c_a is None else c_a[:, j:j + 1],
                 w_block_sums[:, j].float().reshape(1, n), s_w[:, j * groups // blocks].reshape(1, n) if groups > 1 else None)
    y = p * s_w.reshape(1, n) if groups == 1 else p
    if bias is not None:
        y = y + bias.float().reshape(1, n)
    return y


def int_linear_blocks_reference(
    a: torch.Tensor, a_scale: torch.Tensor, a_offset: torch.Tensor | None,  # the activation codes and parameters
    q_w: torch.Tensor, w_scale: torch.Tensor, w_block_sums: torch.Tensor,  # the weight's
    bias: torch.Tensor | None, gelu: bool = False, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The block-scaled integer linear (module doc: the fp32 order every kernel follows): exact
    int32 sums per block, then :func:`int_linear_blocks_epilogue`.

    Shapes: ``a [M, K]`` int8, ``a_scale, a_offset [M, J]`` (``a_offset`` None or zeros for
    symmetric codes), ``q_w [N, K]`` int8 (unpacked), ``w_scale [N, G]`` (G = 1 row-wise, else
    ``K // G`` a multiple of the block ``B = K // J``), ``w_block_sums [N, J]``
    (:func:`weight_block_sums`), ``bias [N]`` or None.
    """
    (m, k), blocks = a.shape, a_scale.shape[-1]
    groups = w_scale.shape[-1]
    if a_scale.shape != (m, blocks) or k % blocks or groups > blocks or blocks % groups:
        raise ValueError(f"int_linear_blocks_reference: a {tuple(a.shape)}, a_scale {tuple(a_scale.shape)} and "
                         f"w_scale {tuple(w_scale.shape)} do not describe K / blocks / weight groups")
    b = k // blocks
    sums = (int_matmul(a[:, j * b:(j + 1) * b], q_w[:, j * b:(j + 1) * b]) for j in range(blocks))
    y = int_linear_blocks_epilogue(sums, a_scale, a_offset, w_scale, w_block_sums, bias)
    if gelu:
        y = torch.nn.functional.gelu(y)
    return y.to(out_dtype)
