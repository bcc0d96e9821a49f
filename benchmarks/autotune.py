"""The autotuned plan against the fixed strategies: BERT-base as called, on the GPU present.

For each batch x seq (default 1x128, 8x128, 32x128, 128x128) one table row gives the median
latency (ms) of ``compiled(**batch)`` (CUDA events, warm-up, the runtime's CUDA graphs on) for

    all-fp16     qfx.compile(model, mode="fp16")
    all-<mode>   qfx.compile(model, mode=<mode>)                 every part quantized ("qall")
    q3-only      the same with skip=("qkv", "attn_out", "ffn_out"): only FFN-in quantized
    autotuned    qfx.compile(model, mode=<mode>, tune=Scenario.of(batch=bs, seq=seq))

with the plan the autotuner chose (precision per part), the best fixed strategy and the ratio
autotuned / best fixed (<= 1.00 is the goal), plus the time of the first compile with tune
(cold cache: a fresh cache directory) and of a second one with the same scenario (warm cache).
The model is random-init BERT-base from benchmarks/e2e.py (post-training quantization: the
timing does not depend on the weights).

    python benchmarks/autotune.py [--mode int8] [--shapes 1x128,8x128] [--iters 30] [--out results.json]
    python benchmarks/autotune.py --dry-run [--target sm_86]   # no GPU: the modelled plans, on the CPU

``--dry-run`` captures the model on the CPU and prints the plans :func:`qfx.tune.select.choose_parts`
makes from the cost model for ``--target`` (marked modelled), with the modelled time of the tuned
GEMM parts under each strategy (float parts left out: no choice changes them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import CONFIGS, batch, load, median_ms  # noqa: E402  (the e2e model builders and timer)

import qfx  # noqa: E402
from qfx.tune import Scenario  # noqa: E402
from qfx.tune.autotune import fixed_strategies  # noqa: E402

DEFAULT_SHAPES = "1x128,8x128,32x128,128x128"
PARTS = ("qkv", "attn_out", "ffn_in", "ffn_out")
_INT_TAGS = {"W8A8": "int8", "W4A4": "int4"}


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        raise SystemExit(f"--shapes {text!r}: write batch x seq pairs like 1x128,32x128") from None


def plan_of(compiled) -> dict[str, str]:
    """Precision per part of a compiled model, read from its report (``"mixed"`` when the
    layers disagree)."""
    seen: dict[str, set[str]] = {}
    for row in compiled.report().linears:
        if row.role in PARTS:
            tag = row.precision.split()[0]  # "W8A8 sym" -> int8, as the dry run names it
            seen.setdefault(row.role, set()).add("fp16" if row.backend == "float" else _INT_TAGS.get(tag, tag))
    return {p: (v.pop() if len(v) == 1 else "mixed") for p in PARTS if (v := seen.get(p))}


def _plan_text(plan: dict[str, str]) -> str:
    return " ".join(f"{p}={v}" for p, v in plan.items())


def _compile(model, mode: str, target: str, example, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
        return qfx.compile(model, mode=mode, target=target, example_kwargs=example, **kw)


def _cpu_example(bs: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, 2000, (bs, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def modelled_rows(model: torch.nn.Module, target: str, shapes, mode: str) -> list[dict]:
    """The dry run: capture ``model`` on the CPU and, per shape, the modelled plan and the
    modelled time (us) of its tuned GEMM parts under each strategy."""
    from qfx.capture import capture
    from qfx.config import config_for_mode
    from qfx.passes.annotate import annotate
    from qfx.tune.select import choose_parts

    gm = annotate(capture(model, (), _cpu_example()), config_for_mode(mode))
    rows = []
    for bs, seq in shapes:
        decision = choose_parts(gm, target, Scenario.of(batch=bs, seq=seq), measure=False, progress=False,
                                max_seq=gm.meta["qfx_capture"].max_seq_len)
        us = {name: decision.total_us(rule) for name, rule in fixed_strategies(mode).items()}
        us["autotuned"] = decision.total_us()
        rows.append(_row(bs, seq, {k: v / 1000 for k, v in us.items()}, decision.chosen(), decision.source))
    return rows


def _row(bs: int, seq: int, ms: dict[str, float], plan: dict[str, str], source: str, **extra) -> dict:
    fixed = {k: v for k, v in ms.items() if k != "autotuned"}
    best = min(fixed, key=fixed.get)
    return dict(bs=bs, seq=seq, ms=ms, plan=plan, best_fixed=best, ratio=ms["autotuned"] / fixed[best], source=source,
                **extra)


def measured_rows(args, shapes) -> list[dict]:
    target = qfx.detect_target().name
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="qfx-autotune-")
    os.environ["QFX_CACHE_DIR"] = cache_dir  # read when a tune runs: a fresh directory is a cold cache
    print(f"GPU: {torch.cuda.get_device_name()} ({target}); autotune cache: {cache_dir}", flush=True)
    model = load(args.model)
    example = batch(2, 16)
    skip_q3 = tuple(p for p in PARTS if p != "ffn_in")
    fixed = {}
    for name, kw in (("all-fp16", dict(mode="fp16")), (f"all-{args.mode}", dict(mode=args.mode)),
                     ("q3-only", dict(mode=args.mode, skip=skip_q3))):
        t0 = time.perf_counter()
        fixed[name] = _compile(model, kw["mode"], target, example, skip=kw.get("skip", ()))
        print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for bs, seq in shapes:
        scenario = Scenario.of(batch=bs, seq=seq)
        t0 = time.perf_counter()
        cold = _compile(model, args.mode, target, example, tune=scenario)
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tuned = _compile(model, args.mode, target, example, tune=scenario)
        warm_s = time.perf_counter() - t0
        plan = plan_of(tuned)
        if plan != plan_of(cold):
            raise RuntimeError(f"{bs}x{seq}: the warm-cache compile chose {plan}, the cold one {plan_of(cold)}")
        del cold
        x = batch(bs, seq)
        ms = {name: median_ms(lambda cm=cm: cm(**x), args.iters) for name, cm in fixed.items()}
        ms["autotuned"] = median_ms(lambda: tuned(**x), args.iters)
        row = _row(bs, seq, ms, plan, "measured", compile_cold_s=cold_s, compile_warm_s=warm_s,
                   tuner=tuned.report().plan_origin)
        print(f"{bs}x{seq}: " + "  ".join(f"{k}={v:.3f}" for k, v in ms.items())
              + f"  plan {_plan_text(plan)}  compile cold {cold_s:.1f} s warm {warm_s:.1f} s", flush=True)
        rows.append(row)
        del tuned
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict], unit: str) -> None:
    names = list(rows[0]["ms"])
    timed = any("compile_cold_s" in r for r in rows)
    head = ["bs x seq", *names, "plan chosen", "best fixed", "autotuned / best fixed"]
    head += ["compile cold s", "compile warm s"] if timed else []
    print(f"\n{unit}")
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for r in rows:
        cells = [f"{r['bs']} x {r['seq']}", *(f"{r['ms'][k]:.4f}" for k in names), _plan_text(r["plan"]),
                 r["best_fixed"], f"{r['ratio']:.3f}"]
        cells += [f"{r['compile_cold_s']:.1f}", f"{r['compile_warm_s']:.1f}"] if timed else []
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Autotuned plan vs fixed strategies (all-fp16, all-int, q3-only), "
                                             "BERT-base as called on the GPU present.")
    ap.add_argument("--model", default="bert-base", choices=sorted(CONFIGS) + ["minilm-l6"])
    ap.add_argument("--mode", default="int8", choices=("int8", "int4"), help="the quantized precision of the strategies")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="batch x seq list, e.g. 1x128,8x128")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--cache-dir", default=None, help="autotune cache (default: a fresh temporary directory: cold)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: print the modelled plans for --target")
    ap.add_argument("--target", default="sm_90", help="--dry-run only: the target to model (sm_80/86/89/90)")
    ap.add_argument("--out", default=None, help="write the rows as JSON")
    args = ap.parse_args(argv)
    shapes = _shapes(args.shapes)
    if args.dry_run:
        rows = modelled_rows(load(args.model), args.target, shapes, args.mode)
        print_table(rows, f"{args.model} {args.mode} on {args.target}: MODELLED time of the tuned GEMM parts, ms "
                          "(cost model, not measured; float parts left out)")
        meta = {"target": args.target, "source": "modelled"}
    else:
        if not torch.cuda.is_available():
            print("benchmarks/autotune.py: no CUDA GPU visible; use --dry-run for the modelled plans", file=sys.stderr)
            return 2
        rows = measured_rows(args, shapes)
        print_table(rows, f"{args.model} {args.mode} as called (compiled(**batch), CUDA graphs), median ms")
        meta = {"gpu": torch.cuda.get_device_name(), "target": qfx.detect_target().name, "source": "measured"}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**meta, "model": args.model, "mode": args.mode, "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
