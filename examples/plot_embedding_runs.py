"""One picture of many ``embedding_qat.py`` runs: top-1 neighbour agreement against mean cosine.

    python examples/plot_embedding_runs.py examples/results_embedding_h100 examples/results_h100_emb_rotation/emb_* \\
        --out examples/results_h100_emb_rotation/cosine_vs_top1.png

Reads each folder's ``results.json`` and draws one dot per evaluated model (PTQ / QAT, W8A8 / W4A4,
with or without rotation; fp32 left out), x = mean cosine to the fp32 embeddings, y = top-1
neighbour agreement over all held-out texts, with the issue's goals (0.97 cosine, 90 % top-1) as
lines. The point it makes: top-1 follows cosine along one curve, whatever produced the model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(folders: list[str]) -> list[dict]:
    """Every non-fp32 row of every ``results.json``, labelled with the folder's tag."""
    out = []
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: pass folders written by embedding_qat.py --out")
        data = json.loads(path.read_text())
        tag = data.get("meta", {}).get("tag") or Path(folder).name
        for row in data["rows"]:
            if row["model"] != "fp32":
                out.append({**row, "run": tag})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", help="folders written by embedding_qat.py --out")
    ap.add_argument("--out", default="cosine_vs_top1.png")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = rows(args.folders)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for r in data:
        w4 = "W4A4" in r["model"]
        colour = ("#2ca02c" if "QAT" in r["model"] else "#d62728") if w4 else "#1f77b4"
        ax.scatter(r["cos_mean"], r["top1"] * 100, c=colour, marker="o" if "rot" in r["model"] else "s", s=28, zorder=3)
    ax.axvline(0.97, color="grey", ls="--", lw=0.8)
    ax.axhline(90, color="grey", ls="--", lw=0.8)
    ax.text(0.968, 12, "goal: cosine 0.97", fontsize=7, color="grey", ha="right")
    ax.text(0.62, 91.5, "goal: top-1 90 %", fontsize=7, color="grey")
    handles = [plt.Line2D([], [], ls="", marker=m, color=c, label=lab) for m, c, lab in (
        ("s", "#d62728", "PTQ W4A4"), ("s", "#2ca02c", "QAT W4A4"), ("s", "#1f77b4", "W8A8 (PTQ, QAT)"),
        ("o", "#2ca02c", "circles: rotated inputs (rot128)"))]
    ax.legend(handles=handles, fontsize=8, loc="center left")
    ax.set_xlabel("mean cosine to fp32 (held-out texts)")
    ax.set_ylabel("top-1 neighbour same as fp32 (%)")
    ax.set_title(f"all-MiniLM-L6-v2: top-1 agreement follows cosine ({len(data)} compiled models)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"{len(data)} models from {len(args.folders)} runs -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
