"""qfx.train under torchrun: 2 CPU processes, gloo, DDP and FSDP2; same result as one process,
resume, and resume on another number of processes.

The worker is the single-process code unchanged; only torchrun's environment differs. With
dropout off and loss terms that are means over equal halves of the global batch (Logit KD,
CE), DDP's averaged gradients equal the one-process gradients, so the trained weights agree;
FSDP2 computes the same gradients sharded. Checkpoints hold full state dicts, so a run stopped
on 2 processes finishes in 1.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qfx import train as qat

from test_qat_kd import W4A4, _example, tiny_classifier, toy_data

_WORKER = textwrap.dedent(
    """
    import os, sys, torch
    sys.path[:0] = [{tests!r}, {e2e!r}]  # tests/ (models.py) and tests/e2e/ (test_qat_kd.py)
    from test_qat_kd import tiny_classifier, toy_data, _example, W4A4
    from qfx import train as qat
    from qfx.train.checkpoint import model_and_optim_state
    torch.set_num_threads(1)
    qat.init_distributed()  # gloo: no GPU here
    rank = qat.world()[0]
    stop_after = int(sys.argv[1]) if sys.argv[1] != "-" else None
    sharding, tag = sys.argv[2], sys.argv[3]
    teacher, data = tiny_classifier(dropout=0.0), toy_data(64)
    student = qat.make_student(teacher, W4A4, _example())
    cfg = qat.TrainConfig(steps=4, batch_size=8, lr=1e-3, eval_every=2, ckpt_dir=os.path.join({ckpt!r}, tag), ckpt_every=1,
                          keep_best=False, progress=False, stop_after=stop_after, sharding=sharding)
    res = qat.distill(teacher, student, data, data, cfg, qat.KDWeights(logit=1.0, att=0.0, rep=0.0, ce=1.0))
    params = model_and_optim_state(student, None)[0]  # full weights, also when FSDP shards them
    torch.save({{"params": params, "history": res.history, "steps": res.steps_done,
                "resumed_from": res.resumed_from}}, os.path.join({out!r}, f"{{tag}}_rank{{rank}}.pt"))
    torch.distributed.barrier()  # both ranks done with every collective before either tears gloo down
    torch.distributed.destroy_process_group()
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
    (tmp_path / "worker.py").write_text(_WORKER.format(tests=str(Path(__file__).resolve().parents[1]), e2e=str(Path(__file__).resolve().parent), ckpt=str(ckpt), out=str(out)))
    _torchrun(tmp_path, "2", "ddp", "ddp")  # "killed" after 2 steps (stop_after), checkpoint written by rank 0
    assert torch.load(ckpt / "ddp" / "last.pt", weights_only=False)["step"] == 2
    shutil.copytree(ckpt / "ddp", ckpt / "one")  # the same stopped run, resumed below by one process
    _torchrun(tmp_path, "-", "ddp", "ddp")  # the same command resumes and finishes
    ranks = [torch.load(out / f"ddp_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["steps"] == 4 and r["resumed_from"] == 2 for r in ranks)
    for k, v in ranks[0]["params"].items():  # DDP keeps the replicas identical
        assert torch.equal(v, ranks[1]["params"][k]), k

    teacher, data = tiny_classifier(dropout=0.0), toy_data(64)
    cfg = qat.TrainConfig(steps=4, batch_size=8, lr=1e-3, eval_every=2, keep_best=False, progress=False)
    kdw = qat.KDWeights(logit=1.0, att=0.0, rep=0.0, ce=1.0)
    single = qat.make_student(teacher, W4A4, _example())
    res = qat.distill(teacher, single, data, data, cfg, kdw)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["params"][k], v.detach(), atol=2e-5, rtol=1e-4, msg=k)
    assert [h["step"] for h in res.history] == [h["step"] for h in ranks[0]["history"]]
    assert [h["dev_acc"] for h in res.history] == pytest.approx([h["dev_acc"] for h in ranks[0]["history"]], abs=1.5 / len(data))

    # Another world size: the 2-process checkpoint finishes in this single process.
    resumed = qat.make_student(teacher, W4A4, _example())
    res1 = qat.distill(teacher, resumed, data, data, replace(cfg, ckpt_dir=str(ckpt / "one")), kdw)
    assert res1.resumed_from == 2 and res1.steps_done == 4 and res1.history[0] == ranks[0]["history"][0]
    for k, v in resumed.state_dict().items():
        torch.testing.assert_close(ranks[0]["params"][k], v.detach(), atol=2e-5, rtol=1e-4, msg=k)

    # FSDP2: parameters, gradients and optimizer state sharded over the 2 processes; same weights.
    _torchrun(tmp_path, "-", "fsdp", "fsdp")
    fsdp = torch.load(out / "fsdp_rank0.pt", weights_only=False)
    assert fsdp["steps"] == 4
    for k, v in ranks[0]["params"].items():
        torch.testing.assert_close(fsdp["params"][k], v, atol=2e-5, rtol=1e-4, msg=k)
