import math

import pytest
import torch

from bipe.errors import ConfigError
from bipe.rope import Rotary, rope_frequencies, yarn_ramp_range

BASE = rope_frequencies(64)[0]


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn", "dynamic"])
def test_factor_one_is_exactly_unscaled(kind):
    inv_freq, scale = rope_frequencies(64, scaling={"type": kind, "factor": 1.0,
                                                    "original_max_position": 1024}, seq_len=512)
    assert torch.equal(inv_freq, BASE) and scale == 1.0


def test_yarn_worked_example():
    # docs/methods.md section 5: head dim 64, L = 1024, b = 10000: the ramp runs over pairs 5 to 18.
    assert yarn_ramp_range(64, 10000.0, 1024) == (5, 18)
    s = {"type": "yarn", "factor": 4.0, "original_max_position": 1024}
    inv_freq, _ = rope_frequencies(64, scaling=s)
    assert torch.equal(inv_freq[:6], BASE[:6])  # fast pairs kept
    torch.testing.assert_close(inv_freq[18:], BASE[18:] / 4)  # slow pairs interpolated
    mid = inv_freq[6:18]
    assert ((mid < BASE[6:18]) & (mid > BASE[6:18] / 4)).all()


@pytest.mark.parametrize(("factor", "temp"), [(2, 1.069), (4, 1.139), (8, 1.208)])
def test_yarn_temperature(factor, temp):
    _, scale = rope_frequencies(64, scaling={"type": "yarn", "factor": factor,
                                             "original_max_position": 1024})
    assert scale == pytest.approx(temp, abs=5e-4)
    assert scale == pytest.approx(0.1 * math.log(factor) + 1)


def test_linear_divides_every_frequency():
    inv_freq, scale = rope_frequencies(64, scaling={"type": "linear", "factor": 4.0})
    torch.testing.assert_close(inv_freq, BASE / 4)
    assert scale == 1.0


def test_ntk_changes_the_base():
    inv_freq, _ = rope_frequencies(64, scaling={"type": "ntk", "factor": 4.0})
    torch.testing.assert_close(inv_freq, rope_frequencies(64, base=10000.0 * 4 ** (64 / 62))[0])


def test_dynamic_is_unscaled_up_to_the_original_length_then_grows():
    s = {"type": "dynamic", "original_max_position": 256}
    for n in (1, 100, 256):
        assert torch.equal(rope_frequencies(64, scaling=s, seq_len=n)[0], BASE)
    longer = rope_frequencies(64, scaling=s, seq_len=1024)[0]
    torch.testing.assert_close(longer, rope_frequencies(64, base=10000.0 * 4 ** (64 / 62))[0])
    assert (longer[1:] < BASE[1:]).all()
    rot = Rotary(64, 1, scaling=s)  # the length is read from the positions themselves
    c_short, _ = rot.cos_sin(torch.arange(200)[None])
    c_plain, _ = Rotary(64, 1).cos_sin(torch.arange(200)[None])
    assert torch.equal(c_short, c_plain)


@pytest.mark.parametrize(("scaling", "message"), [
    ({"type": "yarnn", "factor": 2.0}, "pe.relative.scaling.type"),
    ({"type": "yarn", "factor": 2.0}, "pe.relative.scaling.original_max_position"),
    ({"type": "linear", "factor": 2.0, "betta_fast": 3}, "unknown key"),
    ({"type": "linear", "factor": 0.5}, "must be >= 1"),
])
def test_bad_scaling_is_a_config_error_naming_the_key(scaling, message):
    with pytest.raises(ConfigError, match=message):
        rope_frequencies(64, scaling=scaling)
