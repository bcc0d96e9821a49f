"""The layer-wise KD loss of the paper (3.1): Logit + Att + Rep (+ CE).

Per batch, with ``map`` the teacher layer of each student layer::

    loss = logit * T^2 KL(softmax(t/T) || softmax(s/T))                        "Logit"
         + att   * sum_l MSE(att_s[l], att_t[map[l]])  over valid (query, key)  "Att*"/"Att"
         + rep   * sum_l MSE(h_s[l],  h_t[map[l]])     over valid tokens         "Rep"
         + ce    * CE(s, labels)

``att`` is the pre-softmax score ``scale * q k^T`` ("Att*", the paper's default for BERT) or
the softmax probabilities ("Att"). Every term is computed in fp32, whatever dtype the
features came in (mixed-precision runs hand bf16 features).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from qfx.passes.expose_features import FeatureRecorder

__all__ = ["KDWeights", "kd_loss", "check_pair"]

_ATTENTION_KINDS = ("scores", "probs")


@dataclass(frozen=True)
class KDWeights:
    """Weights of the loss terms; ``attention`` is ``"scores"`` (pre-softmax) or ``"probs"``."""

    logit: float = 1.0
    att: float = 1.0
    rep: float = 1.0
    ce: float = 0.0
    temperature: float = 1.0
    attention: str = "scores"

    def __post_init__(self) -> None:
        for name in ("logit", "att", "rep", "ce"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"KDWeights({name}={v!r}) must be a finite weight >= 0")
        if self.logit + self.att + self.rep + self.ce == 0:
            raise ValueError("KDWeights: all loss weights are 0; set at least one of logit/att/rep/ce")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"KDWeights(temperature={self.temperature!r}) must be > 0")
        if self.attention not in _ATTENTION_KINDS:
            raise ValueError(f"KDWeights(attention={self.attention!r}): use 'scores' (pre-softmax, Att*) or 'probs' (Att)")

    @property
    def needs_features(self) -> bool:
        return self.att > 0 or self.rep > 0


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (a-b)^2 in fp32 over the positions where ``mask`` (broadcastable to a) is true."""
    a = a.float()
    mask = mask.to(a.dtype).expand_as(a)
    return ((a - b.float()) ** 2 * mask).sum() / mask.sum().clamp_min(1)


def _attention(rec: FeatureRecorder, layer: int, key_mask: torch.Tensor, kind: str) -> torch.Tensor:
    scores = rec.scores(layer).float()
    if kind == "scores":
        return scores
    return torch.softmax(scores.masked_fill(~key_mask, float("-inf")), dim=-1)


def kd_loss(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    weights: KDWeights,
    s_rec: FeatureRecorder | None = None,
    t_rec: FeatureRecorder | None = None,
    layer_map: Sequence[int] = (),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Logit / Att / Rep (+ CE) loss of one batch.

    Shapes: logits ``[B, C]``, labels ``[B]``, attention_mask ``[B, S]``; the recorders hold
    hidden states ``[B, S, D]`` and q, k ``[B, H, S, d]`` per layer. Returns (loss, each term
    as a detached 0-d tensor): no host sync here; the loop converts them when it logs.

    Example::

        >>> loss, parts = kd_loss(s_logits, t_logits, labels, mask, KDWeights(att=0, rep=0))
        >>> float(parts["logit"])
    """
    terms: dict[str, torch.Tensor] = {}
    if weights.logit:
        T = weights.temperature
        terms["logit"] = F.kl_div(
            F.log_softmax(s_logits.float() / T, -1), F.log_softmax(t_logits.float() / T, -1), log_target=True, reduction="batchmean"
        ) * (T * T)
    if weights.ce:
        terms["ce"] = F.cross_entropy(s_logits.float(), labels)
    valid = attention_mask.bool()  # [B, S]
    if weights.att:
        key = valid[:, None, None, :]
        pair = key & valid[:, None, :, None]
        terms["att"] = sum(
            _masked_mse(_attention(s_rec, l, key, weights.attention), _attention(t_rec, t, key, weights.attention).detach(), pair)
            for l, t in enumerate(layer_map)
        )
    if weights.rep:
        tok = valid[..., None]
        pairs = [(0, 0)] + [(l + 1, t + 1) for l, t in enumerate(layer_map)]
        terms["rep"] = sum(_masked_mse(s_rec.hidden[i], t_rec.hidden[j].detach(), tok) for i, j in pairs)
    total = sum(getattr(weights, k) * v for k, v in terms.items())
    return total, {k: v.detach() for k, v in terms.items()}


def check_pair(s_rec: FeatureRecorder | None, t_rec: FeatureRecorder | None, layer_map: Sequence[int], s_out, t_out) -> None:
    """Teacher and student must agree on what the loss compares (checked on the first step)."""
    if s_out.shape != t_out.shape:
        raise ValueError(f"teacher logits {tuple(t_out.shape)} and student logits {tuple(s_out.shape)} differ: the models classify into different label sets")
    if s_rec is None:
        return
    if len(layer_map) != s_rec.num_layers or max(layer_map) >= t_rec.num_layers:
        raise ValueError(
            f"the student has {s_rec.num_layers} layers and the teacher {t_rec.num_layers}; layer_map={tuple(layer_map)} "
            "must give one teacher layer per student layer (see qfx.train.compose.reduce_layers)"
        )
    for i, j in [(0, 0)] + [(l + 1, t + 1) for l, t in enumerate(layer_map)]:
        if s_rec.hidden[i].shape != t_rec.hidden[j].shape:
            raise ValueError(
                f"student hidden state {i} {tuple(s_rec.hidden[i].shape)} and teacher hidden state {j} "
                f"{tuple(t_rec.hidden[j].shape)} differ: teacher and student architectures differ"
            )
    if s_rec.q[0].shape != t_rec.q[layer_map[0]].shape:
        raise ValueError(f"student and teacher attention shapes differ ({tuple(s_rec.q[0].shape)} vs {tuple(t_rec.q[0].shape)}): different head counts")
