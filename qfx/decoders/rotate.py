r"""Rotate a Llama-style decoder's activations with randomised Hadamard matrices (QuaRot,
Ashkboos et al. 2024), folded into the weights, before quantization.

Pattern (module structure, matched by attributes and checked numerically, never by names of
graph nodes): a causal LM ``model.model.layers[i]`` of pre-norm decoder layers, each
``input_layernorm -> self_attn.{q,k,v}_proj ... self_attn.o_proj -> (+ residual)`` and
``post_attention_layernorm -> mlp.{gate,up}_proj ... mlp.down_proj -> (+ residual)``, a final
``model.norm`` before ``lm_head``, token embeddings ``model.embed_tokens``; every norm an RMSNorm
(``y = g * x / sqrt(mean(x^2) + eps)``: verified on a probe, a LayerNorm is refused).

Rewrite, with ``Q [d, d]`` orthogonal (``H_d diag(s) / sqrt(d)``, ``s`` random signs; a random
orthogonal matrix when ``d`` is not a power of two) and row-vector activations:

1. fold each RMSNorm's scale ``g`` into the linears that read it (``W <- W diag(g)``) and
   replace the norm by a scale-free RMSNorm (:class:`ScalelessRMSNorm`);
2. rotate the residual stream ``r -> r Q``: ``E <- E Q`` (embeddings), readers
   ``W <- W Q`` (q, k, v, gate, up, lm_head), writers ``W <- Q^T W``, ``b <- b Q`` (o, down).
   A scale-free RMSNorm commutes with ``Q`` (``||r Q|| = ||r||``), so every norm output, and
   hence every logit, is unchanged;
3. (``heads=True``) rotate each value head by ``H_h [d_head, d_head]``: ``W_v <- H_h^T W_v`` per
   head, ``W_o <- W_o blockdiag(H_h)`` (attention mixes tokens, not features, so the head
   rotation passes through it);
4. (``ffn=True``) rotate the FFN's inner activation, the input of ``down_proj``, online:
   ``down_proj`` becomes :class:`RotatedInput` computing ``linear(x R)`` with ``W <- W R``
   (``R [f, f]`` orthogonal): the one rotation that cannot be folded (a nonlinearity precedes it).

Invariant: in exact arithmetic the logits are unchanged (tested in fp64 to ~1e-12); what changes is
the distribution of every quantized linear's input: outlier channels are spread over all channels,
so token-wise 4-bit activation quantization loses much less (QuaRot's point).

Why the nn.Module and not the captured graph: the rewrite is a change of weights (plus one online
matrix product), best done once before capture, fake-quant or GPTQ, so that every later stage
(:func:`qfx.decoders.quantize_decoder`, ``qfx.prepare_qat``) sees an ordinary model; on the graph it
would have to be redone at each level, and the graph-level passes are being rewritten.
GPT-2's LayerNorm subtracts the mean (not rotation-invariant): refused with the fix (SliceGPT's
LayerNorm -> RMSNorm conversion is not implemented).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from qfx.numerics import hadamard_matrix

__all__ = ["rotate_decoder", "random_hadamard", "ScalelessRMSNorm", "RotatedInput"]


def random_hadamard(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """An orthogonal ``[n, n]`` fp64 matrix: ``H_n diag(s) / sqrt(n)`` with random signs ``s``
    (a randomised Hadamard matrix) when ``n`` is a power of two, else the Q factor of a Gaussian
    matrix (sign-fixed). ``Q Q^T = I`` to fp64 rounding.

    Example::

        >>> q = random_hadamard(8, torch.Generator().manual_seed(0))
        >>> torch.allclose(q @ q.T, torch.eye(8, dtype=torch.float64))
        True
    """
    if n <= 0:
        raise ValueError(f"n={n!r}: a rotation needs a positive dimension")
    if n & (n - 1) == 0:
        signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
        return hadamard_matrix(n) * signs.unsqueeze(0) / math.sqrt(n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


class ScalelessRMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps)`` over the last dim, computed in at least fp32 (like HF's
    RMSNorm) and in fp64 for fp64 inputs; its scale was folded into the next linears."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float64 else x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class RotatedInput(nn.Module):
    """``linear(x @ R)``: an online rotation of a linear's input (``R [K, K]`` orthogonal, a buffer).

    Quantizers that replace nn.Linear modules find ``.linear`` and quantize the rotated input.
    """

    def __init__(self, rotation: torch.Tensor, linear: nn.Module) -> None:
        super().__init__()
        self.register_buffer("rotation", rotation)
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x @ self.rotation.to(x.dtype))


def _norm_eps(norm: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps"):
        if isinstance(getattr(norm, attr, None), float):
            return getattr(norm, attr)
    raise ValueError(f"{type(norm).__name__} has no eps attribute (variance_epsilon / eps): not an RMSNorm qfx can fold")


@torch.no_grad()
def _check_rms_norm(norm: nn.Module, where: str) -> float:
    """The norm's eps, after checking on a probe that it computes g * x / rms(x) (not LayerNorm)."""
    w = getattr(norm, "weight", None)
    if w is None or getattr(norm, "bias", None) is not None:
        raise ValueError(
            f"{where}: {type(norm).__name__} is not a bias-free RMSNorm; rotate_decoder needs a pre-norm "
            f"RMSNorm model (Llama-style). GPT-2-style LayerNorm subtracts the mean, which a rotation does "
            f"not commute with: convert it first (SliceGPT) or use rotate=False"
        )
    eps = _norm_eps(norm)
    x = (torch.randn(3, w.shape[0], dtype=torch.float32, generator=torch.Generator().manual_seed(0)) + 0.5).to(w.device)
    expected = w.float() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if not torch.allclose(norm(x.to(w.dtype)).float(), expected, rtol=1e-3, atol=1e-5):
        raise ValueError(f"{where}: {type(norm).__name__} does not compute an RMSNorm (mean subtraction?); "
                         f"rotate_decoder needs Llama-style RMSNorm")
    return eps


def _linears(module: nn.Module, *names: str) -> list[nn.Linear]:
    out = []
    for n in names:
        m = getattr(module, n, None)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"{type(module).__name__}.{n} is {type(m).__name__}, expected nn.Linear: "
                             f"rotate_decoder supports Llama-style decoders (q/k/v/o_proj, gate/up/down_proj)")
        out.append(m)
    return out


def _fold_norm(norm: nn.Module, readers: list[nn.Module], where: str) -> nn.Module:
    eps = _check_rms_norm(norm, where)
    g = norm.weight.detach().double()
    for lin in readers:
        lin.weight.copy_((lin.weight.double() * g.unsqueeze(0)).to(lin.weight.dtype))
    return ScalelessRMSNorm(eps)


def _read(lin: nn.Linear | nn.Embedding, q: torch.Tensor) -> None:
    """A reader of the rotated stream: ``W <- W Q`` (embeddings: ``E <- E Q``)."""
    lin.weight.copy_((lin.weight.double() @ q).to(lin.weight.dtype))


def _write(lin: nn.Linear, q: torch.Tensor) -> None:
    """A writer into the rotated stream: ``W <- Q^T W``, ``b <- b Q``."""
    lin.weight.copy_((q.T @ lin.weight.double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ q).to(lin.bias.dtype))


@torch.no_grad()
def rotate_decoder(model: nn.Module, seed: int = 0, heads: bool = True, ffn: bool = True, inplace: bool = False) -> nn.Module:
    """Fold randomised Hadamard rotations into a Llama-style causal LM (see the module docstring).

    Returns the rotated model (a deep copy unless ``inplace``); its logits equal the original's in
    exact arithmetic. ``seed`` picks the random signs.

    Example::

        >>> rotated = rotate_decoder(llama)           # LlamaForCausalLM
        >>> torch.allclose(rotated(ids).logits, llama(ids).logits, atol=1e-4)
        True
    """
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if base is None or layers is None or getattr(model, "lm_head", None) is None:
        raise ValueError(
            f"rotate_decoder needs a Llama-style causal LM (model.model.layers, model.lm_head); got "
            f"{type(model).__name__}. GPT-2 (LayerNorm) is not supported: use rotate=False"
        )
    if not inplace:
        model = copy.deepcopy(model)
        base, layers = model.model, model.model.layers
    cfg = model.config
    d = cfg.hidden_size
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same rotations whatever the model's device
    dev = base.embed_tokens.weight.device
    q = random_hadamard(d, gen).to(dev)

    emb = base.embed_tokens
    if model.lm_head.weight is emb.weight:  # tied: the head reads the rotated stream, the table writes it
        model.lm_head.weight = nn.Parameter(emb.weight.detach().clone())
    _read(emb, q)

    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or d // n_heads
    h_head = random_hadamard(head_dim, gen).to(dev) if heads else None
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        qp, kp, vp, op = _linears(attn, "q_proj", "k_proj", "v_proj", "o_proj")
        gate, up, down = _linears(mlp, "gate_proj", "up_proj", "down_proj")
        layer.input_layernorm = _fold_norm(layer.input_layernorm, [qp, kp, vp], f"layers[{i}].input_layernorm")
        layer.post_attention_layernorm = _fold_norm(layer.post_attention_layernorm, [gate, up],
                                                    f"layers[{i}].post_attention_layernorm")
        for lin in (qp, kp, vp, gate, up):
            _read(lin, q)
        for lin in (op, down):
            _write(lin, q)
        if h_head is not None:
            n_kv = vp.out_features // head_dim
            wv = vp.weight.double().reshape(n_kv, head_dim, -1)
            vp.weight.copy_(torch.einsum("ji,hjk->hik", h_head, wv).reshape_as(vp.weight).to(vp.weight.dtype))
            if vp.bias is not None:
                vp.bias.copy_((vp.bias.double().reshape(n_kv, head_dim) @ h_head).reshape(-1).to(vp.bias.dtype))
            _read(op, torch.block_diag(*([h_head] * (op.in_features // head_dim))))
        if ffn:
            r = random_hadamard(down.in_features, gen).to(dev)
            _read(down, r)
            mlp.down_proj = RotatedInput(r.to(down.weight.dtype), down)
    base.norm = _fold_norm(base.norm, [model.lm_head], "model.norm")
    _read(model.lm_head, q)
    return model
