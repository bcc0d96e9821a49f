"""What Triton makes of the block-scaled GEMM for sm_90, without a GPU (issue 23: why the block kernels stay near 20 %).

Compiles ``backends/triton/block_gemm_kernels.block_linear_kernel`` ahead of time for sm_90 (Triton's bundled
ptxas; pointer and size arguments marked 16-byte divisible as a real launch specializes them) for a few tiles, and
reports what bounds overlap: shared memory per CTA (how many CTAs share an SM), wgmma instructions, the
``wgmma.wait_group`` depths (0: each block's MMAs are waited for before its promotion starts, so inside a CTA the
tensor cores idle while the CUDA cores promote) and the asynchronous copies (the pipelined loads).

    python benchmarks/block_kernel_ptx.py
"""
from __future__ import annotations

import argparse
import re

#: (BLOCK_M, BLOCK_N, num_warps, stages): the tuned tiles of backends/triton/tuned_block_sm90.json and a 128 x 128
TILES = ((128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3))
_ARGS = ["a_ptr", "w_ptr", "sa_ptr", "ca_ptr", "sw_ptr", "bs_ptr", "bias_ptr", "out_ptr", "M", "N", "K", "J", "G"]
_TYPES = ["*i8", "*i8", "*fp32", "*fp32", "*fp32", "*fp32", "*fp16", "*fp16", "i32", "i32", "i32", "i32", "i32"]
_DIVISIBLE = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10)  # pointers, N and K


def compile_tile(block_m: int, block_n: int, warps: int, stages: int, offset: bool = True) -> dict:
    """Facts of the sm_90 build of the block linear kernel for one tile (128-wide K blocks, fp16 out, bias)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qfx.backends.triton.block_gemm_kernels import block_linear_kernel

    consts = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, SUB=1, HAS_OFFSET=offset, GROUPED=False,
                  HAS_BIAS=True, GELU=False, STAGES=stages, GROUP_M=8, ERF=1)
    signature = dict(zip(_ARGS, _TYPES)) | {name: "constexpr" for name in consts}
    attrs = {(i,): [["tt.divisibility", 16]] for i in _DIVISIBLE}
    kernel = triton.compile(ASTSource(fn=block_linear_kernel, signature=signature, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    return {"tile": f"{block_m}x{block_n} w{warps} s{stages}", "smem_bytes": kernel.metadata.shared,
            "wgmma": ptx.count("wgmma.mma_async"),
            "wait_depths": sorted(set(int(d) for d in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx))),
            "async_copies": ttgir.count("async_copy_global_to_local"), "triton": triton.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--symmetric", action="store_true", help="no offset term (symmetric activation codes)")
    args = ap.parse_args()
    print("| tile | shared memory / CTA | CTAs / SM by shared memory | wgmma | wgmma.wait_group depths | async copies | Triton |")
    print("|---|---|---|---|---|---|---|")
    for tile in TILES:
        r = compile_tile(*tile, offset=not args.symmetric)
        print(f"| {r['tile']} | {r['smem_bytes']} | {228 * 1024 // max(r['smem_bytes'], 1)} | {r['wgmma']} | "
              f"{r['wait_depths']} | {r['async_copies']} | {r['triton']} |")


if __name__ == "__main__":
    main()
