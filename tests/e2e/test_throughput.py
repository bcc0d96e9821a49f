"""The throughput path: token-budget batches (qfx.runtime.buckets.token_budget_batches) and the
compiled SentenceTransformer's ``encode`` (qfx.embeddings.st.ThroughputEncode): the same
embeddings as sentence-transformers' own encode loop over the same compiled model, in the
caller's order. The ST tests skip cleanly without sentence-transformers."""
from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

import qfx
from qfx.runtime.buckets import Buckets, token_budget_batches


def test_token_budget_batches_cover_every_index_once_within_the_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(500)]
    buckets = Buckets(batch=(1, 8, 32, 64), seq=(32, 64, 128, 256, 384))
    batches = token_budget_batches(lengths, 4096, buckets)
    flat = [i for rows in batches for i in rows]
    assert sorted(flat) == list(range(500))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    for rows in batches:
        width = buckets.fit(1, lengths[rows[0]])[1]
        assert len(rows) <= 64 and (len(rows) * width <= 4096 or len(rows) == 1)
    assert len(batches) < 60  # full batches, not one text each
    long = token_budget_batches([600, 3], 512, buckets)  # longer than every bucket: alone, still served
    assert long == [[0], [1]]
    with pytest.raises(ValueError, match="token_budget"):
        token_budget_batches([3], 0)


@pytest.fixture(scope="module")
def compiled_st(tmp_path_factory):
    pytest.importorskip("sentence_transformers")
    from models import write_st_folder
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(write_st_folder(tmp_path_factory.mktemp("tiny_st_tp"))), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
        return qfx.compile(st, mode="int8", target="cpu")


def _texts(n: int) -> list[str]:
    rng = random.Random(1)
    return [" ".join(f"w{rng.randrange(90)}" for _ in range(rng.randint(1, 40))) for _ in range(n)]


def test_the_throughput_encode_gives_the_same_embeddings_in_order(compiled_st, capsys):
    from qfx.embeddings.st import ThroughputEncode

    assert not isinstance(compiled_st.encode, ThroughputEncode)  # CPU: ST's own loop (the twin's batches)
    encode = ThroughputEncode(compiled_st, token_budget=96)  # several batches of a few texts each
    texts = _texts(37)
    got = encode(texts, normalize_embeddings=True)
    want = type(compiled_st).encode(compiled_st, texts, batch_size=5, normalize_embeddings=True)  # ST's own loop
    assert isinstance(got, np.ndarray) and got.shape == want.shape and got.dtype == want.dtype
    # other batch compositions pad to other lengths: equal up to float rounding, in the caller's order
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    single = encode(texts[3])
    assert single.shape == want.shape[1:]
    capped = encode(texts, batch_size=4, show_progress_bar=True)  # at most 4 texts a batch, a bar
    np.testing.assert_allclose(capped, type(compiled_st).encode(compiled_st, texts), rtol=0, atol=2e-5)
    assert "Batches" in capsys.readouterr().err
    tensor = encode(texts[:4], convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (4, want.shape[1])
    by_st = type(compiled_st).encode(compiled_st, texts[:4], batch_size=4)
    np.testing.assert_allclose(tensor.numpy(), by_st, rtol=0, atol=2e-5)


def test_each_batch_gets_exactly_the_inputs_the_preprocessing_makes_of_it_alone(compiled_st):
    """The chunk is tokenized once and batches are slices of it: each must equal the model's own
    preprocessing of that batch's texts, tensor for tensor (right padding: sliced; left padding:
    tokenized batch by batch); every text lands in exactly one batch."""
    from qfx.embeddings.st import ThroughputEncode
    from qfx.runtime.buckets import Buckets

    encode = ThroughputEncode(compiled_st, token_budget=96)
    texts = _texts(29) + ["", "   "]  # empty texts: [CLS] [SEP] only
    preprocess = getattr(compiled_st, "preprocess", None) or compiled_st.tokenize
    names = {"input_ids", "attention_mask", "token_type_ids"}
    tokenizer = compiled_st.tokenizer
    side = tokenizer.padding_side
    try:
        for padding_side in ("right", "left"):
            tokenizer.padding_side = padding_side
            seen = []
            for rows, features in encode._batches(texts, Buckets(), names):
                want = preprocess([texts[i] for i in rows])
                assert set(features) == set(want)
                for k, v in want.items():
                    assert torch.equal(features[k], v) if isinstance(v, torch.Tensor) else features[k] == v, (k, rows)
                    # contiguous: a strided host tensor cannot be copied to the GPU asynchronously in one piece
                    assert not isinstance(v, torch.Tensor) or features[k].is_contiguous(), k
                seen += rows
            assert sorted(seen) == list(range(len(texts)))
    finally:
        tokenizer.padding_side = side


def test_the_rust_backend_tokenizes_a_chunk_as_the_preprocessing_does(compiled_st):
    """qfx.embeddings.fast_tokenize: the whole chunk, tensor for tensor, with the texts the sample
    check picks (whitespace, non-ASCII, empty, past the model's length); a preprocessing that does
    something the backend does not is caught by the sample check, with the text named; the
    throughput path says which tokenization ran."""
    from qfx.embeddings.fast_tokenize import sample_rows, tokenize_chunk
    from qfx.embeddings.st import ThroughputEncode
    from qfx.runtime.buckets import Buckets

    texts = _texts(40) + ["  leading", "trailing  ", "caf\u00e9 na\u00efve \u00dcber", "", " ".join(["w7"] * 700)]
    assert {40, 41, 42, 44} <= set(sample_rows(texts))  # whitespace, non-ASCII and the longest are checked
    preprocess = getattr(compiled_st, "preprocess", None) or compiled_st.tokenize
    whole, why = tokenize_chunk(compiled_st, texts, preprocess)
    assert whole is not None, why
    want = preprocess(texts)
    assert set(whole) == set(want)
    for k, v in want.items():
        assert torch.equal(whole[k], v) if isinstance(v, torch.Tensor) else whole[k] == v, k
    suffixed = lambda ts: preprocess([t + " w3" for t in ts])  # noqa: E731 - a preprocessing that edits texts
    whole, why = tokenize_chunk(compiled_st, texts, suffixed)
    assert whole is None and "input_ids of text 0 differs" in why, why
    encode = ThroughputEncode(compiled_st, token_budget=96)
    list(encode._batches(texts, Buckets(), {"input_ids", "attention_mask", "token_type_ids"}))
    assert encode.tokenized_by.startswith("the fast tokenizer's Rust backend"), encode.tokenized_by


def test_chunks_of_texts_give_the_same_embeddings_in_order(compiled_st):
    from qfx.embeddings.st import ThroughputEncode

    encode = ThroughputEncode(compiled_st, token_budget=64)
    texts = _texts(23)
    whole = encode(texts)
    encode.chunk_texts = 5  # five chunks, each tokenized once; other batches pad to other widths (CPU: padded)
    np.testing.assert_allclose(encode(texts), whole, rtol=0, atol=2e-5)


def test_calls_the_throughput_path_does_not_serve_go_to_the_original_encode(compiled_st):
    from qfx.embeddings.st import ThroughputEncode

    encode = ThroughputEncode(compiled_st)
    texts = _texts(3)
    got = encode(texts, prompt="query: ")
    want = type(compiled_st).encode(compiled_st, texts, prompt="query: ")
    np.testing.assert_array_equal(got, want)
    tokens = encode(texts, output_value="token_embeddings")
    assert isinstance(tokens, list) and tokens[0].dim() == 2


def test_run_many_returns_each_sequence_cut_to_its_length_in_order():
    from models import inputs, make

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
        cm = qfx.compile(make("bert", layers=1), mode="int8", target="cpu", example_kwargs=inputs(2, 8))
    rng = random.Random(2)
    lengths = [rng.randint(1, 20) for _ in range(9)]
    seqs = []
    for n in lengths:
        x = inputs(1, n, seed=n, pad=False)
        seqs.append({k: v[0] for k, v in x.items()})
    outs = cm.run_many(seqs, token_budget=48)
    for n, item, out in zip(lengths, seqs, outs):
        alone = cm(**{k: v[None] for k, v in item.items()})  # the sequence alone, no padding
        assert out.last_hidden_state.shape == (n, alone.last_hidden_state.shape[-1])
        torch.testing.assert_close(out.last_hidden_state, alone.last_hidden_state[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out.pooler_output, alone.pooler_output[0], rtol=0, atol=1e-5)
