"""The block-scaled Triton kernels' tile choice as data: the tuned table (backends/triton/
tuned_block_sm90.json, written by ``benchmarks/gemm.py --block 128 --tuned-out``) is read by shape and
M, falls back to CONFIGS, and a bad entry is refused by name."""
from __future__ import annotations

import json

import pytest

from qfx.backends.triton import block_gemm as bg


def _write(tmp_path, entries):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"entries": entries}))
    return path


def _entry(kind, n, k, max_m, block_m, block_n=128, warps=8, stages=3):
    return {"kind": kind, "n": n, "k": k, "max_m": max_m, "block_m": block_m, "block_n": block_n, "warps": warps,
            "stages": stages}


def test_tuned_entry_of_the_smallest_measured_m_at_or_above_and_the_largest_beyond(tmp_path, monkeypatch):
    table = bg.load_tuned(_write(tmp_path, [_entry("linear", 2304, 768, 8192, 128), _entry("linear", 2304, 768, 128, 64),
                                            _entry("linear", 2304, 768, 16384, 256, 64),
                                            _entry("quantize", 3072, 768, 16384, 32, warps=4, stages=4)]))
    monkeypatch.setattr(bg._TUNED, "for_device", lambda device: table)
    pick = lambda m, *shape: bg.config_for(m, *shape, device="cuda")  # noqa: E731
    assert pick(1, 2304, 768).block_m == 64
    assert pick(128, 2304, 768).block_m == 64
    assert pick(129, 2304, 768).block_m == 128
    assert pick(8192, 2304, 768).block_m == 128
    assert (pick(12288, 2304, 768).block_m, pick(12288, 2304, 768).block_n) == (256, 64)
    assert pick(1 << 20, 2304, 768).block_m == 256
    assert pick(100, 3072, 768, "quantize").block_m == 32
    # a shape or kind the table does not hold: the M-indexed fallback
    assert pick(100, 768, 768) == bg.CONFIGS[0]
    assert pick(100, 2304, 768, "quantize") == bg.CONFIGS[0]
    assert pick(1 << 20, 4096, 1024) == bg.CONFIGS[-1]


def test_no_tuned_table_off_the_gpu():
    assert bg._TUNED.for_device(None) == {} and bg.config_for(100, 2304, 768) == bg.CONFIGS[0]


@pytest.mark.parametrize("bad", [dict(kind="gemm"), dict(block_m=96), dict(warps=6), dict(block_n=0)])
def test_a_bad_tuned_entry_is_refused_by_name(tmp_path, bad):
    with pytest.raises(ValueError, match="entry 0 .*not a launchable block-kernel config"):
        bg.load_tuned(_write(tmp_path, [{**_entry("linear", 2304, 768, 128, 64), **bad}]))


def test_tuned_tables_read_the_file_of_the_devices_capability_once_per_device(tmp_path, monkeypatch):
    """TunedTables (backends/triton/__init__.py), the GPU side without a GPU: the table of the device's
    compute capability, read once per device index; the default for a capability no file covers, for
    a file that is missing and off the GPU; ``replace`` for a benchmark that has just measured one."""
    import types

    import torch

    from qfx.backends.triton import TunedTables

    path = _write(tmp_path, [_entry("linear", 2304, 768, 128, 64)])
    reads = []
    tables = TunedTables({(9, 0): path, (8, 6): tmp_path / "missing.json"},
                         lambda p: reads.append(p) or bg.load_tuned(p), {})
    caps = {0: (9, 0), 1: (8, 6), 2: (8, 9)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: caps[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    gpu = lambda index: types.SimpleNamespace(type="cuda", index=index)  # noqa: E731
    assert tables.for_device(gpu(0)) == bg.load_tuned(path)
    assert tables.for_device(gpu(None)) is tables.for_device(gpu(0))  # the current device, read once
    assert reads == [path]
    assert tables.for_device(gpu(1)) == {} and tables.for_device(gpu(2)) == {}  # file missing / none for sm_89
    assert tables.for_device(None) == {} and tables.for_device(torch.device("cpu")) == {}
    tables.replace(2, {"measured": 1})
    assert tables.for_device(gpu(2)) == {"measured": 1} and reads == [path]
    assert all(bg.load_tuned(shipped) for shipped in bg.TUNED_FILES.values())  # the shipped tables load
