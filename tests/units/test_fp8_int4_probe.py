"""benchmarks/fp8_int4_probe.py on the CPU: its code patterns are int4 codes that e4m3 holds exactly, their
exact sums are what the patterns promise, and its comparison tells a lost addend (the GPU part needs sm_89+)."""
from __future__ import annotations

import pytest
import torch
from scripts import load_script

probe = load_script("benchmarks/fp8_int4_probe.py", "qfx_fp8_int4_probe")


@pytest.mark.parametrize("k", [32, 128, 3072])
def test_patterns_are_exact_int4_codes_with_the_promised_sums(k):
    pats = probe.patterns(64, 64, k)
    for name, (a, w) in pats.items():
        assert a.shape == (64, k) and w.shape == (64, k) and a.dtype == w.dtype == torch.int8, name
        assert int(a.min()) >= -8 and int(a.max()) <= 7 and int(w.min()) >= -8 and int(w.max()) <= 7, name
        assert torch.equal(probe.as_e4m3(a).float(), a.float()), name  # no code changes on the way to FP8
    assert (probe.exact_sums(*pats["all +64"]) == 64 * k).all()
    big_small = probe.exact_sums(*pats["big then +1"])
    assert (big_small == 64 * (k // 2) + k // 2).all() and torch.equal(big_small, probe.exact_sums(*pats["+1 then big"]))


def test_compare_tells_a_lost_unit_addend_and_refuses_non_int4_codes():
    want = torch.full((4, 4), 64 * 64 + 64, dtype=torch.long)
    got = want.float().clone()
    assert probe.compare(got, want) == (True, 0.0, 0.0)
    got[1, 2] -= 1  # one +1 product dropped after a large partial sum
    assert probe.compare(got, want) == (False, 1 / 16, 1.0)
    with pytest.raises(ValueError, match="-8..7"):
        probe.as_e4m3(torch.tensor([17], dtype=torch.int8))  # 17 is not an e4m3 number
