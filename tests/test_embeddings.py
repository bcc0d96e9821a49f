"""qfx.embeddings: sentence-transformers in and out, embedding KD, retrieval metrics.

A tiny random-init BERT is written as a sentence-transformers folder (the layout of the
packaged all-MiniLM-L6-v2: modules.json, 1_Pooling, Normalize) and loaded the way a user
loads one; tests that need sentence-transformers skip cleanly without it.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import qfx
from qfx.embeddings import metrics
from qfx.embeddings.kd import DistillConfig, EmbeddingKDWeights, distill, embedding_kd_loss

WORDS = [f"w{i}" for i in range(90)]
TEXTS = [" ".join(WORDS[(7 * i + j * 3) % 90] for j in range(3 + i % 6)) for i in range(24)]


def _write_st_folder(path, hidden=32, layers=2):
    """A random-init BERT + WordPiece tokenizer + pooling/normalize configs in ``path``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=4 * hidden, max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    return path


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
    pytest.importorskip("sentence_transformers")
    return _write_st_folder(tmp_path_factory.mktemp("tiny_st"))


@pytest.fixture(scope="module")
def tiny_st(st_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(st_dir), device="cpu")


# --------------------------------------------------------------------------- no sentence-transformers needed


def test_missing_sentence_transformers_names_the_extra(monkeypatch):
    from qfx.embeddings import require_sentence_transformers

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"qfx\[embeddings\]"):
        require_sentence_transformers()


def test_plain_modules_are_not_sentence_transformers():
    from qfx.embeddings import is_sentence_transformer

    assert not is_sentence_transformer(torch.nn.Linear(2, 2))
    assert not is_sentence_transformer("all-MiniLM-L6-v2")


def test_agreement_identical_and_permuted():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(30, 8, generator=g)
    same = metrics.agreement(ref, ref * 3.0)  # scale does not matter: rows are normalised
    assert same["cos_mean"] == pytest.approx(1.0, abs=1e-6) and same["top1"] == 1.0 and same["top10"] == 1.0
    other = metrics.agreement(ref, torch.randn(30, 8, generator=g))
    assert other["cos_mean"] < 0.5 and other["top1"] < 0.5
    with pytest.raises(ValueError, match="same texts"):
        metrics.agreement(ref, ref[:10])


def test_nearest_centroid_separable_clusters():
    g = torch.Generator().manual_seed(1)
    centers = torch.tensor([[5.0, 0, 0], [0, 5.0, 0]])
    labels = [0, 1] * 20
    pts = centers[labels] + 0.3 * torch.randn(40, 3, generator=g)
    assert metrics.nearest_centroid_accuracy(pts[:20], labels[:20], pts[20:], labels[20:]) == 1.0
    assert metrics.nearest_centroid_accuracy(pts[:20], labels[:20], pts[20:], [1 - y for y in labels[20:]]) == 0.0


def test_kd_weights_and_config_validate():
    with pytest.raises(ValueError, match="emb"):
        EmbeddingKDWeights(emb=-1.0)
    with pytest.raises(ValueError, match="all weights are 0"):
        EmbeddingKDWeights(0, 0, 0)
    with pytest.raises(ValueError, match="steps"):
        DistillConfig(steps=0)


def test_kd_loss_is_zero_for_identical_student():
    g = torch.Generator().manual_seed(2)
    e = torch.randn(4, 8, generator=g)
    h = [torch.randn(4, 5, 8, generator=g) for _ in range(3)]
    mask = torch.ones(4, 5, dtype=torch.long)
    loss, parts = embedding_kd_loss(e, e.clone(), h, [x.clone() for x in h], mask, EmbeddingKDWeights())
    assert float(loss) == pytest.approx(0.0, abs=1e-6) and set(parts) == {"emb", "sim", "rep"}
    mask[:, 3:] = 0  # padded tokens do not count in the Rep loss
    moved = [x.clone() for x in h]
    for x in moved:
        x[:, 3:] += 10
    assert float(embedding_kd_loss(e, e, h, moved, mask, EmbeddingKDWeights(rep=1, emb=0, sim=0))[0]) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- sentence-transformers in and out


def test_compile_returns_a_sentence_transformer_that_encodes_like_the_original(tiny_st):
    from sentence_transformers import SentenceTransformer

    ref = tiny_st.encode(TEXTS, convert_to_tensor=True)
    int8 = qfx.compile(tiny_st, mode="int8", target="cpu")
    assert isinstance(int8, SentenceTransformer) and type(tiny_st[0].model if hasattr(tiny_st[0], "model") else tiny_st[0].auto_model).__name__ == "BertModel"
    emb = int8.encode(TEXTS, convert_to_tensor=True)
    assert emb.shape == ref.shape and emb.dtype == ref.dtype
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)  # the Normalize module ran
    assert float((emb * ref).sum(-1).min()) > 0.99
    # batching: batch size does not change a text's embedding; numpy output by default, like the original
    small = int8.encode(TEXTS, batch_size=3)
    assert isinstance(small, np.ndarray) and np.allclose(small, emb.numpy(), atol=1e-5)
    raw = int8.encode(TEXTS[:4], normalize_embeddings=True, convert_to_tensor=True)
    assert torch.allclose(raw, emb[:4], atol=1e-5)


def test_encode_shows_the_progress_bar(tiny_st, capsys):
    int8 = qfx.compile(tiny_st, mode="int8", target="cpu")
    int8.encode(TEXTS, batch_size=8, show_progress_bar=True)
    err = capsys.readouterr().err
    assert "Batches" in err and "3/3" in err


def test_prepare_qat_twin_equals_compiled_and_trains(tiny_st):
    qat = qfx.prepare_qat(tiny_st, config=qfx.QuantConfig(4, 4, symmetric=False))
    twin = qat.encode(TEXTS, convert_to_tensor=True)
    compiled = qfx.compile(qat, mode="int4", target="cpu")
    assert torch.equal(compiled.encode(TEXTS, convert_to_tensor=True), twin)  # the twin is the integer path
    assert any(p.requires_grad for p in qat.parameters())
    with pytest.raises(ValueError, match="int4"):
        qfx.compile(qat, mode="int8")
    with pytest.raises(ValueError, match="already holds a qfx model"):
        qfx.prepare_qat(qat)
    with pytest.raises(ValueError, match="example_args"):
        qfx.compile(tiny_st, mode="int8", example_args=(torch.zeros(1, 4, dtype=torch.long),))


def test_distill_lowers_the_kd_loss_and_keeps_the_teacher(tiny_st):
    held_out, train = TEXTS[:8], TEXTS[8:] * 4
    qat = qfx.prepare_qat(tiny_st, config=qfx.QuantConfig(4, 4, symmetric=False))
    cfg = DistillConfig(steps=10, batch_size=8, lr=3e-3, progress=False, eval_every=1)
    result = distill(tiny_st, qat, train, cfg, eval_texts=held_out[:4])
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 10 and set(result.history[0]) >= {"emb", "sim", "rep", "cos_mean"}
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    assert 0.9 < result.history[-1]["cos_mean"] <= 1.0 + 1e-6
    assert type(tiny_st[0].model if hasattr(tiny_st[0], "model") else tiny_st[0].auto_model).__name__ == "BertModel"  # teacher untouched


def test_packaged_minilm_folder_compiles_as_sentence_transformer(minilm_path):
    st_mod = pytest.importorskip("sentence_transformers")
    st = st_mod.SentenceTransformer(str(minilm_path), device="cpu")
    texts = ["a fresh, witty film", "dull and far too long", "the chef's pasta was perfect"]
    ref = st.encode(texts, convert_to_tensor=True)
    int8 = qfx.compile(st, mode="int8", target="cpu")
    assert float((int8.encode(texts, convert_to_tensor=True) * ref).sum(-1).min()) > 0.99


@pytest.mark.gpu
def test_compiled_sentence_transformer_encodes_on_the_gpu(tiny_st):
    target = qfx.detect_target().name
    ref = tiny_st.encode(TEXTS, convert_to_tensor=True)
    int8 = qfx.compile(tiny_st, mode="int8", target=target)
    emb = int8.encode(TEXTS, convert_to_tensor=True)
    assert emb.device.type == "cuda" and emb.dtype == ref.dtype  # fp16 float parts, fp32 embeddings like the original
    assert float((emb.cpu() * ref).sum(-1).min()) > 0.98
    qat = qfx.prepare_qat(tiny_st.to("cuda"), config=qfx.QuantConfig(8, 8))
    assert qat.encode(TEXTS, convert_to_tensor=True).device.type == "cuda"
    tiny_st.to("cpu")


def test_distill_refuses_half_precision_master_weights(tiny_st):
    """An fp16 checkpoint loads as fp16: AdamW on fp16 weights went to NaN in two steps on the GPU."""
    qat = qfx.prepare_qat(tiny_st, config=qfx.QuantConfig(8, 8))
    qat.half()
    with pytest.raises(ValueError, match="float32 master weights"):
        distill(tiny_st, qat, TEXTS * 2, DistillConfig(steps=1, batch_size=4, progress=False))
