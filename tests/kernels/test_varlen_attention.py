"""qfx's short-tile varlen attention kernel (backends/triton/varlen_attention.py) against per-sequence
SDPA in fp32: segments of every length up to the tile and past it, an empty sequence, rows past the
last segment left unwritten, q / k / v read in place from fused [T, 3, H, D] rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qfx.backends.triton import HAS_TRITON
from qfx.backends.triton.varlen_attention import (CHOICES, TUNED_FILES, Tiles, can_run, choose, flash_only, load_tuned,
                                                  varlen_attention)

_CHECK = textwrap.dedent('''
    import torch
    from qfx.backends.triton.varlen_attention import Tiles, varlen_attention

    def check(device, dtype, lengths, heads, d, tiles, extra=5):
        g = torch.Generator().manual_seed(sum(lengths) + d)
        t = sum(lengths) + extra
        qkv = torch.randn(t, 3, heads, d, generator=g).to(device=device, dtype=dtype)
        q, k, v = qkv.unbind(1)  # strided views: row stride 3 * heads * d
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        out = varlen_attention(q, k, v, cu, max(lengths), None, tiles)
        assert out.shape == (t, heads, d) and out.dtype == dtype
        err = 0.0
        for a, b in zip(cu.tolist(), cu.tolist()[1:]):
            if b > a:
                want = torch.nn.functional.scaled_dot_product_attention(
                    *(x[a:b].float().transpose(0, 1) for x in (q, k, v))).transpose(0, 1)
                err = max(err, (out[a:b].float() - want).abs().max().item())
        assert err < (4e-3 if dtype == torch.float16 else 3e-2), (dtype, lengths, tiles, err)
        return err
''')

_INTERPRETED = _CHECK + textwrap.dedent('''
    for tiles in (Tiles(16, 32, 4), Tiles(32, 16, 4)):
        check("cpu", torch.float16, [1, 0, 17, 33, 64, 5], 2, 16, tiles)
    check("cpu", torch.float16, [40, 3], 1, 32, Tiles(16, 16, 4), extra=0)
    print("ok")
''')


def test_choices_tables_and_refusals(tmp_path):
    """The fallback table and a tuned one pick the first row whose bound holds (None: flash); a tuned
    file with an entry the kernel cannot launch is refused by name; bad operands are named."""
    bounds = [b for b, _ in CHOICES]
    assert bounds == sorted(bounds)
    for bound, tiles in CHOICES:
        assert choose(bound) == tiles
    assert choose(10 ** 6) is None  # past every row: flash attention's varlen kernel
    with flash_only():
        assert choose(1) is None
    assert choose(1) == CHOICES[0][1]
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"entries": [
        {"max_seqlen": 384, "kernel": "flash"},
        {"max_seqlen": 128, "kernel": "short", "block_m": 32, "block_n": 64, "warps": 4}]}))
    assert load_tuned(table) == ((128, Tiles(32, 64, 4)), (384, None))
    table.write_text(json.dumps({"entries": [{"max_seqlen": 128, "kernel": "short", "block_m": 24, "block_n": 64,
                                              "warps": 4}]}))
    with pytest.raises(ValueError, match="entry 0"):
        load_tuned(table)
    for path in TUNED_FILES.values():  # the tables in the tree load
        if path.exists():
            assert load_tuned(path)
    q = torch.zeros(4, 2, 64, dtype=torch.float16)
    ok, why = can_run(q, 64)
    assert not ok and ("CUDA" in why or "Triton" in why)
    if HAS_TRITON:
        assert "fp16 / bf16" in can_run(torch.zeros(4, 2, 64), 64)[1]
        assert "head dim 48" in can_run(torch.zeros(4, 2, 48, dtype=torch.float16), 48)[1]
    with pytest.raises(ValueError, match="expected the same"):
        varlen_attention(q, q[:2], q, torch.zeros(2, dtype=torch.int32), 4)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (CPU-only torch)")
def test_kernel_under_the_triton_interpreter():
    """On the CPU, through TRITON_INTERPRET=1 (set before Triton compiles anything: a subprocess)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tiles", sorted({t for _, t in CHOICES if t} | {Tiles(16, 64, 2), Tiles(32, 64, 4),
                                                                         Tiles(64, 64, 4), Tiles(128, 128, 8)}))
def test_kernel_on_the_gpu(dtype, tiles):
    scope: dict = {}
    exec(_CHECK, scope)
    check = scope["check"]
    check("cuda", dtype, [1, 0, 17, 33, 64, 65, 127, 128, 5], 12, 64, tiles)
    check("cuda", dtype, [384, 96, 200, 1], 16, 64, tiles)
    check("cuda", dtype, [50, 7], 4, 128, tiles)
