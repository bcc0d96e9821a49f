"""GEMM benchmark of the qfx CUTLASS backend against torch's GEMMs on BERT shapes (H100).

For BERT-base (h=768) and BERT-large (h=1024) linears -- QKV (M,3h,h), attn-out (M,h,h),
FFN-in (M,4h,h), FFN-out (M,h,4h) -- and M from 128 to 65536, one run prints the throughput of

* qfx:    the int8 tensor-core kernel with the fused dequant epilogue (asymmetric activations,
          bias, fp16 out; the Hopper W4A4/W8A8 path), best config of the table per shape
          (autotuned here; the choice is written as data with --tuned-out);
* unfused: the same kernel with int32 output + the separate epilogue kernel;
* s32:    the same kernel with int32 output alone (no dequant: the epilogue's cost is qfx - s32);
* fp16:   cuBLAS through torch.mm (no bias, no dequant: a lower bound on its cost);
* int_mm: torch._int_mm + the dequant in torch ops;
* fp8:    torch._scaled_mm e4m3 with per-row/per-column scales (dequant included), bf16 out;

as TOPS (2MNK / time), the ratios qfx/fp16 and qfx/fp8, and the fraction of the 1979 TOPS
dense INT8 peak. Timing: each variant is captured in a CUDA graph of several calls cycling
over enough input copies to defeat the 50 MB L2, replayed; median per call.

    python benchmarks/gemm.py                      # full table
    python benchmarks/gemm.py --m 128 8192 --tuned-out tuned.json --json results.json

``--block 128``: instead, the block-scaled table (``QuantConfig(act_block=128)``, the Triton kernels
of backends/triton/block_gemm.py) beside the token-wise CUTLASS kernel and cuBLAS fp16:

* tok:     CUTLASS token-wise int8 GEMM, asymmetric, bias, fp16 out (its default dispatch config);
* blk:     block-scaled int8 GEMM, asymmetric (offset term per block), bias, fp16 out;
* blk_sym: the same for symmetric codes (no offset term);
* blk_q:   (ffn_in) the FFN-in producer: GEMM + bias + GELU + block quantize of its output (int8
           codes + scales written, no fp16 output), against tok+q: the token-wise GEMM with GELU
           then the separate CUTLASS quantize kernel.

W4A4 runs these same INT8 kernels (int4 codes are int8 values; sm_90 has no INT4 tensor cores).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

INT8_PEAK_TOPS = 1979.0  # H100 SXM dense INT8 / FP8 (HARDWARE.md)
L2_DEFEAT_BYTES = 150 << 20  # rotate inputs until a round trip touches 3x the 50 MB L2
MAX_INPUT_SETS = 8
ROLES = {  # role -> (N, K) as multiples of h
    "qkv": (3, 1), "attn_out": (1, 1), "ffn_in": (4, 1), "ffn_out": (1, 4),
}
M_DEFAULT = (128, 512, 2048, 8192, 16384, 65536)


def _time_graph(fn, sets, reps=5, min_calls=8):
    """Median seconds per call of fn(*set), captured in a CUDA graph cycling over ``sets``."""
    calls = max(min_calls, len(sets))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for s in sets:
            fn(*s)  # warm-up: lazy init, caches, JIT
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*sets[i % len(sets)])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3 / calls)
    del graph
    return statistics.median(times)


def _make_sets(m, n, k, device):
    """Random inputs for every variant; as many copies as needed to defeat L2."""
    per_set = m * k * 3 + n * k * 3 + m * n * 2  # int8 + fp16 operands, fp16 out
    count = max(1, min(MAX_INPUT_SETS, -(-L2_DEFEAT_BYTES // per_set)))
    sets = []
    for _ in range(count):
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
        sets.append({
            "a": a, "w": w,
            "a_scale": torch.rand(m, device=device) * 1e-2 + 1e-3,
            "a_offset": torch.randn(m, device=device) * 1e-2,
            "w_scale": torch.rand(n, 1, device=device) * 1e-2 + 1e-3,
            "w_offset_sum": torch.randn(n, device=device),
            "bias": torch.randn(n, device=device),
            "x16": torch.randn(m, k, device=device, dtype=torch.float16),
            "w16": torch.randn(n, k, device=device, dtype=torch.float16),
            "a8": torch.randn(m, k, device=device).to(torch.float8_e4m3fn),
            "w8": torch.randn(n, k, device=device).to(torch.float8_e4m3fn),
        })
    return sets


def _variants(qc, config):
    def qfx_fused(s):
        return qc.int_linear(s["a"], s["a_scale"], s["a_offset"], s["w"], 8, s["w_scale"],
                             s["w_offset_sum"], s["bias"], False, torch.float16, config=config)

    def qfx_unfused(s):  # bf16 output takes the int32 + epilogue-kernel path
        return qc.int_linear(s["a"], s["a_scale"], s["a_offset"], s["w"], 8, s["w_scale"],
                             s["w_offset_sum"], s["bias"], False, torch.bfloat16, config=config)
    return qfx_fused, qfx_unfused


def fp16_mm(s):
    return torch.mm(s["x16"], s["w16"].t())


def int_mm_dequant(s):
    acc = torch._int_mm(s["a"], s["w"].t())
    y = acc.float() * s["a_scale"][:, None] * s["w_scale"].reshape(1, -1)
    y = y + s["a_offset"][:, None] * s["w_offset_sum"][None] + s["bias"][None]
    return y.half()


def fp8_scaled_mm(s):
    return torch._scaled_mm(s["a8"], s["w8"].t(), scale_a=s["a_scale"][:, None],
                            scale_b=s["w_scale"].reshape(1, -1), bias=None,
                            out_dtype=torch.bfloat16)


def bench_shape(qc, configs, h, role, m, device):
    n, k = ROLES[role][0] * h, ROLES[role][1] * h
    sets = [(s,) for s in _make_sets(m, n, k, device)]
    ops = 2.0 * m * n * k
    row = {"h": h, "role": role, "m": m, "n": n, "k": k}
    per_config, failed = {}, {}
    for cfg in configs:
        fused, _ = _variants(qc, cfg)
        try:
            per_config[cfg] = _time_graph(fused, sets)
        except RuntimeError as e:  # a config this shape cannot run (can_implement): a row says so, the rest go on
            failed[cfg] = str(e).splitlines()[0][:200]
            print(f"# {role} h={h} M={m}: {cfg} failed: {failed[cfg]}", flush=True)
    if not per_config:
        raise RuntimeError(f"{role} h={h} M={m}: no config ran ({failed})")
    best = min(per_config, key=per_config.get)
    row["config"] = best
    row["per_config_us"] = {c: t * 1e6 for c, t in per_config.items()}
    if failed:
        row["failed_configs"] = failed
    times = {"qfx": per_config[best], "unfused": _time_graph(_variants(qc, best)[1], sets),
             "s32": _time_graph(lambda s: qc.int_matmul(s["a"], s["w"], config=best), sets),
             "fp16": _time_graph(fp16_mm, sets)}
    for name, fn in (("int_mm", int_mm_dequant), ("fp8", fp8_scaled_mm)):
        try:
            times[name] = _time_graph(fn, sets)
        except RuntimeError as e:  # e.g. _int_mm shape limits
            times[name] = float("nan")
            row[f"{name}_error"] = str(e).splitlines()[0]
    row["us"] = {kk: v * 1e6 for kk, v in times.items()}
    row["tops"] = {kk: ops / v / 1e12 for kk, v in times.items()}
    return row


def unpack_cost(qc, h, device):
    """Per-call cost of unpacking a packed int4 weight (the alternative to caching it)."""
    rows = []
    for role, (nm, km) in ROLES.items():
        n, k = nm * h, km * h
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
        t = _time_graph(qc.unpack_int4, [(packed,)])
        rows.append({"h": h, "role": role, "n": n, "k": k, "unpack_us": t * 1e6,
                     "packed_MiB": n * k / 2 / 2**20, "cached_int8_MiB": n * k / 2**20})
    return rows


def _block_sets(m, n, k, block, device):
    g = k // block
    count = max(1, min(MAX_INPUT_SETS, -(-L2_DEFEAT_BYTES // (m * k + n * k + m * n * 2))))
    return [({
        "a": torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device),
        "w": torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device),
        "a_scale": torch.rand(m, g, device=device) * 1e-3 + 1e-4, "a_offset": torch.randn(m, g, device=device) * 1e-2,
        "tok_scale": torch.rand(m, device=device) * 1e-3 + 1e-4, "tok_offset": torch.randn(m, device=device) * 1e-2,
        "w_scale": torch.rand(n, 1, device=device) * 1e-2 + 1e-3, "w_block_sums": torch.randn(n, g, device=device),
        "w_offset_sum": torch.randn(n, device=device), "bias": torch.randn(n, device=device),
        "x16": torch.randn(m, k, device=device, dtype=torch.float16),
        "w16": torch.randn(n, k, device=device, dtype=torch.float16),
    },) for _ in range(count)]


def bench_block_shape(qc, h, role, m, block, device):
    """One row of the block-scaled table (see the module doc)."""
    from qfx.backends.triton import block_gemm as bg

    n, k = ROLES[role][0] * h, ROLES[role][1] * h
    sets = _block_sets(m, n, k, block, device)

    def blk(s, symmetric=False):
        return bg.int_linear_blocks(s["a"], s["a_scale"], s["a_offset"], s["w"], 8, s["w_scale"], s["w_block_sums"],
                                    s["bias"], False, torch.float16, 8, block, symmetric=symmetric)

    def tok(s, gelu=False):
        return qc.int_linear(s["a"], s["tok_scale"], s["tok_offset"], s["w"], 8, s["w_scale"], s["w_offset_sum"],
                             s["bias"], gelu, torch.float16)

    times = {"fp16": _time_graph(fp16_mm, sets), "tok": _time_graph(tok, sets), "blk": _time_graph(blk, sets),
             "blk_sym": _time_graph(lambda s: blk(s, True), sets)}
    if role == "ffn_in":
        times["blk_q"] = _time_graph(lambda s: bg.int_linear_blocks_quantize(
            s["a"], s["a_scale"], s["a_offset"], s["w"], 8, s["w_scale"], s["w_block_sums"], s["bias"], torch.float16,
            block, 8, False, None, True), sets)
        times["tok+q"] = _time_graph(lambda s: qc.quantize(tok(s), 8, False, None, None, True), sets)
    ops = 2.0 * m * n * k
    return {"h": h, "role": role, "m": m, "n": n, "k": k, "block": block, "us": {kk: v * 1e6 for kk, v in times.items()},
            "tops": {kk: ops / v / 1e12 for kk, v in times.items()}}


#: candidate tiles for the block-scaled kernels: (block_m, block_n, warps, stages); the producer
#: (kind "quantize") takes block_n = the consumer's block, so only its rows, warps and stages vary
BLOCK_CANDIDATES = ((64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 4, 4), (64, 256, 8, 3), (128, 64, 4, 3),
                    (128, 64, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3),
                    (256, 128, 8, 3), (256, 64, 8, 3), (128, 128, 8, 5), (64, 128, 8, 4))
PRODUCER_CANDIDATES = ((64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 3), (128, 8, 3), (128, 8, 4), (256, 8, 3),
                       (32, 4, 4))


def tune_block(args, device, save=None) -> list[dict]:
    """Time every candidate tile of the block-scaled kernels per (role, h, M) and keep the fastest:
    the entries of backends/triton/tuned_block_sm90.json (``config_for`` reads them by shape).
    ``save(entries)`` is called after each shape, so a run cut short keeps what it measured."""
    from qfx.backends.triton import block_gemm as bg

    block = args.block
    entries = []
    for m in args.m:  # M outermost: a run cut short has every role at the first Ms given
        for h in args.h:
            for role in args.roles:
                n, k = ROLES[role][0] * h, ROLES[role][1] * h
                kinds = ("linear", "quantize") if role == "ffn_in" else ("linear",)
                sets = _block_sets(m, n, k, block, device)
                for kind in kinds:
                    if kind == "linear":
                        cands = [bg.BlockConfig(m, bm, bn, w, st) for bm, bn, w, st in BLOCK_CANDIDATES]
                        call = lambda s, c: bg.int_linear_blocks(  # noqa: E731
                            s["a"], s["a_scale"], s["a_offset"], s["w"], 8, s["w_scale"], s["w_block_sums"], s["bias"],
                            False, torch.float16, 8, block, config=c)
                    else:
                        cands = [bg.BlockConfig(m, bm, block, w, st) for bm, w, st in PRODUCER_CANDIDATES]
                        call = lambda s, c: bg.int_linear_blocks_quantize(  # noqa: E731
                            s["a"], s["a_scale"], s["a_offset"], s["w"], 8, s["w_scale"], s["w_block_sums"], s["bias"],
                            torch.float16, block, 8, False, None, True, config=c)
                    timed = []
                    for c in cands:
                        try:
                            timed.append((_time_graph(lambda s, c=c: call(s, c), sets), c))
                        except Exception as e:  # a tile Triton cannot fit (shared memory, registers): not a candidate
                            print(f"#   skip {kind} {c.block_m}x{c.block_n} w{c.warps} s{c.stages}: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0][:80]}", flush=True)
                            torch.cuda.synchronize()
                    t, best = min(timed, key=lambda tc: tc[0])
                    default = bg.config_for(m)
                    t_default = next((tt for tt, c in timed if (c.block_m, c.block_n if kind == "linear" else block,
                                      c.warps, c.stages) == (default.block_m, default.block_n if kind == "linear"
                                                             else block, default.warps, default.stages)), float("nan"))
                    tops = 2.0 * m * n * k / t / 1e12
                    print(f"# tune h={h} {role:>8} {kind:>8} M={m:>6}: {best.block_m}x{best.block_n} w{best.warps} "
                          f"s{best.stages} {t * 1e6:8.1f} us {tops:6.0f} TOPS ({100 * tops / INT8_PEAK_TOPS:4.1f} % peak)"
                          f" | untuned {t_default * 1e6:8.1f} us | {len(timed)} tiles", flush=True)
                    entries.append({"kind": kind, "n": n, "k": k, "max_m": m, "block_m": best.block_m,
                                    "block_n": best.block_n, "warps": best.warps, "stages": best.stages,
                                    "group_m": best.group_m, "us": round(t * 1e6, 2), "role": role})
                    if save is not None:
                        save(entries)
                del sets
                torch.cuda.empty_cache()
    return entries


def block_table(qc, args, device):
    cols = ("fp16", "tok", "blk", "blk_sym", "blk_q", "tok+q")
    print(f"# block-scaled act_block={args.block}: TOPS (2MNK / time; blk_q and tok+q include the quantize) | "
          f"blk / tok, blk / fp16, blk % of {INT8_PEAK_TOPS:.0f} INT8 peak")
    print(f"{'h':>5} {'role':>8} {'M':>6} {'N':>5} {'K':>5} | " + " ".join(f"{c:>7}" for c in cols)
          + f" | {'b/tok':>5} {'b/fp16':>6} {'%peak':>5}")
    rows = []
    for h in args.h:
        for role in args.roles:
            for m in args.m:
                r = bench_block_shape(qc, h, role, m, args.block, device)
                rows.append(r)
                t = r["tops"]
                print(f"{h:>5} {role:>8} {m:>6} {r['n']:>5} {r['k']:>5} | "
                      + " ".join(f"{t.get(c, float('nan')):7.0f}" for c in cols)
                      + f" | {t['blk'] / t['tok']:5.2f} {t['blk'] / t['fp16']:6.2f} {100 * t['blk'] / INT8_PEAK_TOPS:5.1f}",
                      flush=True)
                torch.cuda.empty_cache()
    return rows


def merge_tuned(path: str, measured: list[dict], device: str) -> list[dict]:
    """The entries of the table at ``path`` with those of ``measured`` (same N, K and M bucket)
    replaced and new ones added, in (N, K, bucket) order; prints each change. The table must come
    from the same GPU model: choices measured on two chips do not mix in one table."""
    with open(path) as f:
        old = json.load(f)
    if old.get("device") != device:
        raise SystemExit(f"--tuned-merge: {path} was tuned on {old.get('device')!r}, this is {device!r}; "
                         "tune every shape again on this GPU (--tuned-out without --tuned-merge)")
    table = {(e["n"], e["k"], e["m_bucket"]): e for e in old.get("entries", [])}
    for e in measured:
        key = (e["n"], e["k"], e["m_bucket"])
        before = table.get(key)
        if before is None or before["config"] != e["config"]:
            was = "new" if before is None else f"{before['config']} ({before['us']} us)"
            print(f"# tuned {key}: {was} -> {e['config']} ({e['us']} us)")
        table[key] = e
    return [table[k] for k in sorted(table)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--h", type=int, nargs="+", default=[768, 1024])
    ap.add_argument("--m", type=int, nargs="+", default=list(M_DEFAULT))
    ap.add_argument("--roles", nargs="+", default=list(ROLES))
    ap.add_argument("--configs", nargs="+", default=None, help="subset of sm90 configs to tune")
    ap.add_argument("--json", default=None, help="write all rows here")
    ap.add_argument("--tuned-out", default=None, help="write the autotuned choices here (with --block: the Triton "
                    "block kernels' tiles, backends/triton/tuned_block_sm90.json)")
    ap.add_argument("--tuned-merge", action="store_true", help="with --tuned-out: update the measured (N, K, M bucket) "
                    "entries of the existing table and keep the rest (a run over a subset of roles or M); the table "
                    "must have been tuned on this GPU model")
    ap.add_argument("--block", type=int, default=None, help="the block-scaled table for this act_block instead")
    args = ap.parse_args(argv)
    if args.tuned_merge and (not args.tuned_out or args.block is not None):
        ap.error("--tuned-merge updates the CUTLASS table named by --tuned-out (not the --block one): give --tuned-out")

    import qfx.backends.cutlass as qc
    from qfx.backends.cutlass import _library
    from qfx.backends.cutlass.configs import CONFIGS
    from qfx.backends.cutlass.dispatch import m_bucket

    ok, why = qc.available()
    if not ok:
        sys.exit(f"cutlass backend unavailable: {why}")
    lib, _ = _library.load()
    configs = args.configs or [c.name for c in CONFIGS if c.arch == "sm90a" and c.name in
                               lib.configs]
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | configs: {len(configs)}")
    if args.block is not None:
        if args.tuned_out:  # tune first, then time the table with the choices just made
            from qfx.backends.triton import block_gemm as bg

            def save(entries):
                with open(args.tuned_out, "w") as f:
                    json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
                               "act_block": args.block, "command": " ".join(["python benchmarks/gemm.py"] + sys.argv[1:]),
                               "entries": entries}, f, indent=1)

            tune_block(args, device, save)
            bg._TUNED.replace(torch.cuda.current_device(), bg.load_tuned(args.tuned_out))
        rows = block_table(qc, args, device)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "block_rows": rows}, f, indent=1)
        return
    hdr = (f"{'h':>5} {'role':>8} {'M':>6} {'N':>5} {'K':>5} | {'qfx':>6} {'unfus':>6} {'s32':>6} "
           f"{'fp16':>6} {'int_mm':>6} {'fp8':>6} TOPS | {'q/fp16':>6} {'q/fp8':>6} "
           f"{'%peak':>5} | config")
    print(hdr)
    rows = []
    for h in args.h:
        for role in args.roles:
            for m in args.m:
                r = bench_shape(qc, configs, h, role, m, device)
                rows.append(r)
                t = r["tops"]
                print(f"{h:>5} {role:>8} {m:>6} {r['n']:>5} {r['k']:>5} | {t['qfx']:6.0f} "
                      f"{t['unfused']:6.0f} {t['s32']:6.0f} {t['fp16']:6.0f} {t['int_mm']:6.0f} {t['fp8']:6.0f}"
                      f"      | {t['qfx'] / t['fp16']:6.2f} {t['qfx'] / t['fp8']:6.2f} "
                      f"{100 * t['qfx'] / INT8_PEAK_TOPS:5.1f} | {r['config']}", flush=True)
                torch.cuda.empty_cache()
    unpack = [u for h in args.h for u in unpack_cost(qc, h, device)]
    print("# int4 weights: per-call unpack cost vs the cached int8 copy")
    for u in unpack:
        print(f"#   h={u['h']} {u['role']:>8} [{u['n']}x{u['k']}] unpack {u['unpack_us']:.1f} us"
              f" | packed {u['packed_MiB']:.2f} MiB, cached int8 {u['cached_int8_MiB']:.2f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows, "unpack": unpack},
                      f, indent=1)
    if args.tuned_out:
        entries = [{"n": r["n"], "k": r["k"], "m_bucket": m_bucket(r["m"]), "config": r["config"],
                    "us": round(r["us"]["qfx"], 2)} for r in rows]
        if args.tuned_merge:
            entries = merge_tuned(args.tuned_out, entries, torch.cuda.get_device_name())
        with open(args.tuned_out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(),
                       "date": time.strftime("%Y-%m-%d", time.gmtime()),
                       "command": " ".join(sys.argv), "entries": entries}, f, indent=1)


if __name__ == "__main__":
    main()
