"""Retrieval-style agreement of a quantized embedding model with its fp32 teacher.

All functions take embeddings as ``[N, D]`` tensors (or numpy arrays), one row per text, in
the same order for both models; rows are L2-normalised here, so cosine = dot product.

* :func:`agreement`: cosine of each text's embedding to the teacher's (mean, min), and
  neighbour agreement inside the set: for every text, its nearest other text (top-1) and its
  10 nearest under each model; ``top1`` is the fraction of texts whose nearest neighbour is
  the same, ``top10`` the mean overlap of the two top-10 sets (|A & B| / 10).
  ``top1_200`` is top-1 agreement under the protocol of the issue's 200-snippet measurement:
  the texts are cut, in their given order, into consecutive disjoint blocks of 200; each
  text's nearest neighbour is searched inside its own block only, and the agreement is
  averaged over the blocks (:func:`blockwise_top1`). Only full blocks count: the last
  ``N mod 200`` texts are left out, and the key is absent when ``N < 200``. The two differ
  because the candidate set differs (199 other texts instead of N - 1).
* :func:`nearest_centroid_accuracy`: a labelled task with no training: class centroids of
  the support embeddings, each query gets the label of its most similar centroid.

Example::

    >>> ref, emb = teacher.encode(texts), int4.encode(texts)
    >>> agreement(ref, emb)                       # {'cos_mean': 0.98, 'cos_min': ..., 'top1': 0.9, 'top10': 0.85, 'top1_200': ...}
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["agreement", "blockwise_top1", "neighbours", "nearest_centroid_accuracy"]

#: texts per block of :func:`blockwise_top1` in :func:`agreement` (the issue's 200 snippets)
BLOCK = 200


def _rows(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().float().cpu()
    if t.dim() != 2 or t.shape[0] == 0:
        raise ValueError(f"{name}: expected embeddings of shape [N, D] with N >= 1, got {tuple(t.shape)}")
    return F.normalize(t, dim=-1)


def neighbours(emb, k: int) -> torch.Tensor:
    """Indices ``[N, k]`` of each row's ``k`` most similar other rows (itself excluded), best first."""
    e = _rows(emb, "emb")
    if not 1 <= k < e.shape[0]:
        raise ValueError(f"k={k}: need 1 <= k < N={e.shape[0]} (a text is never its own neighbour)")
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=-1).indices


def blockwise_top1(reference, emb, block: int = BLOCK) -> float | None:
    """Top-1 neighbour agreement searched within consecutive disjoint blocks of ``block`` rows,
    averaged over the blocks; the ``N mod block`` rows after the last full block are left out.

    Returns ``None`` when ``N < block`` (no full block). Blocks are all the same size, so the
    mean over blocks equals the mean over the rows they hold.

    Example::

        >>> blockwise_top1(ref, emb)          # 1,889 texts: 9 blocks of 200, the last 89 unused
    """
    ref, e = _rows(reference, "reference"), _rows(emb, "emb")
    if ref.shape != e.shape:
        raise ValueError(f"emb has shape {tuple(e.shape)} but reference has {tuple(ref.shape)}: embed the same texts with both models")
    if not (isinstance(block, int) and block >= 2):
        raise ValueError(f"block={block!r}: need an int >= 2 (a text needs another text to be its neighbour)")
    blocks = ref.shape[0] // block
    if blocks == 0:
        return None
    hits = [
        (neighbours(ref[b * block : (b + 1) * block], 1)[:, 0] == neighbours(e[b * block : (b + 1) * block], 1)[:, 0]).float().mean()
        for b in range(blocks)
    ]
    return float(torch.stack(hits).mean())


def agreement(reference, emb, k: int = 10) -> dict[str, float]:
    """Cosine to ``reference`` and top-1 / top-``k`` neighbour agreement with it (see module doc).

    Args:
        reference: ``[N, D]`` teacher embeddings. emb: ``[N, D]`` embeddings of the same texts.
        k: size of the neighbour sets compared by ``top10`` (the key keeps its name).

    Returns ``cos_mean``, ``cos_min``, ``top1``, ``top10`` and, when ``N >= 200``,
    ``top1_200`` (:func:`blockwise_top1` over blocks of 200).
    """
    ref, e = _rows(reference, "reference"), _rows(emb, "emb")
    if ref.shape != e.shape:
        raise ValueError(f"emb has shape {tuple(e.shape)} but reference has {tuple(ref.shape)}: embed the same texts with both models")
    cos = (ref * e).sum(-1)
    k = min(k, ref.shape[0] - 1)
    n_ref, n_e = neighbours(ref, k), neighbours(e, k)
    top1 = (n_ref[:, 0] == n_e[:, 0]).float().mean()
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) for a, b in zip(n_ref, n_e)], dtype=torch.float32) / k
    out = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "top1": float(top1), "top10": float(overlap.mean())}
    top1_block = blockwise_top1(ref, e, BLOCK)
    if top1_block is not None:
        out[f"top1_{BLOCK}"] = top1_block
    return out


def nearest_centroid_accuracy(support, support_labels: Sequence[int], query, query_labels: Sequence[int]) -> float:
    """Accuracy of labelling each query by its most similar class centroid of the support set.

    Example::

        >>> nearest_centroid_accuracy(model.encode(train_texts), train_labels, model.encode(test_texts), test_labels)
    """
    s, q = _rows(support, "support"), _rows(query, "query")
    ys, yq = torch.as_tensor(list(support_labels)), torch.as_tensor(list(query_labels))
    if len(ys) != s.shape[0] or len(yq) != q.shape[0]:
        raise ValueError(f"labels: {len(ys)} support / {len(yq)} query labels for {s.shape[0]} / {q.shape[0]} embeddings")
    classes = sorted(set(ys.tolist()))
    centroids = F.normalize(torch.stack([s[ys == c].mean(0) for c in classes]), dim=-1)
    pred = torch.as_tensor(classes)[(q @ centroids.T).argmax(-1)]
    return float((pred == yq).float().mean())
