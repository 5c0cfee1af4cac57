"""Built-in multiplier families: exactness limits, hand-computed values, error sign, monotonicity, names."""
from __future__ import annotations

import math

import numpy as np
import pytest

from qos_compile.errors import QosError
from qos_compile.multipliers.families import (
    FAMILY_NAMES,
    P_EXACT_SIGNED_MW,
    P_EXACT_UNSIGNED_MW,
    broken_array,
    drum,
    family,
    is_family_name,
    mitchell,
    truncated,
)
from qos_compile.multipliers.library import bundled
from qos_compile.multipliers.multiplier import Multiplier, exact_table


def mae(m: Multiplier) -> float:
    return float(np.abs(m.error).mean())


def test_exact_power_constants_match_bundled_exact_circuits():
    assert bundled().exact(False).power_mw == P_EXACT_UNSIGNED_MW
    assert bundled().exact(True).power_mw == P_EXACT_SIGNED_MW


@pytest.mark.parametrize("signed", [False, True])
def test_exact_limits(signed):
    assert truncated(0, signed).is_exact
    assert broken_array(0, 0, signed).is_exact
    for k in (8, 9, 16):
        assert drum(k, signed).is_exact
    for k in range(1, 8):
        assert not drum(k, signed).is_exact
    assert not mitchell(signed).is_exact
    assert truncated(0, signed).power_mw == pytest.approx(bundled().exact(signed).power_mw)
    assert drum(8, signed).power_mw == pytest.approx(bundled().exact(signed).power_mw)


@pytest.mark.parametrize("signed", [False, True])
def test_metadata(signed):
    for m in (truncated(3, signed), broken_array(2, 5, signed), drum(4, signed), mitchell(signed)):
        assert m.signed == signed
        assert m.power_is_estimate
        assert 0 < m.power_mw <= (P_EXACT_SIGNED_MW if signed else P_EXACT_UNSIGNED_MW)
        assert m.source.startswith("qos-compile built-in family")
        assert m.name.endswith("_s8" if signed else "_u8")
        assert m.lut.dtype == np.int32 and m.lut.shape == (256, 256)
    assert truncated(4).name == "trunc_k4_u8"
    assert broken_array(4, 8, True).name == "bam_h4_v8_s8"
    assert drum(4).name == "drum_k4_u8"
    assert mitchell().name == "mitchell_u8"


def test_truncated_hand_values():
    t4 = truncated(4)
    # all 10 PP bits with i+j<4 dropped: 1*1 + 2*2 + 3*4 + 4*8 = 49
    assert t4(255, 255) == 65025 - 49
    assert t4(3, 5) == 0                    # 3*5 = a0b0 + a0b2 + a1b0 + a1b2: columns 0, 2, 1, 3
    assert truncated(2)(3, 5) == 4 + 8      # columns 2 and 3 survive
    assert truncated(14)(255, 255) == 1 << 14
    assert truncated(14)(127, 255) == 0
    assert truncated(3, True)(-3, 5) == -truncated(3)(3, 5)
    assert truncated(3, True)(-128, -128) == 16384   # |-128| = 128 = bit 7 only: nothing dropped


def test_truncated_matches_bitwise_definition():
    rng = np.random.default_rng(1)
    for k in (1, 5, 9):
        m = truncated(k)
        for a, b in rng.integers(0, 256, size=(20, 2)):
            want = sum(((a >> i) & 1) * ((b >> j) & 1) << (i + j) for i in range(8) for j in range(8) if i + j >= k)
            assert m(a, b) == want


def test_broken_array_hand_values_and_definition():
    h1 = broken_array(1, 0)           # drops row j=0: A * (B with bit 0 cleared)
    assert h1(7, 3) == 7 * 2
    assert h1(3, 7) == 3 * 6          # asymmetric: port B's low rows are the ones removed
    assert broken_array(0, 5) == truncated(5)
    m = broken_array(2, 6)
    rng = np.random.default_rng(2)
    for a, b in rng.integers(0, 256, size=(30, 2)):
        want = sum(((a >> i) & 1) * ((b >> j) & 1) << (i + j)
                   for i in range(8) for j in range(8) if j >= 2 and i + j >= 6)
        assert m(a, b) == want
    assert broken_array(2, 6, True)(-100, 77) == -m(100, 77)


def test_drum_hand_values():
    d4 = drum(4)
    # 200 = 0b11001000 -> t=7, s=4, (200>>4)|1 = 13; 100 = 0b1100100 -> t=6, s=3, (100>>3)|1 = 13
    assert d4(200, 100) == 169 << 7
    assert d4(15, 9) == 135          # both below 2^4: passed unchanged
    assert d4(16, 16) == 81 << 2     # 16 -> (8|1) << 1
    assert d4(0, 255) == 0
    assert drum(4, True)(-128, 100) == -(9 * 13 << 7)   # 128 -> (8|1) << 4
    assert drum(2)(3, 3) == 9         # t=1 < 2: exact


def test_mitchell_hand_values():
    m = mitchell()
    assert m(3, 3) == 8               # log 1.5 + 1.5 -> 2^3 * 1.0
    assert m(5, 6) == 28              # 2^4 * (1 + 0.25 + 0.5)
    assert m(2, 3) == 6 and m(64, 128) == 8192    # a power of two makes it exact
    assert m(0, 7) == 0 and m(7, 0) == 0
    ms = mitchell(True)
    assert ms(-5, 6) == -28 and ms(-5, -6) == 28 and ms(-128, 0) == 0


def test_mitchell_against_float_definition():
    m = mitchell()
    rng = np.random.default_rng(3)
    for a, b in rng.integers(1, 256, size=(50, 2)):
        ta, tb = math.floor(math.log2(a)), math.floor(math.log2(b))
        xa, xb = a / 2**ta - 1, b / 2**tb - 1
        want = 2 ** (ta + tb) * (1 + xa + xb) if xa + xb < 1 else 2 ** (ta + tb + 1) * (xa + xb)
        assert m(a, b) == want


@pytest.mark.parametrize("signed", [False, True])
def test_error_sign(signed):
    exact = exact_table(signed)
    for m in (truncated(6, signed), broken_array(3, 7, signed), mitchell(signed)):
        # magnitudes are underestimated, never overestimated
        assert np.all(np.abs(m.lut) <= np.abs(exact)), m.name
        assert np.all(m.lut * np.sign(exact) >= 0), m.name
        assert (m.error != 0).any()
    if not signed:
        assert truncated(6).error.max() == 0 and truncated(6).error.min() < 0
    # DRUM's forced 1 is unbiased: it errs both ways
    d = drum(4, signed).error
    assert d.min() < 0 < d.max()


def test_monotone_error_and_power():
    for signed in (False, True):
        ms = [truncated(k, signed) for k in range(0, 15)]
        assert all(mae(a) < mae(b) for a, b in zip(ms, ms[1:]))
        assert all(a.power_mw > b.power_mw for a, b in zip(ms, ms[1:]))
        ds = [drum(k, signed) for k in range(8, 0, -1)]
        assert all(mae(a) < mae(b) for a, b in zip(ds, ds[1:]))
        assert all(a.power_mw > b.power_mw for a, b in zip(ds, ds[1:]))
    b1, b2 = broken_array(1, 4), broken_array(2, 6)
    assert mae(b1) < mae(b2) and b1.power_mw > b2.power_mw


@pytest.mark.parametrize("signed", [False, True])
def test_symmetry(signed):
    for m in (truncated(5, signed), drum(3, signed), mitchell(signed)):
        assert np.array_equal(m.lut, m.lut.T), m.name
    assert not np.array_equal(broken_array(2, 0, signed).lut, broken_array(2, 0, signed).lut.T)
    if signed:   # sign-magnitude: odd in each operand (away from -128, whose negation is out of range)
        m = drum(3, True)
        a = np.arange(-127, 128)
        assert np.array_equal(m(a[:, None], a[None, :]), -m(-a[:, None], a[None, :]))


@pytest.mark.parametrize("name, expected", [
    ("trunc4", "trunc_k4_u8"), ("TRUNC-4", "trunc_k4_u8"), ("trunc_k4_u8", "trunc_k4_u8"),
    ("trunc4_s8", "trunc_k4_s8"), ("bam-4-8", "bam_h4_v8_u8"), ("bam_h4_v8_s8", "bam_h4_v8_s8"),
    ("drum4", "drum_k4_u8"), ("drum_k6_s8", "drum_k6_s8"), ("mitchell", "mitchell_u8"),
    ("mitchell_s8", "mitchell_s8"), (" drum3-signed ", "drum_k3_s8"),
])
def test_family_names(name, expected):
    m = family(name)
    assert m.name == expected
    assert family(m.name) == m and is_family_name(name)


def test_family_signed_keyword():
    assert family("trunc3", signed=True).name == "trunc_k3_s8"
    assert family("trunc3_s8", signed=True).signed
    with pytest.raises(QosError, match="signed"):
        family("trunc3_u8", signed=True)


@pytest.mark.parametrize("bad", ["", "foo", "trunc", "trunc-x", "trunc15", "bam-8-0", "bam-1-15", "bam4",
                                 "drum0", "drum17", "mitchell2", "mitchell_x8", "mul8u_1JFF"])
def test_bad_names(bad):
    with pytest.raises(QosError) as info:
        family(bad)
    assert "\n" not in str(info.value)


def test_bad_parameters_direct():
    for call in (lambda: truncated(-1), lambda: truncated(2.5), lambda: truncated(True),
                 lambda: broken_array(8, 0), lambda: drum(0)):
        with pytest.raises(QosError):
            call()
    assert "trunc" in FAMILY_NAMES and "mitchell" in FAMILY_NAMES
