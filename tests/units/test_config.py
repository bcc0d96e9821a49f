"""QuantConfig validation: every bad value is a ValueError naming the parameter."""
import pytest

from qfx import QuantConfig


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(weight_bits=3), "weight_bits"),
        (dict(weight_bits=16), "weight_bits"),
        (dict(act_bits=2), "act_bits"),
        (dict(weight_group=0), "weight_group"),
        (dict(weight_group="col"), "weight_group"),
        (dict(weight_group=7), "weight_group"),
        (dict(act_granularity="tensor"), "act_granularity"),
        (dict(act_clip=(1.0, -1.0)), "act_clip"),
        (dict(act_clip=(float("nan"), 1.0)), "act_clip"),
        (dict(roles=("qkv", "mlp")), "roles"),
        (dict(symmetric="yes"), "symmetric"),
    ],
)
def test_bad_config_names_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=param):
        QuantConfig(**kwargs)


def test_tags_and_group_size():
    assert QuantConfig(4, 4, symmetric=False).tag == "W4A4-asym"
    assert QuantConfig(8, 16, weight_group=64).tag == "W8A16-g64"
    assert QuantConfig(4, 4, weight_group=64).group_size == 64
    assert QuantConfig().group_size is None
