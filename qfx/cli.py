"""The qfx command line: ``python -m qfx demo | compile | report | bench | plan``.

Each command is a small function ``(args) -> exit code``; the parser is built once by
:func:`build_parser`. MODEL is a local folder with a HF encoder (``config.json`` + weights; a
sentence-transformers folder works too) and defaults to the packaged all-MiniLM-L6-v2.
Nothing is downloaded.

Example::

    $ python -m qfx demo --repeat 1
    $ python -m qfx report --mode int4 --target sm_89
    $ python -m qfx bench --modes fp32,int8,int4 --batch 8 --seq 128
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Sequence

from qfx.config import MODES

__all__ = ["main", "build_parser"]

_PLAN_MISSING_EXIT = 2
_EXAMPLE_TEXTS = ("qfx compiles encoders to integer GEMMs.", "A short one.")


def _add_model_args(p: argparse.ArgumentParser, modes: bool = True) -> None:
    p.add_argument("model", nargs="?", default=None, help="local model folder (default: the packaged all-MiniLM-L6-v2)")
    if modes:
        p.add_argument("--mode", default="int4", choices=MODES, help="precision (default int4)")
    p.add_argument("--target", default="cpu", help="cpu, sm_80, sm_86, sm_89 or sm_90 (default cpu)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m qfx",
        description="qfx: W4A4 / W8A8 integer transformer encoders from a torch.fx graph.",
        epilog="'python -m qfx COMMAND --help' for the options of one command.",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    from qfx.embeddings.demo import add_arguments

    demo = sub.add_parser("demo", help="compile the packaged MiniLM to int8/int4 and explain the result")
    add_arguments(demo)
    comp = sub.add_parser("compile", help="compile a model and check it against the float model")
    _add_model_args(comp)
    comp.add_argument("--asym", action="store_true", help="asymmetric activations (default symmetric)")
    comp.add_argument("--report", action="store_true", help="also print the full compile report")
    rep = sub.add_parser("report", help="print the compile report (each linear's precision, backend)")
    _add_model_args(rep)
    rep.add_argument("--asym", action="store_true", help="asymmetric activations (default symmetric)")
    bench = sub.add_parser("bench", help="time the forward pass per mode on random tokens")
    _add_model_args(bench, modes=False)
    bench.add_argument("--modes", default="fp32,int8,int4", help="comma list of fp32, fp16, int8, int4 (default fp32,int8,int4)")
    bench.add_argument("--batch", type=int, default=8, help="sequences per batch (default 8)")
    bench.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    bench.add_argument("--repeat", type=int, default=10, help="timed calls per mode (default 10)")
    sub.add_parser("plan", help="per-target execution plan (options: python -m qfx plan --help)", add_help=False)
    return ap


def _load(model_dir: str | None):
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from qfx.models import minilm_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = model_dir or str(minilm_path())
    try:
        model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"qfx: cannot load a model from {path!r} ({str(e).splitlines()[0]}); pass a local folder with config.json and weights")
    return path, model, tok


def _compile(args):
    import qfx
    from qfx.config import config_for_mode

    path, model, tok = _load(args.model)
    batch = dict(tok(list(_EXAMPLE_TEXTS), padding=True, return_tensors="pt"))
    config = config_for_mode(args.mode)  # None for fp16
    if config is not None:
        config = config.with_(symmetric=not args.asym)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
        compiled = qfx.compile(model, mode=args.mode, target=args.target, example_kwargs=batch, config=config)
    return path, model, batch, compiled, time.perf_counter() - start


def _cmd_demo(args) -> int:
    from qfx.api import require_device
    from qfx.embeddings.demo import run_demo

    if args.target is not None:  # before any model is loaded or moved to a GPU that is not there
        require_device(args.target)
    return run_demo(target=args.target, model_dir=args.model_dir, repeat=args.repeat, report=args.report, threads=args.threads)


def _cmd_compile(args) -> int:
    import torch

    path, model, batch, compiled, secs = _compile(args)
    rep = compiled.report()
    with torch.no_grad():
        ref = model(**batch)[0].float()
        got = compiled(**batch)[0].float().cpu()
    from qfx.runtime.agreement import real_token_cosine

    cos = real_token_cosine(ref, got, batch.get("attention_mask"))  # padded positions are not compared
    backends = sorted({r.backend for r in rep.quantized})
    print(f"compiled {type(model).__name__} from {path} in {secs:.1f} s: mode={args.mode} target={args.target} ({rep.execution})")
    print(f"  {len(rep.quantized)} linears on integer GEMMs ({', '.join(backends) or 'none'}), "
          f"{len(rep.linears) - len(rep.quantized)} left in float; weights from {rep.origin}")
    print(f"  check on {len(_EXAMPLE_TEXTS)} example texts: output cosine to the float model over real tokens {float(cos.min()):.4f} (min)")
    if args.report:
        print(rep.render(width=140))
    else:
        print("  every linear's role, precision and backend: python -m qfx report (or --report)")
    return 0


def _cmd_report(args) -> int:
    _, _, _, compiled, _ = _compile(args)
    print(compiled.report().render(width=140))
    return 0


def _cmd_bench(args) -> int:
    import torch

    import qfx

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("fp32", "fp16", "int8", "int4")]
    if bad or not modes:
        raise SystemExit(f"qfx bench: --modes {args.modes!r}: use a comma list of fp32, fp16, int8, int4")
    if args.batch < 1 or args.seq < 2 or args.repeat < 1:
        raise SystemExit("qfx bench: need --batch >= 1, --seq >= 2, --repeat >= 1")
    tgt = qfx.api.require_device(args.target)
    path, model, _ = _load(args.model)
    device = torch.device("cuda" if tgt.device == "cuda" else "cpu")
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    low = 1000 if vocab > 2000 else 5  # above BERT's special and unused ids
    ids = torch.randint(low, vocab, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    print(f"bench {type(model).__name__} from {path} on {tgt.name}: batch {args.batch} x {args.seq} tokens, {args.repeat} timed calls")
    print(f"{'mode':6s} {'ms/batch':>9s} {'vs fp32':>8s}")
    base = None
    for mode in modes:
        if mode == "fp32":
            net = model.to(device)
            fn = lambda: net(**{k: v.to(device) for k, v in batch.items()})  # noqa: E731
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
                net = qfx.compile(model.cpu(), mode=mode, target=tgt.name, example_kwargs=batch)
            fn = lambda: net(**batch)  # noqa: E731
        with torch.no_grad():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.repeat):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / args.repeat * 1e3
        base = base if base is not None else (ms if mode == "fp32" else None)
        print(f"{mode:6s} {ms:9.2f} {(f'{base / ms:.2f}x' if base else '-'):>8s}")
    if tgt.device == "cpu":
        print("(cpu: the exact reference backend shows the numbers, not the speed; time a GPU target for speed)")
    return 0


def _cmd_plan(argv: Sequence[str]) -> int:
    try:
        from qfx.tune.cli import plan_main
    except ImportError as e:
        if getattr(e, "name", None) not in ("qfx.tune", "qfx.tune.cli"):
            raise
        print("qfx plan: not available in this build (qfx.tune is not installed)", file=sys.stderr)
        return _PLAN_MISSING_EXIT
    return int(plan_main(list(argv)) or 0)


_COMMANDS = {"demo": _cmd_demo, "compile": _cmd_compile, "report": _cmd_report, "bench": _cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (``python -m qfx`` exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plan":  # its own parser lives in qfx.tune.cli
        return _cmd_plan(argv[1:])
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    try:
        return _COMMANDS[args.command](args)
    except ValueError as e:  # qfx's bad-input errors say what to fix: show them without a traceback
        print(f"qfx {args.command}: {e}", file=sys.stderr)
        return 2
