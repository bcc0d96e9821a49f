"""qfx.targets: one Target object, one parser, a clear error on a device of another family."""
from __future__ import annotations

import pytest
import torch

from qfx.targets import GPUS, TARGETS, Target, family_of, get_target


@pytest.mark.parametrize("spelling", ["sm_86", "sm86", "SM_86", " Sm86 ", 86, "sm_86a"])
def test_every_spelling_parses_to_the_same_object(spelling):
    assert get_target(spelling) is TARGETS["sm_86"]


def test_a_target_passes_through_and_sm90a_is_sm90():
    t = TARGETS["sm_89"]
    assert get_target(t) is t
    assert get_target("sm_90a") is TARGETS["sm_90"]
    assert get_target("CPU") is TARGETS["cpu"]


@pytest.mark.parametrize("bad", ["sm_75", "ampere", "", 75, "sm_8x", None, 8.6])
def test_unknown_targets_list_the_valid_ones(bad):
    with pytest.raises(ValueError) as e:
        get_target(bad)
    for name in TARGETS:
        assert name in str(e.value)


@pytest.mark.parametrize("name, family, int4", [("sm_80", "sm80", True), ("sm_86", "sm80", True),
                                                 ("sm_89", "sm80", True), ("sm_90", "sm90a", False), ("cpu", None, False)])
def test_family_and_int4_tensor_cores(name, family, int4):
    t = get_target(name)
    assert t.family == family == family_of(t.sm)
    assert t.int4_tensor_cores is int4
    assert t.execution_precision("int4") == ("int4" if int4 else "int8")


def test_the_fields_the_backend_reads_are_there():
    t = get_target("sm_86")
    assert (t.name, t.device, t.sm, t.arch) == ("sm_86", "cuda", 86, "86")
    assert t.peak == {"fp16": 154.8, "int8": 309.7, "int4": 619.3}  # the paper's A6000 numbers
    assert t.bandwidth_gbs == 768.0 and t.sm_count == 84 and t.launch_overhead_us > 0
    assert "INT4" in t.int4_execution and "INT8" in get_target("sm_90").int4_execution
    assert hash(t) == hash(get_target(86))  # frozen and hashable despite the peak dict


def test_other_products_of_a_target():
    t = get_target("sm_86", gpu="3090")
    assert t.gpu == "NVIDIA GeForce RTX 3090" and t.family == "sm80" and t.bandwidth_gbs == 936.0
    assert get_target("sm_89").with_gpu("4090").peak["int4"] == 1321.2
    with pytest.raises(ValueError, match="choose one of"):
        get_target("sm_86", gpu="H100")
    for name, gpus in GPUS.items():
        for g in gpus:
            assert {"fp16", "int8"} <= set(g.peak) and g.bandwidth_gbs > 0 and g.sm_count > 0
            assert ("int4" in g.peak) is TARGETS[name].int4_tensor_cores


def test_check_device_refuses_another_family_with_the_fix():
    with pytest.raises(RuntimeError) as e:
        get_target("sm_86").check_device("cuda", capability=(9, 0), device_name="NVIDIA H100 80GB HBM3")
    msg = str(e.value)
    assert "sm_86" in msg and "sm90a" in msg and "target='sm_90'" in msg and "H100" in msg
    with pytest.raises(RuntimeError, match="target='sm_86'.*sm_90 GPU"):
        get_target("sm_90").check_device(torch.device("cuda"), capability=(8, 6))
    with pytest.raises(RuntimeError, match="target='cpu'"):
        get_target("sm_90").check_device("cpu")
    with pytest.raises(RuntimeError, match="sm_75"):
        get_target("sm_86").check_device("cuda", capability=(7, 5))


def test_check_device_accepts_the_same_family():
    get_target("sm_86").check_device("cuda", capability=(8, 9))  # sm80 kernels run on Ada
    get_target("sm_90").check_device("cuda:0", capability=(9, 0))
    get_target("cpu").check_device("cpu")


def test_check_built_names_the_missing_arch():
    get_target("sm_86").check_built(["80", "90a"])  # sm_80 SASS runs on every 8.x
    with pytest.raises(RuntimeError, match="QFX_CUDA_ARCHS including 90a"):
        get_target("sm_90").check_built(["80", "86", "89"])
    get_target("cpu").check_built([])


def test_peak_for_int4_on_hopper_is_the_int8_peak():
    h = get_target("sm_90")
    assert h.peak_for("int4") == h.peak["int8"]
    assert isinstance(h, Target)


# mode is parsed once (qfx.config.parse_mode) and inferred for a QAT model -------------------

def test_parse_mode_spellings_and_inference():
    from qfx.config import QuantConfig, parse_mode

    assert [parse_mode(m) for m in ("int4", "INT4", "w4a4", "int8", "W8A8", "fp16", "float16")] == \
        ["int4", "int4", "int4", "int8", "int8", "fp16", "fp16"]
    assert parse_mode(None) == "int4"
    assert parse_mode(None, QuantConfig(8, 8)) == "int8" and parse_mode(None, QuantConfig(4, 16)) == "int4"
    for bad in ("int2", "", 4):
        with pytest.raises(ValueError, match="is not one of"):
            parse_mode(bad)


def test_resolve_config_takes_the_qat_models_config_and_refuses_another_mode():
    import qfx
    from qfx.api import _resolve_config
    from models import inputs, make

    qat = qfx.prepare_qat(make("bert", hidden=32, layers=1), example_kwargs=inputs(1, 4), config=qfx.QuantConfig(8, 8))
    cfg, _, origin = _resolve_config(qat, "int8", None)  # compile() parses mode first (None: the trained width)
    assert cfg == qfx.QuantConfig(8, 8) and origin.startswith("QAT")
    with pytest.raises(ValueError, match="use mode='int8'"):
        _resolve_config(qat, "int4", None)
