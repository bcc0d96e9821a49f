"""qfx.train (KD trainer) and qfx.passes.expose_features on tiny random-init BERT classifiers.

Graph checks (tap counts) are paired with numerics checks (outputs unchanged, taps equal to
HF's own hidden states and attention maps); the loop is checked for exact resume after a
stop and after a real SIGKILL.
"""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import BertForSequenceClassification

import qfx
from qfx import train as qat
from qfx.passes.expose_features import FeatureRecorder, FeatureTap, expose_features, feature_taps

from models import bert_config, inputs

W4A4 = qfx.QuantConfig(4, 4)


def tiny_classifier(layers: int = 2, hidden: int = 32, dropout: float = 0.1, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = bert_config(layers, hidden, heads=2)
    cfg.hidden_dropout_prob = dropout
    cfg.num_labels = 2
    return BertForSequenceClassification(cfg).eval()


def toy_data(n: int = 64, seed: int = 0) -> qat.EncodedData:
    """Label = whether the first token id is large: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, 97, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    return qat.EncodedData(ids, [int(x[0] > 50) for x in ids], 0, 2)


def _example():
    return toy_data(4).batch([0, 1, 2, 3])[0]


def _params(m) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


# --------------------------------------------------------------------------- expose_features


def test_taps_keep_numerics_and_match_hf_features():
    model = tiny_classifier()
    batch = inputs(3, 9) | {"token_type_ids": torch.zeros(3, 9, dtype=torch.long)}
    gm = qfx.capture(model, example_kwargs=batch)
    before = gm(**batch).logits
    gm = expose_features(gm)
    taps = feature_taps(gm)
    assert sum(t.kind == "hidden" for t in taps) == 3 and sum(t.kind == "q" for t in taps) == 2 and sum(t.kind == "k" for t in taps) == 2
    assert sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FeatureTap)) == 7
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    ref = eager(**batch, output_hidden_states=True, output_attentions=True)
    with FeatureRecorder(gm) as rec:
        after = gm(**batch).logits
    assert torch.equal(before, after)
    key = batch["attention_mask"].bool()[:, None, None, :]
    for i in range(3):
        torch.testing.assert_close(rec.hidden[i], ref.hidden_states[i], atol=1e-5, rtol=1e-5)
    for i in range(2):
        probs = torch.softmax(rec.scores(i).masked_fill(~key, float("-inf")), -1)
        torch.testing.assert_close(probs, ref.attentions[i], atol=1e-5, rtol=1e-5)


def test_taps_on_qat_graph_keep_numerics_and_gradients():
    model = tiny_classifier()
    ex = _example()
    student = qfx.prepare_qat(model, example_kwargs=ex, config=W4A4).eval()
    before = student(**ex).logits
    expose_features(student)
    assert torch.equal(before, student(**ex).logits)
    with pytest.raises(ValueError, match="already has feature taps"):
        expose_features(student)
    student.train()
    with FeatureRecorder(student) as rec:
        student(**ex).logits.sum().backward()
    assert rec.num_layers == 2 and rec.hidden[0].shape[-1] == 32
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- loss


@given(st.floats(0.5, 4.0), st.integers(0, 10_000))
def test_logit_kd_is_zero_only_for_equal_logits(temperature, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(4, 3, generator=g)
    s = torch.randn(4, 3, generator=g)
    w = qat.KDWeights(logit=1.0, att=0.0, rep=0.0, temperature=temperature)
    labels, mask = torch.zeros(4, dtype=torch.long), torch.ones(4, 5)
    same, _ = qat.kd_loss(t, t, labels, mask, w)
    diff, _ = qat.kd_loss(s, t, labels, mask, w)
    assert abs(float(same)) < 1e-6 and float(diff) > 0


def test_feature_terms_vanish_for_the_teacher_itself():
    model = tiny_classifier()
    ex = _example()
    t = qat.make_teacher(model, ex)
    t2 = qat.make_teacher(model, ex)
    for kind in ("scores", "probs"):
        w = qat.KDWeights(attention=kind)
        with FeatureRecorder(t) as a, FeatureRecorder(t2) as b:
            la, lb = t(**ex).logits, t2(**ex).logits
            loss, parts = qat.kd_loss(la, lb, torch.zeros(4, dtype=torch.long), ex["attention_mask"], w, a, b, (0, 1))
        assert set(parts) == {"logit", "att", "rep"} and float(loss) < 1e-10


@pytest.mark.parametrize("bad", [dict(logit=-1.0), dict(logit=0, att=0, rep=0), dict(temperature=0.0), dict(attention="softmax")])
def test_kd_weights_reject_bad_values(bad):
    with pytest.raises(ValueError):
        qat.KDWeights(**bad)


def test_encoded_data_rejects_bad_labels_and_empty_texts():
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        qat.EncodedData([[5, 6], [7]], [0, 2], 0, 2)
    with pytest.raises(ValueError, match="no tokens"):
        qat.EncodedData([[5, 6], []], [0, 1], 0, 2)


# --------------------------------------------------------------------------- training


def _cfg(tmp_path=None, **kw) -> qat.TrainConfig:
    base = dict(steps=6, batch_size=8, lr=1e-3, eval_every=3, progress=False, ckpt_every=1)
    if tmp_path is not None:
        base["ckpt_dir"] = str(tmp_path)
    return qat.TrainConfig(**(base | kw))


def test_distill_trains_and_compiles():
    teacher, data = tiny_classifier(), toy_data(64)
    qat.finetune(teacher, data, None, _cfg(steps=20))
    student = qat.make_student(teacher, W4A4, _example())
    start = _params(student)
    res = qat.distill(teacher, student, data, data, _cfg(steps=6, keep_best=False), qat.KDWeights(ce=0.5))
    assert res.steps_done == 6 and [h["step"] for h in res.history] == [3, 6]
    assert any(not torch.equal(start[k], v) for k, v in _params(student).items())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    student.eval()
    cm = qfx.compile(student, mode="int4", target="cpu")
    assert abs(qat.evaluate(cm, data) - qat.evaluate(student, data)) <= 2 / len(data)


def test_resume_after_stop_equals_uninterrupted_run(tmp_path):
    teacher, data = tiny_classifier(), toy_data(48)
    ex = _example()
    straight = qat.make_student(teacher, W4A4, ex)
    r1 = qat.distill(teacher, straight, data, data, _cfg(tmp_path / "a", keep_best=False))
    killed = qat.make_student(teacher, W4A4, ex)
    part = qat.distill(teacher, killed, data, data, _cfg(tmp_path / "b", keep_best=False, stop_after=4))
    assert part.steps_done == 4 and not part.finished
    resumed = qat.make_student(teacher, W4A4, ex)
    r2 = qat.distill(teacher, resumed, data, data, _cfg(tmp_path / "b", keep_best=False))
    assert r2.resumed_from == 4 and r2.steps_done == 6
    assert r1.history == r2.history
    for k, v in _params(straight).items():
        assert torch.equal(v, _params(resumed)[k]), k


def test_resume_rejects_other_settings(tmp_path):
    teacher, data = tiny_classifier(), toy_data(32)
    qat.finetune(teacher, data, None, _cfg(tmp_path, steps=2))
    with pytest.raises(ValueError, match="resume with the same settings"):
        qat.finetune(teacher, data, None, _cfg(tmp_path, steps=3))


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path[:0] = [{tests!r}, {e2e!r}]  # tests/ (models.py) and tests/e2e/ (this file)
    from test_qat_kd import tiny_classifier, toy_data, _cfg, _example, W4A4
    from qfx import train as qat
    torch.set_num_threads({threads})  # as the parent: same float reduction order
    teacher, data = tiny_classifier(), toy_data(48)
    student = qat.make_student(teacher, W4A4, _example())
    slow = lambda: time.sleep(0.5)  # leaves time to kill the process mid-run
    qat.distill(teacher, student, data, None, _cfg(__import__("pathlib").Path({ckpt!r}), steps=12, keep_best=False), post_step=slow)
    """
)


def test_sigkill_mid_run_then_resume_loses_no_finished_step(tmp_path):
    ckpt = tmp_path / "ckpt"
    script = tmp_path / "train.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(Path(__file__).resolve().parents[1]), e2e=str(Path(__file__).resolve().parent), ckpt=str(ckpt), threads=torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if (ckpt / "last.pt").exists() and torch.load(ckpt / "last.pt", weights_only=False)["step"] >= 3:
                break
            if proc.poll() is not None:
                pytest.fail("the training subprocess exited before it could be killed")
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = torch.load(ckpt / "last.pt", weights_only=False)["step"]
    assert 3 <= saved < 12
    teacher, data = tiny_classifier(), toy_data(48)
    resumed = qat.make_student(teacher, W4A4, _example())
    res = qat.distill(teacher, resumed, data, None, _cfg(ckpt, steps=12, keep_best=False))
    assert res.resumed_from == saved and res.steps_done == 12
    straight = qat.make_student(teacher, W4A4, _example())
    qat.distill(teacher, straight, data, None, _cfg(tmp_path / "straight", steps=12, keep_best=False))
    for k, v in _params(straight).items():
        assert torch.equal(v, _params(resumed)[k]), k


def test_sigterm_checkpoints_the_finished_steps(tmp_path):
    teacher, data = tiny_classifier(), toy_data(32)
    student = qat.make_student(teacher, W4A4, _example())
    calls = []

    def term_after_two():
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    res = qat.distill(teacher, student, data, None, _cfg(tmp_path, steps=10, ckpt_every=100), post_step=term_after_two)
    assert res.steps_done == 2 and not res.finished
    assert torch.load(tmp_path / "last.pt", weights_only=False)["step"] == 2


def _other_family(family: str):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    if family == "roberta":
        return RobertaForSequenceClassification(RobertaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                              intermediate_size=64, max_position_embeddings=66, pad_token_id=1, num_labels=2))
    return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=97, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                                max_position_embeddings=64, num_labels=2))


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_other_encoder_classifiers_distil_and_compile(family):
    """DistilBERT takes no token_type_ids and its head is Linear -> ReLU -> Linear (not an FFN)."""
    teacher, data = _other_family(family).eval(), toy_data(16)
    student = qat.make_student(teacher, W4A4, _example())
    with FeatureRecorder(student) as rec:
        student.eval()(**{k: v for k, v in _example().items() if k in qat.input_names(student)})
    assert rec.num_layers == 2 and len(rec.hidden) == 3
    res = qat.distill(teacher, student, data, data, _cfg(steps=2))
    assert res.steps_done == 2
    cm = qfx.compile(student.eval(), mode="int4", target="cpu")
    assert 0.0 <= qat.evaluate(cm, data) <= 1.0
    roles = {r.name: r.role for r in cm.report().linears}
    if family == "distilbert":  # its head is Linear -> ReLU -> Linear with no residual: not an FFN
        assert roles["pre_classifier"] == "other" and roles["classifier"] == "other"


# --------------------------------------------------------------------------- bad input


def test_teacher_with_other_architecture_is_rejected():
    data = toy_data(16)
    student = qat.make_student(tiny_classifier(hidden=32), W4A4, _example())
    with pytest.raises(ValueError, match="architectures differ"):
        qat.distill(tiny_classifier(hidden=48), student, data, None, _cfg(steps=1))


def test_student_must_be_a_qat_graph():
    with pytest.raises(ValueError, match="prepare_qat"):
        qat.distill(tiny_classifier(), tiny_classifier(), toy_data(8), None, _cfg(steps=1))


def test_label_count_must_match_the_head():
    data = qat.EncodedData([[5, 6], [7, 8]], [0, 2], 0, 3)
    with pytest.raises(ValueError, match="3 label values"):
        qat.finetune(tiny_classifier(), data, None, _cfg(steps=1))


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_distill_and_compile_on_gpu():
    dev = torch.device("cuda")
    teacher, data = tiny_classifier().to(dev), toy_data(32)
    student = qat.make_student(teacher, W4A4, toy_data(4).batch([0, 1, 2, 3], dev)[0])
    qat.distill(teacher, student, data, data, _cfg(steps=3))
    major, minor = torch.cuda.get_device_capability()
    target = f"sm_{major}{minor}" if f"sm_{major}{minor}" in qfx.TARGETS else "cpu"
    cm = qfx.compile(student.eval(), mode="int4", target=target)
    assert abs(qat.evaluate(cm, data) - qat.evaluate(student, data)) <= 2 / len(data)
