"""key_padding_attention: give SDPA a mask a fused attention kernel takes (L4 -> L5, GPU).

HF builds a boolean ``[B, 1, S, S]`` mask from ``attention_mask`` and expands it with stride 0;
every fused SDPA kernel (flash, mem-efficient, cuDNN) refuses that layout, so attention falls
back to the fp32 math kernel (HARDWARE.md: 2.6 ms + 6 ms of copies at BERT-base 128 x 128).

Pattern::

    M = f(attention_mask)                     (any sub-graph of the attention_mask input alone:
                                               placeholders, shapes, arange/index/compare/expand)
    y_l = aten.scaled_dot_product_attention(q_l, k_l, v_l, M, ...)     for every layer l
    ->
    bias = where(attention_mask != 0, 0, finfo(dtype).min)[:, None, None, :]   once, [B, 1, 1, S]
    y_l = aten.scaled_dot_product_attention(q_l, k_l, v_l, bias, ...)

The match is checked by evaluation, not by node names or op spellings (HF changes how it builds
masks between releases): the sub-graph of ``M`` is copied out and run at compile time on a probe
``attention_mask`` with padded and unpadded rows; it must equal the key-padding mask
``M[b, 0, i, j] == attention_mask[b, j] != 0`` for every query ``i``. Otherwise the graph is left
as it is and the reason is recorded in ``gm.meta["qfx_attention"]`` for the report.

Invariant: every token that has at least one unmasked key gets the same attention weights up
to the kernel's rounding (a masked key gets weight exp(min - max) = 0, as with the boolean
mask). A row whose mask is all zero attends uniformly to all keys (HF's eager behaviour with
its finfo.min bias) instead of producing NaN.

Runs only when the float parts are fp16 / bf16: in fp32 the twin's math kernel is kept so the
compiled model stays bit-identical to its QAT twin.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from qfx.backends.triton.varlen_attention import can_run as can_run_short
from qfx.backends.triton.varlen_attention import choose as choose_short_tiles
from qfx.backends.triton.varlen_attention import varlen_attention
from qfx.schema import ATTENTION_OPS, META_ATTENTION, ancestors, is_call, sdpa_mask

__all__ = ["key_padding_attention", "PACKED_ATTENTION", "packed_attention_impl", "check_packed_args", "attention_block",
           "AttentionBlock"]

aten = torch.ops.aten
_MASK_INPUT = "attention_mask"  # the HF input convention: 1 = attend, 0 = padding
_PROBE = ((1, 1, 1, 1, 1, 1), (1, 1, 1, 0, 0, 0), (0, 1, 1, 1, 1, 0))


def _is_key_padding(gm: GraphModule, mask: Node, placeholders: dict[str, Node]) -> tuple[bool, str]:
    """Evaluate ``mask``'s sub-graph on a probe and compare with the key-padding form."""
    nodes = ancestors(mask)
    if any(n.op in ("call_module", "get_attr") for n in nodes):
        return False, "the mask depends on module state, not only on attention_mask"
    sub = Graph()
    env: dict[Node, Node] = {}
    used = [n for n in nodes if n.op == "placeholder"]
    for n in nodes:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(env[mask])
    device = placeholders[_MASK_INPUT].meta["val"].device
    probe = torch.tensor(_PROBE, device=device)
    args = []
    for p in used:
        val = p.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return False, f"input {p.name} is not a tensor"
        args.append(probe.to(val.dtype) if p.name == _MASK_INPUT else torch.zeros(probe.shape, dtype=val.dtype, device=device))
    try:
        got = GraphModule(torch.nn.Module(), sub)(*args)
    except Exception as e:  # noqa: BLE001 - an unevaluable mask is simply not rewritten
        return False, f"the mask sub-graph did not evaluate on a probe ({type(e).__name__})"
    b, s = probe.shape
    if not isinstance(got, torch.Tensor) or tuple(got.shape) not in ((b, 1, s, s), (b, 1, 1, s)):
        return False, f"mask shape {tuple(getattr(got, 'shape', ()))} is not [B, 1, S, S]"
    keep = (probe != 0)[:, None, None, :].expand(b, 1, got.shape[2], s)
    allowed = got if got.dtype == torch.bool else got > torch.finfo(got.dtype).min / 2
    if not torch.equal(allowed, keep):
        return False, "the mask is not a key-padding mask of attention_mask (causal, sliding or per-query)"
    return True, ""


def key_padding_attention(gm: GraphModule, dtype: torch.dtype) -> GraphModule:
    """Rewrite HF's expanded boolean mask into a ``[B, 1, 1, S]`` additive bias; see module doc."""
    sdpas = [n for n in gm.graph.nodes if is_call(n, ATTENTION_OPS)]
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    gm.meta[META_ATTENTION] = "no attention op"
    if not sdpas:
        return gm
    if dtype not in (torch.float16, torch.bfloat16):
        gm.meta[META_ATTENTION] = f"kept as captured: float parts run in {dtype} (the twin's kernel)"
        return gm
    if _MASK_INPUT not in placeholders:
        gm.meta[META_ATTENTION] = "kept as captured: the model takes no attention_mask"
        return gm
    masks = {m for m in (sdpa_mask(n) for n in sdpas) if m is not None}
    if not masks:
        gm.meta[META_ATTENTION] = "no mask: fused kernels take it as captured"
        return gm
    for m in masks:
        ok, why = _is_key_padding(gm, m, placeholders)
        if not ok:
            gm.meta[META_ATTENTION] = f"kept as captured: {why}"
            return gm
    graph = gm.graph
    src = placeholders[_MASK_INPUT]
    with graph.inserting_after(src):
        ok_node = graph.call_function(aten.ne.Scalar, (src, 0))
    with graph.inserting_after(ok_node):
        zero = graph.call_function(aten.scalar_tensor.default, (0.0,), {"dtype": dtype, "device": src.meta["val"].device})
    with graph.inserting_after(zero):
        bias2 = graph.call_function(aten.where.ScalarOther, (ok_node, zero, torch.finfo(dtype).min))
    with graph.inserting_after(bias2):
        bias3 = graph.call_function(aten.unsqueeze.default, (bias2, 1))
    with graph.inserting_after(bias3):
        bias = graph.call_function(aten.unsqueeze.default, (bias3, 1))
    bias.name = "key_padding_bias"
    for n in sdpas:
        if sdpa_mask(n) is None:
            continue
        if "attn_mask" in n.kwargs:
            n.update_kwarg("attn_mask", bias)
        else:
            n.update_arg(3, bias)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    gm.meta[META_ATTENTION] = f"key-padding bias [B, 1, 1, S] ({dtype}): fused SDPA kernels eligible"
    return gm


# -- packed (variable-length) attention: padding removal's attention (passes/unpad.py) -----------
#
#     qfx::packed_attention(q, k, v [1, T', H*D], heads, cu_seqlens [B+1] int32, max_seqlen,
#                           gather [T'], scatter [T'], attention_mask [B, S], attn_mask?, scale?)
#         -> [1, T', H*D]
#
# Attention over the packed real tokens: token t of sequence b (rows cu_seqlens[b] ..
# cu_seqlens[b+1] - 1, row-major order of attention_mask != 0) attends to every real token of
# its sequence and to nothing else, what the padded model's key-padding mask computes. Rows
# past cu_seqlens[B] (the dummies of a token bucket, qfx::token_index with a capacity) are left
# unspecified: every later op is row-wise and repad drops them.
#
# Kernels (data, not a guess: benchmarks/attention.py --varlen measures them on the GPU):
# CUDA fp16 / bf16 with a head dim flash takes -> a varlen kernel over cu_seqlens: qfx's
# short-tile Triton kernel where its table picks one for the call's max_seqlen
# (:func:`qfx.backends.triton.varlen_attention.choose`, a measured table per GPU: short sequences, where flash's 128-row
# tiles are mostly empty), else flash attention's (``aten._flash_attention_forward`` with
# cu_seqlens: the kernel torch.nn.attention.varlen wraps, called without the custom-op layer);
# anything else (the CPU, fp32) -> the reference:
# the tokens repadded, the captured SDPA with its captured mask, packed again, so the result is
# bit for bit the padded graph's (the fp32 twin's).

_VARLEN_DTYPES = (torch.float16, torch.bfloat16)


def _heads(x: torch.Tensor, heads: int, scatter: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[1, T', H*D] packed -> [B, H, S, D] padded (zeros at padding), as the model's views."""
    from qfx.ops import scatter_tokens

    x = scatter_tokens(x, scatter, like)
    b, s, f = x.shape
    return x.view(b, s, heads, f // heads).transpose(1, 2)


def varlen_kernel_takes(q: torch.Tensor, heads: int) -> bool:
    """Whether the varlen kernel runs this call (else the reference)."""
    d = q.shape[-1] // heads
    return q.is_cuda and q.dtype in _VARLEN_DTYPES and d % 8 == 0 and d <= 256


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                 scale: float | None) -> torch.Tensor:
    """[T', H, D] attention within each cu_seqlens segment (rows past the last are left as they are)."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, False,
                                                   False, scale=scale)[0]


def short_tiles(q: torch.Tensor, head_dim: int, max_seqlen: int):
    """The tiles of the short-tile kernel for this call, or None (flash attention's varlen kernel)."""
    tiles = choose_short_tiles(max_seqlen, q.device)
    return tiles if tiles is not None and can_run_short(q, head_dim)[0] else None


def check_packed_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, cu_seqlens: torch.Tensor,
                      max_seqlen: int, gather: torch.Tensor, scatter: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """What the kernels trust, as a ValueError naming the argument: shapes and dtypes (free, every
    call); cu_seqlens' values (starts at 0, steps in [0, max_seqlen], ends at most at T) where
    they are on the host, on a GPU only with QFX_CHECK_INDICES=1 (a sync; the runtime checks the
    graph computes them from attention_mask instead: qfx.runtime.packed.check_index_plumbing)."""
    from qfx.ops import CHECK_INDEX_VALUES, check_index

    if q.dim() != 3 or q.shape[0] != 1 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"packed_attention: q, k, v have shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}; "
                         "expected the same [1, T, heads * head_dim]")
    if not isinstance(heads, int) or heads < 1 or q.shape[2] % heads:
        raise ValueError(f"packed_attention: heads={heads!r} does not divide q's {q.shape[2]} features")
    if attention_mask.dim() != 2:
        raise ValueError(f"packed_attention: attention_mask has shape {tuple(attention_mask.shape)}; expected [batch, seq]")
    b, s = attention_mask.shape
    t = q.shape[1]
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() != b + 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"packed_attention: cu_seqlens has shape {tuple(cu_seqlens.shape)} and dtype {cu_seqlens.dtype}; "
                         f"expected [{b + 1}] int32, the prefix sums of attention_mask's row lengths")
    if max_seqlen != s:
        raise ValueError(f"packed_attention: max_seqlen={max_seqlen!r}; expected attention_mask's sequence length {s}")
    check_index("packed_attention", "gather", gather, t, b * s - 1)
    check_index("packed_attention", "scatter", scatter, t, b * s)
    if CHECK_INDEX_VALUES or not cu_seqlens.is_cuda:
        ends = cu_seqlens.tolist()
        steps = [b1 - b0 for b0, b1 in zip(ends, ends[1:])]
        if ends[0] != 0 or min(steps) < 0 or max(steps) > s or ends[-1] > t:
            raise ValueError(f"packed_attention: cu_seqlens {ends[:6]}{'...' if len(ends) > 6 else ''} is not a run of "
                             f"row lengths in [0, {s}] from 0 to at most the {t} packed rows")


def packed_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, cu_seqlens: torch.Tensor,
                          max_seqlen: int, gather: torch.Tensor, scatter: torch.Tensor, attention_mask: torch.Tensor,
                          attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """qfx::packed_attention (see above); the runtime calls it directly, without the dispatcher."""
    check_packed_args(q, k, v, heads, cu_seqlens, max_seqlen, gather, scatter, attention_mask)
    t, f = q.shape[1], q.shape[2]
    if varlen_kernel_takes(q, heads):
        d = f // heads
        qh, kh, vh = (x[0].view(t, heads, d) for x in (q, k, v))
        tiles = short_tiles(q, d, max_seqlen)
        out = (varlen_attention(qh, kh, vh, cu_seqlens, max_seqlen, scale, tiles) if tiles is not None
               else flash_varlen(qh, kh, vh, cu_seqlens, max_seqlen, scale))
        return out.reshape(1, t, f)
    from qfx.ops import gather_tokens

    y = torch.nn.functional.scaled_dot_product_attention(
        _heads(q, heads, scatter, attention_mask), _heads(k, heads, scatter, attention_mask),
        _heads(v, heads, scatter, attention_mask), attn_mask=attn_mask, scale=scale)
    b, s = attention_mask.shape
    return gather_tokens(y.transpose(1, 2).reshape(b, s, f), gather)


@torch.library.custom_op("qfx::packed_attention", mutates_args=())
def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, cu_seqlens: torch.Tensor,
                     max_seqlen: int, gather: torch.Tensor, scatter: torch.Tensor, attention_mask: torch.Tensor,
                     attn_mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    return packed_attention_impl(q, k, v, heads, cu_seqlens, max_seqlen, gather, scatter, attention_mask,
                                 attn_mask, scale)


@packed_attention.register_fake
def _(q, k, v, heads, cu_seqlens, max_seqlen, gather, scatter, attention_mask, attn_mask, scale):
    return q.new_empty(q.shape)


PACKED_ATTENTION = torch.ops.qfx.packed_attention.default

_TRANSPOSES = (aten.transpose.int, aten.permute.default)
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_COPIES = (aten.contiguous.default, aten.clone.default)


def _shape(node) -> tuple[str, ...] | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(str(d.node.expr) if isinstance(d, torch.SymInt) else str(int(d)) for d in val.shape)


def _swaps_1_2(node: Node) -> bool:
    """transpose(x, 1, 2) or permute(x, [0, 2, 1, 3]) of a rank-4 x."""
    if is_call(node, (aten.transpose.int,)):
        return sorted(d % 4 for d in node.args[1:3]) == [1, 2]
    return is_call(node, (aten.permute.default,)) and [d % 4 for d in node.args[1]] == [0, 2, 1, 3]


def _split_heads_source(x: Node, b: str, s: str) -> tuple[Node, int] | None:
    """``x`` = swap(view(src [b, s, H*D] -> [b, s, H, D])) (copies allowed): (src, H)."""
    node = x
    while is_call(node, _COPIES):
        node = node.args[0]
    if not _swaps_1_2(node):
        return None
    node = node.args[0]
    while is_call(node, _COPIES):
        node = node.args[0]
    split, src = _shape(node), _shape(node.args[0]) if is_call(node, _VIEWS) else None
    if split is None or src is None or len(split) != 4 or len(src) != 3 or split[:2] != (b, s) or src[:2] != (b, s):
        return None
    if not (split[2].isdigit() and split[3].isdigit() and src[2].isdigit()) or int(split[2]) * int(split[3]) != int(src[2]):
        return None
    return node.args[0], int(split[2])


def _merged_heads_output(sdpa: Node, b: str, s: str, features: int) -> Node | None:
    """The node holding swap(sdpa)[b, s, H*D] reshaped (single-user view / copy chain), or None."""
    node, swapped = sdpa, False
    while len(node.users) == 1:
        user = next(iter(node.users))
        shape = _shape(user)
        if shape is None:
            return None
        if is_call(user, _COPIES) or (is_call(user, _VIEWS) and shape == _shape(node)):
            node = user
        elif not swapped and _swaps_1_2(user):
            node, swapped = user, True
        elif swapped and is_call(user, _VIEWS) and shape == (b, s, str(features)):
            return user
        else:
            return None
    return None


@dataclass(frozen=True)
class AttentionBlock:
    """A multi-head attention over [B, S, H*D] token tensors, as padding removal packs it."""

    sdpa: Node
    q: Node  # [B, S, H*D] sources of the head views
    k: Node
    v: Node
    heads: int
    out: Node  # the [B, S, H*D] merged-heads output
    scale: float | None


def attention_block(sdpa: Node, mask_input: Node) -> tuple[AttentionBlock | None, str]:
    """Match ``merge(sdpa(split(q), split(k), split(v), mask))`` with a key-padding mask of
    ``mask_input`` (checked by evaluation), no dropout, not causal; else (None, why not)."""
    b, s = _shape(mask_input) or ("", "")
    if len(sdpa.args) > 4 and sdpa.args[4] or sdpa.kwargs.get("dropout_p"):
        return None, "attention with dropout"
    if (len(sdpa.args) > 5 and sdpa.args[5]) or sdpa.kwargs.get("is_causal") or sdpa.kwargs.get("enable_gqa"):
        return None, "causal or grouped-query attention"
    mask = sdpa_mask(sdpa)
    if mask is None:
        return None, "attention without a mask"
    ok, why = _is_key_padding(None, mask, {_MASK_INPUT: mask_input})
    if not ok:
        return None, why
    sources = [_split_heads_source(x, b, s) for x in sdpa.args[:3]]
    if None in sources or len({h for _, h in sources}) != 1:
        return None, "q, k, v are not head views of [batch, seq, features] tensors"
    (q, heads), (k, _), (v, _) = sources
    out = _merged_heads_output(sdpa, b, s, int(_shape(q)[2]))
    if out is None:
        return None, "the attention output is not merged back to [batch, seq, features]"
    scale = sdpa.kwargs.get("scale", sdpa.args[6] if len(sdpa.args) > 6 else None)
    return AttentionBlock(sdpa, q, k, v, heads, out, scale), ""
