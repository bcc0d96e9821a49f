"""Per-part GEMM speedup vs M from qfx's cost model, per target (like the paper's Figure 1).

For each target (sm_80 A100, sm_86 A6000, sm_89 L4, sm_90 H100) and BERT-base / BERT-large,
the modelled speedup of each layer part's GEMM (QKV, attention-out, FFN-in, FFN-out):
INT4 over INT8 (solid, the paper's Figure 1 quantity; GEMMs alone, int32 output) and INT4 over
cuBLAS fp16 (dashed; qfx's GEMM with its dequant epilogue as built today, without the quantize
of its input). The paper's two A6000 points
(BERT-large, M = 12288) are drawn on the sm_86 panel; on sm_90 INT4 runs on INT8 tensor cores,
so its INT4/INT8 line is 1. Everything here is MODELLED (qfx/tune/cost_model.py), not measured.

    python benchmarks/plot_cost_model.py [--out benchmarks/cost_model_speedup.png] [--csv out.csv]
"""
from __future__ import annotations

import argparse
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qfx.targets import get_target  # noqa: E402
from qfx.tune import cost_model as cm  # noqa: E402
from qfx.tune import evidence  # noqa: E402

TARGETS = ("sm_80", "sm_86", "sm_89", "sm_90")
MODELS = ("bert-base", "bert-large")
MS = [128 * 2**i for i in range(0, 10)]  # 128 .. 65536
COLORS = {"qkv": "tab:blue", "attn_out": "tab:orange", "ffn_in": "tab:green", "ffn_out": "tab:red"}


def speedups(target: str, model: str) -> list[dict]:
    t = get_target(target)
    rows = []
    for part, n, k in cm.MODEL_SHAPES[model].parts():
        for m in MS:
            i8 = cm.gemm_time(t, m, n, k, "int8", out_bytes=4.0).us
            i4 = cm.gemm_time(t, m, n, k, "int4", out_bytes=4.0).us
            f16 = cm.part_time(t, part, m, n, k, "fp16").us
            # qfx's GEMM with its dequant epilogue as built today (a separate kernel on sm_8x)
            q4 = cm.part_time(t, part, m, n, k, "int4", quantize_input=False).us
            rows.append(dict(target=target, gpu=t.gpu, model=model, part=part, m=m, n=n, k=k,
                             int8_us=i8, int4_us=i4, fp16_us=f16, int4_over_int8=i8 / i4, int4_over_fp16=f16 / q4))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/cost_model_speedup.png")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    fig, axes = plt.subplots(len(TARGETS), len(MODELS), figsize=(11, 3.2 * len(TARGETS)), sharex=True)
    everything = []
    for i, target in enumerate(TARGETS):
        for j, model in enumerate(MODELS):
            ax = axes[i][j]
            rows = speedups(target, model)
            everything += rows
            for part, color in COLORS.items():
                mine = [r for r in rows if r["part"] == part]
                ax.plot([r["m"] for r in mine], [r["int4_over_int8"] for r in mine], "-o", ms=3, color=color, label=f"{part} int4/int8")
                ax.plot([r["m"] for r in mine], [r["int4_over_fp16"] for r in mine], "--", color=color, alpha=0.6)
            if target == "sm_86" and model == "bert-large":
                for part, value in evidence.PAPER_FIGURE1.items():
                    ax.plot([12288], [value], "*", ms=12, color=COLORS[part], markeredgecolor="k")
                ax.annotate("paper (A6000, M=12288)", (12288, 1.96), textcoords="offset points", xytext=(-120, 8), fontsize=8)
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{target} ({rows[0]['gpu']}), {model}: MODELLED", fontsize=9)
            ax.set_ylabel("speedup")
            if i == len(TARGETS) - 1:
                ax.set_xlabel("M = batch x seq")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle("qfx cost model: INT4 over INT8 GEMM (solid) and INT4 GEMM+epilogue over cuBLAS fp16 (dashed)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(everything[0]))
            w.writeheader()
            w.writerows(everything)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
