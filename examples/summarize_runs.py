"""Summarize several ``qat_sentiment.py`` runs (different ``--seed``): mean and spread per model.

    python examples/summarize_runs.py out/seed42 out/seed43 out/seed44 --out out/summary

Reads each run's ``results.json``; writes ``summary.md`` (a markdown table: per-seed test
accuracy, mean ± sample standard deviation, the mean gap to the teacher and the compiled-vs-
fake-quant gaps) and ``seeds.png`` (one dot per run and model, the teacher's mean as a line).
A model missing from a run is averaged over the runs that have it (the table says how many).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

TEACHER = "teacher fp32"


def load(dirs: list[str]) -> list[dict]:
    runs = []
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: pass folders written by qat_sentiment.py --out")
        runs.append(json.loads(path.read_text()))
    return runs


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def table(runs: list[dict]) -> str:
    names = list(dict.fromkeys(n for r in runs for n in r["models"]))
    seeds = [r["seed"] for r in runs]
    t_mean, _ = _mean_sd([100 * r["models"][TEACHER]["test_acc"] for r in runs if TEACHER in r["models"]])
    head = ["model", *[f"seed {s}" for s in seeds], "mean ± sd (%)", "runs", "mean gap to teacher (pt)",
            "compiled fp32 - fake, per run (pt)", "compiled fp16 - fake, mean (pt)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        accs = [100 * r["models"][name]["test_acc"] if name in r["models"] else None for r in runs]
        have = [a for a in accs if a is not None]
        mean, sd = _mean_sd(have)
        twin = [100 * (m["compiled_acc"] - m["test_acc"]) for r in runs if (m := r["models"].get(name)) and m.get("compiled_acc") is not None]
        fast = [100 * (m["compiled_fp16_acc"] - m["test_acc"]) for r in runs if (m := r["models"].get(name)) and m.get("compiled_fp16_acc") is not None]
        lines.append("| " + " | ".join([
            name, *["" if a is None else f"{a:.2f}" for a in accs], f"{mean:.2f} ± {sd:.2f}", str(len(have)),
            "" if name == TEACHER else f"{mean - t_mean:+.2f}",
            " / ".join(f"{d:+.2f}" for d in twin), f"{statistics.fmean(fast):+.2f}" if fast else "",
        ]) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in dict.fromkeys(n for r in runs for n in r["models"]) if n != TEACHER]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.8))
    for i, name in enumerate(names):
        accs = [100 * r["models"][name]["test_acc"] for r in runs if name in r["models"]]
        ax.scatter(accs, [i] * len(accs), color="C0", alpha=0.7, label="fake-quant, one seed" if i == 0 else None)
        ax.scatter([statistics.fmean(accs)], [i], color="C3", marker="|", s=300, label="mean" if i == 0 else None)
    teacher = [100 * r["models"][TEACHER]["test_acc"] for r in runs if TEACHER in r["models"]]
    if teacher:
        t = statistics.fmean(teacher)
        ax.axvline(t, color="k", lw=1, label="fp32 teacher")
        ax.axvspan(t - 0.5, t, color="k", alpha=0.07, label="within 0.5 pt")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set(xlabel="test accuracy (%)", title=f"QAT + KD students over {len(runs)} seeds")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="folders holding results.json")
    p.add_argument("--out", default=None, help="folder for summary.md and seeds.png (default: print only)")
    args = p.parse_args(argv)
    runs = load(args.runs)
    md = table(runs)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text(md + "\n")
        plot(runs, out / "seeds.png")
    return md


if __name__ == "__main__":
    main()
