"""Training throughput on the visible GPU(s): fine-tuning vs QAT + KD, 1 or N GPUs, side by side.

Per model (random-init BERT from its config) and mode, the trainer of qfx.train itself
(``finetune`` / ``distill``: data prefetch, DDP under torchrun, AdamW, grad clipping) runs
``--warmup`` steps and then ``--steps`` timed steps at a per-GPU batch of 32:

    ft        fine-tuning with cross-entropy, float parts under bf16 autocast (fp32 master
              weights): the "fp16" baseline of issue 11
    w8a8      QAT + KD (Logit + Att* + Rep, the frozen teacher's forward included), W8A8
    w4a4      the same, W4A4 (int4 codes on INT8 tensor cores through torch._int_mm)

    model       batch x seq   per GPU
    bert-base   32 x 128
    bert-large  32 x 384

Printed: step time (ms, wall clock between two device synchronizes around the timed steps,
divided by the steps), examples/s (global batch x steps / time), the QAT / ft step ratio and
peak memory. ``--json`` saves the rows; ``--compare`` a saved 1-GPU file puts the 1-GPU
numbers beside this run's and adds the scaling efficiency ex/s(N) / (N x ex/s(1)).

    python benchmarks/train.py --json benchmarks/train_1gpu.json
    torchrun --nproc-per-node 2 benchmarks/train.py --json benchmarks/train_2gpu.json --compare benchmarks/train_1gpu.json

A mode with the suffix ``+c`` (``ft+c``, ``w4a4+c``) trains with ``TrainConfig(compile=True)``:
the training forward through torch.compile (Inductor; not bit-identical to eager, see
TrainConfig). "vs ft step" is always against the eager ``ft`` row of the same model.

``--accumulator fp64`` times the QAT modes with the old float64 accumulator (what the twin
computed before torch._int_mm), for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone

import torch
from transformers import BertConfig, BertForSequenceClassification

import qfx
from qfx import numerics
from qfx import train as kd

CONFIGS = {
    "bert-base": (dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072), 128),
    "bert-large": (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096), 384),
}
MODES = {"ft": None, "w8a8": qfx.QuantConfig(8, 8), "w4a4": qfx.QuantConfig(4, 4)}
PER_GPU_BATCH = 32
_TEACHERS: dict = {}


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bert-base,bert-large")
    p.add_argument("--modes", default="ft,w8a8,w4a4")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--precision", default="bf16", choices=tuple(kd.PRECISIONS))
    p.add_argument("--sharding", default="ddp", choices=("ddp", "fsdp"))
    p.add_argument("--accumulator", default="int8", choices=("int8", "fp64"), help="QAT twin's exact accumulator")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--compare", default=None, help="a --json file of a 1-GPU run: print it beside this one")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="profile the timed steps (torch.profiler) and write one op table per model and mode into DIR")
    return p.parse_args(argv)


def _data(seq: int, n: int, vocab: int) -> kd.EncodedData:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (n, seq), generator=g).tolist()  # full-length: no padding
    return kd.EncodedData(ids, [i % 2 for i in range(n)], 0, 2)


class _Clock:
    """post_step hook: synchronize and time from the end of warm-up to the last step;
    with ``profile`` the timed steps also run under torch.profiler (times then include its cost)."""

    def __init__(self, warmup: int, total: int, device: torch.device, profile: bool = False) -> None:
        self.warmup, self.total, self.device, self.done, self.t0, self.t1 = warmup, total, device, 0, None, None
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) if profile else None

    def __call__(self) -> None:
        self.done += 1
        if self.done in (self.warmup, self.total):
            torch.cuda.synchronize(self.device)
            if self.done == self.warmup:
                self.t0 = time.perf_counter()
                torch.cuda.reset_peak_memory_stats(self.device)
                if self.prof is not None:
                    self.prof.__enter__()
            else:
                self.t1 = time.perf_counter()
                if self.prof is not None:
                    self.prof.__exit__(None, None, None)


def _write_profile(prof, path: str, steps: int) -> dict:
    """The op table (self CUDA time) and the per-step GPU busy time of one profiled run."""
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) / steps
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / steps
    with open(path, "w") as f:
        f.write(f"per step: GPU busy {gpu_us / 1e3:.1f} ms, {kernels:.0f} GPU kernels/copies\n\n")
        f.write(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=60))
        f.write("\n\nby CPU time:\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    return {"gpu_busy_ms": gpu_us / 1e3, "gpu_kernels_per_step": kernels}


def _run(name: str, mode: str, args, device: torch.device, world: int) -> dict:
    cfg_kw, seq = CONFIGS[name]
    base, compiled = mode.removesuffix("+c"), mode.endswith("+c")
    if base not in MODES:
        raise SystemExit(f"--modes: unknown mode {mode!r}; use {', '.join(MODES)}, each optionally with +c (torch.compile)")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=2, max_position_embeddings=512, **cfg_kw)).to(device).train()
    total = args.warmup + args.steps
    gbatch = PER_GPU_BATCH * world
    data = _data(seq, gbatch * 4, model.config.vocab_size)
    tcfg = kd.TrainConfig(steps=total, batch_size=gbatch, lr=1e-5, eval_every=10**9, keep_best=False, progress=False,
                          precision=args.precision, sharding=args.sharding, log_every=10**9, compile=compiled)
    clock = _Clock(args.warmup, total, device, profile=bool(args.profile))
    row = {"model": name, "mode": mode, "batch": PER_GPU_BATCH, "seq": seq, "gpus": world, "precision": args.precision}
    try:
        if MODES[base] is None:
            kd.finetune(model, data, None, tcfg, post_step=clock)
        else:
            example = data.batch([0, 1], device)[0]
            if name not in _TEACHERS:  # same seed, same weights: one capture serves every QAT mode
                _TEACHERS[name] = kd.make_teacher(model, example)
            teacher = _TEACHERS[name]
            student = kd.make_student(model, MODES[base], example)
            del model
            kd.distill(teacher, student, data, None, tcfg, kd.KDWeights(), post_step=clock)
    except torch.OutOfMemoryError as e:
        row["error"] = str(e).splitlines()[0]
        return row
    secs = clock.t1 - clock.t0
    if clock.prof is not None:
        os.makedirs(args.profile, exist_ok=True)
        row.update(_write_profile(clock.prof, os.path.join(args.profile, f"{name}_{mode}.txt"), args.steps))
    row.update(step_ms=1e3 * secs / args.steps, ex_per_s=gbatch * args.steps / secs,
               peak_gib=torch.cuda.max_memory_allocated(device) / 2**30)
    return row


def _table(rows: list[dict], base: dict[tuple, dict]) -> str:
    ft = {(r["model"], r["gpus"]): r for r in rows if r["mode"] == "ft" and "step_ms" in r}
    head = ["model", "b x s / GPU", "mode"]
    if base:
        head += ["1 GPU step (ms)", "1 GPU ex/s"]
    n = rows[0]["gpus"] if rows else 1
    head += [f"{n} GPU step (ms)", f"{n} GPU ex/s", "vs ft step", "peak GiB"] + (["scaling eff."] if base else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['batch']} x {r['seq']}", r["mode"]]
        b = base.get((r["model"], r["mode"]))
        if base:
            cells += [f"{b['step_ms']:.1f}", f"{b['ex_per_s']:.0f}"] if b and "step_ms" in b else ["", ""]
        if "step_ms" not in r:
            cells += [r.get("error", "failed")[:80], "", "", ""] + ([""] if base else [])
        else:
            f = ft.get((r["model"], r["gpus"]))
            cells += [f"{r['step_ms']:.1f}", f"{r['ex_per_s']:.0f}", f"{r['step_ms'] / f['step_ms']:.2f}x" if f else "", f"{r['peak_gib']:.1f}"]
            if base:
                cells.append(f"{r['ex_per_s'] / (r['gpus'] * b['ex_per_s']):.2f}" if b and "ex_per_s" in b else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = _args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/train.py needs a CUDA GPU")
    device = kd.init_distributed() or torch.device("cuda", 0)
    rank, world = kd.world()
    if args.accumulator == "fp64":  # the float64 accumulator the twin used before torch._int_mm
        numerics.int_matmul = lambda a, b, tensor_cores=None: numerics.int_matmul_reference(a, b)
    rows = []
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            row = _run(name, mode, args, device, world)
            rows.append(row)
            torch.cuda.empty_cache()
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank == 0:
        base = {}
        if args.compare:
            base = {(r["model"], r["mode"]): r for r in json.load(open(args.compare))["rows"]}
        print(f"\n{torch.cuda.get_device_name(device)} x {world}, torch {torch.__version__}, {args.precision} autocast, "
              f"{args.steps} timed steps after {args.warmup}, accumulator {args.accumulator}, {args.sharding}\n")
        print(_table(rows, base))
        if args.json:
            meta = {"device": torch.cuda.get_device_name(device), "gpus": world, "torch": torch.__version__,
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": vars(args)}
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return rows


if __name__ == "__main__":
    main()
