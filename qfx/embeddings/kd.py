"""Embedding QAT: knowledge distillation of a sentence-embedding model on unlabelled text.

The student is ``qfx.prepare_qat(st)`` (a SentenceTransformer whose encoder is the QAT graph
with feature taps); the teacher is the fp32 ``st``. Per batch of texts, with ``e`` the pooled
(and, when the model normalizes, normalized) sentence embedding computed by the model's own
Pooling / Normalize modules, ``h[l]`` the hidden state after layer ``l`` (0 = embeddings)
and ``a[l]`` the pre-softmax attention scores ``scale * q k^T`` of layer ``l`` (``[B, H, S, S]``)::

    loss = emb * mean_i (1 - cos(e_s[i], e_t[i]))                       embedding direction
         + sim * mean_ij (cos(e_s[i], e_s[j]) - cos(e_t[i], e_t[j]))^2   in-batch geometry
         + rep * sum_l MSE(h_s[l], h_t[l])  over real (unpadded) tokens  "Rep" (the paper's 3.1)
         + att * sum_l MSE(a_s[l], a_t[l])  over valid (query, key) pairs "Att*" (the paper's 3.1)

``emb`` aligns each text with its teacher embedding; ``sim`` keeps the neighbourhood
structure that retrieval reads; ``rep`` guides every layer; ``att`` (off by default) matches
every layer's attention scores, the term of the classification KD (:mod:`qfx.train.losses`,
whose helpers compute it here too). No labels are used.

This is its own short loop (one process, no checkpoints): embedding models train in minutes
and the KD trainer of :mod:`qfx.train` is built around classification logits.

Example::

    >>> qat = qfx.prepare_qat(st, config=qfx.QuantConfig(4, 4, symmetric=False))
    >>> result = qfx.embeddings.distill(st, qat, texts, DistillConfig(steps=200, batch_size=32))
    >>> int4 = qfx.compile(qat, mode="int4", target="cpu")
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from qfx.embeddings.st import EncoderAdapter, _replace_encoder, encoder_of, example_inputs, require_sentence_transformers
from qfx.train.config import KDConfigBase, optimizer_step
from qfx.train.losses import _masked_mse

__all__ = ["EmbeddingKDWeights", "DistillConfig", "DistillResult", "distill", "embedding_kd_loss"]


@dataclass(frozen=True)
class EmbeddingKDWeights:
    """Weights of the loss terms (see the module docstring); each finite and >= 0, not all 0.

    ``att`` (pre-softmax attention scores, default 0: off) is the 4th field, so positional
    ``EmbeddingKDWeights(emb, sim, rep)`` keeps its meaning.
    """

    emb: float = 1.0
    sim: float = 1.0
    rep: float = 1.0
    att: float = 0.0

    def __post_init__(self) -> None:
        for name in ("emb", "sim", "rep", "att"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"EmbeddingKDWeights({name}={v!r}) must be a finite weight >= 0")
        if self.emb + self.sim + self.rep + self.att == 0:
            raise ValueError("EmbeddingKDWeights: all weights are 0; set at least one of emb / sim / rep / att")

    @property
    def needs_features(self) -> bool:
        """Whether the loss reads the feature taps (Rep or Att)."""
        return bool(self.rep or self.att)


@dataclass(frozen=True)
class DistillConfig(KDConfigBase):
    """One distillation run: the optimisation of :class:`qfx.train.config.KDConfigBase` (AdamW,
    linear warmup over ``warmup`` of the steps, then linear decay), then:

    Args:
        batch_size: texts per step.
        dropout: train with the encoder's dropout on (off by default: the target is the
            deterministic teacher, and short runs converge faster without the noise).
        eval_every: steps between evaluations on ``eval_texts`` (0: only at the end).
        seed: batch order and initial state are functions of (seed, step).
    """

    warmup: float = 0.1
    batch_size: int = 32
    dropout: bool = False
    eval_every: int = 0
    seed: int = 0
    progress: bool = True
    desc: str = "embedding KD"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_positive("batch_size")
        if not (isinstance(self.eval_every, int) and self.eval_every >= 0):
            raise ValueError(f"DistillConfig(eval_every={self.eval_every!r}) must be an int >= 0 (0: evaluate at the end only)")


@dataclass
class DistillResult:
    """``history``: one dict per evaluation (step, loss terms of that step, eval ``cos_mean``)."""

    history: list[dict[str, float]] = field(default_factory=list)
    steps_done: int = 0
    wall_s: float = 0.0


def embedding_kd_loss(
    s_emb: torch.Tensor,
    t_emb: torch.Tensor,
    s_hidden: Sequence[torch.Tensor],
    t_hidden: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    weights: EmbeddingKDWeights,
    s_att: Sequence[torch.Tensor] = (),
    t_att: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch (module docstring) and the float value of each term.

    Args:
        s_emb, t_emb: ``[B, D]`` sentence embeddings. s_hidden, t_hidden: ``[B, S, D]`` hidden
            states per layer (same count). attention_mask: ``[B, S]``, 1 on real tokens.
        s_att, t_att: ``[B, H, S, S]`` pre-softmax attention scores per layer (same count;
            ``FeatureRecorder.scores(l)``), needed when ``weights.att`` > 0. Only pairs of a
            real query and a real key count, as in :func:`qfx.train.losses.kd_loss`.
    """
    if s_emb.shape != t_emb.shape:
        raise ValueError(f"student embeddings {tuple(s_emb.shape)} and teacher embeddings {tuple(t_emb.shape)} differ: different models")
    terms: dict[str, torch.Tensor] = {}
    s_n, t_n = F.normalize(s_emb.float(), dim=-1), F.normalize(t_emb.float(), dim=-1).detach()
    if weights.emb:
        terms["emb"] = (1 - (s_n * t_n).sum(-1)).mean()
    if weights.sim:
        terms["sim"] = ((s_n @ s_n.T - t_n @ t_n.T) ** 2).mean()
    if weights.rep:
        if len(s_hidden) != len(t_hidden) or not s_hidden:
            raise ValueError(f"Rep loss: the student has {len(s_hidden)} hidden states and the teacher {len(t_hidden)}")
        valid = attention_mask.bool()
        terms["rep"] = sum(_masked_mse(s, t.detach(), valid[..., None]) for s, t in zip(s_hidden, t_hidden))
    if weights.att:
        if len(s_att) != len(t_att) or not s_att:
            raise ValueError(f"Att loss: the student has {len(s_att)} attention layers and the teacher {len(t_att)}")
        valid = attention_mask.bool()
        pair = valid[:, None, None, :] & valid[:, None, :, None]  # [B, 1, S(query), S(key)]
        terms["att"] = sum(_masked_mse(s, t.detach(), pair) for s, t in zip(s_att, t_att))
    total = sum(getattr(weights, k) * v for k, v in terms.items())
    return total, {k: float(v.detach()) for k, v in terms.items()}


def _tapped_teacher(teacher, device: torch.device):
    """A frozen copy of the fp32 SentenceTransformer on ``device`` whose encoder is a graph with
    feature taps, captured there (a captured graph runs only on its capture device)."""
    from qfx.capture import capture
    from qfx.passes.expose_features import expose_features

    encoder = copy.deepcopy(encoder_of(teacher)).to(device).eval()
    gm = expose_features(capture(encoder, example_kwargs=example_inputs(teacher, device=device)))
    out = _replace_encoder(teacher, EncoderAdapter(gm, encoder.config, torch.float32))
    for module in list(out)[1:]:
        module.to(device)
    for p in out.parameters():
        p.requires_grad_(False)
    return out.eval()


def _embed(st, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings through ``st``'s own modules (its pooling, dense, normalize)."""
    return st(dict(inputs))["sentence_embedding"]


def _hidden(rec) -> list[torch.Tensor]:
    return [rec.hidden[i] for i in sorted(rec.hidden)]


def _scores(rec) -> list[torch.Tensor]:
    """Pre-softmax attention scores of every layer (fp32), as the classification KD's Att* reads them."""
    return [rec.scores(layer).float() for layer in sorted(rec.q)]


@torch.no_grad()
def _eval_cos(teacher, student, texts: Sequence[str], batch_size: int) -> float:
    cos = []
    for start in range(0, len(texts), batch_size):
        inputs = example_inputs(teacher, texts[start : start + batch_size])
        cos.append(F.cosine_similarity(_embed(student, inputs).float(), _embed(teacher, inputs).float(), dim=-1))
    return float(torch.cat(cos).mean())


def distill(
    teacher,
    student,
    texts: Sequence[str],
    cfg: DistillConfig,
    weights: EmbeddingKDWeights = EmbeddingKDWeights(),
    eval_texts: Sequence[str] | None = None,
) -> DistillResult:
    """Train ``student`` (``qfx.prepare_qat`` of ``teacher``) to embed ``texts`` as ``teacher`` does.

    Args:
        teacher: the fp32 ``SentenceTransformer``. student: ``qfx.prepare_qat(teacher, ...)``
            (a SentenceTransformer holding the QAT graph with feature taps); trained in place.
        texts: unlabelled training texts. eval_texts: held-out texts for the mean cosine to
            the teacher in ``history`` (optional).

    Returns:
        :class:`DistillResult`; ``student`` is left in eval mode.
    """
    from qfx.api import is_qat_model
    from qfx.passes.expose_features import FeatureRecorder, feature_taps

    require_sentence_transformers()
    gm = encoder_of(student)
    if not is_qat_model(gm):
        raise ValueError("student: expected qfx.prepare_qat(teacher) (a SentenceTransformer holding a QAT graph), got a model without one")
    if weights.needs_features and not feature_taps(gm):
        raise ValueError("student: its QAT graph has no feature taps for the Rep / Att loss; prepare it with qfx.prepare_qat(st) (taps are on by default)")
    texts = [t for t in texts if t and t.strip()]
    if len(texts) < 2:
        raise ValueError(f"texts: need at least 2 non-empty texts to distil on, got {len(texts)}")
    device = student.device
    t_st = _tapped_teacher(teacher, device)
    t_rec, s_rec = FeatureRecorder(encoder_of(t_st)), FeatureRecorder(gm)
    params = [p for p in student.parameters() if p.is_floating_point()]
    low = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype != torch.float32})
    if low:
        raise ValueError(
            f"student: parameters in {', '.join(low)}; QAT updates float32 master weights (AdamW steps in "
            "half precision underflow and diverge to NaN). Load the teacher in float32, e.g. "
            "SentenceTransformer(path, model_kwargs={'dtype': torch.float32}), or call student.float()"
        )
    for p in params:
        p.requires_grad_(True)
    opt, sched = cfg.optimizer(params)
    from tqdm.auto import tqdm

    result, t0 = DistillResult(), time.perf_counter()
    per_epoch = max(len(texts) // cfg.batch_size, 1)
    student.train(cfg.dropout)
    with tqdm(total=cfg.steps, desc=cfg.desc, disable=not cfg.progress, dynamic_ncols=True, leave=False) as bar:
        for step in range(cfg.steps):
            epoch, pos = divmod(step, per_epoch)
            perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            batch = [texts[i] for i in perm[pos * cfg.batch_size : (pos + 1) * cfg.batch_size].tolist()]
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout, when on, is a function of the step
            inputs = example_inputs(teacher, batch, device=device)
            mask = inputs["attention_mask"]
            with torch.no_grad(), t_rec:
                t_emb = _embed(t_st, inputs)
                t_hidden = _hidden(t_rec)
                t_att = _scores(t_rec) if weights.att else []
            with s_rec:
                s_emb = _embed(student, inputs)
                s_hidden = _hidden(s_rec)
                s_att = _scores(s_rec) if weights.att else []
            loss, parts = embedding_kd_loss(s_emb, t_emb, s_hidden, t_hidden, mask, weights, s_att, t_att)
            t_rec.clear(), s_rec.clear()
            optimizer_step(loss, params, opt, sched, cfg.grad_clip)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in parts.items()})
            last = step + 1 == cfg.steps
            if last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
                row = {"step": step + 1, "loss": float(loss.detach()), **parts}
                if eval_texts:
                    student.eval()
                    row["cos_mean"] = _eval_cos(t_st, student, list(eval_texts), 128)
                    student.train(cfg.dropout)
                    if cfg.progress:
                        bar.write(f"[{cfg.desc}] step {step + 1}: held-out cosine to the teacher {row['cos_mean']:.4f}")
                result.history.append(row)
    student.eval()
    result.steps_done, result.wall_s = cfg.steps, time.perf_counter() - t0
    return result
