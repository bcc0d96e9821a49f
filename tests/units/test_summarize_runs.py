"""examples/summarize_runs.py: runs of one seed merge; each student is compared with its own seed's teacher."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import load_script

sr = load_script("examples/summarize_runs.py")


def _run(tmp: Path, name: str, seed: int, models: dict) -> str:
    d = tmp / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"seed": seed, "models": models}))
    return str(d)


def _m(acc, compiled=None):
    return {"test_acc": acc} | ({"compiled_acc": compiled} if compiled is not None else {})


def test_merges_seeds_and_measures_gaps_against_the_own_teacher(tmp_path, capsys):
    dirs = [
        _run(tmp_path, "s1a", 1, {"teacher fp32": _m(0.80), "W4A4": _m(0.79, 0.79)}),
        _run(tmp_path, "s1b", 1, {"teacher fp32": _m(0.81), "2:4": _m(0.78, 0.78)}),  # teacher differs: first kept
        _run(tmp_path, "s2", 2, {"teacher fp32": _m(0.90), "W4A4": _m(0.91, 0.905)}),
    ]
    runs = sr.load(dirs)
    assert [r["seed"] for r in runs] == [1, 2] and set(runs[0]["models"]) == {"teacher fp32", "W4A4", "2:4"}
    assert "keeping the first" in capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in sr.table(runs).splitlines()[2:]}
    # W4A4: gaps -1.00 (seed 1) and +1.00 (seed 2): mean 0 even though the teachers differ by 10 pt
    assert rows["W4A4"][3] == "85.00 ± 8.49" and rows["W4A4"][5] == "+0.00 ± 1.41"
    assert rows["W4A4"][6] == "+0.00 / -0.50"
    assert rows["2:4"][1:3] == ["78.00", ""] and rows["2:4"][5].startswith("-2.00")  # seed 1 only
    sr.plot(runs, tmp_path / "seeds.png")
    assert (tmp_path / "seeds.png").stat().st_size > 0


def test_missing_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json does not exist"):
        sr.load([str(tmp_path)])
