"""The runtime: shape buckets, dims told apart by symbol, the lean launch plan, the attention
rewrite (CPU, by evaluation), and on a GPU the bucketed CUDA graphs as the user calls them."""
from __future__ import annotations

import warnings

import pytest
import torch
from models import inputs, make

import qfx
from qfx.capture import normalize_inputs
from qfx.passes.attention import key_padding_attention
from qfx.runtime.buckets import Buckets, dim_roles
from qfx.runtime.launch_plan import bind_launchers


def _ptq(model, mode="int8", target="cpu", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
        return qfx.compile(model, mode=mode, target=target, example_kwargs=inputs(2, 8), **kw)


def test_buckets_fit_the_smallest_holding_shape():
    b = Buckets(batch=(1, 4, 16), seq=(32, 128))
    assert b.fit(1, 5) == (1, 32)
    assert b.fit(3, 33) == (4, 128)
    assert b.fit(16, 128) == (16, 128)
    assert b.fit(17, 8) is None and b.fit(2, 129) is None
    assert b.limited_to(100).seq == (32, 100)


@pytest.mark.parametrize("bad", [dict(batch=()), dict(seq=(0, 8)), dict(batch=(1.5,)), dict(max_graphs=0)])
def test_buckets_reject_bad_values_naming_them(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Buckets(**bad)


def test_dim_roles_tell_batch_from_seq_by_symbol():
    cm = _ptq(make("bert_cls", layers=1))
    roles = dim_roles(cm.graph_module)
    assert not roles.why_not
    assert roles.inputs == {"input_ids": ("b", "s"), "attention_mask": ("b", "s"), "token_type_ids": ("b", "s")}
    assert roles.outputs == (("b", ""),)  # logits [batch, labels]
    roles = dim_roles(_ptq(make("bert", layers=1)).graph_module)
    assert ("b", "s", "") in roles.outputs and ("b", "") in roles.outputs  # last_hidden_state, pooler


def test_dim_roles_of_feature_inputs():
    lin = torch.nn.Sequential(torch.nn.Linear(32, 64))
    for x, want in ((torch.randn(4, 16, 32), ("b", "s", "")), (torch.randn(24, 32), ("b", ""))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
            cm = qfx.compile(lin, mode="int8", target="cpu", example_args=(x,), config=qfx.QuantConfig(8, 8, quantize_other=True))
        roles = dim_roles(cm.graph_module, cm._capture.input_names)
        assert not roles.why_not and list(roles.inputs.values()) == [want] and roles.outputs == (want,)
        assert list(roles.inputs) == list(cm._capture.input_names)


def test_launch_plan_drops_export_guards_and_keeps_outputs():
    cm = _ptq(make("bert_cls", layers=2))
    plan = bind_launchers(cm.graph_module)
    lean = plan.module
    targets = {n.target for n in lean.graph.nodes}
    assert torch.ops.aten._assert_tensor_metadata.default not in targets
    assert not any(n.op == "call_module" and n.target == "_guards_fn" for n in lean.graph.nodes)
    from qfx.backends.cpu import int8_path

    # CPU: the cpu backend's ops are bound to its launchers; on the reference backend nothing is
    assert set(plan.bound.values()) == ({"cpu"} if int8_path().isa else set())
    x = normalize_inputs(cm._capture, (), inputs(3, 11, seed=4))
    with torch.no_grad():
        assert torch.equal(lean.forward(**x).logits, cm.graph_module(**x).logits)
        assert torch.equal(cm(**x).logits, cm.graph_module(**x).logits)


def test_positional_and_keyword_calls_share_the_input_check_memo():
    """A repeated call skips normalize_inputs whether its inputs come by position or keyword;
    calls that leave inputs to defaults or change a shape still go through the checks."""
    cm = _ptq(make("bert_cls", layers=1))
    x = inputs(2, 8)
    x["token_type_ids"] = torch.zeros_like(x["input_ids"])
    names = list(cm._capture.input_names)  # the order of BertForSequenceClassification.forward
    args = tuple(x[n] for n in names)
    by_kw = cm(**x).logits
    assert torch.equal(cm(*args).logits, by_kw) and torch.equal(cm(*args).logits, by_kw)  # 2nd: memo hit
    assert tuple(cm._checked.values()) == ((), tuple(names))
    head, rest = args[:1], {n: x[n] for n in names[1:]}
    assert torch.equal(cm(*head, **rest).logits, by_kw)
    assert torch.equal(cm(*head, **rest).logits, by_kw)
    assert cm(x["input_ids"]).logits.shape == by_kw.shape  # defaults filled: not memoised
    assert len(cm._checked) == 3
    with pytest.raises(ValueError):
        cm(*args[:-1], args[-1].float())  # another dtype: checked again, refused


def test_cuda_graphs_on_a_cpu_target_is_a_clear_error():
    with pytest.raises(ValueError, match="cuda_graphs=True needs a GPU"):
        _ptq(make("bert_cls", layers=1), cuda_graphs=True)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "bart_encoder"])
def test_key_padding_attention_rewrites_the_hf_mask_and_keeps_outputs(family):
    model = make(family, layers=2).to(torch.bfloat16)
    gm = qfx.capture(model, example_kwargs=inputs(2, 8))
    x = inputs(3, 9, seed=2)  # last row padded
    with torch.no_grad():
        before = gm(**x)[0].float()
    gm = key_padding_attention(gm, torch.bfloat16)
    assert gm.meta["qfx_attention"].startswith("key-padding bias"), gm.meta["qfx_attention"]
    masks = [n.args[3] if len(n.args) > 3 else n.kwargs["attn_mask"] for n in gm.graph.nodes
             if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert len(set(masks)) == 1 and masks[0].meta.get("val") is None or masks[0].name == "key_padding_bias"
    with torch.no_grad():
        after = gm(**x)[0].float()
    real = x["attention_mask"].bool()
    assert torch.allclose(after[real], before[real], atol=2e-2, rtol=2e-2)


def test_key_padding_attention_leaves_fp32_and_non_padding_masks_alone():
    gm = qfx.capture(make("bert", layers=1), example_kwargs=inputs(2, 8))
    key_padding_attention(gm, torch.float32)
    assert gm.meta["qfx_attention"].startswith("kept as captured: float parts run in torch.float32")


def _cuda_inputs(b, s, seed=0):
    return {k: v.cuda() for k, v in inputs(b, s, seed=seed).items()}


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gpu_bucketed_graphs_replay_what_direct_launch_computes(mode):
    model = make("bert_cls", layers=2, hidden=64, heads=2)
    cm = _ptq(model, mode=mode, target=qfx.detect_target().name, buckets=Buckets(batch=(1, 4), seq=(16, 64)),
              remove_padding=False)  # the padded graphs' keys; packed calls: tests/e2e/test_packed_default.py
    x = _cuda_inputs(3, 37, seed=5)  # padded to (4, 64)
    got = cm(**x).logits
    assert got.shape == (3, 2) and len(cm._graphs.graphs) == 1, cm.runtime_report()
    assert "1 bucket(s) captured" in cm.runtime_report()
    # the graph computes what direct launch computes on the padded batch (float GEMMs and
    # attention may pick other cuBLAS / cuDNN algorithms under capture: equal up to rounding)
    padded = cm._graphs.graphs[(4, 64)].inputs
    with torch.inference_mode():
        direct_padded = cm.launch_plan.module.forward(**{k: v.clone() for k, v in padded.items()}).logits
    cos = torch.nn.functional.cosine_similarity(got.float().flatten(), direct_padded[:3].float().flatten(), dim=0)
    assert cos > 0.999, (cos, got, direct_padded[:3])
    # and padding does not change what a real token sees beyond the attention kernel's rounding
    with torch.inference_mode():
        direct = cm.launch_plan.module.forward(**normalize_inputs(cm._capture, (), x)).logits
    cos = torch.nn.functional.cosine_similarity(got.float().flatten(), direct.float().flatten(), dim=0)
    assert cos > 0.99, (cos, got, direct)
    again = cm(**_cuda_inputs(3, 37, seed=5)).logits
    assert got.data_ptr() != again.data_ptr()  # a fresh output tensor, not the graph's static one
    assert torch.allclose(again, got, rtol=1e-3, atol=1e-3), (again, got)
    big = cm(**_cuda_inputs(5, 60, seed=1)).logits  # batch 5 is outside every bucket: direct launch
    assert big.shape == (5, 2) and torch.isfinite(big).all() and len(cm._graphs.graphs) == 1


@pytest.mark.gpu
def test_gpu_unpadded_calls_replay_the_unmasked_graph():
    cm = _ptq(make("bert_cls", layers=2, hidden=64, heads=2), mode="int8", target=qfx.detect_target().name, remove_padding=False,
              buckets=Buckets(batch=(4,), seq=(16,)))
    assert cm.launch_plan.dense_module is not None  # the key-padding rewrite ran (fp16 float parts)
    dense = inputs(4, 16, pad=False)  # CPU mask, all ones: checked on the host, no sync
    out_dense = cm(**dense).logits
    assert cm._graphs.last_key == (4, 16, "dense"), cm._graphs.last_key
    padded = inputs(4, 16, pad=True)
    cm(**padded)
    assert cm._graphs.last_key == (4, 16)
    with torch.inference_mode():
        masked = cm.launch_plan.module.forward(**normalize_inputs(cm._capture, (), {k: v.cuda() for k, v in dense.items()})).logits
    cos = torch.nn.functional.cosine_similarity(out_dense.float().flatten(), masked.float().flatten(), dim=0)
    assert cos > 0.999, (out_dense, masked)  # an all-zero bias changes nothing but the kernel


@pytest.mark.gpu
def test_gpu_capture_failure_falls_back_to_direct_launch_and_says_why():
    # padded (remove_padding=False): every call replays the launch plan's graph, the one refused below
    cm = _ptq(make("bert_cls", layers=1, hidden=64, heads=2), target=qfx.detect_target().name, remove_padding=False)
    x = _cuda_inputs(2, 12)
    with torch.inference_mode():
        want = cm.launch_plan.module.forward(**normalize_inputs(cm._capture, (), x)).logits
    pool = cm._pool()
    real = pool.forward

    def refuses_capture(**kw):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("operation not permitted when stream is capturing")
        return real(**kw)

    pool.forward = refuses_capture
    with pytest.warns(RuntimeWarning, match="capture failed"):
        got = cm(**x).logits
    assert torch.equal(got, want)  # direct launch: the same kernels, eagerly
    assert "direct launch, capture failed" in cm.runtime_report()
    assert torch.equal(cm(**x).logits, want) and not pool.graphs  # the failed bucket is not retried


@pytest.mark.gpu
def test_gpu_runtime_bad_inputs():
    cm = _ptq(make("bert_cls", layers=1, hidden=64, heads=2), target=qfx.detect_target().name)
    x = inputs(2, 12)
    out_cpu_inputs = cm(**x).logits  # CPU tensors are moved to the GPU (stated in the docstring)
    assert out_cpu_inputs.is_cuda
    other = "sm_86" if qfx.detect_target().family == "sm90a" else "sm_90"
    with pytest.raises(RuntimeError, match=f"target {other}"):  # a plan for another kernel family
        _ptq(make("bert_cls", layers=1, hidden=64, heads=2), target=other)
    zero = {k: v.cuda() for k, v in x.items()}
    zero["attention_mask"][0] = 0  # an all-zero mask row: finite (uniform attention), never NaN
    assert torch.isfinite(cm(**zero).logits).all()


def test_fuse_add_layer_norm_quantize_matches_the_unfused_graph_on_the_reference():
    """The pass rewires add -> layer_norm -> quantize into one op; on the reference backend the
    op computes exactly the unfused ops, so the whole model output is unchanged bit for bit."""
    import copy

    from qfx.backends import only
    from qfx.passes.fuse_norm_quant import fuse_add_layer_norm_quantize

    with warnings.catch_warnings(), only("reference"):  # target cpu plans the "cpu" backend first
        warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
        cm = qfx.compile(make("bert_cls", layers=2), mode="int8", target="cpu", example_kwargs=inputs(2, 8),
                         float_dtype=torch.bfloat16)
    x = normalize_inputs(cm._capture, (), inputs(3, 11, seed=3))
    gm = cm.graph_module
    before = gm(**x).logits
    fused_gm = fuse_add_layer_norm_quantize(copy.deepcopy(gm), torch.bfloat16, backend="reference",
                                            fits=lambda k, dtype: (True, ""))
    n_fused, _ = fused_gm.meta["qfx_fused_norms"]
    fused_ops = [n for n in fused_gm.graph.nodes if n.target == torch.ops.qfx.add_layer_norm_quantize.default]
    # the LayerNorms that feed a quantize: embeddings, layer 0 (attention-out, FFN-out), layer 1
    # attention-out (layer 1's FFN-out LayerNorm feeds the float pooler)
    assert n_fused == len(fused_ops) == 4
    # each with its residual add, except the embeddings' (its position add broadcasts [1, S, H])
    assert sum(n.args[1] is not None for n in fused_ops) == 3
    assert not [n for n in fused_gm.graph.nodes if n.target == torch.ops.qfx.quantize.default
                and n.args[0].target == torch.ops.aten.layer_norm.default]
    assert torch.equal(fused_gm(**x).logits, before)
    refused = fuse_add_layer_norm_quantize(copy.deepcopy(gm), torch.bfloat16, backend="reference",
                                           fits=lambda k, dtype: (False, "too long"))
    assert refused.meta["qfx_fused_norms"] == (0, "too long")
    kept = fuse_add_layer_norm_quantize(copy.deepcopy(gm), torch.float32, backend="reference")
    assert kept.meta["qfx_fused_norms"][0] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits, symmetric", [(8, True), (4, False)])
def test_gpu_add_layer_norm_quantize_kernel(dtype, bits, symmetric):
    from qfx import numerics
    from qfx.backends import cutlass as qc

    if not qc.available()[0]:
        pytest.skip(qc.available()[1])
    g = torch.Generator().manual_seed(bits)
    for rows, k in [(1, 64), (37, 768), (300, 1024), (5, 384)]:
        a = (torch.randn(rows, k, generator=g) * 3).to(dtype).cuda()
        b = torch.randn(rows, k, generator=g).to(dtype).cuda()
        w = (torch.rand(k, generator=g) + 0.5).to(dtype).cuda()
        beta = (torch.randn(k, generator=g) * 0.1).to(dtype).cuda()
        for bb in (b, None):
            y, q, s, c = qc.add_layer_norm_quantize(a, bb, w, beta, 1e-12, bits, symmetric)
            s_ref = a if bb is None else a + bb
            y_ref = torch.nn.functional.layer_norm(s_ref.float(), (k,), w.float(), beta.float(), 1e-12)
            assert (y.float() - y_ref).abs().max() <= 2e-2 * y_ref.abs().max()  # fp16/bf16 rounding of y
            # the codes are exactly those of the y the kernel returned
            rq, rs, rc = numerics.quantize_activation(y.cpu(), bits, symmetric, None)
            assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs) and torch.equal(c.cpu(), rc)
