"""How close an output is to the float model's, over the tokens that count.

A padded position's output is read by no one (poolers and heads mask it out), and the float
and quantized models may differ there arbitrarily: a cosine over all positions understates the
agreement (issue 22: 0.937 over padded positions where the real tokens give 0.996).
"""
from __future__ import annotations

import torch

__all__ = ["real_token_cosine"]


def real_token_cosine(ref: torch.Tensor, got: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Per sequence, the cosine of ``got`` to ``ref`` over its real tokens.

    Args:
        ref, got: ``[batch, seq, ...]`` per-token outputs (a last hidden state), or
            ``[batch, ...]`` per-sequence outputs (logits, pooled embeddings: taken whole).
        attention_mask: ``[batch, seq]``, nonzero at real tokens; None: every token is real.

    Returns:
        ``[batch]`` float64 cosines (a sequence with no real token gets 1.0: nothing to compare).

    Example::

        >>> real_token_cosine(model(**batch)[0], compiled(**batch)[0], batch["attention_mask"]).min()
    """
    if ref.shape != got.shape:
        raise ValueError(f"ref has shape {tuple(ref.shape)} but got has {tuple(got.shape)}: compare the same output")
    ref, got = ref.detach().double().cpu(), got.detach().double().cpu()
    per_token = attention_mask is not None and ref.dim() >= 2 and tuple(ref.shape[:2]) == tuple(attention_mask.shape)
    if not per_token:
        return torch.nn.functional.cosine_similarity(ref.flatten(1), got.flatten(1), dim=-1)
    real = attention_mask.detach().cpu() != 0
    out = []
    for r, g, keep in zip(ref, got, real):
        r, g = r[keep].flatten(), g[keep].flatten()
        out.append(torch.nn.functional.cosine_similarity(r, g, dim=0) if r.numel() else torch.tensor(1.0, dtype=torch.float64))
    return torch.stack(out)
