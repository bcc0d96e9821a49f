"""qfx.embeddings: sentence-embedding models (sentence-transformers in and out, embedding QAT).

* ``qfx.compile(st, mode=...)`` / ``qfx.prepare_qat(st)`` take a ``SentenceTransformer`` and
  return one whose ``encode`` is the original's (same pooling, normalization, batching,
  progress bar) running the qfx model (:mod:`qfx.embeddings.st`).
* :func:`distill`: QAT with knowledge distillation for embedding models: the student matches
  the teacher's pooled embeddings and its layer-wise hidden states on unlabelled text
  (:mod:`qfx.embeddings.kd`).
* :func:`agreement` / :func:`nearest_centroid_accuracy`: retrieval-style evaluation against
  the fp32 teacher (:mod:`qfx.embeddings.metrics`).

sentence-transformers is optional: ``pip install "qfx[embeddings]"``.

Example::

    >>> st = SentenceTransformer(str(qfx.models.minilm_path()), device="cpu")
    >>> qat = qfx.prepare_qat(st, config=qfx.QuantConfig(4, 4, symmetric=False))
    >>> qfx.embeddings.distill(st, qat, texts, qfx.embeddings.DistillConfig(steps=300))
    >>> int4 = qfx.compile(qat, mode="int4", target="cpu")
    >>> qfx.embeddings.agreement(st.encode(test), int4.encode(test))["top1"]
"""
from qfx.embeddings.kd import DistillConfig, DistillResult, EmbeddingKDWeights, distill, embedding_kd_loss
from qfx.embeddings.metrics import agreement, blockwise_top1, nearest_centroid_accuracy, neighbours
from qfx.embeddings.st import (
    EXTRA,
    EncoderAdapter,
    encoder_of,
    example_inputs,
    is_sentence_transformer,
    require_sentence_transformers,
)

__all__ = [
    "EXTRA",
    "EncoderAdapter",
    "encoder_of",
    "example_inputs",
    "is_sentence_transformer",
    "require_sentence_transformers",
    "DistillConfig",
    "DistillResult",
    "EmbeddingKDWeights",
    "distill",
    "embedding_kd_loss",
    "agreement",
    "blockwise_top1",
    "nearest_centroid_accuracy",
    "neighbours",
]
