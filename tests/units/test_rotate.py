"""qfx/decoders/rotate.py: Hadamard rotations folded into a Llama-style decoder keep its outputs (fp64,
exact arithmetic up to ~1e-15), spread activation outliers, and refuse what they cannot rotate."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from qfx.decoders.rotate import RotatedInput, ScalelessRMSNorm, random_hadamard, rotate_decoder


class _ExactRMSNorm(nn.Module):
    """HF's RMSNorm computes in fp32 even for fp64 inputs; this one stays in the input dtype, so
    the fp64 comparison measures the rotation, not fp32 rounding."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def _llama(tied: bool, hidden=64, ffn=128, kv=2, exact=True, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=64,
                      tie_word_embeddings=tied, attn_implementation="sdpa")
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)  # non-trivial norm scales, so folding is exercised
    if exact:
        for mod in list(m.modules()):
            for name, ch in list(mod.named_children()):
                if type(ch).__name__ == "LlamaRMSNorm":
                    setattr(mod, name, _ExactRMSNorm(ch))
    return m


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("heads,ffn", [(True, True), (False, False)])
def test_fp64_outputs_unchanged(tied, heads, ffn):
    m = _llama(tied).double()
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(1))
    r = rotate_decoder(m, seed=3, heads=heads, ffn=ffn)
    with torch.no_grad():
        a, b = m(input_ids=ids).logits, r(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-10
    # ...while the weights did change (not a no-op), the original is untouched, norms are scale-free.
    assert not torch.allclose(m.model.layers[0].self_attn.q_proj.weight, r.model.layers[0].self_attn.q_proj.weight)
    assert isinstance(r.model.layers[1].input_layernorm, ScalelessRMSNorm)
    assert isinstance(r.model.layers[1].mlp.down_proj, RotatedInput) == ffn
    assert isinstance(m.model.layers[1].input_layernorm, _ExactRMSNorm)


def test_fp32_hf_model_close_and_seed_matters():
    m = _llama(False, kv=4, exact=False)
    ids = torch.randint(0, 61, (1, 16), generator=torch.Generator().manual_seed(2))
    r0, r1 = rotate_decoder(m, seed=0), rotate_decoder(m, seed=1)
    with torch.no_grad():
        a, b, c = m(input_ids=ids).logits, r0(input_ids=ids).logits, r1(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(a, c, atol=1e-4)
    assert not torch.equal(r0.model.embed_tokens.weight, r1.model.embed_tokens.weight)


def test_rotation_spreads_an_outlier_channel():
    """The point of rotating: a channel 30x larger than the rest dominates token-wise absmax
    before, and is spread over all channels after (max/rms of the q_proj input drops)."""
    m = _llama(False, exact=False)
    with torch.no_grad():
        m.model.embed_tokens.weight[:, 5] *= 30.0
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(3))

    def crest(model):
        seen = []
        h = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        with torch.no_grad():
            model(input_ids=ids)
        h.remove()
        x = seen[0]
        return (x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean().item()

    before, after = crest(m), crest(rotate_decoder(m))
    assert before > 3 * after


@pytest.mark.parametrize("n", [1, 2, 16, 64, 48])
def test_random_hadamard_orthogonal(n):
    q = random_hadamard(n, torch.Generator().manual_seed(0))
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    if n & (n - 1) == 0:  # a scaled +-1 matrix: every entry has magnitude 1/sqrt(n)
        assert torch.allclose(q.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64))


def test_refuses_gpt2_and_layernorm():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="Llama-style causal LM"):
        rotate_decoder(gpt2)
    m = _llama(False, exact=False)
    m.model.layers[0].input_layernorm = nn.LayerNorm(64, bias=False)
    with pytest.raises(ValueError, match=r"layers\[0\].input_layernorm.*(RMSNorm|eps)"):
        rotate_decoder(m)


@pytest.mark.gpu
def test_rotation_on_gpu_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    m = _llama(tied=False, exact=False)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    cpu = rotate_decoder(m)
    gpu = rotate_decoder(m.cuda())
    assert gpu.model.layers[0].mlp.down_proj.rotation.is_cuda
    assert torch.allclose(gpu.model.layers[0].self_attn.q_proj.weight.cpu(), cpu.model.layers[0].self_attn.q_proj.weight)
    with torch.no_grad():
        assert torch.allclose(gpu(input_ids=ids.cuda()).logits.cpu(), m.cpu()(input_ids=ids).logits, atol=1e-3)
