"""qfx demo: compile the packaged pretrained MiniLM sentence encoder to W8A8 and W4A4.

Runs on the CPU (exact reference backend) and on a GPU (CUTLASS integer kernels where built).
Without QAT this is post-training quantization: the W4A4 drop shown here is what
examples/qat_sentiment.py recovers with QAT + knowledge distillation.

    python examples/demo.py [--target cpu|sm_80|sm_86|sm_89|sm_90] [--model-dir DIR]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
from transformers import AutoModel, AutoTokenizer

import qfx
from qfx.models import minilm_path

SENTENCES = [
    "A gripping thriller with a twist you will not see coming.",
    "The plot is predictable and the acting is wooden.",
    "An edge-of-your-seat mystery with a surprising ending.",
    "Two hours of my life I will never get back.",
    "The chef's pasta was perfectly al dente.",
    "Integer tensor cores make transformer inference cheaper.",
]


def embed(model, batch) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the all-MiniLM-L6-v2 recipe)."""
    hidden = model(**batch).last_hidden_state.float().cpu()
    mask = batch["attention_mask"].unsqueeze(-1).float().cpu()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def timed(fn, repeat: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help="compile target (default: the visible GPU, else cpu)")
    ap.add_argument("--model-dir", default=None, help="a MiniLM directory (default: the packaged one)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    target = qfx.get_target(args.target) if args.target else qfx.detect_target()
    path = args.model_dir or minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()  # the fp32 reference, whatever the file holds
    batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    print(f"model: all-MiniLM-L6-v2 from {path}\ntarget: {target.name} ({target.int4_execution})")

    with torch.no_grad():
        ref = embed(model, batch)
        rows = [("fp32 eager (torch)", ref, timed(lambda: model(**batch), args.repeat))]
        for mode in ("fp16", "int8", "int4"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
                t0 = time.perf_counter()
                compiled = qfx.compile(model, mode=mode, target=target.name, example_kwargs=batch)
                compile_s = time.perf_counter() - t0
            emb = embed(compiled, batch)
            ms = timed(lambda: compiled(**batch), args.repeat)
            rows.append((f"qfx {mode} ({compiled.report().quantized and 'PTQ' or 'float'}, compile {compile_s:.1f}s)", emb, ms))
            if mode == "int4":
                print(compiled.report().render(width=120))

    print(f"{'model':45s} {'cos(emb, fp32) min':>18s} {'mean':>8s} {'ms/batch':>9s}")
    for name, emb, ms in rows:
        cos = (emb * ref).sum(-1)
        print(f"{name:45s} {cos.min():18.4f} {cos.mean():8.4f} {ms:9.2f}")
    sims = {name: emb @ emb.T for name, emb, _ in rows}
    print("\nnearest neighbour of each sentence (fp32 / int8 / int4):")
    for i, s in enumerate(SENTENCES):
        nn = [int((sim[i] - 2 * torch.eye(len(SENTENCES))[i]).argmax()) for sim in (sims[rows[0][0]], sims[rows[2][0]], sims[rows[3][0]])]
        print(f"  {s[:48]:48s} -> {nn}")
    if target.device == "cpu":
        print("\n(CPU: the exact reference backend computes int32 accumulators in float64; it shows the numbers,"
              " not the speed. On a GPU target the integer GEMMs run on tensor cores.)")


if __name__ == "__main__":
    main()
