"""One GEMM of each kind inside an NVTX range named ``prof``, for Nsight Compute: where the
block-scaled kernel's time goes beside the token-wise CUTLASS kernel on the same shape.

    ncu --nvtx --nvtx-include "prof/" --section SpeedOfLight --section ComputeWorkloadAnalysis \\
        --section WarpStateStats --section InstructionStats --print-details all \\
        python benchmarks/block_gemm_profile.py --variant blk

Variants (the rows of ``gemm.py --block 128``): ``tok`` (CUTLASS token-wise, asymmetric), ``blk``
(Triton block-scaled, asymmetric: the offset term per block), ``blk_sym`` (no offset term).
Each is called twice first (compile, tuned tile lookup), then once inside the range.
``--config <name>`` runs ``tok`` on that row of backends/cutlass/configs.py instead of the dispatcher's
choice (e.g. the short-K epilogue-tile candidates: ``--role qkv --m 16384 --config
sm90_s8_pp_128x128x128_c2x1_e64x128``).
"""
from __future__ import annotations

import argparse

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=("tok", "blk", "blk_sym"), required=True)
    ap.add_argument("--h", type=int, default=768)
    ap.add_argument("--role", default="ffn_out")
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--config", default=None, help="tok only: this CUTLASS config instead of the dispatcher's")
    args = ap.parse_args(argv)
    if args.config and args.variant != "tok":
        ap.error("--config names a CUTLASS token-wise config: use it with --variant tok")

    import qfx.backends.cutlass as qc
    from gemm import ROLES, _block_sets
    from qfx.backends.triton import block_gemm as bg

    n, k = ROLES[args.role][0] * args.h, ROLES[args.role][1] * args.h
    s = _block_sets(args.m, n, k, 128, torch.device("cuda"))[0][0]
    if args.variant == "tok":
        def run():
            return qc.int_linear(s["a"], s["tok_scale"], s["tok_offset"], s["w"], 8, s["w_scale"], s["w_offset_sum"],
                                 s["bias"], False, torch.float16, config=args.config)
    else:
        def run():
            return bg.int_linear_blocks(s["a"], s["a_scale"], s["a_offset"], s["w"], 8, s["w_scale"],
                                        s["w_block_sums"], s["bias"], False, torch.float16, 8, 128,
                                        symmetric=args.variant == "blk_sym")
    run(), run()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("prof")
    run()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    print(f"{args.variant} h={args.h} {args.role} M={args.m} N={n} K={k}: "
          f"tile {bg.config_for(args.m, n, k) if args.variant != 'tok' else args.config or 'cutlass dispatch'}")


if __name__ == "__main__":
    main()
