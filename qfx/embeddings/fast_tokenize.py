"""A chunk of texts tokenized by the fast tokenizer's Rust backend straight into arrays, as the model's
own preprocessing would tokenize it, for :class:`qfx.embeddings.st.ThroughputEncode`.

Why: measured on the H100's host (benchmarks/RESULTS.md, encode), sentence-transformers' preprocessing
spends most of its time after the tokenizer has finished: transformers builds its ``BatchEncoding``
from Python lists of every token id (a recursive ``flatten`` in 5.17, ``torch.tensor`` of nested
lists), ~10x what the Rust tokenizer takes. Both ST's loop and the throughput path paid it, so the
GPU waited for the host.

How it stays the model's own tokenization: the preprocessing is run first on a sample of the chunk
(:func:`sample_rows`: the first texts, the longest, texts with surrounding whitespace or non-ASCII
characters); that call leaves on the Rust backend the truncation and padding it applied
(transformers sets them there and calls the backend's ``encode_batch`` with the texts as given).
The whole chunk then goes through that same backend call, and the sample's rows are compared with
the preprocessing's, every input, to the last token. Any difference, an input the backend does not
produce, or a tokenizer that is not a fast one: :func:`tokenize_chunk` returns None and a reason, and
the caller tokenizes with the preprocessing (the same result, slower; ``ThroughputEncode`` says
which path ran).
"""
from __future__ import annotations

from typing import Any

import torch

try:
    import numpy as np
except ImportError:  # torch without numpy: the chunk goes through the preprocessing
    np = None

__all__ = ["sample_rows", "tokenize_chunk"]

#: what each model input is on a ``tokenizers.Encoding``
_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


def sample_rows(texts: list[str], per_kind: int = 4) -> list[int]:
    """Indices of the texts the fast path is checked on: the first, the longest (truncation),
    those with surrounding whitespace and those with non-ASCII characters, ``per_kind`` of each."""
    picked = list(range(min(per_kind, len(texts))))
    picked += sorted(range(len(texts)), key=lambda i: -len(texts[i]))[:per_kind]
    picked += [i for i, t in enumerate(texts) if t != t.strip()][:per_kind]
    picked += [i for i, t in enumerate(texts) if not t.isascii()][:per_kind]
    return sorted(set(picked))


def tokenize_chunk(st, texts: list[str], preprocess) -> tuple[dict[str, Any] | None, str]:
    """(the model inputs of ``texts`` as ``preprocess(texts)`` makes them, "") through the Rust backend,
    or (None, why not)."""
    tokenizer = getattr(st, "tokenizer", None)
    backend = getattr(tokenizer, "_tokenizer", None)
    if np is None or not getattr(tokenizer, "is_fast", False) or not hasattr(backend, "encode_batch"):
        return None, "the model's tokenizer is not a fast (Rust) tokenizer"
    sample = sample_rows(texts)
    want = preprocess([texts[i] for i in sample])  # leaves its truncation and padding on the backend
    tensors = {k: v for k, v in want.items() if isinstance(v, torch.Tensor)}
    if not tensors or set(tensors) - set(_FIELDS) or any(v.dim() != 2 for v in tensors.values()):
        return None, f"the preprocessing makes inputs the backend does not ({sorted(set(tensors) - set(_FIELDS))})"
    encodings = backend.encode_batch(texts)
    if len({len(e) for e in encodings}) > 1:
        return None, "the backend's rows differ in length (no padding to one width)"
    whole: dict[str, Any] = {}
    for key, value in want.items():
        if key in tensors:
            field = _FIELDS[key]
            whole[key] = torch.from_numpy(np.array([getattr(e, field) for e in encodings], dtype=np.int64)).to(value.dtype)
        else:
            whole[key] = value  # constants (e.g. modality="text"): the caller checks they are
    for key, value in tensors.items():
        got = whole[key][sample]
        width = value.shape[1]
        if got.shape[1] < width:
            return None, f"the backend pads to {got.shape[1]} tokens, the model's preprocessing to {width}"
        same = (got[:, :width] == value).all(1)
        if key == "attention_mask":  # past the sample's width, the sample's rows hold no token
            same &= (got[:, width:] == 0).all(1)
        if not bool(same.all()):
            row = sample[int((~same).nonzero()[0, 0])]
            return None, f"the backend's {key} of text {row} differs from the model's preprocessing"
    return whole, ""
