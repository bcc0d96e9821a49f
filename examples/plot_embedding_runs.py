"""One picture of many ``embedding_qat.py`` runs: top-1 neighbour agreement against mean cosine.

    python examples/plot_embedding_runs.py examples/results_embedding_h100 examples/results_h100_emb_rotation/emb_* \\
        --out examples/results_h100_emb_rotation/cosine_vs_top1.png

Reads each folder's ``results.json`` and draws one dot per evaluated model (PTQ / QAT, W8A8 / W4A8 /
W8A4 / W4A4, with or without rotation; fp32 left out; the right panel zooms on cosine >= 0.94), x = mean cosine to the fp32 embeddings, y = top-1
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


#: the right panel starts here (the models near the goals)
ZOOM_FROM = 0.94
#: (legend label, colour); W8A4 (8-bit weights, 4-bit activations) bounds what 4-bit activations allow
LEGEND = (("PTQ W4A4", "#d62728"), ("QAT W4A4", "#2ca02c"), ("W8A4 (PTQ, QAT)", "#ff7f0e"),
          ("W4A8 (PTQ, QAT)", "#9467bd"), ("W8A8 (PTQ, QAT)", "#1f77b4"))


def _colour(model: str) -> str:
    """The legend colour of a row named like ``QAT W4A4 rot128 +GPTQ``."""
    if "W4A4" in model:
        return dict(LEGEND)["QAT W4A4" if "QAT" in model else "PTQ W4A4"]
    for precision in ("W8A4", "W4A8", "W8A8"):
        if precision in model:
            return dict(LEGEND)[f"{precision} (PTQ, QAT)"]
    raise ValueError(f"row {model!r} names no precision this plot knows (W4A4, W8A4, W4A8, W8A8)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", help="folders written by embedding_qat.py --out")
    ap.add_argument("--out", default="cosine_vs_top1.png")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = rows(args.folders)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1, 1.2]})
    for ax, zoom in zip(axes, (False, True)):
        for r in data:
            if zoom and r["cos_mean"] < ZOOM_FROM:
                continue
            ax.scatter(r["cos_mean"], r["top1"] * 100, c=_colour(r["model"]),
                       marker="o" if "rot" in r["model"] else "s", s=28, zorder=3)
        ax.axvline(0.97, color="grey", ls="--", lw=0.8)
        ax.axhline(90, color="grey", ls="--", lw=0.8)
        ax.text(0.9695, 57 if zoom else 12, "goal: cosine 0.97", fontsize=7, color="grey", ha="right")
        ax.text(ZOOM_FROM + 0.001 if zoom else 0.62, 91, "goal: top-1 90 %", fontsize=7, color="grey")
        ax.set_xlabel("mean cosine to fp32 (held-out texts)")
        ax.grid(alpha=0.3)
    axes[1].set_xlim(ZOOM_FROM, 1.0005)
    axes[1].set_title(f"zoom: cosine >= {ZOOM_FROM}", fontsize=9)
    axes[0].set_ylabel("top-1 neighbour same as fp32 (%)")
    handles = [plt.Line2D([], [], ls="", marker="s", color=c, label=lab) for lab, c in LEGEND]
    handles.append(plt.Line2D([], [], ls="", marker="o", color="grey", label="circles: rotated inputs (rot128)"))
    axes[0].legend(handles=handles, fontsize=8, loc="center left")
    fig.suptitle(f"all-MiniLM-L6-v2: top-1 agreement follows cosine ({len(data)} compiled models)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"{len(data)} models from {len(args.folders)} runs -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
