"""Print the cost model's check against every published Ampere/Ada speedup as a markdown table
(for benchmarks/RESULTS.md): published ratio, modelled ratio, error, whether the row was used in
a fit, and the source. Nothing here is measured by qfx; the model is
qfx/tune/cost_model.py, the rows qfx/tune/data/published_ampere.json.

    python benchmarks/cost_model_check.py
"""
from __future__ import annotations

from qfx.tune import evidence


def main() -> int:
    checks = evidence.check_published()
    print("| GPU | workload | speedup | engine | published | modelled | error | use | source |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    sources = {}
    for c in checks:
        r = c.row
        what = f"{r['model']} {r['batch']}x{r['seq']}" if r["kind"] == "model" else f"{r['part']} GEMM {r['m']}x{r['n']}x{r['k']}"
        use = "held out" if c.held_out else "fit"
        note = " (outside: see KNOWN_OUTSIDE)" if c.known_outside else ""
        cite = r["source"].rsplit("(", 1)[-1].rstrip(")") if "https://" in r["source"] else r["source"]
        ref = sources.setdefault(cite, f"[{len(sources) + 1}]")
        print(f"| {r['gpu'].replace('NVIDIA ', '')} | {what} | {r['fast']}/{r['slow']} | {r['pipeline']} | "
              f"{c.published:.2f} | {c.modelled:.2f} | {c.error:+.1%}{note} | {use} | {ref} |")
    inside = [c for c in checks if c.known_outside is None]
    print(f"\n{len(inside)} of {len(checks)} rows within {evidence.TOLERANCE:.0%} (worst {max(abs(c.error) for c in inside):.1%}); "
          f"held out and within: {sum(c.held_out for c in inside)}.")
    for src, ref in sources.items():
        print(f"{ref} {src}")
    reasons = {c.known_outside for c in checks if c.known_outside}
    for why in reasons:
        print(f"\nOutside {evidence.TOLERANCE:.0%}: {why}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
