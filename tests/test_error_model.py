"""Error prediction (method step 4): prediction vs Monte-Carlo, brute force, defect guards."""
from __future__ import annotations

import numpy as np
import pytest

from qos_compile.errors import QosError
from qos_compile.multipliers import Multiplier, bundled, get
from qos_compile.reference import approx_gemm_acc
from qos_compile.search import error_model
from qos_compile.search.error_model import (
    agreement,
    measure_error_std,
    predict_error_std,
    predict_error_std_many,
    reference_spread,
)


def synthetic_operands(signed: bool, rows: int = 1024, k: int = 72, out: int = 16, seed: int = 0):
    """ReLU-like activations (about half at the zero-point code, rows of varying density and
    scale) and Gaussian-ish weights around the weight zero point, as codes."""
    rng = np.random.default_rng(seed)
    zx, zw = (-128, 0) if signed else (0, 128)
    a = np.maximum(0.0, rng.normal(0.0, 60.0, (rows, k))) * rng.uniform(0.3, 1.5, (rows, 1))
    a[rng.random((rows, k)) < rng.uniform(0.3, 0.7, (rows, 1))] = 0.0
    x = np.clip(np.round(a) + zx, zx, zx + 255)
    w = np.clip(np.round(rng.normal(zw, 25.0, (out, k))), zw - 128, zw + 127)
    dtype = np.int8 if signed else np.uint8
    return x.astype(dtype), w.astype(dtype)


def brute_force_prediction(x_rows, w_codes, mult: Multiplier, twos_complement: bool = False) -> float:
    """The notes' formula written as plain loops over all rows (tiny cases only).

    Errors come from ``mult(w, x) - w*x`` (port A = weight). With ``twos_complement`` it
    reproduces the reference code's defect: bins indexed by ``code & 0xFF`` against the
    table in natural (code + offset) order.
    """
    err = mult.error
    xs = [[int(v) for v in row] for row in np.asarray(x_rows)]
    ws = [int(v) for v in np.asarray(w_codes).ravel()]
    k = len(xs[0])

    def e(wc: int, xc: int) -> float:
        if twos_complement:
            return float(err[wc & 0xFF, xc & 0xFF])
        return float(int(mult(wc, xc)) - wc * xc)

    p_w: dict[int, float] = {}
    for wc in ws:
        p_w[wc] = p_w.get(wc, 0.0) + 1.0 / len(ws)
    mus, sig2s = [], []
    for row in xs:
        p_x: dict[int, float] = {}
        for xc in row:
            p_x[xc] = p_x.get(xc, 0.0) + 1.0 / k
        mu = sum(e(a, b) * pa * pb for a, pa in p_w.items() for b, pb in p_x.items())
        var = sum((e(a, b) - mu) ** 2 * pa * pb for a, pa in p_w.items() for b, pb in p_x.items())
        mus.append(mu)
        sig2s.append(var / k)  # sigma_i = sqrt(var)/sqrt(K)
    n = len(xs)
    sigma2 = (sum(m * m + s for m, s in zip(mus, sig2s)) - sum(mus) ** 2 / n) / n
    return k * float(np.sqrt(max(sigma2, 0.0)))


# ----------------------------------------------------------------------------- Monte-Carlo agreement
@pytest.mark.parametrize(
    "signed, names",
    [
        (False, ["mul8u_KEM", "mul8u_1446", "mul8u_2AC", "mul8u_DM1", "mul8u_17KS", "mul8u_FTA"]),
        (True, ["mul8s_1KVB", "mul8s_1KX2", "mul8s_1KR6", "mul8s_1KTY", "mul8s_1L1G"]),
    ],
)
def test_prediction_agrees_with_monte_carlo(signed, names):
    x, w = synthetic_operands(signed)
    mults = [get(n) for n in names]
    pred = predict_error_std_many(x, w, mults, rng=3)
    meas = np.array([measure_error_std(x, w, m, rng=3) for m in mults])
    assert np.all(meas > 0)
    ratio = pred / meas
    assert np.all((ratio > 0.5) & (ratio < 2.0)), dict(zip(names, ratio.round(3)))
    summary = agreement(pred, meas)
    assert summary["within_2x"] == 1.0 and summary["pearson_log"] > 0.95
    # the single-circuit entry point is the same computation
    assert predict_error_std(x, w, mults[2], rng=3) == pytest.approx(pred[2], rel=1e-12)


@pytest.mark.parametrize("signed", [False, True])
def test_exact_circuit_predicts_zero(signed):
    x, w = synthetic_operands(signed, rows=200)
    exact = bundled().exact(signed)
    assert predict_error_std(x, w, exact) == 0.0
    assert measure_error_std(x, w, exact) == 0.0


# ----------------------------------------------------------------------------- defect guards
def test_matches_brute_force_signed_not_twos_complement():
    """Signed operands incl. negative codes, asymmetric circuit: the vectorised prediction
    equals the formula written as loops; the two's-complement binning defect would not."""
    m = get("mul8s_1KTY")
    assert not np.array_equal(m.error, m.error.T)
    rng = np.random.default_rng(5)
    x = rng.integers(-128, 128, size=(5, 7)).astype(np.int8)
    w = rng.integers(-128, 128, size=(3, 7)).astype(np.int8)
    want = brute_force_prediction(x, w, m)
    assert predict_error_std(x, w, m) == pytest.approx(want, rel=1e-9)
    defective = brute_force_prediction(x, w, m, twos_complement=True)
    assert abs(defective - want) > 0.05 * want  # the check is sensitive to the defect


def test_operand_order_weight_is_port_a():
    """Asymmetric unsigned circuit, weights and activations from different code ranges:
    swapping the ports changes the answer, and ours matches port A = weight."""
    m = get("mul8u_1446")
    swapped = Multiplier(name="swapped", signed=False, lut=m.lut.T.copy())
    rng = np.random.default_rng(7)
    x = rng.integers(150, 256, size=(6, 9)).astype(np.uint8)   # codes > 127: an int8 cast would break them
    w = rng.integers(0, 40, size=(4, 9)).astype(np.uint8)
    want = brute_force_prediction(x, w, m)
    got = predict_error_std(x, w, m)
    assert got == pytest.approx(want, rel=1e-9)
    assert predict_error_std(x.astype(np.int64), w.astype(np.int64), m) == got
    other = predict_error_std(x, w, swapped)
    assert abs(other - want) > 0.1 * want
    # the measurement follows the same contract as the reference accumulators
    ref = approx_gemm_acc(x, w, m).astype(np.int64) - x.astype(np.int64) @ w.astype(np.int64).T
    assert measure_error_std(x, w, m) == pytest.approx(ref.std(), rel=1e-12)
    assert abs(measure_error_std(x, w, swapped) - ref.std()) > 0.05 * ref.std()


@pytest.mark.parametrize("name", ["mul8s_1KR6", "mul8u_2AC"])
def test_measurement_equals_reference_accumulators(name, monkeypatch):
    m = get(name)
    x, w = synthetic_operands(m.signed, rows=40, k=12, out=5, seed=2)
    monkeypatch.setattr(error_model, "_GATHER_CHUNK", 64)  # exercise the neuron chunking
    xa, wa = x.astype(np.int64), w.astype(np.int64)
    diff = approx_gemm_acc(x, w, m).astype(np.int64) - xa @ wa.T
    assert measure_error_std(x, w, m) == pytest.approx(diff.std(), rel=1e-12)


# ----------------------------------------------------------------------------- reference spread
def test_reference_spread_with_zero_points(monkeypatch):
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, size=(300, 20)).astype(np.uint8)
    w = rng.integers(0, 256, size=(6, 20)).astype(np.uint8)
    direct = ((x.astype(np.float64) - 17) @ (w.astype(np.float64) - 131).T).std()
    assert reference_spread(x, w, 17, 131) == pytest.approx(direct, rel=1e-12)
    # ignoring the zero points (a reference-code defect) gives something else entirely
    assert abs((x.astype(np.float64) @ w.astype(np.float64).T).std() - direct) > 0.1 * direct
    # per-channel weight zero points, signed codes, and the chunked accumulation
    xs = rng.integers(-128, 128, size=(300, 20)).astype(np.int8)
    ws = rng.integers(-128, 128, size=(6, 20)).astype(np.int8)
    zw = np.array([0, 3, -5, 7, 0, 1])
    direct = ((xs.astype(np.float64) + 128) @ (ws.astype(np.float64) - zw[:, None]).T).std()
    monkeypatch.setattr(error_model, "_GATHER_CHUNK", 8 * 6 * 7)  # 7 rows per chunk
    assert reference_spread(xs, ws, -128, zw) == pytest.approx(direct, rel=1e-10)
    # conv weights (O, C, kh, kw) flatten to (O, K); float codes holding integers are fine
    w4 = w.reshape(6, 5, 2, 2).astype(np.float32)
    direct = ((x.astype(np.float64) - 17) @ (w.astype(np.float64) - 131).T).std()
    assert reference_spread(x, w4, 17, 131) == pytest.approx(direct, rel=1e-10)


# ----------------------------------------------------------------------------- input checking
def test_bad_inputs_are_one_line_errors():
    x, w = synthetic_operands(False, rows=10)
    with pytest.raises(QosError, match="code range"):
        predict_error_std(x, w, get("mul8s_1KVB"))   # unsigned codes 200 for a signed circuit
    with pytest.raises(QosError, match="mix of signed and unsigned"):
        predict_error_std_many(x, w, [get("mul8u_KEM"), get("mul8s_1KVB")])
    with pytest.raises(QosError, match="fan-in"):
        measure_error_std(x, w[:, :5], get("mul8u_KEM"))
    with pytest.raises(QosError, match="integer"):
        predict_error_std(x + 0.5, w, get("mul8u_KEM"))
    with pytest.raises(QosError):
        reference_spread(x, w, 0, np.zeros(3))


def test_row_sampling_is_without_replacement_and_seeded():
    idx = error_model.sample_rows(1000, 512, 4)
    assert idx.size == 512 and np.unique(idx).size == 512
    assert np.array_equal(idx, error_model.sample_rows(1000, 512, 4))
    assert np.array_equal(error_model.sample_rows(100, 512, 4), np.arange(100))


def test_agreement_summary():
    s = agreement([0.0, 1.0, 2.0, 4.0], [0.0, 1.0, 4.0, 4.0])
    assert s["both_zero"] == 1 and s["one_zero"] == 0 and s["n_compared"] == 3
    assert s["median_ratio"] == pytest.approx(1.0)
    assert s["worst_ratio"] == pytest.approx(2.0)
    assert s["within_2x"] == 1.0 and s["spearman_log"] > 0.8
    assert agreement([1.0], [0.0])["one_zero"] == 1
