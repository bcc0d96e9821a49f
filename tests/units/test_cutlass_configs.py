"""CPU tests of the CUTLASS backend's config table, generator, dispatcher and input checks."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qfx.backends.cutlass import _validate, can_implement, family_for
from qfx.backends.cutlass import configs, dispatch, generate_kernels
from scripts import load_script


def test_config_names_unique_and_fallback_listed():
    names = [c.name for c in configs.CONFIGS]
    assert len(names) == len(set(names))
    for fam, name in configs.FALLBACK.items():
        assert configs.by_name(name).arch == fam


def test_split_rows_share_one_kernel():
    one, two = (configs._sm90((128, 64, 128), (1, 1, 1), "cooperative", (0, 0), "", "streamk", s)
                for s in (1, 2))
    assert one.symbol == two.symbol == one.name and two.name.endswith("_split2")
    assert "StreamKScheduler" in generate_kernels.source(two)


def test_epilogue_tile_is_data_and_checked():
    ok = configs._sm90((128, 128, 128), (2, 1, 1), "pingpong", (0, 0), "", epi_tile=(64, 128))
    assert ok.name.endswith("_e64x128") and "Shape<_64, _128>>;" in generate_kernels.source(ok)
    auto = configs.by_name("sm90_s8_pp_128x128x128_c2x1")
    assert auto.epi_tile is None and "EpilogueTileAuto" in generate_kernels.source(auto)
    # CUTLASS's rule: a ping-pong warpgroup stores 64-row subtiles, a cooperative pair 128-row ones
    for schedule, tile in (("pingpong", (128, 64)), ("cooperative", (64, 64)), ("pingpong", (64, 24))):
        with pytest.raises(ValueError, match="epi_tile"):
            configs._sm90((128, 128, 128), (1, 1, 1), schedule, (0, 0), "", epi_tile=tile)


def test_every_sm90_m_has_a_default():
    sm90 = [c for c in configs.CONFIGS if c.arch == "sm90a"]
    for m in (0, 1, 511, 512, 2047, 8191, 8192, 1 << 20):
        assert any(c.m_range[0] <= m < c.m_range[1] for c in sm90), m


def test_generator_writes_one_file_per_config(tmp_path):
    manifest = generate_kernels.generate(tmp_path, ["86", "90a"])
    files = sorted(p.stem for p in tmp_path.rglob("*.cu"))
    assert files == manifest["kernels"] == sorted({c.symbol for c in configs.CONFIGS})
    assert sorted(manifest["configs"]) == sorted(c.name for c in configs.CONFIGS)
    text = (tmp_path / "sm90a" / f"{configs.FALLBACK['sm90a']}.cu").read_text()
    assert f"qfx_{configs.FALLBACK['sm90a']}_dequant" in text
    again = generate_kernels.generate(tmp_path, ["90a"])  # drops the sm80 files
    assert not list((tmp_path / "sm80").glob("*.cu"))
    assert json.loads((tmp_path / generate_kernels.MANIFEST).read_text()) == again


def test_the_manifest_records_the_building_cuda_and_a_different_torch_cuda_is_named(tmp_path):
    from qfx.backends.cutlass._library import erf_mismatch

    assert generate_kernels.generate(tmp_path, ["90a"], "13.0.88")["cuda"] == "13.0.88"
    assert "cuda" not in generate_kernels.generate(tmp_path, ["90a"])
    assert erf_mismatch("13.0.88", "13.0") == "" and erf_mismatch("", "12.8") == "" and erf_mismatch("13.0", None) == ""
    note = erf_mismatch("13.0.88", "12.8")
    assert "built with CUDA 13.0.88, torch with CUDA 12.8" in note and "rebuild the library" in note


def test_dispatch_untuned_follows_m_ranges(monkeypatch):
    monkeypatch.setattr(dispatch, "tuned_table", lambda path=None: {})
    built = {c.name for c in configs.CONFIGS}
    small = dispatch.choose("sm90a", "s8", 128, 768, 768, built)
    large = dispatch.choose("sm90a", "s8", 65536, 4096, 1024, built)
    assert small.m_range[0] <= 128 < small.m_range[1]
    assert large.m_range[0] <= 65536 < large.m_range[1]
    # only the fallback built -> fallback
    assert dispatch.choose("sm90a", "s8", 128, 768, 768, {configs.FALLBACK["sm90a"]}).name \
        == configs.FALLBACK["sm90a"]
    assert dispatch.m_bucket(1) == 128 and dispatch.m_bucket(129) == 256


def test_dispatch_uses_nearest_tuned_bucket(monkeypatch):
    pick = "sm90_s8_co_256x128x128_c1x1"
    monkeypatch.setattr(dispatch, "tuned_table", lambda path=None: {(1024, 1024, 8192): pick})
    built = {c.name for c in configs.CONFIGS}
    assert dispatch.choose("sm90a", "s8", 9000, 1024, 1024, built).name == pick  # bucket 16384
    assert dispatch.choose("sm90a", "s8", 100, 1024, 1024, built).name == pick   # below: smallest
    assert dispatch.choose("sm90a", "s8", 9000, 1024, 1024, built - {pick}).name != pick


def test_committed_tuned_table_names_only_known_configs():
    names = {c.name for c in configs.CONFIGS}
    assert set(dispatch.tuned_table().values()) <= names


@pytest.mark.parametrize("sm,archs,family", [
    (90, ["80", "86", "89", "90a"], "sm90a"), (86, ["86"], "sm80"), (89, ["80"], "sm80"),
    (90, ["86"], None), (100, ["90a"], None), (75, ["80"], None)])
def test_family_for(sm, archs, family):
    assert family_for(sm, archs)[0] == family


@pytest.mark.parametrize("args,ok", [
    ((None, 768, 768, 4, 4, None, "sm_90"), True),
    ((None, 768, 770, 8, 8, None, "sm_90"), False),      # K alignment
    ((None, 764, 768, 8, 8, None, "sm_90"), False),      # N alignment
    ((None, 768, 768, 4, 4, 128, "sm_90"), False),       # group-wise
    ((None, 768, 784, 4, 4, None, "sm_86"), False),      # s4 needs K % 32
    ((None, 768, 784, 8, 8, None, "sm_86"), True),
    ((None, 768, 768, 4, 16, None, "sm_90"), False),     # weight-only: not here
])
def test_can_implement_without_library(args, ok):
    assert can_implement(*args, require_library=False)[0] is ok


def test_validation_messages_name_the_tensor():
    with pytest.raises(_validate.BadInput, match="a_scale.*CUDA"):
        _validate.check_tensor(torch.zeros(3), "a_scale", (torch.float32,))
    with pytest.raises(_validate.BadInput, match="K=770 .* pad it to 784"):
        _validate.check_multiple(770, 16, "K", "16-byte rows")


@given(n=st.integers(1, 8192), k=st.integers(1, 8192), bits=st.sampled_from([4, 8]),
       sm=st.sampled_from([80, 86, 89, 90]))
def test_can_implement_iff_aligned(n, k, bits, sm):
    ok, why = can_implement(None, n, k, bits, bits, None, f"sm_{sm}", require_library=False)
    k_align = 32 if (sm < 90 and bits == 4) else 16
    assert ok == (n % 8 == 0 and k % k_align == 0), why
    assert ok or why


def test_gencode_flags_come_from_the_table(tmp_path):
    assert generate_kernels.gencode_flags("sm80", ["86", "90a"]) == [
        "-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_80,code=compute_80"]
    assert generate_kernels.gencode_flags("sm90a", ["90a"]) == [
        "-gencode=arch=compute_90a,code=sm_90a"]
    generate_kernels.generate(tmp_path, ["89", "90a"])
    text = (tmp_path / generate_kernels.CMAKE_FAMILIES).read_text()
    assert "set(QFX_FAMILIES sm90a;sm80)" in text and "code=sm_89" in text


def test_tuned_merge_replaces_measured_shapes_and_keeps_the_rest(tmp_path):
    gemm = load_script("benchmarks/gemm.py", "qfx_gemm_benchmark")
    table = tmp_path / "tuned.json"
    table.write_text(json.dumps({"device": "H100", "entries": [
        {"n": 768, "k": 3072, "m_bucket": 16384, "config": "pp", "us": 56.0},
        {"n": 2304, "k": 768, "m_bucket": 16384, "config": "pp", "us": 67.0}]}))
    merged = gemm.merge_tuned(str(table), [{"n": 2304, "k": 768, "m_bucket": 16384, "config": "pp_e", "us": 60.0},
                                           {"n": 2304, "k": 768, "m_bucket": 8192, "config": "co", "us": 30.0}], "H100")
    assert [(e["n"], e["m_bucket"], e["config"]) for e in merged] == [
        (768, 16384, "pp"), (2304, 8192, "co"), (2304, 16384, "pp_e")]
    with pytest.raises(SystemExit, match="tuned on 'H100'.*without --tuned-merge"):
        gemm.merge_tuned(str(table), [], "H200")
