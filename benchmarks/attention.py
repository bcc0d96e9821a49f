"""Which attention kernel runs, and how fast, for BERT shapes under CUDA-graph capture.

HF hands SDPA a boolean [B, 1, S, S] mask expanded with stride 0; under capture every fused
kernel refuses it and SDPA falls back to fp32 math (HARDWARE.md). This measures the forms a
compiler that owns attention can emit instead, each replayed from a CUDA graph, with the
kernel the profiler saw:

    hf_bool_expand     the HF mask as captured today
    additive_b11s      fp16 additive key-padding mask [B, 1, 1, S] (contiguous last dim)
    additive_b11s_eff  the same, mem-efficient backend forced
    additive_b11s_cudnn the same, cuDNN backend forced
    no_mask_flash / no_mask_cudnn   no padding at all (upper bound)
    varlen_seqused     aten._flash_attention_forward on the padded layout, keys limited per
                       sequence by seqused_k (no mask tensor; q/k/v read in place from the
                       fused QKV output [B*S, 3, H, D])

With --varlen: padding removal's attention (passes/attention.py, qfx::packed_attention) on
padded batches of lengths uniform in [S/4, S], each replayed from a CUDA graph:

    padded_bias_<backend>  SDPA over the padded [B, H, S, D] with the [B, 1, 1, S] bias
                           (what the padded model runs), efficient / cuDNN backends
    varlen_flash           aten._flash_attention_forward over the packed real tokens with
                           cu_seqlens (what qfx::packed_attention runs); _contiguous: q/k/v
                           copied out of the fused QKV rows first; _true_max: max_seqlen the
                           longest real sequence instead of the padded S
    varlen_api             torch.nn.attention.varlen.varlen_attn (torch's public wrapper; it
                           may pick cuDNN's ragged kernel)
    varlen_triton_<tiles>  qfx's short-tile kernel (backends/triton/varlen_attention.py) with
                           query tile m, key tile n, w warps (the tiles its CHOICES table
                           picks for the shape are printed first)

    python benchmarks/attention.py [--varlen [--tuned-out ../backends/triton/tuned_varlen_sm90.json]] [--out attention.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from e2e import graphed, median_ms  # noqa: E402  (run from benchmarks/)

SHAPES = [(1, 128, 12, 64), (32, 128, 12, 64), (128, 128, 12, 64), (32, 384, 16, 64)]


def replay_ms(fn, iters=50):
    """(median ms of one replay, the replay) of ``fn`` captured in a CUDA graph (e2e.py's helpers)."""
    replay = graphed(fn)
    return median_ms(replay, iters), replay


def kernels_of(replay) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    return sorted(set(n[:70] for n in names))


VARLEN_SHAPES = [(128, 128, 12, 64), (32, 128, 12, 64), (128, 384, 16, 64), (8, 512, 12, 64)]
#: (BLOCK_M, BLOCK_N, warps) of qfx's short-tile varlen kernel measured beside the others
TRITON_TILES = [(16, 64, 2), (32, 64, 2), (32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 4), (128, 64, 8), (128, 128, 8)]


def varlen_rows(b: int, s: int, h: int, d: int) -> list[dict]:
    """Padded SDPA with the key-padding bias vs varlen kernels over the packed real tokens."""
    g = torch.Generator().manual_seed(b * s)
    lengths = torch.randint(s // 4, s + 1, (b,), generator=g).cuda()
    key_ok = torch.arange(s, device="cuda")[None, :] < lengths[:, None]
    real = int(lengths.sum())
    qkv = torch.randn(b * s, 3, h, d, device="cuda", dtype=torch.float16)
    q4, k4, v4 = (qkv[:, i].view(b, s, h, d).transpose(1, 2) for i in range(3))
    bias = torch.zeros(b, 1, 1, s, device="cuda", dtype=torch.float16).masked_fill_(~key_ok[:, None, None, :], -65504.0)
    packed = qkv[key_ok.flatten()]  # [T, 3, H, D]
    qp, kp, vp = packed[:, 0], packed[:, 1], packed[:, 2]
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
    variants = {}
    for name, backend in (("padded_bias_efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("padded_bias_cudnn", SDPBackend.CUDNN_ATTENTION)):
        def run(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=bias)
        variants[name] = run
    variants["varlen_flash"] = lambda: torch.ops.aten._flash_attention_forward(
        qp, kp, vp, cu, cu, s, s, 0.0, False, False, scale=d ** -0.5)[0]
    qc, kc, vc = (t.contiguous() for t in (qp, kp, vp))
    variants["varlen_flash_contiguous"] = lambda: torch.ops.aten._flash_attention_forward(
        qc, kc, vc, cu, cu, s, s, 0.0, False, False, scale=d ** -0.5)[0]
    longest = int(lengths.max())
    variants["varlen_flash_true_max"] = lambda: torch.ops.aten._flash_attention_forward(
        qp, kp, vp, cu, cu, longest, longest, 0.0, False, False, scale=d ** -0.5)[0]
    try:
        from torch.nn.attention.varlen import varlen_attn

        variants["varlen_api"] = lambda: varlen_attn(qp, kp, vp, cu, cu, s, s)
    except ImportError as e:
        print(f"varlen_attn: {e}")
    from qfx.backends.triton.varlen_attention import Tiles, choose, varlen_attention

    triton_tiles = {f"varlen_triton_{Tiles(*t)!r}": Tiles(*t) for t in TRITON_TILES}
    for name, tiles in triton_tiles.items():
        variants[name] = lambda tiles=tiles: varlen_attention(qp, kp, vp, cu, s, d ** -0.5, tiles)
    print(f"varlen {b}x{s}: CHOICES pick {choose(s)!r} (None: flash varlen)", flush=True)
    ref = F.scaled_dot_product_attention(q4.float(), k4.float(), v4.float(), attn_mask=bias.float())
    ref = ref.transpose(1, 2).reshape(b * s, h, d)[key_ok.flatten()]
    rows = []
    for name, fn in variants.items():
        try:
            out = fn()
            out = out if out.dim() == 3 else out.transpose(1, 2).reshape(b * s, h, d)[key_ok.flatten()]
            err = (out.float() - ref).abs().max().item()
            ms, replay = replay_ms(fn)
            ks = kernels_of(replay)
        except Exception as e:  # noqa: BLE001
            ms, err, ks = float("nan"), float("nan"), [f"{type(e).__name__}: {str(e)[:100]}"]
        tiles = list(triton_tiles[name]) if name in triton_tiles else None
        rows.append(dict(shape=[b, s, h, d], real_tokens=real, variant=name, tiles=tiles, ms=ms, max_err=err, kernels=ks))
        print(f"varlen {b:4d}x{s:<4d} h{h} real {real / (b * s):.0%} {name:22s} {ms:8.4f} ms  err {err:.2e}  "
              f"{' | '.join(ks)[:120]}", flush=True)
    return rows


#: the short-tile kernel is chosen at a sequence length only where it beats flash varlen by this factor
MARGIN = 0.97


def write_choices(rows: list[dict], path: str) -> None:
    """Per padded sequence length S: the short-tile kernel with the tiles of the least total time over
    the shapes of that S, where it beats flash varlen's total by :data:`MARGIN`, else flash."""
    import time

    totals: dict[int, dict[str, float]] = {}
    tiles_of = {r["variant"]: r["tiles"] for r in rows if r.get("tiles")}
    for r in rows:
        if r["ms"] == r["ms"] and (r["variant"] == "varlen_flash" or r["variant"] in tiles_of):
            by = totals.setdefault(r["shape"][1], {})
            by[r["variant"]] = by.get(r["variant"], 0.0) + r["ms"]
    entries = []
    for s, by in sorted(totals.items()):
        flash = by.get("varlen_flash", float("inf"))
        short = {k: v for k, v in by.items() if k != "varlen_flash"}
        best = min(short, key=short.get) if short else None
        if best is not None and short[best] < MARGIN * flash:
            m, n, w = tiles_of[best]
            entries.append({"max_seqlen": s, "kernel": "short", "block_m": m, "block_n": n, "warps": w,
                            "ms": round(short[best], 4), "flash_ms": round(flash, 4)})
        else:
            entries.append({"max_seqlen": s, "kernel": "flash", "ms": round(flash, 4),
                            "best_short": best, "best_short_ms": round(short[best], 4) if best else None})
        print(f"choice at S <= {s}: {entries[-1]}", flush=True)
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                   "command": "python benchmarks/attention.py --varlen --tuned-out " + path,
                   "rule": f"per S, the short-tile tiles of least total ms over the shapes of that S where below "
                           f"{MARGIN} x flash varlen's total, else flash", "entries": entries}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--varlen", action="store_true", help="only the packed (varlen) comparison")
    ap.add_argument("--tuned-out", default=None,
                    help="with --varlen: write the kernel choice per sequence length (the JSON that "
                         "backends/triton/varlen_attention.py reads for this GPU)")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for b, s, h, d in (VARLEN_SHAPES if args.varlen else ()):
        rows.extend(varlen_rows(b, s, h, d))
    if args.varlen and args.tuned_out:
        write_choices(rows, args.tuned_out)
    for b, s, h, d in (() if args.varlen else SHAPES):
        qkv = torch.randn(b * s, 3, h, d, device="cuda", dtype=torch.float16)
        q4 = qkv[:, 0].view(b, s, h, d).transpose(1, 2)  # [B, H, S, D] views, as after fuse_qkv
        k4 = qkv[:, 1].view(b, s, h, d).transpose(1, 2)
        v4 = qkv[:, 2].view(b, s, h, d).transpose(1, 2)
        lengths = torch.full((b,), s, device="cuda", dtype=torch.int32)
        lengths[-1] = s // 2  # one padded sequence
        key_ok = torch.arange(s, device="cuda")[None, :] < lengths[:, None]
        hf_mask = key_ok[:, None, None, :].expand(b, 1, s, s)
        add_mask = torch.zeros(b, 1, 1, s, device="cuda", dtype=torch.float16)
        add_mask.masked_fill_(~key_ok[:, None, None, :], float("-inf"))
        cu = torch.arange(0, (b + 1) * s, s, device="cuda", dtype=torch.int32)
        variants = {
            "hf_bool_expand": lambda: F.scaled_dot_product_attention(q4, k4, v4, attn_mask=hf_mask),
            "additive_b11s": lambda: F.scaled_dot_product_attention(q4, k4, v4, attn_mask=add_mask),
        }

        def forced(backend, mask):
            def run():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask)
            return run

        variants["additive_b11s_eff"] = forced(SDPBackend.EFFICIENT_ATTENTION, add_mask)
        variants["additive_b11s_cudnn"] = forced(SDPBackend.CUDNN_ATTENTION, add_mask)
        variants["no_mask_flash"] = forced(SDPBackend.FLASH_ATTENTION, None)
        variants["no_mask_cudnn"] = forced(SDPBackend.CUDNN_ATTENTION, None)
        qf, kf, vf = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [B*S, H, D], last dim contiguous
        variants["varlen_seqused"] = lambda: torch.ops.aten._flash_attention_forward(
            qf, kf, vf, cu, cu, s, s, 0.0, False, False, scale=d ** -0.5, seqused_k=lengths)[0]
        ref = F.scaled_dot_product_attention(q4.float(), k4.float(), v4.float(), attn_mask=hf_mask)
        for name, fn in variants.items():
            try:
                out = fn()
                if out.dim() == 3:  # varlen: [B*S, H, D] -> [B, H, S, D]
                    out = out.view(b, s, h, d).transpose(1, 2)
                err = ((out.float() - ref).abs().max()).item()
                ms, g = replay_ms(fn)
                ks = kernels_of(g)
            except Exception as e:  # noqa: BLE001
                ms, err, ks = float("nan"), float("nan"), [f"{type(e).__name__}: {str(e)[:100]}"]
            rows.append(dict(shape=[b, s, h, d], variant=name, ms=ms, max_err=err, kernels=ks))
            print(f"{b:4d}x{s:<4d} h{h} {name:22s} {ms:8.4f} ms  err {err:.2e}  {' | '.join(ks)[:150]}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
