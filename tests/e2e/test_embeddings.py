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
from models import WORDS, write_st_folder
from qfx.embeddings import metrics
from qfx.embeddings.kd import DistillConfig, EmbeddingKDWeights, distill, embedding_kd_loss

TEXTS = [" ".join(WORDS[(7 * i + j * 3) % 90] for j in range(3 + i % 6)) for i in range(24)]


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
    pytest.importorskip("sentence_transformers")
    return write_st_folder(tmp_path_factory.mktemp("tiny_st"))


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


def test_blockwise_top1_identical_permuted_and_short_sets():
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(450, 16, generator=g)
    same = metrics.agreement(ref, ref * 2.0)
    assert same["top1_200"] == 1.0 and metrics.blockwise_top1(ref, ref) == 1.0
    # block 0 keeps its geometry; block 1 is shuffled (rows 200..399 get other rows' embeddings);
    # the 50 rows after the last full block never count
    emb = ref.clone()
    perm = torch.randperm(200, generator=g) + 200
    emb[200:400] = ref[perm]
    emb[400:] = torch.randn(50, 16, generator=g)
    block1 = metrics.agreement(ref[200:400], emb[200:400])["top1"]
    assert block1 < 0.2
    out = metrics.agreement(ref, emb)
    assert out["top1_200"] == pytest.approx((1.0 + block1) / 2, abs=1e-6)
    assert metrics.blockwise_top1(ref[:400], emb[:400]) == pytest.approx(out["top1_200"], abs=1e-6)  # remainder dropped
    # a known small case, blocks of 4: pairs (0, 1) and (2, 3) are each other's nearest neighbours;
    # in block 0 rows 1 and 2 trade embeddings, so the pairs become (0, 2) and (1, 3): no text
    # keeps its neighbour there (0 / 4), block 1 is unchanged (4 / 4)
    pts = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    swapped = pts[[0, 2, 1, 3]]
    two = torch.cat([swapped, pts])
    assert metrics.blockwise_top1(torch.cat([pts, pts]), two, block=4) == pytest.approx((0.0 + 1.0) / 2)
    # fewer texts than one block: no key (and keys of the full-set metrics unchanged)
    short = metrics.agreement(ref[:199], ref[:199])
    assert "top1_200" not in short and set(short) == {"cos_mean", "cos_min", "top1", "top10"}
    assert metrics.blockwise_top1(ref[:199], ref[:199]) is None
    assert metrics.agreement(ref[:200], emb[:200])["top1_200"] == 1.0


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
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="att"):
            EmbeddingKDWeights(att=bad)
    assert EmbeddingKDWeights().att == 0.0 and not EmbeddingKDWeights(rep=0).needs_features
    assert EmbeddingKDWeights(0, 0, 0, 1.0).needs_features  # att alone is a valid loss


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


def test_kd_loss_attention_term_masks_padding_and_vanishes_for_the_teacher():
    g = torch.Generator().manual_seed(4)
    e, h = torch.randn(2, 8, generator=g), [torch.randn(2, 5, 8, generator=g)]
    t_att = [torch.randn(2, 2, 5, 5, generator=g) for _ in range(3)]  # [B, H, S, S] scores per layer
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    w = EmbeddingKDWeights(emb=1, sim=0, rep=0, att=1)
    loss, parts = embedding_kd_loss(e, e, h, h, mask, w, [a.clone() for a in t_att], t_att)
    assert set(parts) == {"emb", "att"} and parts["att"] == pytest.approx(0.0, abs=1e-7)
    s_att = [a + 0.5 for a in t_att]
    s_att[0].requires_grad_(True)
    loss, parts = embedding_kd_loss(e, e, h, h, mask, w, s_att, t_att)
    assert parts["att"] == pytest.approx(3 * 0.25, rel=1e-5)  # sum over layers of the MSE
    loss.backward()
    assert s_att[0].grad is not None and float(s_att[0].grad[1, :, 3:, :].abs().sum()) == 0.0  # padded queries
    assert float(s_att[0].grad[1, :, :, 3:].abs().sum()) == 0.0  # padded keys
    moved = [a.clone() for a in t_att]
    for a in moved:
        a[1, :, :, 3:] += 10  # padded keys do not count
    assert embedding_kd_loss(e, e, h, h, mask, w, moved, t_att)[1]["att"] == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="Att loss"):
        embedding_kd_loss(e, e, h, h, mask, w, t_att[:2], t_att)


def test_example_only_and_loss_flags_parse():
    from pathlib import Path

    examples = str(Path(__file__).resolve().parents[2] / "examples")
    sys.path.insert(0, examples)
    try:
        import embedding_qat
    finally:
        sys.path.remove(examples)
    parse = embedding_qat._args
    assert parse([]).only == ("ptq8", "qat8", "ptq4", "qat4")
    args = parse(["--only", "qat4, PTQ8", "--w-att", "2", "--eval-every", "5", "--tag", "att2"])
    assert args.only == ("ptq8", "qat4")  # table order, case-insensitive
    assert (args.w_emb, args.w_sim, args.w_rep, args.w_att, args.eval_every, args.tag) == (4.0, 4.0, 1.0, 2.0, 5, "att2")
    assert embedding_qat.parse_only("all") == parse([]).only
    assert (parse([]).rotation, parse([]).group4, parse([]).gptq_init) == (None, None, 0)
    assert parse(["--gptq-init", "256"]).gptq_init == 256
    assert (parse([]).precision4, parse(["--precision4", "W8A4"]).precision4) == ("W4A4", "W8A4")
    assert (parse(["--rotation", "128", "--group4", "64"]).rotation, parse(["--group4", "64"]).group4) == (128, 64)
    for bad in (["--only", "qat5"], ["--only", ","], ["--w-att", "-1"], ["--w-emb", "0", "--w-sim", "0", "--w-rep", "0"], ["--eval-every", "-1"],
                ["--rotation", "100"], ["--group4", "0"], ["--gptq-init", "-1"], ["--precision4", "W2A2"]):
        with pytest.raises(SystemExit):
            parse(bad)


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


def test_distill_with_the_attention_term(tiny_st):
    """att > 0: the teacher's taps give q/k too; the term is logged, finite and positive."""
    qat = qfx.prepare_qat(tiny_st, config=qfx.QuantConfig(4, 4, symmetric=False))
    cfg = DistillConfig(steps=2, batch_size=8, lr=3e-3, progress=False, eval_every=1)
    result = distill(tiny_st, qat, TEXTS, cfg, EmbeddingKDWeights(emb=1, sim=1, rep=1, att=1), eval_texts=TEXTS[:4])
    atts = [row["att"] for row in result.history]
    assert len(atts) == 2 and all(np.isfinite(a) and a > 0 for a in atts), atts
    assert all(np.isfinite(row["cos_mean"]) for row in result.history)


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


def test_plot_embedding_runs_reads_results_and_names_a_missing_folder(tmp_path):
    from pathlib import Path

    examples = str(Path(__file__).resolve().parents[2] / "examples")
    sys.path.insert(0, examples)
    try:
        import plot_embedding_runs
    finally:
        sys.path.remove(examples)
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"model": "fp32", "cos_mean": 1.0, "top1": 1.0}, {"model": "QAT W4A4 rot128", "cos_mean": 0.97, "top1": 0.7},
            {"model": "PTQ W8A8", "cos_mean": 0.997, "top1": 0.9}, {"model": "QAT W8A4 rot128", "cos_mean": 0.98, "top1": 0.71}]
    (run / "results.json").write_text(json.dumps({"rows": rows, "meta": {"tag": "t"}}))
    got = plot_embedding_runs.rows([str(run)])
    assert [r["model"] for r in got] == ["QAT W4A4 rot128", "PTQ W8A8", "QAT W8A4 rot128"] and {r["run"] for r in got} == {"t"}
    assert plot_embedding_runs._colour("QAT W8A4 rot128") != plot_embedding_runs._colour("QAT W4A4 rot128")
    with pytest.raises(ValueError, match="names no precision"):
        plot_embedding_runs._colour("QAT W2A2")
    assert plot_embedding_runs.main([str(run), "--out", str(tmp_path / "p.png")]) == 0 and (tmp_path / "p.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="embedding_qat.py --out"):
        plot_embedding_runs.rows([str(tmp_path / "nope")])


def test_gptq_init_of_a_sentence_transformer_student_calibrates_on_texts(tiny_st):
    from qfx.train.gptq_init import gptq_init

    qat = qfx.prepare_qat(tiny_st, config=qfx.QuantConfig(4, 4, symmetric=False, rotation=16))
    errs = gptq_init(qat, TEXTS)
    assert errs and sum(g for _, g in errs.values()) < sum(r for r, _ in errs.values())
    twin = qat.encode(TEXTS, convert_to_tensor=True)
    assert torch.equal(qfx.compile(qat, mode="int4", target="cpu").encode(TEXTS, convert_to_tensor=True), twin)
    with pytest.raises(ValueError, match="list of texts"):
        gptq_init(qat, [])
