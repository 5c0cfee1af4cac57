"""Operating points and k-means selection (method step 5) on synthetic σ/T matrices."""
from __future__ import annotations

import numpy as np
import pytest

from qos_compile.errors import QosError
from qos_compile.search.operating_points import (
    DEFAULT_SCALES,
    compress_ratios,
    layer_tolerance,
    ratio_matrix,
    select_operating_points,
)

# circuit 0 exact; then increasing error and decreasing power; the last fits nothing
BASE_ERR = np.array([0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 50.0])
POWER = np.array([1.0, 0.9, 0.8, 0.6, 0.45, 0.3, 0.2, 0.01])


def structured(n_layers: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    spread = rng.uniform(100.0, 1000.0, n_layers)
    agn = rng.uniform(0.02, 0.3, n_layers)            # learned per-layer noise tolerance
    tol = layer_tolerance(agn, spread)
    sigma = np.outer(spread * rng.uniform(0.8, 1.2, n_layers), BASE_ERR)
    macs = rng.integers(1_000, 100_000, n_layers)
    return sigma, tol, macs


def test_ratio_matrix_is_scale_major():
    sigma, tol, _ = structured(n_layers=4)
    r = ratio_matrix(sigma, tol, DEFAULT_SCALES)
    assert r.shape == (3 * 4, BASE_ERR.size)
    for s, scale in enumerate(DEFAULT_SCALES):
        for l in range(4):
            np.testing.assert_allclose(r[s * 4 + l], sigma[l] / (scale * tol[l] + 1e-6))
    np.testing.assert_allclose(r.reshape(3, 4, -1)[1], sigma / (tol[:, None] + 1e-6))
    with pytest.raises(QosError):
        ratio_matrix(sigma, tol[:3], DEFAULT_SCALES)


def test_compression_is_continuous_and_monotone():
    r = np.array([0.0, 0.5, 1.0, 1.0 + 1e-9, 2.0, 1e6])
    c = compress_ratios(r)
    np.testing.assert_allclose(c[:3], r[:3])
    assert c[3] == pytest.approx(1.0) and c[4] == pytest.approx(1.0 + np.log(2.0))
    assert np.all(np.diff(c) >= 0) and c[-1] < 16


def test_selection_on_structured_data():
    sigma, tol, macs = structured()
    res = select_operating_points(sigma, tol, DEFAULT_SCALES, POWER, n=4, exact_index=0, seed=0, macs=macs)
    assert res.assign.shape == (3, 10)
    assert res.assign.min() >= 0 and res.assign.max() < BASE_ERR.size
    assert res.circuits.size <= 4
    np.testing.assert_array_equal(res.circuits, np.unique(res.assign))
    assert 7 not in res.candidates and 7 not in res.assign      # fits no row: dropped
    assert 0 in res.candidates                                   # exact always a candidate
    # most accurate OP first, cheaper (not more power) with every larger scale
    assert np.all(np.diff(res.op_relative_power) <= 1e-12)
    assert not res.reordered
    np.testing.assert_array_equal(res.scales, DEFAULT_SCALES)
    # per-layer too: a larger scale never gets a more power-hungry circuit here
    assert np.all(np.diff(POWER[res.assign], axis=0) <= 0)
    # misfits are exactly the rows whose circuit has r > 1
    r = res.ratios.reshape(3, 10, -1)
    expected = {(j, l) for j in range(3) for l in range(10) if r[j, l, res.assign[j, l]] > 1}
    assert {(j, l) for j, l, _ in res.misfits} == expected
    # deterministic for a seed
    again = select_operating_points(sigma, tol, DEFAULT_SCALES, POWER, n=4, exact_index=0, seed=0, macs=macs)
    np.testing.assert_array_equal(res.assign, again.assign)
    np.testing.assert_array_equal(res.labels, again.labels)


def test_at_most_n_circuits_for_all_ops_together():
    sigma, tol, macs = structured(n_layers=30, seed=4)
    for n in (1, 2, 3):
        res = select_operating_points(sigma, tol, DEFAULT_SCALES, POWER, n=n, exact_index=0, seed=1, macs=macs)
        assert np.unique(res.assign).size <= n


def test_misfits_reported_when_forced():
    """n=1: one circuit for tight and loose layers alike; the tight rows must be reported."""
    n_layers = 8
    sigma = np.tile(BASE_ERR[:7], (n_layers, 1)) * 100.0        # circuit 1: σ = 2
    tol = np.where(np.arange(n_layers) < 4, 1.5, 1000.0)       # layers 0-3 tight
    res = select_operating_points(sigma, tol, [1.0], POWER[:7], n=1, exact_index=0, seed=0)
    assert res.circuits.size == 1 and res.circuits[0] != 0     # the cheap choice wins on average
    assert {l for _, l, _ in res.misfits} == {0, 1, 2, 3}
    assert all(ratio > 1 for _, _, ratio in res.misfits)


def test_exact_circuit_is_always_kept():
    sigma, tol, _ = structured(n_layers=5)
    sigma[:, 0] = 1e9          # pretend the "exact" column fits nothing: still a candidate
    res = select_operating_points(sigma, tol, DEFAULT_SCALES, POWER, n=2, exact_index=0)
    assert 0 in res.candidates
    # zero tolerance everywhere: only σ = 0 fits, and every row falls back to exact
    sigma2, _, _ = structured(n_layers=5)
    res = select_operating_points(sigma2, np.zeros(5), DEFAULT_SCALES, POWER, n=3, exact_index=0)
    np.testing.assert_array_equal(res.assign, 0)
    assert res.misfits == []


def test_ops_sorted_by_power_when_scales_are_not():
    sigma, tol, macs = structured()
    res = select_operating_points(sigma, tol, [2.0, 0.3, 1.0], POWER, n=4, exact_index=0, macs=macs)
    np.testing.assert_array_equal(res.scales, [0.3, 1.0, 2.0])
    np.testing.assert_array_equal(res.op_order, [1, 2, 0])
    assert res.reordered
    assert np.all(np.diff(res.op_relative_power) <= 1e-12)
    ref = select_operating_points(sigma, tol, [0.3, 1.0, 2.0], POWER, n=4, exact_index=0, macs=macs)
    np.testing.assert_allclose(res.ratios, ref.ratios)


def test_bad_inputs():
    sigma, tol, _ = structured(n_layers=3)
    power = POWER.copy()
    power[7] = np.nan      # unknown power is fine for a circuit that fits nothing...
    select_operating_points(sigma, tol, DEFAULT_SCALES, power, n=2, exact_index=0)
    power[2] = np.nan      # ...but not for a candidate
    with pytest.raises(QosError, match="c2 has no usable power"):
        select_operating_points(sigma, tol, DEFAULT_SCALES, power, n=2, exact_index=0,
                                names=[f"c{i}" for i in range(8)])
    with pytest.raises(QosError, match="exact_index"):
        select_operating_points(sigma, tol, DEFAULT_SCALES, POWER, n=2, exact_index=99)
    with pytest.raises(QosError):
        select_operating_points(sigma, tol, DEFAULT_SCALES, POWER, n=0, exact_index=0)
    with pytest.raises(QosError):
        select_operating_points(-sigma, tol, DEFAULT_SCALES, POWER, exact_index=0)
