"""Error metrics: EvoApprox conventions, checked against every published figure of the 64 bundled circuits."""
from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import pytest

from qos_compile.errors import QosError
from qos_compile.multipliers import bundled, exact_table
from qos_compile.multipliers.metrics import Metrics, compute_metrics

ALL = [m.name for m in bundled()]
BY_NAME = {m.name: m for m in bundled()}

# published key (Multiplier.published) -> Metrics field it is a rounding of
PUBLISHED_FIELDS = {
    "mae_lsb": "mae", "mae_pct": "mae_pct", "wce_lsb": "wce", "wce_pct": "wce_pct",
    "mre_pct": "mre_pct", "wcre_pct": "wcre_pct", "ep_pct": "ep_pct", "mse_lsb2": "mse",
}

# The publisher's own rounding quirks (docs/design.md, "The publisher's rounding quirks"),
# each present in both EvoApprox branches. Our values are right; the published strings are not
# the correctly rounded values, so these pairs get a 7% relative check instead of the exact one.
#   mul8s_1KRC MAE 36.535 is published as "36" (truncated), though its MAE% 0.056 matches.
#   mul8s_1KVA / mul8s_1KVB MAE% 0.0019 / 0.0065 are published as 0.0018 / 0.0064: they were
#   evidently computed from the already-rounded MAE 1.2 / 4.2.
KNOWN_QUIRKS = {("mul8s_1KRC", "mae_lsb"), ("mul8s_1KVA", "mae_pct"), ("mul8s_1KVB", "mae_pct")}


def matches_published(value: float, published: str) -> bool:
    """True when ``value`` rounds to ``published`` at its number of digits.

    The last published digit fixes the unit (``"1.2"`` -> 0.1, ``"72829.102e2"`` -> 0.1,
    ``"16256"`` -> 1): the value must lie within half a unit, plus 1e-9 of a unit so that
    exact ties (1.25 published as "1.2") and float noise pass either way.
    """
    pub = Decimal(published)
    unit = Decimal(1).scaleb(pub.as_tuple().exponent)
    return abs(Decimal(repr(float(value))) - pub) <= unit * Decimal("0.500000001")


def test_matches_published_rule() -> None:
    assert matches_published(1.25, "1.2") and matches_published(1.25, "1.3")  # a tie may go either way
    assert not matches_published(1.26, "1.2")
    assert matches_published(7282910.25, "72829.102e2") and not matches_published(7282910.4, "72829.102e2")
    assert matches_published(0.0, "0.00") and not matches_published(0.006, "0.00")
    assert matches_published(36.4, "36") and not matches_published(36.535, "36")


@pytest.mark.parametrize("name", ALL)
def test_metrics_match_published_figures(name: str) -> None:
    m = BY_NAME[name]  # by primary name: three names are ambiguous for a plain lookup
    computed = m.metrics.to_dict()
    assert set(m.published) == set(PUBLISHED_FIELDS)
    for key, field in PUBLISHED_FIELDS.items():
        value, published = computed[field], m.published[key]
        if (name, key) in KNOWN_QUIRKS:
            # keep the exception honest: it must still be a quirk, and a small one
            assert not matches_published(value, published), f"{name} {key} is no longer a quirk"
            assert abs(value - float(published)) <= 0.07 * abs(value), (name, key, value, published)
        else:
            assert matches_published(value, published), f"{name} {key}: computed {value!r}, published {published!r}"


def test_known_quirks_are_exactly_three_bundled_pairs() -> None:
    # Six published numbers are off: three pairs, each found in both branches; our library holds each circuit once.
    assert len(ALL) == 64 and len(set(ALL)) == 64
    assert {n for n, _ in KNOWN_QUIRKS} == {"mul8s_1KRC", "mul8s_1KVA", "mul8s_1KVB"}
    assert all(n in ALL for n, _ in KNOWN_QUIRKS)


@pytest.mark.parametrize("name, signed", [("mul8u_1JFF", False), ("master:mul8s_1KV8", True)])
def test_exact_circuits_reproduce_the_product(name: str, signed: bool) -> None:
    m = bundled().get(name)
    codes = np.arange(256) - (128 if signed else 0)
    assert m.signed is signed and m.is_exact
    np.testing.assert_array_equal(m.lut, np.outer(codes, codes))
    a, b = np.meshgrid(codes, codes, indexing="ij")
    np.testing.assert_array_equal(m(a, b), a * b)  # all 65,536 pairs through the lookup
    assert m.metrics == Metrics(*([0.0] * 10))


def _reference(lut: np.ndarray, signed: bool) -> dict[str, float]:
    """Straightforward float64 definitions, independent of the implementation."""
    exact = exact_table(signed).astype(np.float64)
    e = lut.astype(np.float64) - exact
    nz = exact != 0
    rel = np.abs(e[nz]) / np.abs(exact[nz]) * 100
    return dict(mae=np.abs(e).mean(), mae_pct=np.abs(e).mean() / 65536 * 100, wce=np.abs(e).max(),
                wce_pct=np.abs(e).max() / 65536 * 100, mre_pct=rel.mean(), wcre_pct=rel.max(),
                ep_pct=(e != 0).mean() * 100, mse=(e * e).mean(), mean_error=e.mean(), std_error=e.std())


@pytest.mark.parametrize("name", ALL)
def test_metrics_match_reference_formulas_on_bundled_circuits(name: str) -> None:
    # every field, also those EvoApprox does not publish (bias, std), recomputed independently
    m = BY_NAME[name]
    got = m.metrics.to_dict()
    for k, v in _reference(m.lut, m.signed).items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), (name, k)


@pytest.mark.parametrize("signed", [False, True])
def test_metrics_match_reference_formulas_on_random_tables(signed: bool) -> None:
    rng = np.random.default_rng(7)
    lut = exact_table(signed) + rng.integers(-300, 300, size=(256, 256)) * (rng.random((256, 256)) < 0.4)
    got = compute_metrics(lut, signed).to_dict()
    for k, v in _reference(lut, signed).items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k


def test_constant_offset_table() -> None:
    m = compute_metrics(exact_table(False) + 3, signed=False)
    assert (m.mae, m.wce, m.ep_pct, m.mse, m.mean_error, m.std_error) == (3.0, 3.0, 100.0, 9.0, 3.0, 0.0)
    assert m.mae_pct == pytest.approx(3 / 65536 * 100)
    assert m.wcre_pct == pytest.approx(300.0)  # |3| / |1*1|


def test_zero_products_are_left_out_of_relative_errors() -> None:
    lut = exact_table(False).copy()
    lut[0, :] = 1000  # errors only where the exact product is 0
    m = compute_metrics(lut, signed=False)
    assert m.mre_pct == 0.0 and m.wcre_pct == 0.0
    assert m.ep_pct > 0 and m.wce == 1000.0


def test_signed_percentages_use_2_to_16() -> None:
    lut = exact_table(True).copy()
    lut[0, 0] += 65536 // 100  # one error of 655 lsb
    assert compute_metrics(lut, signed=True).wce_pct == pytest.approx(655 / 65536 * 100)


def test_extreme_errors_do_not_overflow() -> None:
    lut = np.full((256, 256), 2**31 - 1, dtype=np.int64)
    m = compute_metrics(lut, signed=True)
    e = (lut - exact_table(True)).ravel()
    mse = sum(int(v) * int(v) for v in e) / e.size
    assert m.mse == pytest.approx(mse, rel=1e-15)
    assert m.std_error == pytest.approx(float(np.std(e.astype(np.float64))), rel=1e-9)
    assert math.isfinite(m.std_error)


def test_to_dict_fields_and_frozen() -> None:
    m = bundled().get("mul8u_2AC").metrics
    d = m.to_dict()
    assert list(d) == ["mae", "mae_pct", "wce", "wce_pct", "mre_pct", "wcre_pct", "ep_pct", "mse", "mean_error",
                       "std_error"]
    assert all(type(v) is float for v in d.values())
    with pytest.raises(AttributeError):
        m.mae = 0.0  # type: ignore[misc]


@pytest.mark.parametrize("bad", [np.zeros((255, 256), np.int32), np.zeros((256, 256), np.float32),
                                 np.full((256, 256), 2**40, np.int64)])
def test_invalid_tables_raise_qos_error(bad: np.ndarray) -> None:
    with pytest.raises(QosError):
        compute_metrics(bad, signed=False)
