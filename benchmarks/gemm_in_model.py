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

``--act-block 128``: instead, the model as users call it (``compiled(**batch)``, CUDA-event medians)
with block-scaled activations (``QuantConfig(act_block=128)``, the Triton kernels of
backends/triton/block_gemm.py) beside the same model token-wise (CUTLASS) and HF fp16 eager, for
int8 and int4 (int4 codes on INT8 tensor cores: sm_90 has none for INT4), and the block model's
GEMM kernel time per layer part (torch.profiler, 4 GEMMs per layer in graph order).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

import qfx
from qfx.runtime import block_binding
from qfx.schema import INT_LINEAR, arg, is_call, op_buffer

from e2e import batch, load, median_ms  # noqa: E402  (run from benchmarks/ or with it on sys.path)
from gemm import _time_graph  # noqa: E402

ROLES = ("qkv", "attn_out", "ffn_in", "ffn_out")


def _gemm_kernels(fn, names=("gemm", "cutlass", "qfx_sm")) -> list[tuple[str, float]]:
    """(kernel name, µs) of every GEMM kernel of one call (a name containing one of ``names``), in launch order."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    events.sort(key=lambda e: e.time_range.start)
    return [(e.name, e.time_range.elapsed_us()) for e in events if any(n in e.name.lower() for n in names)]


def _median_ms(fn) -> float:
    return median_ms(fn, 30)


def blocks_as_called(args) -> None:
    """The ``--act-block`` table (module doc)."""
    import copy

    from qfx.backends.triton import block_gemm as bg

    bg.register()
    major, minor = torch.cuda.get_device_capability()
    target = f"sm_{major}{minor}"
    hf = load(args.model)
    inputs = {k: v.cuda() for k, v in batch(args.bs, args.seq).items()}
    hf16 = copy.deepcopy(hf).half().cuda()
    rows = {}
    with torch.no_grad():
        rows["HF fp16 eager"] = _median_ms(lambda: hf16(**inputs))
    del hf16
    per_role = {}
    for bits in args.block_bits:
        token = qfx.compile(hf, mode=f"int{bits}", target=target, example_kwargs=inputs)
        rows[f"qfx int{bits} token-wise (cutlass)"] = _median_ms(lambda: token(**inputs))
        del token
        cfg = qfx.QuantConfig(bits, bits, act_block=args.act_block)
        blocks = qfx.compile(hf, mode=f"int{bits}", config=cfg, target=target, example_kwargs=inputs)
        bound = block_binding.rebind_block_ops(blocks.graph_module)
        rows[f"qfx int{bits} block {args.act_block} (triton, {bound} ops)"] = _median_ms(lambda: blocks(**inputs))
        kernels = [(n, t) for n, t in _gemm_kernels(lambda: blocks(**inputs), ("block_linear",))]
        if kernels and len(kernels) % 4 == 0:
            per_role[bits] = {role: statistics.mean(t for i, (_, t) in enumerate(kernels) if i % 4 == r)
                              for r, role in enumerate(ROLES)}
        del blocks
        torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}, {args.model} {args.bs}x{args.seq}, as called, median ms")
    base = rows["HF fp16 eager"]
    for name, ms in rows.items():
        print(f"  {name:<44} {ms:8.3f} ms   {base / ms:5.2f}x HF fp16")
    m = args.bs * args.seq
    h = hf.config.hidden_size
    shapes = {"qkv": (3 * h, h), "attn_out": (h, h), "ffn_in": (hf.config.intermediate_size, h),
              "ffn_out": (h, hf.config.intermediate_size)}
    for bits, times in per_role.items():
        print(f"  int{bits} block GEMMs in the model, us (TOPS): " + ", ".join(
            f"{r} {t:.1f} ({2 * m * shapes[r][0] * shapes[r][1] / t / 1e6:.0f})" for r, t in times.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), args=vars(args), ms=rows, gemm_us=per_role), f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base")
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--mode", default="int8")
    ap.add_argument("--out", default=None)
    ap.add_argument("--act-block", type=int, default=None, help="the block-scaled model table instead (module doc)")
    ap.add_argument("--block-bits", type=int, nargs="+", default=[8, 4], help="with --act-block: W8A8 and/or W4A4")
    args = ap.parse_args()
    if args.act_block is not None:
        return blocks_as_called(args)
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
