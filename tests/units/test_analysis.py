"""qfx.decoders.analysis: positional perplexity against closed forms, activation ranges, PNGs, the
duplicate-content-word metric and the generation sweep, bad input."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

from qfx.decoders.analysis import (duplicate_content_words, generation_sweep, generation_throughput, positional_activation_range,
                          positional_perplexity)


class _Uniform(nn.Module):
    """Uniform next-token distribution over V: perplexity exactly V at every position."""

    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.v))


class _Copy(nn.Module):
    """Puts probability p on the true next token from position `start` on: ppl 1/p there."""

    def __init__(self, v, start):
        super().__init__()
        self.v, self.start = v, start

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.v)
        nxt = torch.roll(input_ids, -1, dims=1)
        logits[:, self.start:].scatter_(-1, nxt[:, self.start:].unsqueeze(-1), math.log(9 * (self.v - 1)))
        return SimpleNamespace(logits=logits)  # p = 9 (V-1) / (9 (V-1) + V - 1) = 0.9


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def test_positional_perplexity_closed_forms(tmp_path):
    ids = torch.randint(0, 20, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # padding: not scored
    png = tmp_path / "fig6.png"
    out = positional_perplexity({"uniform": _Uniform(20), "copy": _Copy(20, 4)}, [{"input_ids": ids, "attention_mask": mask}], png=png)
    assert out["uniform"].shape == (11,)
    assert torch.allclose(out["uniform"], torch.full((11,), 20.0))
    assert out["uniform/overall"].item() == pytest.approx(20.0)
    assert torch.allclose(out["copy"][:4], torch.full((4,), 20.0))
    assert torch.allclose(out["copy"][4:], torch.full((7,), 1 / 0.9), rtol=1e-5)
    # overall weights positions by their counts (row 0 scores 5 tokens, rows 1-2 score 11 each)
    n_early, n_late = 3 * 4, 1 * 1 + 2 * 7
    expected = math.exp((n_early * math.log(20) + n_late * math.log(1 / 0.9)) / (n_early + n_late))
    assert out["copy/overall"].item() == pytest.approx(expected, rel=1e-5)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_positional_activation_range(tmp_path):
    m = _gpt2()
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    png = tmp_path / "fig5.png"
    r = positional_activation_range(m, [{"input_ids": ids}, {"input_ids": ids[:, :8]}], layers=[1], png=png)
    assert set(r) == {"1.attn.c_attn", "1.attn.c_proj", "1.mlp.c_fc", "1.mlp.c_proj"}
    seen = []
    h = m.transformer.h[1].mlp.c_fc.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        m(input_ids=ids)
    h.remove()
    x = seen[0]
    assert torch.allclose(r["1.mlp.c_fc"], (x.amax(-1) - x.amin(-1)).amax(0))
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="layers contains 5, but the model has 2 blocks"):
        positional_activation_range(m, [{"input_ids": ids}], layers=[5])


def test_duplicate_content_words():
    stop = {"the", "and", "of"}
    assert duplicate_content_words("The king, the KING and the queen of Denmark", stop) == 1
    assert duplicate_content_words("to be or not to be", {"to", "or", "not"}) == 1
    assert duplicate_content_words("", stop) == 0


def test_generation_sweep_grid_and_bad_models():
    m = _gpt2()
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    decode = lambda ids: " ".join("w%d" % (i % 7) for i in ids)  # noqa: E731
    rows = generation_sweep(m, prompts, decode, {"w0"}, temperatures=(0.7, 1.0), top_ks=(5,), max_new_tokens=(6, 10),
                            pad_token_id=0)
    assert [(r.temperature, r.top_k, r.max_new_tokens) for r in rows] == [(0.7, 5, 6), (0.7, 5, 10), (1.0, 5, 6), (1.0, 5, 10)]
    for r in rows:
        assert len(r.samples) == 2 and all(len(s.split()) == r.max_new_tokens for s in r.samples)
        assert 0 <= r.duplicates <= r.content_words <= r.max_new_tokens
    again = generation_sweep(m, prompts, decode, {"w0"}, temperatures=(0.7,), top_ks=(5,), max_new_tokens=(6,), pad_token_id=0)
    assert again[0].samples == rows[0].samples  # seeded: the same stream for every model compared
    with pytest.raises(ValueError, match="needs 67 positions, but the model has 64"):
        generation_sweep(m, prompts, decode, set(), max_new_tokens=(64,))
    with pytest.raises(ValueError, match="no causal LM head"):
        generation_sweep(GPT2Model(m.config), prompts, decode, set())
    with pytest.raises(ValueError, match="batches is empty"):
        positional_perplexity(m, [])


def test_generation_throughput_counts_every_token_and_refuses_bad_models():
    m = _gpt2()
    r = generation_throughput(m, batch_size=2, new_tokens=8, prompt_len=4, repeats=1)
    assert r["batch"] == 2 and r["new_tokens"] == 8
    assert r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(16 / r["seconds"])
    with pytest.raises(ValueError, match="generation_throughput needs e.g. GPT2LMHeadModel"):
        generation_throughput(GPT2Model(m.config))
    with pytest.raises(ValueError, match="needs 80 positions, but the model has 64"):
        generation_throughput(m, new_tokens=64, prompt_len=16)
    with pytest.raises(ValueError, match="each must be >= 1"):
        generation_throughput(m, batch_size=0)
