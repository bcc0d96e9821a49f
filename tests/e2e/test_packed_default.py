"""Padding removal by default (issue 24): ``remove_padding="auto"`` packs padded calls on GPU
targets, runs calls without padding (or where packing would not be exact) on the padded twin,
says which path each call took, and turns bad input into the exact result or a clear error.

On the CPU the same runtime runs with "auto" switched on for the CPU target (AUTO_DEVICES), so
every claim is checked bit for bit against ``remove_padding=False`` on the CPU backend (fp32).
"""
from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch
import torch.utils._pytree as pytree
from models import inputs, make

import qfx
import qfx.api
import qfx.ops
import qfx.runtime.packed as packed_rt
from qfx.capture import normalize_inputs
from qfx.passes.attention import PACKED_ATTENTION, packed_attention_impl
from qfx.runtime.buckets import Buckets, DimRoles
from qfx.runtime.compiled import CompiledModel
from qfx.schema import PACK_TOKENS, TOKEN_INDEX, is_call
from qfx.targets import get_target

_CFG = qfx.QuantConfig(4, 4, symmetric=False)
FAMILIES = ("bert", "distilbert")  # a pooler reading position 0 / token outputs only


def _compile(model, target="cpu", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
        return qfx.compile(model, mode="int4", target=target, example_kwargs=inputs(2, 8), config=_CFG, **kw)


@pytest.fixture(scope="module")
def pairs():
    """family -> (remove_padding=False, the default with "auto" on for the CPU target)."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packed_rt, "AUTO_DEVICES", ("cuda", "cpu"))
        for family in FAMILIES:
            model = make(family, layers=2)
            out[family] = (_compile(model, remove_padding=False), _compile(model))
    return out


def _mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def _right(lengths, seq):
    return _mask([[1] * n + [0] * (seq - n) for n in lengths])


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _check_exact(padded, auto, x) -> str:
    """``auto(**x)`` against ``padded(**x)``: real tokens and per-sequence outputs bit for bit;
    everything bit for bit on the padded path, zeros at padding on the packed path."""
    with torch.no_grad():
        want, got = padded(**x), auto(**x)
    real = x["attention_mask"] != 0
    route = auto.last_route
    for w, g in zip(_leaves(want), _leaves(got)):
        assert g.shape == w.shape
        if w.dim() >= 2 and tuple(w.shape[:2]) == tuple(real.shape):  # [batch, seq, ...]
            assert torch.equal(g[real], w[real]), route
            if route.path == "packed":
                assert (g[~real] == 0).all(), route
            else:
                assert torch.equal(g, w), route
        else:  # per sequence (the pooler): the padded model's, whatever the route
            assert torch.equal(g, w), route
    return route.path


# -- the default --------------------------------------------------------------------------------


def test_auto_packs_on_gpu_targets_and_stays_padded_on_the_cpu():
    resolve = packed_rt.resolve_remove_padding
    assert resolve("auto", get_target("sm_90")) == "auto" and resolve("AUTO", get_target("sm_86")) == "auto"
    assert resolve("auto", get_target("cpu")) is False
    assert resolve(True, get_target("cpu")) is True and resolve(False, get_target("sm_90")) is False
    with pytest.raises(ValueError, match=r"remove_padding='yes': give 'auto' .*True .*False"):
        resolve("yes", get_target("cpu"))
    cm = _compile(make("bert", layers=1))  # the default on the CPU target: padded, and said so
    assert not any(is_call(n, TOKEN_INDEX) for n in cm.graph_module.graph.nodes) and cm._router is None
    assert "padding removal: off (remove_padding='auto' packs on GPU targets only" in cm.runtime_report()
    assert "padding removal: off (remove_padding='auto'" in cm.report().render(width=400)


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_packs_a_padded_call_and_equals_the_padded_model_bit_for_bit(pairs, family):
    padded, auto = pairs[family]
    assert auto.graph_module.meta["qfx_unpad"].startswith("on:")
    x = {**inputs(3, 11, seed=1), "attention_mask": _right([11, 4, 7], 11)}
    assert _check_exact(padded, auto, x) == "packed"
    report = auto.runtime_report()
    assert "last call: packed, direct launch, CPU target" in report and "per call: calls with padding run packed" in report
    assert "padding removal: on: " in auto.report().render(width=400)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_call_without_padding_takes_the_padded_path(pairs, family):
    padded, auto = pairs[family]
    x = inputs(3, 10, seed=2, pad=False)
    assert _check_exact(padded, auto, x) == "padded" and auto.last_route.why == "no padding"
    x.pop("attention_mask")  # left out: the default mask of ones, no padding either
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(_leaves(auto(**x)), _leaves(padded(**x))))
    assert auto.last_route.label == "padded (no padding)"
    twin = auto._padded_module()  # the padded twin: no token index, no pack or repad
    targets = {n.target for n in twin.graph.nodes if n.op == "call_function"}
    assert not targets & {qfx.ops.gather_tokens, qfx.ops.scatter_tokens, packed_attention_impl}
    assert "last call: padded (no padding)" in auto.runtime_report()


def test_auto_packs_only_from_its_padding_threshold_and_true_packs_every_padded_call(tmp_path):
    """remove_padding="auto" runs a call with less padding than AUTO_MIN_PADDING padded (said so),
    the threshold travels with a saved file; True packs any padded call."""
    model = make("bert", layers=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packed_rt, "AUTO_DEVICES", ("cuda", "cpu"))
        mp.setattr(packed_rt, "AUTO_MIN_PADDING", 0.5)
        mp.setattr(qfx.api, "AUTO_MIN_PADDING", 0.5)
        auto, always, padded = _compile(model), _compile(model, remove_padding=True), _compile(model, remove_padding=False)
    little = {**inputs(2, 10, seed=3), "attention_mask": _right([10, 8], 10)}  # 10 % padding
    lots = {**inputs(2, 10, seed=3), "attention_mask": _right([3, 2], 10)}  # 75 % padding
    assert _check_exact(padded, auto, little) == "padded" and "padding 10% is below 50%" in auto.last_route.why
    assert _check_exact(padded, auto, lots) == "packed"
    assert "calls with at least 50% padding run packed" in auto.runtime_report()
    assert _check_exact(padded, always, little) == "packed" and always._router.min_padding == 0.0
    qfx.save(auto, tmp_path / "auto.qfx.safetensors")
    again = qfx.load(tmp_path / "auto.qfx.safetensors")
    assert again._router.min_padding == 0.5 and _check_exact(padded, again, little) == "padded"


def test_auto_leaves_a_small_gpu_mask_unread_and_true_reads_it(tmp_path):
    """remove_padding="auto": a call of fewer than AUTO_SYNC_MIN_POSITIONS positions whose mask is on
    the GPU runs padded without a device sync (said so); larger ones, CPU masks and True are counted.
    (A mask on the meta device stands for a GPU one: the router must decide without its values.)"""
    model = make("bert", layers=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packed_rt, "AUTO_DEVICES", ("cuda", "cpu"))
        auto, always = _compile(model), _compile(model, remove_padding=True)
    assert auto._router.sync_min_positions == packed_rt.AUTO_SYNC_MIN_POSITIONS > 0
    assert always._router.sync_min_positions == 0
    n = packed_rt.AUTO_SYNC_MIN_POSITIONS
    small = torch.ones(1, n - 1, dtype=torch.long, device="meta")
    route = auto._router.route(small)
    assert route.path == "padded" and "not read back" in route.why and f"{n - 1} positions" in route.why
    with pytest.raises(NotImplementedError):  # counted: the meta mask has no values to read
        auto._router.route(torch.ones(1, n, dtype=torch.long, device="meta"))
    with pytest.raises(NotImplementedError):
        always._router.route(small)
    assert auto._router.route(_right([3, 2], 10)).path == "packed"  # a CPU mask is counted, however small
    assert "positions with its attention_mask on the GPU runs padded" in auto.runtime_report()
    qfx.save(auto, tmp_path / "auto.qfx.safetensors")
    assert qfx.load(tmp_path / "auto.qfx.safetensors")._router.sync_min_positions == n


def test_a_call_whose_token_bucket_fills_its_bucket_runs_padded(pairs):
    """With CUDA graphs (buckets set), a packed call runs its token bucket: when that is the whole
    (batch, seq) bucket nothing is skipped, so the call runs the padded twin and says why; a call
    whose token bucket is smaller still packs. (The CPU runtime has no graphs: the router is given
    the buckets here, as the GPU runtime does.)"""
    _, auto = pairs["bert"]
    router = copy.copy(auto._router)
    router.calls = type(router.calls)()
    router.buckets = Buckets(batch=(1, 4), seq=(128,), token_step=64, token_buckets=4)
    one = router.route(_right([104], 128))  # 104 real tokens: token bucket 128 = the 1 x 128 bucket
    assert one.path == "padded" and "saves no positions" in one.why and "bucket 128" in one.why, one
    assert router.route(_right([60], 128)).path == "packed"  # token bucket 64 < 128
    assert router.route(_right([128, 100, 90, 20], 128)).path == "packed"  # 338 -> 384 of 512
    router.route(_right([120], 128))
    assert router.calls[packed_rt.NO_SAVING] == 2 and "packing saves nothing" in router.describe()  # one label
    router.buckets = None
    assert router.route(_right([104], 128)).path == "packed"  # direct launch packs exactly 104 rows


def test_remove_padding_false_never_packs(pairs):
    padded, _ = pairs["bert"]
    assert not any(is_call(n, (TOKEN_INDEX, PACK_TOKENS, PACKED_ATTENTION)) for n in padded.graph_module.graph.nodes)
    with torch.no_grad():
        padded(**{**inputs(3, 11, seed=1), "attention_mask": _right([11, 4, 7], 11)})
    assert padded._router is None and padded.last_route is None
    report = padded.runtime_report()
    assert "padding removal: off (remove_padding=False)" in report and "packed" not in report.split("CUDA graphs")[1]


# -- bad input: the exact result, or a clear error -------------------------------------------------

BAD_MASKS = {  # name -> (mask, path with a pooler reading position 0, path with token outputs only)
    "an all-padding row": (_mask([[1] * 9, [0] * 9, [1] * 5 + [0] * 4]), "padded", "packed"),
    "left padding": (_mask([[1] * 9, [0] * 5 + [1] * 4, [1] * 7 + [0] * 2]), "padded", "packed"),
    "holes, position 0 real": (_mask([[1, 0, 1, 1, 0, 0, 1, 1, 0], [1] * 9, [1, 1, 0, 1, 1, 1, 1, 1, 1]]), "packed", "packed"),
    "holes at position 0": (_mask([[0, 1, 1, 0, 1, 1, 1, 1, 1], [1] * 9, [1] * 3 + [0] * 6]), "padded", "packed"),
    "every row empty": (_mask([[0] * 9] * 3), "padded", "packed"),
    "values other than 0 and 1": (_mask([[1] * 9, [1, 2, 1, 1, 0, 0, 0, 0, 0], [1] * 6 + [0] * 3]), "padded", "padded"),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(BAD_MASKS))
def test_bad_masks_give_the_padded_models_result(pairs, family, case):
    padded, auto = pairs[family]
    mask, with_pooler, tokens_only = BAD_MASKS[case]
    x = {**inputs(3, 9, seed=5), "attention_mask": mask}
    path = _check_exact(padded, auto, x)
    assert path == (with_pooler if family == "bert" else tokens_only), auto.last_route
    assert all(torch.isfinite(t).all() for t in _leaves(auto(**x)))
    if path == "padded":
        assert auto.last_route.why and f"last call: {auto.last_route.label}" in auto.runtime_report()


def test_length_0_sequences_are_refused_with_the_fix(pairs):
    _, auto = pairs["bert"]
    with pytest.raises(ValueError, match=r"input_ids has an empty sequence"):
        auto(input_ids=torch.zeros(2, 0, dtype=torch.long), attention_mask=torch.zeros(2, 0, dtype=torch.long))
    seqs = [{"input_ids": torch.arange(3, 3 + n), "attention_mask": torch.ones(n, dtype=torch.long)} for n in (5, 0, 3)]
    with pytest.raises(ValueError, match=r"run_many: sequences\[1\] has no tokens \(length 0\); drop it"):
        auto.run_many(seqs)
    seqs[1] = {"input_ids": torch.arange(3, 7), "attention_mask": torch.ones(5, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"run_many: the inputs of sequences\[1\] have lengths \[4, 5\]"):
        auto.run_many(seqs)
    seqs[1] = {"input_ids": torch.arange(3, 7)[None], "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"sequences\[1\]\['input_ids'\] is a 2-D tensor"):
        auto.run_many(seqs)


def test_run_many_gives_the_padded_models_outputs(pairs):
    padded, auto = pairs["bert"]
    g = torch.Generator().manual_seed(3)
    seqs = [{"input_ids": torch.randint(3, 90, (n,), generator=g), "attention_mask": torch.ones(n, dtype=torch.long)}
            for n in (7, 2, 11, 5, 1)]
    want, got = padded.run_many(seqs, token_budget=24), auto.run_many(seqs, token_budget=24)
    for w, o in zip(want, got):
        assert torch.equal(o.last_hidden_state, w.last_hidden_state) and torch.equal(o.pooler_output, w.pooler_output)
    assert "packed" in auto._router.calls


def test_a_token_count_above_every_bucket_runs_packed_by_direct_launch(pairs):
    """A shape no bucket holds replays no graph: the packed graph runs directly, its token index
    sized on the host (no sync), exact. The pool's bookkeeping, without a GPU."""
    from qfx.runtime.graphs import GraphPool
    from qfx.runtime.launch_plan import TokenIndex

    pool = GraphPool.__new__(GraphPool)  # skips __post_init__ (a CUDA graph memory pool)
    pool.__dict__.update(forward=None, dense_forward=None, padded_forward=lambda **kw: None, token_index=TokenIndex(),
                         roles=DimRoles({"input_ids": ("b", "s"), "attention_mask": ("b", "s")}, (), True),
                         buckets=Buckets(batch=(2,), seq=(8,), token_step=8), device=torch.device("cpu"),
                         graphs={}, failed={}, captures=0, last_key=None)
    x = {"input_ids": torch.ones(3, 10, dtype=torch.long), "attention_mask": _right([10, 3, 9], 10)}
    assert pool.key_for(x, dense=False, tokens=22) is None and pool.key_for(x, dense=False, padded=True) is None
    small = {k: v[:2, :8] for k, v in x.items()}
    assert pool.key_for(small, dense=False, tokens=11) == (2, 8, 16)
    assert pool.key_for(small, dense=False, tokens=11, padded=True) == (2, 8, "padded")
    padded, auto = pairs["distilbert"]
    big = {**inputs(4, 40, seed=9), "attention_mask": _right([40, 13, 1, 29], 40)}
    assert _check_exact(padded, auto, big) == "packed"
    plan = auto.launch_plan
    with torch.no_grad():  # sized on the host == sized by the graph (capacity None)
        norm = normalize_inputs(auto._capture, (), big)
        assert torch.equal(packed_rt.packed_forward(plan, 83, norm)[0], plan.module(**norm)[0])
    assert plan.token_index.capacity is None


# -- safety: what reaches the kernels --------------------------------------------------------------


def test_a_graph_whose_indices_do_not_come_from_attention_mask_is_refused(pairs):
    _, auto = pairs["bert"]
    gm = copy.deepcopy(auto.graph_module)
    attn = next(n for n in gm.graph.nodes if is_call(n, PACKED_ATTENTION))
    lengths = attn.args[4].args[0]  # cumsum(...): the ends, not the padded prefix sums
    attn.update_arg(4, lengths)
    with pytest.raises(ValueError, match=r"packed graph: node .* takes a cu_seqlens that is not the prefix sums"):
        CompiledModel(gm, auto.report(), auto._capture, auto.device)
    gm = copy.deepcopy(auto.graph_module)
    pack = next(n for n in gm.graph.nodes if is_call(n, PACK_TOKENS))
    scatter = next(n for n in gm.graph.nodes if n.target is operator.getitem and n.args[1] == 1
                   and is_call(n.args[0], TOKEN_INDEX))
    pack.update_arg(1, scatter)
    with pytest.raises(ValueError, match=r"takes a gather index that is not qfx::token_index's gather"):
        CompiledModel(gm, auto.report(), auto._capture, auto.device)


def test_save_and_load_keep_the_router(pairs, tmp_path):
    padded, auto = pairs["bert"]
    qfx.save(auto, tmp_path / "m.qfx.safetensors")
    again = qfx.load(tmp_path / "m.qfx.safetensors")
    assert again._router is not None and again._router.reads == "first"
    for mask in (_right([9, 4, 7], 9), BAD_MASKS["left padding"][0]):
        x = {**inputs(3, 9, seed=6), "attention_mask": mask}
        _check_exact(padded, again, x)


def _packed_args(mask: torch.Tensor, heads: int = 2, d: int = 8, extra: int = 0):
    gather, scatter = qfx.ops.token_rows(mask, int(mask.ne(0).sum()) + extra if extra else None)
    t = gather.numel()
    cu = torch.nn.functional.pad(mask.ne(0).sum(1).cumsum(0), (1, 0)).int()
    q, k, v = torch.randn(3, 1, t, heads * d).unbind(0)
    return dict(q=q, k=k, v=v, heads=heads, cu_seqlens=cu, max_seqlen=mask.shape[1], gather=gather, scatter=scatter,
                attention_mask=mask, attn_mask=mask.bool()[:, None, None, :])


BAD_ARGS = {
    "cu_seqlens int64": (lambda a: {"cu_seqlens": a["cu_seqlens"].long()}, r"cu_seqlens has shape \(4,\) and dtype torch.int64"),
    "cu_seqlens one short": (lambda a: {"cu_seqlens": a["cu_seqlens"][:-1]}, r"cu_seqlens .*expected \[4\] int32"),
    "cu_seqlens not monotonic": (lambda a: {"cu_seqlens": torch.tensor([0, 6, 3, 9], dtype=torch.int32)},
                                 r"cu_seqlens \[0, 6, 3, 9\] is not a run of row lengths"),
    "cu_seqlens past T": (lambda a: {"cu_seqlens": a["cu_seqlens"] + torch.tensor([0, 0, 0, 5], dtype=torch.int32)},
                          r"cu_seqlens .* at most the 12 packed rows"),
    "cu_seqlens not from 0": (lambda a: {"cu_seqlens": a["cu_seqlens"] + 1}, r"cu_seqlens \[1, "),
    "a segment past max_seqlen": (lambda a: {"cu_seqlens": torch.tensor([0, 9, 10, 12], dtype=torch.int32)},
                                  r"row lengths in \[0, 6\]"),
    "max_seqlen": (lambda a: {"max_seqlen": 5}, r"max_seqlen=5; expected attention_mask's sequence length 6"),
    "gather int32": (lambda a: {"gather": a["gather"].int()}, r"packed_attention: gather has shape \(12,\) and dtype torch.int32"),
    "scatter short": (lambda a: {"scatter": a["scatter"][:-1]}, r"packed_attention: scatter has shape \(11,\).*expected \[12\]"),
    "heads": (lambda a: {"heads": 3}, r"heads=3 does not divide q's 16 features"),
    "k shape": (lambda a: {"k": a["k"][:, :-1]}, r"q, k, v have shapes"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_packed_attention_refuses_arguments_a_kernel_would_read_out_of_bounds(case):
    mask = _mask([[1] * 6, [1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0]])
    args = _packed_args(mask)
    change, match = BAD_ARGS[case]
    with pytest.raises(ValueError, match=match):
        packed_attention_impl(**{**args, **change(args)})


def test_token_layout_ops_check_shapes_always_and_values_under_the_debug_flag(monkeypatch):
    mask = _mask([[1, 1, 0], [1, 0, 1]])
    x = torch.randn(2, 3, 4)
    gather, scatter = torch.ops.qfx.token_index(mask, None)
    with pytest.raises(ValueError, match=r"pack_tokens: gather has shape \(1, 4\)"):
        torch.ops.qfx.pack_tokens(x, gather[None])
    with pytest.raises(ValueError, match=r"repad_tokens: scatter has shape \(3,\) .*expected \[4\] int64"):
        torch.ops.qfx.repad_tokens(torch.randn(1, 4, 4), scatter[:3], mask)
    with pytest.raises(ValueError, match=r"repad_tokens: x has shape \(4, 4\)"):
        torch.ops.qfx.repad_tokens(torch.randn(4, 4), scatter, mask)
    bad = gather.clone()
    bad[0] = 6  # one past the last row
    monkeypatch.setattr(qfx.ops, "CHECK_INDEX_VALUES", True)
    with pytest.raises(ValueError, match=r"pack_tokens: gather holds indices outside \[0, 5\]"):
        torch.ops.qfx.pack_tokens(x, bad)
    packed = torch.ops.qfx.pack_tokens(x, gather)  # good indices pass the value check too
    assert torch.equal(torch.ops.qfx.repad_tokens(packed, scatter, mask)[mask.bool()], x[mask.bool()])


# -- GPU ------------------------------------------------------------------------------------------


def _gpu_pair(float_dtype, buckets):
    target = qfx.detect_target().name
    model = make("bert", layers=2, hidden=64, heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qfx.PostTrainingQuantizationWarning)
        kw = dict(mode="int8", target=target, example_kwargs=inputs(2, 8), float_dtype=float_dtype, buckets=buckets)
        padded, auto = qfx.compile(model, remove_padding=False, **kw), qfx.compile(model, **kw)
    # these small calls stand for large ones: read every GPU mask, as a call of AUTO_SYNC_MIN_POSITIONS would be
    auto._router.sync_min_positions = 0
    return padded, auto


def _cuda(x: dict) -> dict:
    return {k: v.cuda() for k, v in x.items()}


@pytest.mark.gpu
def test_gpu_auto_default_fp32_is_bit_for_bit_at_real_tokens():
    """The default on a GPU target packs; with fp32 float parts the packed call equals the padded
    model at every real token and per-sequence output bit for bit (attention runs the repadded
    reference in fp32); no padding and an empty row under the pooler replay the padded twin."""
    padded, auto = _gpu_pair(torch.float32, Buckets(batch=(4,), seq=(64,), token_step=16, token_buckets=4))
    assert auto.graph_module.meta["qfx_unpad"].startswith("on:"), auto.graph_module.meta["qfx_unpad"]
    cases = [(_right([50, 17, 1], 50), "packed", (4, 64, 80)),
             (torch.ones(3, 50, dtype=torch.long), "padded", (4, 64, "padded")),
             (_right([50, 0, 9], 50), "padded", (4, 64, "padded"))]
    for mask, path, key in cases:
        x = {**inputs(3, 50, seed=5), "attention_mask": mask}
        assert _check_exact(padded, auto, _cuda(x)) == path
        assert auto._graphs.last_key == key, auto.runtime_report()
    report = auto.runtime_report()
    assert "calls so far:" in report and "last call: padded (position 0 is padding" in report, report


@pytest.mark.gpu
def test_gpu_auto_default_fp16_packs_padded_and_replays_dense_unpadded_calls():
    padded, auto = _gpu_pair(None, Buckets(batch=(4,), seq=(16, 64), token_step=16, token_buckets=4))
    x = _cuda({**inputs(3, 50, seed=5), "attention_mask": _right([50, 17, 1], 50)})
    want, got = padded(**x), auto(**x)
    assert auto.last_route.path == "packed" and auto._graphs.last_key == (4, 64, 80)
    real = x["attention_mask"].bool()
    cos = torch.nn.functional.cosine_similarity(got.last_hidden_state[real].float().flatten(),
                                                want.last_hidden_state[real].float().flatten(), dim=0)
    assert cos > 0.999 and (got.last_hidden_state[~real] == 0).all(), cos
    full = inputs(4, 16, pad=False)  # a CPU mask of ones filling its bucket: the unmasked graph
    auto(**full)
    assert auto.last_route.label == "padded (no padding)" and auto._graphs.last_key == (4, 16, "dense")


@pytest.mark.gpu
def test_gpu_auto_runs_a_small_call_with_a_gpu_mask_padded_unread():
    padded, auto = _gpu_pair(torch.float32, Buckets(batch=(4,), seq=(64,), token_step=16, token_buckets=4))
    auto._router.sync_min_positions = packed_rt.AUTO_SYNC_MIN_POSITIONS
    x = {**inputs(3, 50, seed=5), "attention_mask": _right([50, 17, 1], 50)}
    assert _check_exact(padded, auto, _cuda(x)) == "padded" and "not read back" in auto.last_route.why
    assert auto._graphs.last_key == (4, 64, "padded"), auto.runtime_report()
    assert _check_exact(padded, auto, x) == "packed"  # the same call with its mask on the CPU: counted, packed


@pytest.mark.gpu
def test_gpu_a_call_above_every_bucket_runs_packed_by_direct_launch():
    padded, auto = _gpu_pair(torch.float32, Buckets(batch=(2,), seq=(16,)))
    x = {**inputs(4, 40, seed=9), "attention_mask": _right([40, 13, 1, 29], 40)}
    assert _check_exact(padded, auto, _cuda(x)) == "packed"
    assert "last call: packed, direct launch, no bucket holds this shape" in auto.runtime_report()
    assert auto.launch_plan.token_index.capacity is None


@pytest.mark.gpu
def test_gpu_index_values_are_checked_under_the_debug_flag(monkeypatch):
    mask = _mask([[1] * 6, [1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0]])
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _packed_args(mask).items()}
    args = {**args, **{k: args[k].half() for k in ("q", "k", "v")}, "attn_mask": None}
    past = args["cu_seqlens"] + torch.tensor([0, 0, 0, 5], dtype=torch.int32, device="cuda")
    monkeypatch.setattr(qfx.ops, "CHECK_INDEX_VALUES", True)
    with pytest.raises(ValueError, match=r"cu_seqlens .* at most the 12 packed rows"):
        packed_attention_impl(**{**args, "cu_seqlens": past})
    assert packed_attention_impl(**args).shape == args["q"].shape  # good values pass
