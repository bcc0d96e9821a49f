"""Do int4 codes run exactly on the H100's FP8 tensor cores? (issue 23: the next idea for block-scaled W4A4)

Why ask: the block-scaled kernels are bound by their CUDA-core promotion (benchmarks/RESULTS.md, "Block-scaled
activations"). On INT8 wgmma every K block's int32 accumulator must first become fp32 (an integer add at half the
fp32 rate, then a subtract) before its scale multiply and the add into the running sum: per output element and
block of 128, ~0.039 SM cycles of CUDA-core work against ~0.031 of tensor-core work, so even a perfect overlap caps
the kernel near 80 % of peak. Every int4 code (-8..7) is an e4m3 number exactly, and so is every sum the FP8 wgmma
would form from them: |sum| <= 64 K, an integer, exact in fp32 up to K = 2^18. If the FP8 MMA added its products
into the fp32 accumulator without loss, a W4A4 block kernel would get each block's sum as fp32 from the tensor cores
and its promotion would be one multiply and one add (~0.016 cycles: half the tensor-core time, hideable). But
Hopper's FP8 MMA is reported to keep only about 14 bits when it adds into the accumulator (DeepSeek-V3 technical
report, Sec. 3.3.2, measured on H800), which is why FP8 GEMMs promote every 128 K. Integer sums of int4 products
below 2^13 (K <= 128) may fit in 14 bits, or may not: this probe measures it.

Per K and code pattern it compares with the exact integer sums:

1. Triton ``tl.dot`` of float8_e4m3fn tiles into a chained fp32 accumulator, ``BLOCK_K`` codes per dot (what a
   block kernel would run inside one activation block), the hardware's own accumulation (Triton's default on
   sm_90: no intermediate promotion) and, as the control, Triton promoting after every dot;
2. ``torch._scaled_mm`` (cuBLASLt FP8, unit scales, fp32 out), with and without fast accumulation.

Patterns (see :func:`patterns`): uniform codes, extreme codes (-8 / 7), all products +64 (the largest sum), a large
sum then many +1 products (a small addend after a large accumulator), and the reverse order.

    python benchmarks/fp8_int4_probe.py            # on an sm_90 GPU; prints one row per case
"""
from __future__ import annotations

import argparse
import functools

import torch

#: K lengths probed: within one activation block (32..128) and beyond it (a whole BERT K)
KS = (32, 64, 128, 256, 512, 1024, 3072)


def patterns(m: int, n: int, k: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Named (A [m, k], W [n, k]) int4 code pairs (int8 tensors with values in -8..7), on the CPU."""
    g = torch.Generator().manual_seed(seed)

    def codes(*shape, lo=-8, hi=7):
        return torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int8)

    def extremes(*shape):
        return torch.where(torch.rand(shape, generator=g) < 0.5, torch.tensor(-8, dtype=torch.int8),
                           torch.tensor(7, dtype=torch.int8))

    half = k // 2
    big_small = torch.full((1, k), 1, dtype=torch.int8)
    big_small[:, :half] = -8  # products 64 over the first half, then 1: a small addend after a large sum
    small_big = big_small.flip(1)
    return {
        "uniform": (codes(m, k), codes(n, k)),
        "extreme": (extremes(m, k), extremes(n, k)),
        "all +64": (torch.full((m, k), -8, dtype=torch.int8), torch.full((n, k), -8, dtype=torch.int8)),
        "big then +1": (big_small.expand(m, k).contiguous(), big_small.expand(n, k).contiguous()),
        "+1 then big": (small_big.expand(m, k).contiguous(), small_big.expand(n, k).contiguous()),
    }


def exact_sums(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w.T`` of int8 codes as exact int64 (on the CPU)."""
    return a.long().cpu() @ w.long().cpu().T


def as_e4m3(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes as float8_e4m3fn, checked exact (every integer in -8..7 is an e4m3 number)."""
    f = codes.float().to(torch.float8_e4m3fn)
    if not torch.equal(f.float(), codes.float()):
        raise ValueError("codes outside -8..7 are not exact in e4m3")
    return f


def compare(got: torch.Tensor, want: torch.Tensor) -> tuple[bool, float, float]:
    """(equal, fraction of elements that differ, largest |difference|) of fp32 results against exact sums."""
    diff = (got.double().cpu() - want.double()).abs()
    return bool((diff == 0).all()), float((diff != 0).double().mean()), float(diff.max())


@functools.cache
def _dot_kernel():
    """The probe's Triton kernel, defined once (Triton caches its builds per function object)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(a_ptr, w_ptr, out_ptr, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               IMPRECISE: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :])
            w = tl.load(w_ptr + rn[None, :] * K + (k0 + rk)[:, None])
            if IMPRECISE == 0:
                acc = tl.dot(a, w, acc)  # the hardware's accumulation (Triton's sm_90 default)
            else:
                acc = tl.dot(a, w, acc, max_num_imprecise_acc=IMPRECISE)  # promoted after every IMPRECISE of K
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc)

    return kernel


def _triton_dot(a8: torch.Tensor, w8: torch.Tensor, block_k: int, promote_each_dot: bool) -> torch.Tensor:
    m, k = a8.shape
    n = w8.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=a8.device)
    _dot_kernel()[(m // 64, n // 64)](a8, w8, out, n, k, BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k,
                                      IMPRECISE=block_k if promote_each_dot else 0, num_warps=4)
    return out


def _scaled_mm(a8: torch.Tensor, w8: torch.Tensor, fast: bool) -> torch.Tensor:
    one = torch.ones((), device=a8.device)
    return torch._scaled_mm(a8, w8.T, scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=fast)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, default=128, help="rows of A and of W (multiples of 64)")
    ap.add_argument("--ks", type=int, nargs="+", default=list(KS), help="K lengths (multiples of 128)")
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("needs a GPU with FP8 tensor cores (sm_89 / sm_90)")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; fp32 results of int4 codes on FP8 MMAs "
          "against the exact integer sums")
    print("| source | K per MMA step | pattern | K | max |exact sum| | equal | elements wrong | max error |")
    print("|---|---|---|---|---|---|---|---|")
    for k in args.ks:
        for name, (a, w) in patterns(args.m, args.m, k).items():
            want = exact_sums(a, w)
            a8, w8 = as_e4m3(a).cuda(), as_e4m3(w).cuda()
            runs = [("triton, hardware accumulation", bk, lambda bk=bk: _triton_dot(a8, w8, bk, False))
                    for bk in (32, 64, 128)]
            runs += [("triton, promoted after every dot (control)", 32, lambda: _triton_dot(a8, w8, 32, True))]
            runs += [(f"torch._scaled_mm, use_fast_accum={fast}", "-", lambda fast=fast: _scaled_mm(a8, w8, fast))
                     for fast in (True, False)]
            for source, step, run in runs:
                try:
                    ok, frac, err = compare(run(), want)
                    print(f"| {source} | {step} | {name} | {k} | {int(want.abs().max())} | {ok} | {frac:.4%} | {err:g} |")
                except Exception as e:  # noqa: BLE001 - a source that cannot run this case says why, the rest go on
                    print(f"| {source} | {step} | {name} | {k} | | error: {type(e).__name__}: {str(e)[:120]} | | |")


if __name__ == "__main__":
    main()
