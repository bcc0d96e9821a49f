"""Where a batch-1 call spends host time: qfx int8 BERT-base as called vs its own graph replayed,
and the Python functions of the call path (cProfile), for the default (remove_padding="auto") and
remove_padding=False, with the attention_mask on the GPU and on the CPU (a tokenizer's).

    python benchmarks/host_overhead.py [--seq 128] [--calls 300]

"as called" is timed as benchmarks/e2e.py times it (CUDA events around one call after a device
synchronize: the host time before the replay starts counts); "host" is the wall time of the call
without waiting for the GPU (what the host spends per call when it runs ahead).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import batch, load, median_ms  # noqa: E402

import qfx  # noqa: E402


def host_us(fn, calls: int) -> float:
    """Median host wall time of one call, the GPU left to run behind (synchronized every 8 calls)."""
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if i % 8 == 7:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args(argv)
    target = qfx.detect_target()
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
          f" | {args.model} 1x{args.seq} int8", flush=True)
    model = load(args.model)
    for remove_padding in ("auto", False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
            cm = qfx.compile(model, mode="int8", target=target.name, example_kwargs=batch(2, 16),
                             remove_padding=remove_padding)
        for where in ("cuda", "cpu"):
            x = batch(1, args.seq)
            if where == "cpu":
                x = {k: v.cpu() for k, v in x.items()}
            with torch.inference_mode():
                call = lambda: cm(**x)  # noqa: E731
                called = median_ms(call, 50)
                key = cm._graphs.last_key
                replay = median_ms(cm._graphs.graphs[key].graph.replay, 50) if key in cm._graphs.graphs else float("nan")
                host = host_us(call, args.calls)
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(args.calls):
                    call()
                prof.disable()
                torch.cuda.synchronize()
            print(f"\nremove_padding={remove_padding!r}, mask on {where}: as called {called:.3f} ms, replay {replay:.3f} ms, "
                  f"host {host:.0f} us per call | path {cm.last_path} route {cm.last_route}", flush=True)
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
            print("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:4000], flush=True)


if __name__ == "__main__":
    main()
