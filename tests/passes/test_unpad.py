"""Padding removal (passes/unpad.py, compile(..., remove_padding=True)): the token layout ops,
the pass's structure, and its invariant: at every real token the outputs equal the padded
compile's bit for bit on the CPU; padded positions are zero. On a GPU: token-bucketed CUDA
graphs replay what direct launch computes."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from models import inputs, make

import qfx
from qfx.capture import normalize_inputs
from qfx.ops import token_rows
from qfx.passes.attention import PACKED_ATTENTION
from qfx.passes.unpad import remove_padding
from qfx.runtime.buckets import Buckets
from qfx.schema import ATTENTION_OPS, INTEGER_LINEAR_OPS, PACK_TOKENS, QUANTIZE, REPAD_TOKENS, TOKEN_INDEX, is_call

_W4A4_ASYM = qfx.QuantConfig(4, 4, symmetric=False)


def _compile(model, remove_padding=False, config=_W4A4_ASYM, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
        return qfx.compile(model, mode=f"int{config.weight_bits}", target="cpu", example_kwargs=inputs(2, 8), config=config,
                           remove_padding=remove_padding, **kw)


def _mask(lengths, seq, left=()):
    """Rows of ``lengths`` real tokens, right-padded (left-padded for rows in ``left``)."""
    m = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        if i in left:
            m[i, seq - n:] = 1
        else:
            m[i, :n] = 1
    return m


def _count(gm, op) -> int:
    return sum(1 for n in gm.graph.nodes if is_call(n, op))


@pytest.fixture(scope="module")
def bert_pair():
    """The same BERT (with pooler) compiled W4A4-asym without and with padding removal."""
    model = make("bert", layers=2)
    return _compile(model), _compile(model, remove_padding=True)


# -- the token layout ops -----------------------------------------------------------------------


def test_token_index_lists_real_tokens_and_pads_to_a_capacity():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]])
    real = torch.tensor([0, 1, 9, 10, 11])
    gather, scatter = token_rows(mask)
    assert torch.equal(gather, real) and torch.equal(scatter, real)
    gather, scatter = token_rows(mask, capacity=8)  # static shape: 3 dummies after the real tokens
    assert torch.equal(gather[:5], real) and torch.equal(scatter[:5], real)
    assert (scatter[5:] == 12).all() and (gather[5:] < 12).all()  # dummies: trash row / a valid row
    gather, scatter = token_rows(torch.zeros(2, 3))  # no real token: one dummy row, never empty
    assert gather.tolist() == [5] and scatter.tolist() == [6]
    with pytest.raises(ValueError, match="capacity=0"):
        token_rows(mask, capacity=0)


def test_pack_then_repad_keeps_real_rows_and_zeroes_padding():
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    x = torch.randn(2, 3, 5)
    for capacity in (None, 6):
        gather, scatter = torch.ops.qfx.token_index(mask, capacity)
        packed = torch.ops.qfx.pack_tokens(x, gather)
        assert packed.shape == (1, 4 if capacity is None else 6, 5)
        back = torch.ops.qfx.repad_tokens(packed, scatter, mask)
        assert torch.equal(back[mask.bool()], x[mask.bool()]) and (back[~mask.bool()] == 0).all()


def test_token_buckets_are_geometric_steps_capped_at_the_shape():
    b = Buckets()
    assert b.tokens(1, 16) == 16 and b.tokens(0, 4096) == 64  # steps of 64 below 1024 tokens
    assert b.tokens(65, 256) == 128 and b.tokens(4096, 4096) == 4096
    assert b.tokens(10300, 16384) == 10752  # [8192, 16384): steps of 512
    for real in range(1, 20000, 97):  # dummies: at most a step below 1024, else 1/16 of T
        got = b.tokens(real, 1 << 20)
        assert real <= got <= max(real + 63, real * 17 // 16) and got % 64 == 0
    assert Buckets(token_step=16, token_buckets=64).tokens(17, 1024) == 32
    with pytest.raises(ValueError, match="token_step"):
        Buckets(token_step=0)


# -- the pass -------------------------------------------------------------------------------------


def test_pass_packs_once_at_the_embeddings_and_repads_once_at_the_output(bert_pair):
    padded, unpadded = bert_pair
    gm = unpadded.graph_module
    layers = 2
    assert gm.meta["qfx_unpad"].startswith("on:"), gm.meta["qfx_unpad"]
    assert f"{layers} attention(s) packed (varlen)" in gm.meta["qfx_unpad"]
    assert _count(gm, TOKEN_INDEX) == 1
    # the embedding lookups read packed ids (word, token type, positions: integers, no float row
    # is packed), attention runs on the packed q/k/v (no repad around it), repadded once: the
    # last hidden state (the output, read by the pooler too)
    packs = [n for n in gm.graph.nodes if is_call(n, PACK_TOKENS)]
    assert len(packs) == 3 and all(u.target == torch.ops.aten.embedding.default for n in packs for u in n.users)
    assert _count(gm, REPAD_TOKENS) == 1
    assert _count(gm, ATTENTION_OPS) == 0 and _count(gm, PACKED_ATTENTION) == layers
    for n in gm.graph.nodes:
        if is_call(n, tuple(INTEGER_LINEAR_OPS) + (QUANTIZE, PACKED_ATTENTION)):
            assert n.meta.get("qfx_tokens") == "packed", n.name
    assert "padding removal: on" in unpadded.runtime_report()
    assert "padding removal: off (remove_padding=False)" in padded.runtime_report()
    assert "qfx_unpad" not in padded.graph_module.meta


def _packed_graph(cm, x: dict):
    """The packed lean graph itself on ``x`` (what a call routed packed runs), exact token count."""
    x = normalize_inputs(cm._capture, (), x)
    with torch.no_grad():
        return cm.launch_plan.module(**x)


@given(lengths=st.lists(st.integers(0, 11), min_size=1, max_size=4), left=st.booleans())
@example(lengths=[11, 1], left=False)  # a full row and a length-1 row
@example(lengths=[0, 5, 11], left=True)  # an all-zero row
def test_real_tokens_are_bit_identical_to_the_padded_compile(bert_pair, lengths, left):
    padded, unpadded = bert_pair
    seq = 11
    x = inputs(len(lengths), seq, seed=sum(lengths))
    x["attention_mask"] = _mask(lengths, seq, left=range(1, len(lengths), 2) if left else ())
    want, got = padded(**x), unpadded(**x)
    real = x["attention_mask"].bool()
    assert torch.equal(got.last_hidden_state[real], want.last_hidden_state[real])
    assert torch.equal(got.pooler_output, want.pooler_output)  # per sequence: always the padded model's
    if unpadded.last_route.path == "packed":  # every row's position 0 real: padded positions zero
        assert real[:, 0].all() and not real.all() and (got.last_hidden_state[~real] == 0).all()
    else:  # no padding, or position 0 padded under the pooler: the padded twin, every position
        assert not real[:, 0].all() or real.all(), unpadded.last_route
        assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    # the packed graph itself: zeros at padding, an empty row's pooler reads zeros (tanh(bias))
    packed = _packed_graph(unpadded, x)
    assert torch.equal(packed.last_hidden_state[real], want.last_hidden_state[real])
    assert (packed.last_hidden_state[~real] == 0).all() and torch.isfinite(packed.last_hidden_state).all()
    first_real = real[:, 0]
    assert torch.equal(packed.pooler_output[first_real], want.pooler_output[first_real])
    empty = ~real.any(1)
    bias = unpadded.graph_module.get_parameter("pooler.dense.bias")
    assert torch.equal(packed.pooler_output[empty], torch.tanh(bias).expand(int(empty.sum()), -1))


def test_masks_with_holes_and_empty_rows_keep_real_tokens_bit_for_bit(bert_pair):
    """Not only left / right padding: a key-padding mask with holes and an all-zero row (each
    row's real tokens are contiguous in the packed order, so packed attention is exact). The
    pooler reads position 0, padding in two rows here: the call runs the padded twin."""
    padded, unpadded = bert_pair
    x = inputs(3, 9, seed=11)
    x["attention_mask"] = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1, 0], [0] * 9, [0, 1, 1, 0, 1, 1, 1, 1, 1]])
    want, got = padded(**x), unpadded(**x)
    real = x["attention_mask"].bool()
    assert torch.equal(got.last_hidden_state, want.last_hidden_state) and torch.equal(got.pooler_output, want.pooler_output)
    assert unpadded.last_path == ("direct", "CPU target") and unpadded.last_route.path == "padded"
    assert "last call: padded (position 0 is padding in some row" in unpadded.runtime_report()
    packed = _packed_graph(unpadded, x)
    assert torch.equal(packed.last_hidden_state[real], want.last_hidden_state[real])
    assert (packed.last_hidden_state[~real] == 0).all()


def test_a_classifier_reads_its_cls_rows_packed_and_repads_nothing():
    """BertForSequenceClassification returns logits only: the pooler's hidden[:, 0] reads the
    packed rows cu_seqlens[b] (zeros where position 0 is padding, as the repadded tensor holds),
    so no [B, S, F] tensor is ever made; logits bit for bit where position 0 is real. A call
    with position 0 padded somewhere runs the padded twin: logits bit for bit everywhere."""
    model = make("bert_cls", layers=2)
    padded, unpadded = _compile(model), _compile(model, remove_padding=True)
    gm = unpadded.graph_module
    assert _count(gm, REPAD_TOKENS) == 0 and "0 repad" in gm.meta["qfx_unpad"], gm.meta["qfx_unpad"]
    x = inputs(5, 9, seed=3)
    x["attention_mask"] = _mask([9, 4, 0, 7, 2], 9, left=(3,))
    want, got = padded(**x).logits, unpadded(**x).logits
    assert torch.equal(got, want) and unpadded.last_route.path == "padded"
    packed = _packed_graph(unpadded, x).logits
    first_real = x["attention_mask"][:, 0].bool()
    assert torch.equal(packed[first_real], want[first_real])
    assert torch.equal(packed[2], packed[3])  # no real token at position 0: both read a zero row
    x["attention_mask"] = _mask([9, 4, 1, 7, 2], 9)  # right padding: packed
    assert torch.equal(unpadded(**x).logits, padded(**x).logits) and unpadded.last_route.path == "packed"


@pytest.mark.parametrize("family", ["distilbert", "albert", "modernbert"])
def test_families_keep_real_tokens_bit_for_bit(family):
    """Other layer structures (DistilBERT, ALBERT's tanh-GELU chain and shared weights,
    ModernBERT's GLU chunk and rotary attention); the pass applied to a copy of the compiled graph."""
    cm = _compile(make(family, layers=2), config=qfx.QuantConfig(8, 8))
    gm = remove_padding(copy.deepcopy(cm.graph_module))
    assert gm.meta["qfx_unpad"].startswith("on:"), gm.meta["qfx_unpad"]
    x = inputs(3, 13, seed=7)
    x["attention_mask"] = _mask([13, 5, 1], 13, left=(1,))
    x = normalize_inputs(cm._capture, (), x)
    with torch.no_grad():
        want, got = cm.graph_module(**x)[0], gm(**x)[0]
    real = x["attention_mask"].bool()
    assert torch.equal(got[real], want[real]) and (got[~real] == 0).all()


def test_the_gpu_shaped_graph_packs_through_the_key_padding_bias_and_fused_norms():
    """The GPU passes' graph, made on the CPU with the reference backend: attention reads the
    [B, 1, 1, S] key-padding bias, LayerNorms are fused add + LayerNorm + quantize ops."""
    from qfx.passes.attention import key_padding_attention
    from qfx.passes.fuse_norm_quant import fuse_add_layer_norm_quantize

    from qfx.backends import only

    with only("reference"):  # the backend the fused op's reference runs on (target cpu plans "cpu" first)
        cm = _compile(make("bert", layers=2), config=qfx.QuantConfig(8, 8), float_dtype=torch.bfloat16)
    gm = key_padding_attention(copy.deepcopy(cm.graph_module), torch.bfloat16)
    gm = fuse_add_layer_norm_quantize(gm, torch.bfloat16, backend="reference", fits=lambda k, dtype: (True, ""))
    assert gm.meta["qfx_attention"].startswith("key-padding bias") and gm.meta["qfx_fused_norms"][0] == 4
    unpadded = remove_padding(copy.deepcopy(gm))
    assert unpadded.meta["qfx_unpad"].startswith("on:"), unpadded.meta["qfx_unpad"]
    fused = [n for n in unpadded.graph.nodes if is_call(n, torch.ops.qfx.add_layer_norm_quantize.default)]
    assert fused and all(n.meta.get("qfx_tokens") == "packed" for n in fused)
    x = normalize_inputs(cm._capture, (), {**inputs(3, 12, seed=1), "attention_mask": _mask([12, 4, 1], 12, left=(1,))})
    with torch.no_grad():
        want, got = gm(**x).last_hidden_state, unpadded(**x).last_hidden_state
    real = x["attention_mask"].bool()
    assert torch.equal(got[real], want[real]) and (got[~real] == 0).all()
    # calls with no padding replay the unmasked graph, where packing is a view and no index is made
    from qfx.runtime.launch_plan import bind_launchers

    plan = bind_launchers(unpadded)
    dense = plan.dense_module
    assert dense is not None and not [n for n in dense.graph.nodes if n.target == plan.token_index.__call__]
    full = normalize_inputs(cm._capture, (), inputs(2, 12, seed=4, pad=False))
    with torch.no_grad():
        assert torch.equal(dense(**full).last_hidden_state, plan.module(**full).last_hidden_state)


def test_token_bucket_capacity_computes_the_same_real_tokens(bert_pair):
    """What a CUDA graph of a token bucket runs (index with dummy rows, fixed shapes), on the CPU."""
    padded, unpadded = bert_pair
    x = normalize_inputs(unpadded._capture, (), {**inputs(3, 10, seed=2), "attention_mask": _mask([10, 3, 6], 10)})
    plan = unpadded.launch_plan
    assert plan.token_index is not None
    with torch.no_grad():
        exact = plan.module(**x).last_hidden_state
        plan.token_index.capacity = 24  # 19 real tokens + 5 dummies
        try:
            bucketed = plan.module(**x).last_hidden_state
        finally:
            plan.token_index.capacity = None
    assert torch.equal(bucketed, exact)
    assert torch.equal(exact, unpadded.graph_module(**x).last_hidden_state)  # lean graph == L5 graph


def test_save_and_load_keep_padding_removal(bert_pair, tmp_path):
    _, unpadded = bert_pair
    qfx.save(unpadded, tmp_path / "m.qfx.safetensors")
    again = qfx.load(tmp_path / "m.qfx.safetensors")
    x = {**inputs(2, 9, seed=3), "attention_mask": _mask([9, 4], 9)}
    assert torch.equal(again(**x).last_hidden_state, unpadded(**x).last_hidden_state)
    assert "padding removal: on" in again.runtime_report()


def test_graphs_whose_attention_does_not_mask_padding_are_left_alone(bert_pair):
    padded, _ = bert_pair
    gm = copy.deepcopy(padded.graph_module)
    for n in gm.graph.nodes:  # attention that lets padded keys through: packing would change it
        if is_call(n, ATTENTION_OPS):
            n.update_arg(3, None)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    gm = remove_padding(gm)
    assert gm.meta["qfx_unpad"] == "off: an SDPA attention takes no mask: padded keys reach real tokens"
    assert _count(gm, PACK_TOKENS) == 0
    with pytest.raises(ValueError, match=r"remove_padding=True: this model cannot run packed \(no SDPA attention"):
        _compile(make("deberta_v2", layers=1), remove_padding=True, config=qfx.QuantConfig(8, 8))


# -- GPU: token-bucketed CUDA graphs ------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gpu_unpadded_graphs_replay_what_the_padded_model_computes(mode):
    target = qfx.detect_target().name
    model = make("bert", layers=2, hidden=64, heads=2)
    buckets = Buckets(batch=(4,), seq=(64,), token_step=16, token_buckets=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
        kw = dict(mode=mode, target=target, example_kwargs=inputs(2, 8), buckets=buckets)
        padded, unpadded = qfx.compile(model, remove_padding=False, **kw), qfx.compile(model, remove_padding=True, **kw)
    x = {k: v.cuda() for k, v in inputs(3, 50, seed=5).items()}
    x["attention_mask"] = _mask([50, 17, 1], 50).cuda()  # 68 real tokens of 256 bucket slots
    want = padded(**x).last_hidden_state
    got = unpadded(**x).last_hidden_state
    assert unpadded._graphs.last_key == (4, 64, 80), unpadded.runtime_report()  # [64, 128): steps of 16
    real = x["attention_mask"].bool()
    assert (got[~real] == 0).all()
    cos = torch.nn.functional.cosine_similarity(got[real].float().flatten(), want[real].float().flatten(), dim=0)
    assert cos > 0.999, cos
    with torch.inference_mode():  # the graph replays what direct launch computes (exact index)
        direct = unpadded.launch_plan.module.forward(**normalize_inputs(unpadded._capture, (), x)).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(got[real].float().flatten(), direct[real].float().flatten(), dim=0)
    assert cos > 0.999, cos
    x["attention_mask"] = _mask([50, 50, 49], 50).cuda()  # 149 tokens: another token bucket (no padding: padded)
    unpadded(**x)
    assert unpadded._graphs.last_key == (4, 64, 160) and len(unpadded._graphs.graphs) == 2
    report = unpadded.runtime_report()
    assert "padding removal: on" in report and "token buckets" in report, report
    assert "2 attention(s) packed (varlen)" in report and "last call: packed, graph (4, 64, 160)" in report, report
    zero = {k: v.clone() for k, v in x.items()}
    zero["attention_mask"][0] = 0  # an all-zero row under the pooler: the padded twin, as the padded model
    out = unpadded(**zero).last_hidden_state
    assert unpadded._graphs.last_key == (4, 64, "padded") and unpadded.last_route.path == "padded"
    want = padded(**zero).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), want.float().flatten(), dim=0)
    assert torch.isfinite(out).all() and cos > 0.999, cos


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["table", "flash"])
def test_gpu_varlen_attention_matches_the_repadded_reference(dtype, kernel, monkeypatch):
    """qfx::packed_attention's CUDA kernels (the short-tile kernel its table picks at this length,
    and flash varlen, over cu_seqlens) against its reference (repad, SDPA with the key-padding mask,
    pack) in fp32: holes, left padding, an empty row, and dummy rows of a token bucket (left
    unspecified, never read)."""
    import qfx.backends.triton.varlen_attention as short
    from qfx.passes.attention import packed_attention_impl, short_tiles, varlen_kernel_takes

    if kernel == "flash":
        monkeypatch.setattr(short, "_FLASH_ONLY", [True])

    heads, d, seq = 4, 64, 96
    mask = _mask([37, 0, 96, 5, 60], seq, left=(3,))
    mask[0, 10] = 0  # a hole
    real = int(mask.sum())
    gather, scatter = token_rows(mask)
    cu = torch.nn.functional.pad(mask.ne(0).sum(1).cumsum(0), (1, 0)).int()
    q, k, v = torch.randn(3, 1, real + 11, heads * d).unbind(0)  # + 11 dummy rows
    key_padding = mask.bool()[:, None, None, :]
    want = packed_attention_impl(q[:, :real], k[:, :real], v[:, :real], heads, cu, seq, gather, scatter, mask,
                                 key_padding)
    gather_c, scatter_c = (t.cuda() for t in token_rows(mask.cuda(), real + 11))
    on_gpu = [t.cuda().to(dtype) for t in (q, k, v)]
    assert varlen_kernel_takes(on_gpu[0], heads)
    assert (short_tiles(on_gpu[0], d, seq) is None) == (kernel == "flash" or short.choose(seq, on_gpu[0].device) is None)
    got = packed_attention_impl(*on_gpu, heads, cu.cuda(), seq, gather_c, scatter_c, mask.cuda(), None)
    assert got.shape == (1, real + 11, heads * d)
    err = (got[0, :real].float().cpu() - want[0]).abs().max()
    assert err < (2e-3 if dtype == torch.float16 else 2e-2), err


def test_graph_pool_keys_calls_by_token_bucket_and_leaves_padded_rows_empty():
    """The CUDA-graph pool's bookkeeping (no capture: runs on the CPU): a call's key carries its
    token bucket, and rows added to fill a batch bucket get no real token."""
    from qfx.runtime.buckets import DimRoles
    from qfx.runtime.graphs import GraphPool
    from qfx.runtime.launch_plan import TokenIndex

    def pool(token_index):
        p = GraphPool.__new__(GraphPool)  # skips __post_init__ (a CUDA graph memory pool)
        p.__dict__.update(forward=None, dense_forward=lambda **kw: None, token_index=token_index,
                          roles=DimRoles({"input_ids": ("b", "s"), "attention_mask": ("b", "s")}, (), True),
                          buckets=Buckets(batch=(4,), seq=(16,), token_step=8, token_buckets=4),
                          device=torch.device("cpu"), graphs={}, failed={}, captures=0, last_key=None)
        return p

    x = {"input_ids": torch.ones(3, 10, dtype=torch.long), "attention_mask": _mask([10, 3, 1], 10)}
    unpadded, padded = pool(TokenIndex()), pool(None)
    assert unpadded.key_for(x, dense=False, tokens=14) == (4, 16, 16)  # steps of 8 below 32 tokens
    assert unpadded.key_for(x, dense=False, tokens=17) == (4, 16, 24)
    assert unpadded.key_for(x, dense=False, tokens=50) == (4, 16, 56)
    assert padded.key_for(x, dense=False) == (4, 16)
    full = {"input_ids": torch.ones(4, 16, dtype=torch.long), "attention_mask": torch.ones(4, 16, dtype=torch.long)}
    assert unpadded.key_for(full, dense=True, tokens=64) == (4, 16, "dense")
    for p, filler in ((unpadded, 0), (padded, 1)):
        static = p._static_inputs((4, 16), x)
        p._fill(static, x, p._packed(p.key_for(x, dense=False, tokens=14)))
        assert torch.equal(static["attention_mask"][:3, :10], x["attention_mask"])
        assert (static["attention_mask"][3] == filler).all() and (static["attention_mask"][:3, 10:] == 0).all()


def test_the_varlen_path_computes_what_the_padded_model_does(bert_pair, monkeypatch):
    """The GPU path's plumbing on the CPU: qfx::packed_attention takes its varlen branch, with the
    flash kernel replaced by per-segment SDPA that checks what the kernel is given (int32
    cu_seqlens, a max_seqlen that bounds every segment, [T', H, D] with a unit last stride),
    through the lean graph, token-bucket dummies and the dense graph."""
    import qfx.passes.attention as attention

    seen = []

    def segments(q, k, v, cu, max_seqlen, scale):
        assert cu.dtype == torch.int32 and q.dim() == 3 and q.stride(-1) == 1 and k.stride(-1) == 1
        ends = cu.tolist()
        assert max(b - a for a, b in zip(ends, ends[1:])) <= max_seqlen and ends[-1] <= q.shape[0]
        out = torch.full_like(q, float("nan"))  # rows past the last segment: unspecified
        for a, b in zip(ends, ends[1:]):
            if b > a:
                out[a:b] = torch.nn.functional.scaled_dot_product_attention(
                    *(x[a:b].transpose(0, 1) for x in (q, k, v)), scale=scale).transpose(0, 1)
        seen.append(q.shape[0])
        return out

    monkeypatch.setattr(attention, "varlen_kernel_takes", lambda q, heads: True)
    monkeypatch.setattr(attention, "flash_varlen", segments)
    padded, unpadded = bert_pair
    x = normalize_inputs(unpadded._capture, (), {**inputs(4, 10, seed=6), "attention_mask": _mask([10, 0, 3, 7], 10, left=(2,))})
    plan = unpadded.launch_plan
    with torch.no_grad():
        want = padded(**x).last_hidden_state
        plan.token_index.capacity = 32  # 20 real tokens + 12 dummies (NaN after attention: never read)
        try:
            got = plan.module(**x).last_hidden_state
        finally:
            plan.token_index.capacity = None
    real = x["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
    assert (got[~real] == 0).all() and seen == [32, 32]  # both layers, the bucket's rows
    full = normalize_inputs(unpadded._capture, (), inputs(2, 10, seed=8, pad=False))
    with torch.no_grad():
        torch.testing.assert_close(plan.module(**full).last_hidden_state, padded(**full).last_hidden_state,
                                   rtol=0, atol=1e-5)
