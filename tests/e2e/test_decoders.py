"""qfx.decoders on tiny random-init GPT-2 and Llama: every mode and format runs, the stored codes are
what the layer multiplies with, the weight paths agree, W4A4 warns with the gap, rotation helps
W4A4, QAT + KD lowers the loss and converts bit for bit, bad input; the example's helpers."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from qfx import numerics as nx
from qfx.decoders import (DecoderKDConfig, DecoderQuantizationWarning, QATLinear, QuantizedLinear, convert_decoder_qat,
                          decoder_memory, distill_decoder, prepare_decoder_qat, quantize_decoder, set_weight_path)


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=64, n_layer=2, n_head=2, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def _llama(outlier: float = 1.0):
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    with torch.no_grad():  # outlier channels in the norm scales, hence in every q/k/v and gate/up input
        for layer in m.model.layers:
            layer.input_layernorm.weight[7] *= outlier
            layer.post_attention_layernorm.weight[3] *= outlier
    return m


IDS = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(0))
CALIB = [{"input_ids": torch.randint(0, 61, (4, 32), generator=torch.Generator().manual_seed(1))}]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["w4a16", "w4a8", "w4a4"])
def test_modes_run_and_replace_every_linear(family, mode):
    m = _gpt2() if family == "gpt2" else _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DecoderQuantizationWarning)
        q = quantize_decoder(m, mode=mode, fmt="int4", block_size=32)
    qls = [mod for mod in q.modules() if isinstance(mod, QuantizedLinear)]
    assert len(qls) == (4 if family == "gpt2" else 7) * 2
    assert all(ql.act_bits == {"w4a16": 16, "w4a8": 8, "w4a4": 4}[mode] for ql in qls)
    assert not isinstance(q.lm_head, QuantizedLinear)
    with torch.no_grad():
        ref, out = m(input_ids=IDS).logits, q(input_ids=IDS).logits
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.equal(out, ref)
    assert (out - ref).abs().max() < 0.5 * ref.abs().max()  # quantized, not broken


@pytest.mark.parametrize("fmt", nx.WEIGHT_FORMATS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_layer_multiplies_with_its_stored_codes(fmt, double_quant):
    m = _gpt2()
    q = quantize_decoder(m, fmt=fmt, block_size=64, double_quant=double_quant)
    ql = q.transformer.h[0].mlp.c_fc
    w4 = ql.weight4
    codes = nx.unpack_int4(ql.codes) if fmt.startswith("int4") else nx.unpack_uint4(ql.codes)
    assert torch.equal(codes, w4.codes)
    assert torch.equal(ql.weight_hat, nx.dequantize_weight_4bit(w4))
    # Conv1D stores [K, N]: the quantized [N, K] weight is its transpose.
    w = m.transformer.h[0].mlp.c_fc.weight.T
    assert torch.equal(w4.codes, nx.quantize_weight_4bit(w, fmt, 64).codes)
    x = torch.randn(3, 64)
    assert torch.allclose(ql(x), x @ ql.weight_hat.T + ql.bias)
    bits = decoder_memory(q).bits_per_quantized_param
    assert bits == pytest.approx(nx.weight_format_bits(fmt, 64, double_quant), abs=0.05)


def test_w4a4_warns_unless_rotated_and_rotation_helps():
    m = _llama(outlier=20.0)
    with pytest.warns(DecoderQuantizationWarning, match=r"w4a4.*\+9 %.*W4A4 \+[0-9.]+ %.*rotate=True") as rec:
        plain = quantize_decoder(m, mode="w4a4", fmt="int4", block_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DecoderQuantizationWarning)
        rotated = quantize_decoder(m, mode="w4a4", fmt="int4", block_size=32, rotate=True)
    with torch.no_grad():
        ref = m(input_ids=IDS).logits
        e_plain = (plain(input_ids=IDS).logits - ref).pow(2).mean()
        e_rot = (rotated(input_ids=IDS).logits - ref).pow(2).mean()
    assert e_rot < 0.5 * e_plain
    assert "gap" in str(rec[0].message)  # the warning quotes the measured / expected gap


def test_gptq_path_runs_with_calibration():
    m = _llama()
    q = quantize_decoder(m, mode="w4a16", fmt="nf4", block_size=32, gptq=True, calibration=CALIB, act_order=True,
                         double_quant=True)
    ql = q.model.layers[0].self_attn.q_proj
    assert isinstance(ql, QuantizedLinear) and isinstance(ql.weight4.scale, nx.DoubleQuantized)
    with torch.no_grad():
        ref = m(**CALIB[0]).logits
        rtn = quantize_decoder(m, mode="w4a16", fmt="nf4", block_size=32, double_quant=True)
        e_g = (q(**CALIB[0]).logits - ref).pow(2).mean()
        e_r = (rtn(**CALIB[0]).logits - ref).pow(2).mean()
    assert e_g < e_r * 1.5  # per-layer optimality is tested in test_gptq; end to end it must not blow up


def test_decoder_entry_points_refuse_bad_modes_formats_block_sizes_and_models_without_their_linears():
    m = _gpt2()
    with pytest.raises(ValueError, match="mode='w2a2'"):
        quantize_decoder(m, mode="w2a2")
    with pytest.raises(ValueError, match="fmt='int5'"):
        quantize_decoder(m, fmt="int5")
    with pytest.raises(ValueError, match=r"block_size=48 does not divide K=64 of transformer.h.0"):
        quantize_decoder(m, block_size=48)
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_decoder(m, gptq=True)
    with pytest.raises(ValueError, match="Llama-style"):
        quantize_decoder(m, rotate=True)
    assert not any(isinstance(x, QuantizedLinear) for x in m.modules())  # the input model is untouched
    with pytest.raises(ValueError, match="block_size=0 does not divide"):
        quantize_decoder(m, block_size=0)
    with pytest.raises(ValueError, match="fmt='nf3'"):
        prepare_decoder_qat(m, fmt="nf3")
    with pytest.raises(ValueError, match="block_size=24 does not divide K=64"):
        prepare_decoder_qat(m, block_size=24)
    with pytest.raises(ValueError, match="weight path 'triton' is not one of"):
        set_weight_path(quantize_decoder(m, block_size=32), "triton")
    with pytest.raises(ValueError, match="has no QuantizedLinear"):
        set_weight_path(m, "dequant")
    with pytest.raises(ValueError, match="has no QATLinear"):
        convert_decoder_qat(m)
    with pytest.raises(ValueError, match="student has no QATLinear"):
        distill_decoder(m, m, CALIB, DecoderKDConfig(steps=1))
    with pytest.raises(ValueError, match=r"DecoderKDConfig\(steps=0\)"):
        DecoderKDConfig(steps=0)
    with pytest.raises(ValueError, match=r"KDWeights\(rep=-1"):
        DecoderKDConfig(rep=-1.0)
    with pytest.raises(ValueError, match="batches ran out after 1 of 3 steps"):
        distill_decoder(m, prepare_decoder_qat(m, block_size=32), iter(CALIB), DecoderKDConfig(steps=3))


def test_weight_paths_agree_on_cpu():
    q = quantize_decoder(_llama(), mode="w4a8", fmt="int4_asym", block_size=32, double_quant=True)
    with torch.no_grad():
        cached = q(input_ids=IDS).logits
        dequant = set_weight_path(q, "dequant")(input_ids=IDS).logits
    assert torch.equal(cached, dequant)  # the same W_hat values, decoded per call instead of once


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_qat_twin_converts_bit_for_bit_and_kd_lowers_the_loss(family):
    teacher = _gpt2() if family == "gpt2" else _llama(outlier=8.0)
    student = prepare_decoder_qat(teacher, mode="w4a4", fmt="nf4", block_size=32, double_quant=True)
    assert sum(isinstance(x, QATLinear) for x in student.modules()) == (4 if family == "gpt2" else 7) * 2
    assert not any(isinstance(x, QATLinear) for x in teacher.modules())
    train_ids = CALIB[0]["input_ids"]
    with torch.no_grad():
        before = student(input_ids=IDS).logits
        t_logits = teacher(input_ids=train_ids).logits
        s_before = student(input_ids=train_ids).logits
    mask = torch.ones_like(CALIB[0]["input_ids"])
    mask[0, 20:] = 0  # padded positions are not scored
    batches = [{"input_ids": CALIB[0]["input_ids"], "attention_mask": mask}]
    rows = distill_decoder(teacher, student, batches, DecoderKDConfig(steps=12, lr=1e-4, log_every=11))
    assert [r["step"] for r in rows] == [0, 11]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert set(rows[0]) >= {"logit", "rep", "loss", "seconds"}
    with torch.no_grad():
        after = student(input_ids=IDS).logits
        q = convert_decoder_qat(student)
        converted = q(input_ids=IDS).logits
    assert not torch.equal(after, before)  # training moved the weights
    assert torch.equal(converted, after)  # stored codes compute what QAT trained, bit for bit
    assert all(isinstance(x, QuantizedLinear) and x.act_bits == 4 for x in q.modules() if isinstance(x, QuantizedLinear))
    kl = lambda s: torch.nn.functional.kl_div(s.log_softmax(-1), t_logits.log_softmax(-1), log_target=True,  # noqa: E731
                                              reduction="batchmean")
    with torch.no_grad():
        assert kl(q(input_ids=train_ids).logits) < 0.8 * kl(s_before)  # the converted model is closer to the teacher


@pytest.mark.gpu
def test_quantize_decoder_on_gpu_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    m = _llama()
    cpu = quantize_decoder(m, mode="w4a8", fmt="fp4", block_size=32, double_quant=True)
    gpu = quantize_decoder(m.cuda(), mode="w4a8", fmt="fp4", block_size=32, double_quant=True,
                           gptq=False)
    a, b = cpu.model.layers[1].mlp.down_proj, gpu.model.layers[1].mlp.down_proj
    assert b.codes.is_cuda and torch.equal(a.codes, b.codes.cpu())
    assert torch.allclose(a.weight_hat, b.weight_hat.cpu())
    g = quantize_decoder(m, mode="w4a16", fmt="int4", block_size=32, gptq=True,
                         calibration=[{k: v.cuda() for k, v in CALIB[0].items()}])
    with torch.no_grad():
        out = g(**{k: v.cuda() for k, v in CALIB[0].items()}).logits
    assert out.is_cuda and torch.isfinite(out).all()


def _example():
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    return importlib.import_module("decoder_failure")


def test_example_word_vocab_split_and_buckets():
    df = _example()
    v = df.build_word_vocab("The king and the queen. The end. The king!", 5)
    assert v.tokens == ["<unk>", "the", ".", "king", "!"]  # by count, ties in code-point order
    ids = v.encode("The KING, the end.")
    assert ids.tolist() == [1, 3, 0, 1, 0, 2]  # lower-cased; "," and "end" are not in the vocabulary
    assert v.decode(ids.tolist()) == "the king <unk> the <unk>."
    w = df.build_word_vocab("don't stop\nnow", 10)
    assert w.decode(w.encode("don't stop\nnow").tolist()) == "don't stop\nnow"
    with pytest.raises(ValueError, match="--vocab-size 1"):
        df.build_word_vocab("a b", 1)

    ids = torch.arange(1000)
    train, calib, ev = df.split_heldout(ids, 0.05, 4)
    assert train.numel() + calib.numel() + ev.numel() == 1000 and calib.numel() == ev.numel() == 48
    assert not set(calib.tolist()) & set(ev.tolist()) and not set(train.tolist()) & set(ev.tolist())
    assert ev.max() == 999 and ev.min() < 250  # every chunk contributes
    with pytest.raises(ValueError, match="--heldout 0.6"):
        df.split_heldout(ids, 0.6, 1)

    ref = torch.full((40,), 10.0)
    q = ref.clone()
    q[:8] = 12.0  # +20 % (+2) on the first 8 positions only
    b = df.bucket_gaps(ref, q)
    assert [x["bucket"] for x in b] == ["pos 0", "first 8", "8-32", "32+"]  # pos 0 alone, then the partition
    assert b[0]["rel_pct"] == pytest.approx(20.0) and b[1]["abs"] == pytest.approx(2.0)
    assert b[2]["rel_pct"] == 0 and b[3]["abs"] == 0 and b[3]["fp32_ppl"] == 10.0
    assert [x["bucket"] for x in df.bucket_gaps(ref, q, pos0=False)] == ["first 8", "8-32", "32+"]

    r = torch.ones(10)
    r[0], r[5] = 6.0, float("nan")  # position 0 six times the median of the later (non-NaN) positions
    assert df.range_ratio_pos0({"0.mlp.down_proj": r, "flat": torch.ones(4)}) == {"0.mlp.down_proj": 6.0, "flat": 1.0}


def test_example_bos_vocab_and_windows():
    """--bos: BOS has an id of its own after the text tokens, no text encodes to it, the text ids are
    unchanged; every window (training, evaluation) is BOS + seq - 1 text tokens, so BOS is never a
    next-token label; without BOS the windows are as before."""
    df = _example()
    text = "The king and the queen. The end. The king!\n" * 30 + "<bos> ?<"
    cv, cb = df.CharVocab(text), df.CharVocab(text, bos=True)
    assert cv.bos_id is None and cb.bos_id == len(cb) - 1 == len(cv) and cb.chars[cb.bos_id] == df.BOS
    assert torch.equal(cv.encode(text), cb.encode(text)) and cb.bos_id not in cb.encode(text).tolist()
    assert cb.decode([cb.bos_id] + cb.encode("the king").tolist()) == "the king"
    wv, wb = df.build_word_vocab(text, 6), df.build_word_vocab(text, 6, bos=True)
    assert wb.bos_id == 6 == len(wb) - 1 and wb.tokens[:6] == wv.tokens and wb.tokens[6] == df.BOS
    enc = wb.encode(text + " <bos>")
    assert torch.equal(enc[:-3], wv.encode(text + " <bos>")[:-3]) and wb.bos_id not in enc.tolist()
    assert wb.decode([wb.bos_id] + wb.encode("the king").tolist()) == "the king"
    with pytest.raises(ValueError, match="reserved"):
        df.WordVocab(["a", df.BOS])

    ids = torch.arange(1, 1001)  # 0 is <unk>; BOS below is 1001
    plain = next(df.random_windows(ids, 8, 16, 0, "cpu"))["input_ids"]
    with_bos = next(df.random_windows(ids, 8, 16, 0, "cpu", bos=1001))["input_ids"]
    assert plain.shape == with_bos.shape == (8, 16)
    assert (with_bos[:, 0] == 1001).all() and (with_bos[:, 1:] != 1001).all()
    assert torch.equal(with_bos[:, 1:], plain[:, :15])  # the same random starts, one text token fewer
    assert torch.equal(plain[:, 1:] - plain[:, :1], torch.arange(1, 16).expand(8, -1))  # contiguous text
    ev = df.make_eval_batches(ids, 16, 100, 32, "cpu", bos=1001)
    x = torch.cat([b["input_ids"] for b in ev])
    assert x.shape == (66, 16) and (x[:, 0] == 1001).all() and (x[:, 1:] != 1001).all()
    assert torch.equal(x[:, 1:].reshape(-1), ids[: 66 * 15])  # non-overlapping, in order
    assert torch.equal(torch.cat([b["input_ids"] for b in df.make_eval_batches(ids, 16, 100, 32, "cpu")]),
                       ids[:992].reshape(62, 16))  # no BOS: as before
    with pytest.raises(ValueError, match="fewer than one window"):
        df.make_eval_batches(ids[:10], 16, 4, 4, "cpu", bos=1001)


def test_example_presets_and_explicit_flags():
    df = _example()
    a = df.parse_args(["--preset", "cpu", "--d", "32", "--tokenizer", "word"])
    assert (a.d, a.tokenizer, a.layers, a.device) == (32, "word", df.PRESETS["cpu"]["layers"], "cpu")
    assert a.bos is False and a.phases == df.PHASES
    g = df.parse_args(["--preset", "gpu", "--device", "cpu"])
    assert g.bos is True and df.parse_args(["--preset", "gpu", "--device", "cpu", "--no-bos"]).bos is False
    assert df.parse_args(["--bos", "--phases", "memory, evaluate"]).phases == ("evaluate", "memory")
    assert df.parse_args(["--phases", "none"]).phases == ()
    for bad in (["--phases", "evaluate,tokens"], ["--bos", "--seq", "1"]):
        with pytest.raises(SystemExit):
            df.parse_args(bad)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            df.parse_args(["--preset", "gpu"])  # --device cuda without a GPU: a clear argparse error


@pytest.mark.gpu
def test_qat_kd_on_gpu_converts_bit_for_bit():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    teacher = _llama(outlier=8.0).cuda()
    student = prepare_decoder_qat(teacher, mode="w4a4", fmt="int4", block_size=32)
    batches = [{"input_ids": CALIB[0]["input_ids"].cuda()}]
    rows = distill_decoder(teacher, student, batches, DecoderKDConfig(steps=4, lr=1e-4))
    assert rows[-1]["step"] == 3 and all(math.isfinite(r["loss"]) for r in rows)
    ids = IDS.cuda()
    with torch.no_grad():
        assert torch.equal(convert_decoder_qat(student)(input_ids=ids).logits, student(input_ids=ids).logits)


def test_example_text_from_a_directory(tmp_path):
    df = _example()
    (tmp_path / "hamlet.txt").write_text("HAMLET\n  To be,   or not\n\n")
    (tmp_path / "political_data.json").write_text('[{"speeches": ["Thank you.\\nGood night."]}, {"speeches": []}]')
    assert df.load_text(tmp_path) == "HAMLET\nTo be, or not\nThank you.\nGood night."
    with pytest.raises(FileNotFoundError, match="rotten_tomatoes_corpus_full.csv.bz2"):
        df.load_text(tmp_path, "speeches+reviews")
    with pytest.raises(ValueError, match="--corpus 'poems'"):
        df.load_text(tmp_path, "poems")


def test_example_smoke_run_bos_short_phases(tmp_path):
    """The whole script on a tiny synthetic corpus: --bos with --phases evaluate trains both models,
    makes only the float / round-to-nearest rows, records BOS and the skipped phases; a second call
    with --no-bos retrains (the checkpoints were made with BOS) and the markdown renders without rows."""
    import json
    import random

    df = _example()
    rnd = random.Random(0)
    words = "the king queen and of to a my lord good night thank you so much tonight be or not".split()
    lines = [" ".join(rnd.choice(words) for _ in range(12)) + "." for _ in range(600)]
    (tmp_path / "hamlet.txt").write_text("\n".join(lines[:300]))
    (tmp_path / "political_data.json").write_text(json.dumps([{"speeches": ["\n".join(lines[300:])]}]))
    out = tmp_path / "out"
    tiny = ["--data", str(tmp_path), "--out", str(out), "--steps", "2", "--smoke", "--eval-seqs", "4", "--calib-seqs", "4",
            "--seq", "40", "--d", "64", "--block", "32", "--layers", "2", "--heads", "2", "--batch", "4", "--threads", "1"]
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        assert df.main(tiny + ["--bos", "--phases", "evaluate"]) == 0
        res = json.loads((out / "results.json").read_text())
        assert res["bos"] is True and res["bos_id"] == res["vocab"] - 1
        assert res["phases_skipped"] == ["gptq", "qat", "memory", "throughput", "sweep"]
        for family in ("gpt2", "llama"):
            m = res["models"][family]
            labels = [r["variant"] for r in m["rows"]]
            assert labels[0] == "fp32" and "W4A4 int4 RTN" in labels
            assert not any("GPTQ" in x or "QAT" in x for x in labels)
            assert m["rows"][0]["buckets"][0]["bucket"] == "pos 0" and m["act_range_pos0_ratio"]
        assert ("rot W4A4 int4 RTN" in [r["variant"] for r in res["models"]["llama"]["rows"]])
        assert "memory" not in res and "sweep" not in res
        md = (out / "results.md").read_text()
        assert "Phases skipped (--phases evaluate)" in md and "Position-0 / median range ratio" in md and "BOS (id" in md

        assert df.main(tiny + ["--no-bos", "--phases", "none"]) == 0
        res = json.loads((out / "results.json").read_text())
        assert res["bos"] is False and res["bos_id"] is None and res["models"]["gpt2"]["rows"] == []
        assert "retraining" in (out / "log.txt").read_text()
        assert "No perplexity rows" in df.render_markdown(res)
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
