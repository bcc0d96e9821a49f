"""Why do the integer GEMMs run slower inside the model than alone? Per layer part, side by side.

For one model and one batch x seq (default BERT-base 128 x 128, int8, the GPU present), prints per
layer part (qkv, attn_out, ffn_in, ffn_out):

    in model        mean kernel time of that part's GEMM in one call of the compiled model as
                    users call it (torch.profiler; GEMMs are taken in graph order, 4 per layer)
    alone, warm     the same launcher (same weights, config and epilogue) replayed 20 times from
                    a CUDA graph on one input: the input and weights stay in L2
    alone, cold     the same, cycling through inputs that together exceed L2
    no GELU         (ffn_in only) the same GEMM without the GELU epilogue, cold

so the gap splits into cache warmth, epilogue cost and what is left (clocks, neighbours).

    python benchmarks/gemm_in_model.py [--model bert-base] [--bs 128] [--seq 128] [--mode int8]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

import qfx
from qfx.schema import INT_LINEAR, arg, is_call, op_buffer

from e2e import batch, load  # noqa: E402  (run from benchmarks/ or with it on sys.path)
from gemm import _time_graph  # noqa: E402

ROLES = ("qkv", "attn_out", "ffn_in", "ffn_out")


def _gemm_kernels(fn) -> list[tuple[str, float]]:
    """(kernel name, µs) of every GEMM kernel of one call, in launch order."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    events.sort(key=lambda e: e.time_range.start)
    return [(e.name, e.time_range.elapsed_us()) for e in events
            if "gemm" in e.name.lower() or "cutlass" in e.name.lower() or "qfx_sm" in e.name.lower()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base")
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--mode", default="int8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from qfx.backends.cutlass.launch import LinearLauncher

    major, minor = torch.cuda.get_device_capability()
    hf = load(args.model).cuda()
    inputs = {k: v.cuda() for k, v in batch(args.bs, args.seq).items()}
    compiled = qfx.compile(hf.cpu(), mode=args.mode, target=f"sm_{major}{minor}", example_kwargs=inputs)
    kernels = _gemm_kernels(lambda: compiled(**inputs))
    layers = len(kernels) // 4
    if layers * 4 != len(kernels):
        raise SystemExit(f"{len(kernels)} GEMM kernels in one call, not 4 per layer: {sorted({n for n, _ in kernels})}")
    gm = compiled.graph_module
    linears = [n for n in gm.graph.nodes if is_call(n, INT_LINEAR)]
    m = args.bs * args.seq
    rows = []
    for r, role in enumerate(ROLES):
        in_model = statistics.mean(t for i, (_, t) in enumerate(kernels) if i % 4 == r)
        names = sorted({n for i, (n, _) in enumerate(kernels) if i % 4 == r})
        node = linears[r]
        w = op_buffer(gm, node, "w")
        common = dict(w=w, w_bits=arg(node, "w_bits"), w_scale=op_buffer(gm, node, "w_scale"),
                      w_offset_sum=op_buffer(gm, node, "w_offset_sum"), bias=op_buffer(gm, node, "bias"),
                      out_dtype=arg(node, "out_dtype"), a_bits=arg(node, "a_bits"))
        launcher = LinearLauncher(gelu=arg(node, "gelu"), **common)
        k = launcher.k
        # inputs exceeding L2 (50 MB on the H100) when cycled: at least 4, at least 160 MB in all
        n_cold = max(4, -(-160 * 2**20 // (m * k)))
        a = torch.randint(-8, 8, (n_cold, m, k), dtype=torch.int8, device="cuda")
        scale = torch.rand(n_cold, m, dtype=torch.float32, device="cuda") * 0.01
        offset = torch.randint(-8, 8, (n_cold, m), device="cuda").float() if arg(node, "a_offset") is not None else None

        sets = [(a[j], scale[j], None if offset is None else offset[j]) for j in range(n_cold)]
        warm = _time_graph(launcher, sets[:1], reps=7, min_calls=20) * 1e6
        cold = _time_graph(launcher, sets, reps=7, min_calls=20) * 1e6
        row = dict(role=role, n=launcher.n, k=k, m=m, kernel=names, in_model_us=round(in_model, 2),
                   alone_warm_us=round(warm, 2), alone_cold_us=round(cold, 2))
        if arg(node, "gelu"):
            plain = LinearLauncher(gelu=False, **common)
            row["no_gelu_cold_us"] = round(_time_graph(plain, sets, reps=7, min_calls=20) * 1e6, 2)
        rows.append(row)
    print(f"{torch.cuda.get_device_name()}, {args.model} {args.bs}x{args.seq} {args.mode}, {layers} layers, M = {m}")
    print(f"{'part':<9} {'N x K':>12} {'in model':>9} {'alone warm':>11} {'alone cold':>11} {'no GELU':>8}  kernel")
    for r in rows:
        print(f"{r['role']:<9} {r['n']:>5} x {r['k']:<5} {r['in_model_us']:>9.1f} {r['alone_warm_us']:>11.1f} "
              f"{r['alone_cold_us']:>11.1f} {r.get('no_gelu_cold_us', float('nan')):>8.1f}  {','.join(r['kernel'])[:90]}")
    total = {k: sum(r[k] for r in rows) * layers / 1000 for k in ("in_model_us", "alone_warm_us", "alone_cold_us")}
    print("ms per forward: " + ", ".join(f"{k.removesuffix('_us')} {v:.3f}" for k, v in total.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), args=vars(args), rows=rows, ms=total), f, indent=1)


if __name__ == "__main__":
    main()
