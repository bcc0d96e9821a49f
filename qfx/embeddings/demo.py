"""The qfx demo: the packaged all-MiniLM-L6-v2 sentence encoder compiled to W8A8 and W4A4.

What it shows, in order: what was compiled; one table (latency and quality against fp32 per
mode, and the peer each qfx mode beats or loses to); what W4A4 post-training loses and the
command that recovers it; nearest neighbours as text; the full compile report with
``--report``. Needs only the packaged model (no sentence-transformers, no data download).

Run it as ``python -m qfx demo`` or ``python examples/demo.py``.

Example::

    >>> from qfx.embeddings.demo import run_demo
    >>> run_demo(target="cpu", repeat=1)
"""
from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["SENTENCES", "QAT_COMMAND", "run_demo", "add_arguments"]

#: a tiny corpus in four topics, so every sentence has an obvious nearest neighbour
SENTENCES = (
    "A gripping thriller with a twist you will not see coming.",
    "An edge-of-your-seat mystery with a surprising ending.",
    "The plot is predictable and the acting is wooden.",
    "Two hours of my life I will never get back.",
    "A warm, funny film that the whole family will love.",
    "Charming and sweet, a delight from start to finish.",
    "The chef's pasta was perfectly al dente.",
    "This bakery makes the best sourdough bread in town.",
    "Fresh tomatoes, basil and olive oil make a simple sauce.",
    "Integer tensor cores make transformer inference cheaper.",
    "Quantizing weights to four bits shrinks the model eightfold.",
    "GPU kernels fuse the scale and bias into the matrix multiply.",
)
#: the one command that recovers W4A4 quality (QAT with distillation on unlabelled text, rotated inputs)
QAT_COMMAND = "python examples/embedding_qat.py --rotation 128 --out out/embedding_qat"


@dataclass
class _Row:
    name: str
    emb: torch.Tensor
    ms: float
    peer: str = ""


def _embed(model, batch) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the all-MiniLM-L6-v2 recipe)."""
    hidden = model(**batch).last_hidden_state.float().cpu()
    mask = batch["attention_mask"].unsqueeze(-1).float().cpu()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def _timed(fn: Callable[[], object], repeat: int, cuda: bool) -> float:
    """Milliseconds per call, the median of ``repeat`` calls (robust to a busy machine's
    bursts); the caller has already made one (warm-up) call."""
    times = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _nearest(emb: torch.Tensor) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(-1)


def _vs(row: _Row, peer: _Row, ref: torch.Tensor) -> str:
    """'beats/loses to PEER: speed, cosine' in words."""
    speed = peer.ms / row.ms
    dcos = float((row.emb * ref).sum(-1).mean() - (peer.emb * ref).sum(-1).mean())
    faster = f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x slower"
    verdict = "beats" if speed >= 1 and dcos >= -1e-3 else ("loses to" if speed < 1 and dcos <= 1e-3 else "trades with")
    return f"{verdict} {peer.name}: {faster}, cosine {dcos:+.4f}"


def _peer(model, batch, target, repeat: int) -> _Row:
    """The baseline a user would reach for without qfx: torch's dynamic int8 on the CPU, fp16 on a GPU."""
    if target.device == "cuda":
        half = type(model).from_pretrained(model.name_or_path, dtype=torch.float16).cuda().eval()
        on_gpu = {k: v.cuda() for k, v in batch.items()}
        return _Row("torch fp16", _embed(half, on_gpu), _timed(lambda: half(**on_gpu), repeat, True))
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notice
        q8 = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return _Row("torch int8 dynamic", _embed(q8, batch), _timed(lambda: q8(**batch), repeat, False))


def run_demo(
    target: str | None = None,
    model_dir: str | None = None,
    repeat: int = 5,
    report: bool = False,
    threads: int | None = 1,
    out: Callable[[str], None] = print,
) -> int:
    """Compile the packaged MiniLM to int8 and int4 for ``target`` and tell what happened.

    Args:
        target: a qfx target name (default: the visible GPU, else ``"cpu"``).
        model_dir: a MiniLM directory (default: the packaged one).
        repeat: timed calls per model (after the call that computes its embeddings).
        report: also print every compiled model's full compile report.
        threads: CPU threads for torch (``torch.set_num_threads``); None keeps torch's
            default. One by default: the demo's batch is tiny, so a second thread gains little,
            while on a busy machine (shared CI runners) OpenMP threads that spin-wait for a core
            made the demo 5x slower (17 s with one thread, 91 s with two, 2-core machine at load 8).
    Returns:
        0 (a process exit code).
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from qfx.api import PostTrainingQuantizationWarning, compile
    from qfx.models import minilm_path
    from qfx.targets import detect_target, get_target

    if repeat < 1:
        raise ValueError(f"repeat={repeat}: time at least one call (--repeat 1)")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads}: use 1 or more")
        torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()  # loading messages and the weight-loading bar are not part of the story
    hf_logging.disable_progress_bar()
    tgt = get_target(target) if target else detect_target()
    path = model_dir or minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()  # the fp32 reference, whatever the files hold
    batch = dict(tok(list(SENTENCES), padding=True, return_tensors="pt"))
    cuda = tgt.device == "cuda"
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    cfg = model.config
    out(f"qfx demo: {type(model).__name__} all-MiniLM-L6-v2 ({n_params:.1f} M parameters, {cfg.num_hidden_layers} layers, "
        f"hidden {cfg.hidden_size}) from {path}")
    out(f"compiled: every encoder linear (q, k, v, attn_out, ffn_in, ffn_out: {6 * cfg.num_hidden_layers} per model) to integer "
        f"GEMMs, post-training (no QAT), for target {tgt.name} ({tgt.int4_execution})")
    out(f"measured on {len(SENTENCES)} sentences in one batch, {repeat} timed call(s) each, {torch.get_num_threads()} CPU thread(s); "
        "quality = mean-pooled embeddings vs fp32\n")

    with torch.no_grad():
        fp32 = _Row("torch fp32", _embed(model, batch), _timed(lambda: model(**batch), repeat, False))
        peer = _peer(model, batch, tgt, repeat)
        rows, compiled = [fp32, peer], {}
        for mode in (("fp16", "int8", "int4") if cuda else ("int8", "int4")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PostTrainingQuantizationWarning)
                cm = compile(model, mode=mode, target=tgt.name, example_kwargs=batch)
            compiled[mode] = cm
            tag = {"fp16": "qfx fp16", "int8": "qfx int8 W8A8 PTQ", "int4": "qfx int4 W4A4 PTQ"}[mode]
            row = _Row(tag, _embed(cm, batch), _timed(lambda: cm(**batch), repeat, cuda))
            row.peer = _vs(row, peer, fp32.emb)
            rows.append(row)

    ref_nn = _nearest(fp32.emb)
    out(f"{'model':20s} {'ms/batch':>9s} {'speed vs fp32':>13s} {'cos to fp32 mean / min':>23s} {'same nearest':>12s}  peer")
    for r in rows:
        cos = (r.emb * fp32.emb).sum(-1)
        same = int((_nearest(r.emb) == ref_nn).sum())
        out(f"{r.name:20s} {r.ms:9.1f} {fp32.ms / r.ms:12.2f}x {float(cos.mean()):11.4f} / {float(cos.min()):.4f} "
            f"{same:>7d}/{len(SENTENCES)}  {r.peer}")
    if not cuda:
        out("\n" + _cpu_path(compiled["int8"]))
    int4 = rows[-1]
    cos4 = float((int4.emb * fp32.emb).sum(-1).mean())
    out(f"\nW4A4 post-training loses quality: mean cosine {cos4:.3f} to fp32 (int8 keeps "
        f"{float((rows[-2].emb * fp32.emb).sum(-1).mean()):.3f}). QAT with distillation on unlabelled text recovers it:\n"
        f"    {QAT_COMMAND}\n(needs pip install \"qfx[embeddings]\"; results and plot in examples/RESULTS.md)")

    out("\nnearest neighbour of each query (fp32 | int8 | int4; * = differs from fp32):")
    nns = {r.name: _nearest(r.emb) for r in rows}
    names = [fp32.name, rows[-2].name, int4.name]
    for i in range(0, len(SENTENCES), 2):
        picks = [int(nns[n][i]) for n in names]
        shown = " | ".join(("" if p == picks[0] else "*") + _short(SENTENCES[p]) for p in picks)
        out(f"  {_short(SENTENCES[i], 44):44s} -> {shown}")
    if report:
        for mode, cm in compiled.items():
            out("\n" + cm.report().render(width=140))
    else:
        out("\nfull compile report (every linear: role, shape, precision, backend): add --report")
    return 0


def _cpu_path(cm) -> str:
    """What ran the integer ops on the CPU, from the compile report (the plan's own words)."""
    rows = cm.report().quantized
    backends = sorted({r.backend for r in rows})
    if backends == ["cpu"]:
        from qfx.backends.cpu import int8_path, kernels

        return (f"CPU: qfx's integer GEMMs ran on the cpu backend ({kernels.GEMM}, {int8_path().why}; epilogue and "
                f"quantizer: {kernels.EPILOGUE}),\nbit for bit the float64 reference backend (python -m pytest "
                "tests/kernels/test_cpu_backend.py checks it).")
    why = next((r.note for r in rows if "not cpu" in r.note), "")
    return (f"CPU: qfx's integer ops ran on the {', '.join(backends)} backend(s): exact, but not fast. {why}\n"
            "On a CPU with AMX-INT8 / AVX512-VNNI / AVX-VNNI they run on its int8 instructions (qfx.backends.cpu).")


def _short(text: str, width: int = 30) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def add_arguments(ap) -> None:
    """The demo's options, shared by ``python -m qfx demo`` and ``examples/demo.py``."""
    ap.add_argument("--target", default=None, help="compile target: cpu, sm_80, sm_86, sm_89, sm_90 (default: the visible GPU, else cpu)")
    ap.add_argument("--model-dir", default=None, help="a MiniLM directory (default: the packaged one)")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per model (default 5)")
    ap.add_argument("--report", action="store_true", help="also print the full compile report of each model")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1: the batch is tiny)")
