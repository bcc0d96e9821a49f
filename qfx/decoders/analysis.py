r"""Decoder failure analysis (Wu et al. 2023, section 5): activation range and perplexity by token
position, and the companion study's generation sweep (Roy, "Understanding the Impact of
Post-Training Quantization on Large Language Models": duplicate content words against
temperature, top_k and max_new_tokens).

* :func:`positional_activation_range` (the paper's Figure 5): for each quantized linear's input in
  the chosen layers, the range ``max_k x[t, k] - min_k x[t, k]`` of the activation vector at each
  position ``t``, maximised over the batches; token-wise quantization's step is proportional to it.
* :func:`positional_perplexity` (Figure 6): ``exp`` of the mean next-token negative log-likelihood
  at each position (position ``t`` predicts token ``t + 1`` from ``t + 1`` tokens of context).
* :func:`generation_sweep`: sample completions over a grid and count duplicate content words
  (words left after removing stop words, minus their distinct count).
* :func:`generation_throughput`: greedy tokens/s at a batch size (the study's Table 7).

Each returns its data and, given ``png=``, writes a plot (matplotlib, Agg backend).
"""
from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qfx.numerics.gptq import target_linears

__all__ = [
    "positional_activation_range",
    "positional_perplexity",
    "duplicate_content_words",
    "generation_sweep",
    "generation_throughput",
    "SweepRow",
    "decoder_blocks",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _check_batches(batches) -> list[Mapping[str, torch.Tensor]]:
    batches = list(batches) if batches is not None else []
    if not batches:
        raise ValueError("batches is empty: pass a list of {'input_ids': [B, T] LongTensor, 'attention_mask': ...}")
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping) or "input_ids" not in b:
            raise ValueError(f"batches[{i}] is {type(b).__name__}, expected a dict with 'input_ids' [B, T]")
    return batches


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of transformer blocks: the longest nn.ModuleList in ``model``
    (``model.model.layers`` for Llama, ``model.transformer.h`` for GPT-2)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks: not a transformer decoder")
    return max(lists, key=len)


@torch.no_grad()
def positional_activation_range(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    layers: Sequence[int] | None = None,
    png: str | Path | None = None,
    title: str = "",
) -> dict[str, torch.Tensor]:
    """Activation range by position of every quantizable linear's input in blocks ``layers``.

    Returns ``{"<layer>.<linear>": range [T]}`` (fp32, T the longest batch length; positions no
    batch reached are NaN), keys like ``"0.self_attn.q_proj"``. ``layers`` defaults to the first and
    the last block.

    Example::

        >>> ranges = positional_activation_range(gpt2, [{"input_ids": ids}], layers=[0], png="fig5.png")
        >>> ranges["0.attn.c_attn"].shape
        torch.Size([32])
    """
    batches = _check_batches(batches)
    blocks = decoder_blocks(model)
    n = len(blocks)
    layers = [0, n - 1] if layers is None else list(layers)
    for li in layers:
        if not -n <= li < n:
            raise ValueError(f"layers contains {li}, but the model has {n} blocks (0..{n - 1})")
    ranges: dict[str, torch.Tensor] = {}
    handles = []

    def hook(key):
        def fn(_mod, args):
            x = args[0].detach().float()
            r = (x.amax(-1) - x.amin(-1)).reshape(-1, x.shape[-2]).amax(0)  # [T]
            prev = ranges.get(key)
            if prev is None or prev.numel() < r.numel():
                grown = torch.full((r.numel(),), float("nan"))
                if prev is not None:
                    grown[: prev.numel()] = prev
                prev = grown
            prev[: r.numel()] = torch.fmax(prev[: r.numel()], r.cpu())
            ranges[key] = prev
        return fn

    for li in layers:
        idx = li % n
        for name, mod in target_linears(blocks[idx], skip=()).items():
            handles.append(mod.register_forward_pre_hook(hook(f"{idx}.{name}")))
    try:
        for b in batches:
            model(**b)
    finally:
        for h in handles:
            h.remove()
    if png is not None:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, r in ranges.items():
            ax.plot(torch.arange(1, r.numel() + 1), r, label=key, lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("token position")
        ax.set_ylabel("activation range (max - min over features)")
        ax.set_title(title or "Activation range by position (Wu et al. 2023, Fig. 5)")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        plt.close(fig)
    return ranges


@torch.no_grad()
def _positional_nll(model: nn.Module, batches: list[Mapping[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: (sum of next-token NLL, number of scored tokens), fp64 ``[T-1]``."""
    sums = torch.zeros(0, dtype=torch.float64)
    counts = torch.zeros(0, dtype=torch.float64)
    for b in batches:
        ids = b["input_ids"]
        out = model(**b)
        logits = out.logits if hasattr(out, "logits") else out[0]
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
        nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, T-1]
        mask = b.get("attention_mask")
        valid = torch.ones_like(nll) if mask is None else (mask[:, 1:] * mask[:, :-1]).double()
        t = nll.shape[1]
        if sums.numel() < t:
            sums = torch.cat([sums, sums.new_zeros(t - sums.numel())])
            counts = torch.cat([counts, counts.new_zeros(t - counts.numel())])
        sums[:t] += (nll * valid).sum(0).cpu()
        counts[:t] += valid.sum(0).cpu()
    return sums, counts


def positional_perplexity(
    model: nn.Module | Mapping[str, nn.Module],
    batches: Iterable[Mapping[str, torch.Tensor]],
    png: str | Path | None = None,
    title: str = "",
) -> dict[str, torch.Tensor]:
    """Perplexity at each position: ``exp(mean NLL of predicting token t+1)``, ``t = 0..T-2``.

    ``model``: one causal LM, or ``{label: model}`` to compare several on one plot. Returns
    ``{label: ppl [T-1]}`` (label ``"model"`` for a single model) plus ``"<label>/overall"`` scalars
    (the usual perplexity over all positions, weighted by their counts).

    Example::

        >>> curves = positional_perplexity({"fp32": lm, "w4a4": lm_q}, batches, png="fig6.png")
        >>> curves["w4a4"][:8]   # the first positions carry the gap
    """
    batches = _check_batches(batches)
    models = dict(model) if isinstance(model, Mapping) else {"model": model}
    out: dict[str, torch.Tensor] = {}
    for label, m in models.items():
        if not callable(m):
            raise ValueError(f"model {label!r} is {type(m).__name__}, not a callable causal LM")
        sums, counts = _positional_nll(m, batches)
        out[label] = (sums / counts.clamp_min(1)).exp().float()
        out[f"{label}/overall"] = (sums.sum() / counts.sum().clamp_min(1)).exp().float()
    if png is not None:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(7, 4))
        for label in models:
            ax.plot(torch.arange(1, out[label].numel() + 1), out[label], label=f"{label} ({out[f'{label}/overall'].item():.2f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("token position (context length)")
        ax.set_ylabel("perplexity")
        ax.set_title(title or "Positional perplexity (Wu et al. 2023, Fig. 6)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        plt.close(fig)
    return out


_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def duplicate_content_words(text: str, stop_words: Iterable[str]) -> int:
    """Content words (lower-cased words not in ``stop_words``) minus distinct content words.

    Example::

        >>> duplicate_content_words("The king, the king and the queen", {"the", "and"})
        1
    """
    stop = {w.lower() for w in stop_words}
    words = [w for w in _WORD.findall(text.lower()) if w not in stop]
    return len(words) - len(set(words))


def _check_causal_lm(model: nn.Module, what: str) -> None:
    get_head = getattr(model, "get_output_embeddings", None)
    if not callable(getattr(model, "generate", None)) or not callable(get_head) or get_head() is None:
        raise ValueError(f"{type(model).__name__} has no causal LM head with generate(): {what} needs e.g. "
                         f"GPT2LMHeadModel or LlamaForCausalLM, not a base model")


def _check_positions(model: nn.Module, prompt_len: int, new_tokens: int) -> None:
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if limit is not None and prompt_len + new_tokens > limit:
        raise ValueError(f"max_new_tokens={new_tokens} after a prompt of {prompt_len} tokens needs "
                         f"{prompt_len + new_tokens} positions, but the model has {limit}; shorten the prompts or "
                         f"max_new_tokens")


@dataclass(frozen=True)
class SweepRow:
    temperature: float
    top_k: int
    max_new_tokens: int
    duplicates: float  # mean over prompts
    content_words: float  # mean over prompts
    samples: tuple[str, ...] = field(default=(), repr=False)


@torch.no_grad()
def generation_sweep(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    decode: Callable[[Sequence[int]], str],
    stop_words: Iterable[str],
    temperatures: Sequence[float] = (0.5, 1.0),
    top_ks: Sequence[int] = (5, 50),
    max_new_tokens: Sequence[int] = (32, 64),
    seed: int = 0,
    **generate_kwargs,
) -> list[SweepRow]:
    """Sample a completion of every prompt for every (temperature, top_k, max_new_tokens) and count
    duplicate content words in the generated part (the companion study's metric).

    ``prompts``: 1-D LongTensors of token ids. ``decode``: ids -> text. The model needs a causal LM
    head and ``generate`` (HF ``*ForCausalLM`` / ``GPT2LMHeadModel``); a base model raises ValueError.
    Sampling is seeded per grid point, so two models see the same random stream.
    """
    _check_causal_lm(model, "the generation sweep")
    if not prompts:
        raise ValueError("prompts is empty: pass 1-D LongTensors of token ids")
    _check_positions(model, max(p.numel() for p in prompts), max(max_new_tokens))
    stop = set(stop_words)
    rows = []
    for temp, k, n_new in itertools.product(temperatures, top_ks, max_new_tokens):
        if temp <= 0 or k < 0 or n_new <= 0:
            raise ValueError(f"bad grid point temperature={temp}, top_k={k}, max_new_tokens={n_new}: "
                             f"need temperature > 0, top_k >= 0 (0: no top-k), max_new_tokens > 0")
        texts, dups, words = [], [], []
        for i, p in enumerate(prompts):
            torch.manual_seed(seed + i)
            out = model.generate(p.reshape(1, -1), do_sample=True, temperature=temp, top_k=k,
                                 max_new_tokens=n_new, min_new_tokens=n_new, **generate_kwargs)
            text = decode(out[0, p.numel():].tolist())
            texts.append(text)
            dups.append(duplicate_content_words(text, stop))
            words.append(len([w for w in _WORD.findall(text.lower()) if w not in stop]))
        rows.append(SweepRow(temp, k, n_new, sum(dups) / len(dups), sum(words) / len(words), tuple(texts)))
    return rows


@torch.no_grad()
def generation_throughput(
    model: nn.Module,
    batch_size: int = 1,
    new_tokens: int = 128,
    prompt_len: int = 16,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """Greedy decoding speed (the companion study's tokens/s): ``batch_size`` random prompts of
    ``prompt_len`` ids, ``new_tokens`` generated each (no early stop), KV cache on, on the model's
    device. Returns ``{"batch", "new_tokens", "seconds", "tokens_per_s"}`` with ``seconds`` the
    median of ``repeats`` timed calls after one untimed warm-up (CUDA synchronised around each).

    Example::

        >>> generation_throughput(model.half().cuda(), batch_size=16, new_tokens=128)["tokens_per_s"]
    """
    _check_causal_lm(model, "generation_throughput")
    if batch_size < 1 or new_tokens < 1 or prompt_len < 1 or repeats < 1:
        raise ValueError(f"batch_size={batch_size}, new_tokens={new_tokens}, prompt_len={prompt_len}, "
                         f"repeats={repeats}: each must be >= 1")
    _check_positions(model, prompt_len, new_tokens)
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=g).to(device)
    pad = getattr(model.config, "pad_token_id", None)
    pad = getattr(model.config, "eos_token_id", 0) if pad is None else pad
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
              pad_token_id=pad, attention_mask=torch.ones_like(prompt))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out = model.generate(prompt, **kw)  # warm-up (allocations, kernel selection)
    if out.shape != (batch_size, prompt_len + new_tokens):
        raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {(batch_size, prompt_len + new_tokens)}")
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        model.generate(prompt, **kw)
        sync()
        times.append(time.perf_counter() - t0)
    secs = sorted(times)[len(times) // 2]
    return {"batch": batch_size, "new_tokens": new_tokens, "seconds": secs, "tokens_per_s": batch_size * new_tokens / secs}
