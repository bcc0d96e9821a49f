"""qfx.qat under torchrun: 2 CPU processes, gloo, DDP; same result as one process, and resume.

The worker is the single-process code unchanged; only torchrun's environment differs. With
dropout off and loss terms that are means over equal halves of the global batch (Logit KD,
CE), DDP's averaged gradients equal the one-process gradients, so the trained weights agree.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qfx import qat

from test_qat_kd import W4A4, _example, tiny_classifier, toy_data

_WORKER = textwrap.dedent(
    """
    import os, sys, torch
    import torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_qat_kd import tiny_classifier, toy_data, _example, W4A4
    from qfx import qat
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    stop_after = int(sys.argv[1]) if len(sys.argv) > 1 else None
    teacher, data = tiny_classifier(dropout=0.0), toy_data(64)
    student = qat.make_student(teacher, W4A4, _example())
    cfg = qat.TrainConfig(steps=4, batch_size=8, lr=1e-3, eval_every=2, ckpt_dir={ckpt!r}, ckpt_every=1,
                          keep_best=False, progress=False, stop_after=stop_after)
    res = qat.distill(teacher, student, data, data, cfg, qat.KDWeights(logit=1.0, att=0.0, rep=0.0, ce=1.0))
    torch.save({{"params": dict(student.named_parameters()), "history": res.history, "steps": res.steps_done,
                "resumed_from": res.resumed_from}}, os.path.join({out!r}, f"rank{{rank}}.pt"))
    dist.destroy_process_group()
    """
)


def _torchrun(tmp_path: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(tmp_path / "worker.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def test_ddp_gloo_two_processes_match_one_process_and_resume(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    (tmp_path / "worker.py").write_text(_WORKER.format(tests=str(Path(__file__).parent), ckpt=str(ckpt), out=str(out)))
    _torchrun(tmp_path, "2")  # "killed" after 2 steps (stop_after), checkpoint written by rank 0
    assert torch.load(ckpt / "last.pt", weights_only=False)["step"] == 2
    _torchrun(tmp_path)  # the same command resumes and finishes
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["steps"] == 4 and r["resumed_from"] == 2 for r in ranks)
    for k, v in ranks[0]["params"].items():  # DDP keeps the replicas identical
        assert torch.equal(v, ranks[1]["params"][k]), k

    teacher, data = tiny_classifier(dropout=0.0), toy_data(64)
    single = qat.make_student(teacher, W4A4, _example())
    cfg = qat.TrainConfig(steps=4, batch_size=8, lr=1e-3, eval_every=2, keep_best=False, progress=False)
    res = qat.distill(teacher, single, data, data, cfg, qat.KDWeights(logit=1.0, att=0.0, rep=0.0, ce=1.0))
    for k, v in single.named_parameters():
        torch.testing.assert_close(ranks[0]["params"][k], v.detach(), atol=2e-5, rtol=1e-4, msg=k)
    assert [h["step"] for h in res.history] == [h["step"] for h in ranks[0]["history"]]
    assert [h["dev_acc"] for h in res.history] == pytest.approx([h["dev_acc"] for h in ranks[0]["history"]], abs=1.5 / len(data))
