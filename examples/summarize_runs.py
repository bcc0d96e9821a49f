"""Summarize several ``qat_sentiment.py`` runs (different ``--seed``): mean and spread per model.

    python examples/summarize_runs.py out/seed42 out/seed43 out/seed44 --out out/summary

Reads each run's ``results.json``; writes ``summary.md`` (a markdown table: per-seed test
accuracy, mean ± sample standard deviation, the gap to the teacher of the same seed and the
compiled-vs-fake-quant gaps) and ``seeds.png`` (each student's gap to its teacher, one dot
per seed, with the issue's goals as lines).
Runs with the same seed (say, one with ``--only w4a4,asym`` and one with ``--only sparse``)
are merged into one column; their teachers were trained identically, and if their test
accuracies differ (GPU training is not bit-deterministic) the first is kept and a note is
printed. A model missing from a seed is averaged over the seeds that have it.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

TEACHER = "teacher fp32"


def load(dirs: list[str]) -> list[dict]:
    """One merged result per seed, in order of first appearance."""
    by_seed: dict[int, dict] = {}
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: pass folders written by qat_sentiment.py --out")
        run = json.loads(path.read_text())
        merged = by_seed.setdefault(run["seed"], {**run, "models": {}})
        for name, m in run["models"].items():
            if name in merged["models"]:
                if name == TEACHER and merged["models"][name]["test_acc"] != m["test_acc"]:
                    print(f"note: seed {run['seed']}: teacher test accuracy {m['test_acc']:.4f} in {d} differs from "
                          f"{merged['models'][name]['test_acc']:.4f}; keeping the first")
                continue
            merged["models"][name] = m
    return list(by_seed.values())


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def table(runs: list[dict]) -> str:
    names = list(dict.fromkeys(n for r in runs for n in r["models"]))
    seeds = [r["seed"] for r in runs]
    head = ["model", *[f"seed {s}" for s in seeds], "mean ± sd (%)", "runs", "gap to own teacher, mean ± sd (pt)",
            "compiled fp32 - fake, per run (pt)", "compiled fp16 - fake, mean (pt)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        accs = [100 * r["models"][name]["test_acc"] if name in r["models"] else None for r in runs]
        have = [a for a in accs if a is not None]
        mean, sd = _mean_sd(have)
        # each student against the teacher of its own seed (the seed also changes the teacher)
        gaps = [100 * (m["test_acc"] - r["models"][TEACHER]["test_acc"]) for r in runs if (m := r["models"].get(name)) and TEACHER in r["models"]]
        gap, gap_sd = _mean_sd(gaps) if gaps else (float("nan"), float("nan"))
        twin = [100 * (m["compiled_acc"] - m["test_acc"]) for r in runs if (m := r["models"].get(name)) and m.get("compiled_acc") is not None]
        fast = [100 * (m["compiled_fp16_acc"] - m["test_acc"]) for r in runs if (m := r["models"].get(name)) and m.get("compiled_fp16_acc") is not None]
        lines.append("| " + " | ".join([
            name, *["" if a is None else f"{a:.2f}" for a in accs], f"{mean:.2f} ± {sd:.2f}", str(len(have)),
            "" if name == TEACHER else f"{gap:+.2f} ± {gap_sd:.2f}",
            " / ".join(f"{d:+.2f}" for d in twin), f"{statistics.fmean(fast):+.2f}" if fast else "",
        ]) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """Gap of each student to the teacher of its own seed, one dot per seed, with the goals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted((n for n in dict.fromkeys(n for r in runs for n in r["models"]) if n != TEACHER), key=lambda n: (not n.startswith("PTQ"), n))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.8))
    for i, name in enumerate(names):
        gaps = [100 * (m["test_acc"] - r["models"][TEACHER]["test_acc"]) for r in runs if (m := r["models"].get(name)) and TEACHER in r["models"]]
        ax.scatter(gaps, [i] * len(gaps), color="C0", alpha=0.7, label="one seed" if i == 0 else None)
        ax.scatter([statistics.fmean(gaps)], [i], color="C3", marker="|", s=300, label="mean over seeds" if i == 0 else None)
    ax.axvline(0, color="k", lw=1, label="teacher of the same seed")
    for x, style, label in ((-0.2, ":", "goal W8A8 (-0.2)"), (-0.5, "--", "goal W4A4 (-0.5)"), (-1.0, "-.", "goal W4A4 + 2:4 (-1.0)")):
        ax.axvline(x, color="0.4", lw=1, ls=style, label=label)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set(xlabel="test accuracy minus the fp32 teacher's (pt)", title=f"QAT + KD on Rotten Tomatoes, MiniLM-L6: {len(runs)} seeds")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
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
