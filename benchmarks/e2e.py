"""End-to-end encoder latency on the visible GPU: HF fp16 eager vs qfx-compiled models.

One run prints, per model and batch x sequence, the median forward latency of
  * HF fp16 eager (transformers, SDPA attention)             -- the baseline
  * qfx fp16 (the captured graph, no quantization)
  * qfx int8 (W8A8) and qfx int4 (W4A4 numerics; on sm_90 they run on INT8 tensor cores)
each called eagerly and replayed from a CUDA graph, with ratios against the baseline.
Weights are random-init (speed does not depend on values) except MiniLM when installed.

    python benchmarks/e2e.py [--quick] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import warnings

import torch
from transformers import AutoModel, BertConfig, BertModel

import qfx

SHAPES = {
    "minilm-l6": [(1, 128), (32, 128), (128, 128)],
    "bert-base": [(1, 128), (32, 128), (128, 128)],
    "bert-large": [(1, 128), (32, 384)],
}
CONFIGS = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def load(name: str) -> torch.nn.Module:
    if name == "minilm-l6":
        try:
            from qfx.models import minilm_path

            return AutoModel.from_pretrained(minilm_path()).eval()
        except FileNotFoundError:
            cfg = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
            return BertModel(BertConfig(**cfg)).eval()
    return BertModel(BertConfig(**CONFIGS[name])).eval()


def batch(bs: int, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, 2000, (bs, seq), device="cuda")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def median_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="MiniLM and bert-base only, fewer iterations")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    target = qfx.detect_target()
    iters = 10 if args.quick else 30
    models = ["minilm-l6", "bert-base"] if args.quick else list(SHAPES)
    rows = []
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
    print(f"GPU: {torch.cuda.get_device_name()} ({target.name}); int4 runs on: {target.int4_execution}")
    for name in models:
        float_model = load(name)
        hf = float_model.to("cuda", torch.float16)
        example = batch(2, 16)
        compiled = {}
        for mode in ("fp16", "int8", "int4"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
                compiled[mode] = qfx.compile(float_model, mode=mode, target=target.name, example_kwargs=example)
        backends = {m: sorted({r.backend for r in c.report().quantized}) for m, c in compiled.items()}
        for bs, seq in SHAPES[name]:
            x = batch(bs, seq)
            with torch.no_grad():
                res = {"hf fp16 eager": median_ms(lambda: hf(**x), iters)}
                try:
                    res["hf fp16 graph"] = median_ms(graphed(lambda: hf(**x)), iters)
                except Exception as e:  # HF under capture is not always capturable: say so
                    res["hf fp16 graph"] = float("nan")
                    print(f"  hf graph capture failed: {type(e).__name__}: {str(e)[:120]}")
                for mode, cm in compiled.items():
                    gm = cm.graph_module
                    res[f"qfx {mode} eager"] = median_ms(lambda: gm(**x), iters)
                    res[f"qfx {mode} graph"] = median_ms(graphed(lambda: gm(**x)), iters)
            base = res["hf fp16 eager"]
            rows.append({"model": name, "bs": bs, "seq": seq, "ms": res, "backends": backends})
            cells = "  ".join(f"{k}={v:.3f}ms({base / v:.2f}x)" for k, v in res.items())
            print(f"{name:10s} {bs:4d}x{seq:<4d} {cells}", flush=True)
        del hf, compiled
        torch.cuda.empty_cache()
    print("backends per mode:", {r["model"]: r["backends"] for r in rows})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "target": target.name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
