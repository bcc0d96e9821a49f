"""The command line: python -m qfx demo | compile | report | bench | plan (tiny random-init model)."""
from __future__ import annotations

import re
import subprocess
import sys
import types

import pytest
import torch

from qfx.cli import build_parser, main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random-init BERT with a WordPiece tokenizer, saved as a local model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny_bert")
    words = [f"w{i}" for i in range(60)]
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "qfx", "a", "short", "one", "."]) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=70, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(path)
    return path


def test_help_fits_the_readme():
    text = build_parser().format_help()
    for cmd in ("demo", "compile", "report", "bench", "plan"):
        assert cmd in text
    lines = text.splitlines()
    assert len(lines) <= 20 and max(len(line) for line in lines) <= 100, text


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: python -m qfx" in capsys.readouterr().out


def test_compile_prints_what_was_compiled_and_checks_it(model_dir, capsys):
    assert main(["compile", str(model_dir), "--mode", "int8"]) == 0
    out = capsys.readouterr().out
    # 2 layers x (q, k, v, attn_out, ffn_in, ffn_out), on the int8 CPU backend where the CPU has one
    assert re.search(r"12 linears on integer GEMMs \((cpu|reference)\)", out), out
    cos = float(out.split("cosine to the float model over real tokens ")[1].split()[0])
    assert cos > 0.99


def test_report_lists_every_linear(model_dir, capsys):
    assert main(["report", str(model_dir), "--mode", "int4", "--asym"]) == 0
    out = capsys.readouterr().out
    assert "qfx compile report: mode=int4" in out and "W4A4 asym" in out
    assert out.count("ffn_out") >= 2


def test_bench_times_each_mode(model_dir, capsys):
    assert main(["bench", str(model_dir), "--modes", "fp32,int8", "--batch", "2", "--seq", "8", "--repeat", "1"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.split() and line.split()[0] in ("fp32", "int8")]
    assert rows == ["fp32", "int8"]


def test_bad_input_is_a_message_not_a_traceback(model_dir, capsys):
    with pytest.raises(SystemExit, match="--modes"):
        main(["bench", str(model_dir), "--modes", "int3"])
    assert main(["compile", str(model_dir), "--mode", "int8", "--target", "sm_90"]) in (0, 2)  # no GPU: a clear error, exit 2
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot load a model"):
        main(["compile", str(model_dir / "missing")])


@pytest.mark.parametrize("command", [["demo", "--target", "sm_90"], ["bench", "--target", "sm_80", "--repeat", "1"],
                                     ["compile", "--target", "sm_89"], ["report", "--target", "sm_86"]])
def test_a_gpu_target_without_a_gpu_is_one_line_for_every_command(command, monkeypatch, capsys):
    """``python -m qfx demo --target sm_90`` without a GPU ended in a raw driver traceback while
    compile / bench / report were clear: every command now checks the target before loading."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"qfx {command[0]}: target='{command[2]}' needs a CUDA GPU and none is visible; use target='cpu'"


def test_plan_dispatches_to_qfx_tune(monkeypatch):
    seen = []
    fake = types.ModuleType("qfx.tune.cli")
    fake.plan_main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "qfx.tune.cli", fake)
    assert main(["plan", "--target", "sm_90"]) == 7 and seen == [["--target", "sm_90"]]


def test_plan_says_when_it_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "qfx.tune.cli", None)  # as if the module did not exist
    assert main(["plan"]) == 2
    assert "not available in this build" in capsys.readouterr().err


def test_python_dash_m_qfx_runs():
    proc = subprocess.run([sys.executable, "-m", "qfx", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "demo" in proc.stdout and "bench" in proc.stdout
