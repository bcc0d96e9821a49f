"""Where a batch-1 call spends host time: qfx int8 BERT-base as called vs its own graph replayed,
and the Python functions of the call path (cProfile), for the default (remove_padding="auto") and
remove_padding=False, with the attention_mask on the GPU and on the CPU (a tokenizer's).

    python benchmarks/host_overhead.py [--batch 1] [--seq 128] [--lengths full|uniform] [--calls 300] [--timeline]

(``--batch 128 --lengths uniform``: the packed calls of issue 24's traffic case, whose as-called
time exceeds the replay by more than the padded call's.)

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


def timeline(call) -> None:
    """One call as called (after a device synchronize) under torch.profiler: when the GPU starts and
    stops relative to the call, its idle gaps over 5 us, and the host ops that run before the first kernel.
    The profiler adds host time of its own (its "Activity Buffer Request" rows): read the order, not the sums."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("qfx call"):
            call()
        torch.cuda.synchronize()
    events = prof.events()
    span = next(e for e in events if e.name == "qfx call")
    t0, t1 = span.time_range.start, span.time_range.end
    gpu = sorted((e for e in events if e.device_type.name == "CUDA" and e.name != "qfx call"),  # not the annotation's GPU span
                 key=lambda e: e.time_range.start)
    if not gpu:
        print("timeline: no GPU activity recorded")
        return
    first, last = gpu[0].time_range.start, max(e.time_range.end for e in gpu)
    busy = sum(e.time_range.end - e.time_range.start for e in gpu)
    print(f"timeline: call on the host {t1 - t0:.0f} us; first GPU activity at +{first - t0:.0f} us, last ends at "
          f"+{last - t0:.0f} us; GPU busy {busy:.0f} us of {last - first:.0f}", flush=True)
    end = gpu[0].time_range.end
    for e in gpu[1:]:
        if e.time_range.start - end > 5:
            print(f"  GPU idle {e.time_range.start - end:6.0f} us at +{end - t0:.0f} before {e.name[:60]}")
        end = max(end, e.time_range.end)
    host = [e for e in events if e.device_type.name == "CPU" and e.name != "qfx call" and t0 <= e.time_range.start < first
            and e.time_range.end - e.time_range.start > 3]
    for e in sorted(host, key=lambda e: e.time_range.start)[:25]:
        print(f"  host +{e.time_range.start - t0:6.0f} us {e.time_range.end - e.time_range.start:6.0f} us {e.name[:70]}")
    for e in gpu[:6]:
        print(f"  gpu  +{e.time_range.start - t0:6.0f} us {e.time_range.end - e.time_range.start:6.0f} us {e.name[:70]}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lengths", choices=("full", "uniform"), default="full", help="uniform: real lengths in [seq/4, seq]")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--timeline", action="store_true", help="also one call's GPU start / idle gaps / host ops (torch.profiler)")
    args = ap.parse_args(argv)
    target = qfx.detect_target()
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
          f" | {args.model} {args.batch}x{args.seq} int8, lengths {args.lengths}", flush=True)
    model = load(args.model)
    for remove_padding in ("auto", False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
            cm = qfx.compile(model, mode="int8", target=target.name, example_kwargs=batch(2, 16),
                             remove_padding=remove_padding)
        for where in ("cuda", "cpu"):
            x = batch(args.batch, args.seq, args.lengths == "uniform")
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
            if args.timeline:
                with torch.inference_mode():
                    timeline(call)
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
            print("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:4000], flush=True)


if __name__ == "__main__":
    main()
