"""Predicted and measured error of an approximate multiplier in one layer (method step 4).

All functions work on traced integer operands of one conv/linear layer:

* ``x_rows`` (R, K): im2col receptive-field rows of activation **codes** (fan-in K);
* ``w_codes`` (O, K) (or any shape that flattens to it): weight **codes**.

Codes are the 8-bit operand codes the hardware sees: 0..255 for unsigned circuits,
-128..127 for signed ones. Any integer dtype is accepted (and floats holding exact
integers, as fake-quantisation tracers produce); codes are widened to int64 and
never cast through int8/uint8. A code's table index is ``code + mult.offset``,
exactly as in :mod:`qos_compile.reference`, so histograms are binned in the
table's own index order (not two's complement), and the error table is read as
``E[weight index, activation index]`` (port A = weight, port B = activation).

Grouped/depthwise convolutions: the prediction only uses the rows' per-row
activation histograms and one histogram of all weights, so any (R, K) rows of the
layer's fan-in work. :func:`measure_error_std` and :func:`reference_spread` pair
every row with every output neuron; for a grouped layer pass one group's rows
with that group's weights (or accept the mild approximation of mixing groups).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import QosError
from ..multipliers import Multiplier

__all__ = [
    "reference_spread",
    "predict_error_std",
    "predict_error_std_many",
    "measure_error_std",
    "agreement",
    "sample_rows",
]

# Elements per temporary chunk in measure_error_std / reference_spread (~128 MiB of 8-byte values).
_GATHER_CHUNK = 1 << 24


# ----------------------------------------------------------------------------- helpers
def _as_array(a: Any) -> np.ndarray:
    """A NumPy view of ``a`` (torch tensors via ``.detach().cpu()``, without importing torch)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _integer_array(a: Any, what: str) -> np.ndarray:
    """``a`` as an int64 array; integer dtypes or floats holding exact integers only."""
    arr = _as_array(a)
    if arr.dtype == np.bool_:
        raise QosError(f"{what} must be integer codes, got booleans")
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)  # widening: uint8 200 stays 200 (never via int8)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise QosError(f"{what} must hold integer codes, got non-integral floats")
        return arr.astype(np.int64)
    raise QosError(f"{what} must be integer codes, got dtype {arr.dtype}")


def _table_index(a: Any, offset: int, what: str, name: str) -> np.ndarray:
    """Codes → table indices (code + offset), refusing codes outside the circuit's range."""
    idx = _integer_array(a, what) + offset
    if idx.size and (idx.min() < 0 or idx.max() > 255):
        lo, hi = -offset, 255 - offset
        raise QosError(
            f"{what} out of the code range {lo}..{hi} of {name} "
            f"(got {int(idx.min()) - offset}..{int(idx.max()) - offset}); signed/unsigned mismatch?"
        )
    return idx


def _rows_2d(x: np.ndarray, what: str = "x_rows") -> tuple[int, int]:
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise QosError(f"{what} must be a non-empty (R, K) array of receptive-field rows, got shape {x.shape}")
    return int(x.shape[0]), int(x.shape[1])


def _weights_2d(w: np.ndarray, k: int) -> np.ndarray:
    if w.ndim < 1 or w.size == 0:
        raise QosError("w_codes must be a non-empty array of weight codes")
    w2 = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
    if w2.shape[1] != k:
        raise QosError(f"weights of shape {w.shape} do not match the rows' fan-in K={k} (want (O, K))")
    return w2


def sample_rows(n_total: int, n_rows: int | None, rng: Any = None) -> np.ndarray:
    """Indices of the rows to use: ``n_rows`` drawn without replacement, or all rows when
    ``n_total <= n_rows`` (or ``n_rows`` is None). ``rng``: seed, Generator or None.

    Every function here samples through this helper, so calls with equal seeds use the
    same rows (the prediction and its Monte-Carlo check then see the same operands).
    """
    if n_rows is not None and n_rows < 1:
        raise QosError(f"n_rows must be >= 1, got {n_rows}")
    if n_rows is None or n_total <= n_rows:
        return np.arange(n_total)
    gen = np.random.default_rng(rng)
    return np.sort(gen.choice(n_total, size=n_rows, replace=False))


def _same_signedness(mults: Sequence[Multiplier]) -> int:
    if len(mults) == 0:
        raise QosError("no multipliers given")
    kinds = {m.signed for m in mults}
    if len(kinds) != 1:
        raise QosError("mix of signed and unsigned circuits: one layer's codes fit only one kind")
    return mults[0].offset


# ----------------------------------------------------------------------------- reference spread
def reference_spread(
    x_rows: Any,
    w_codes: Any,
    x_zero_point: int | float,
    w_zero_point: Any,
    n_rows: int | None = None,
    rng: Any = None,
) -> float:
    """``s_l``: std of the layer's exact integer outputs ``(X − z_x)·(W − z_w)ᵀ``.

    ``x_zero_point``: the activation zero point (a code); ``w_zero_point``: a scalar code
    (per-tensor) or one per output channel (shape (O,)). Codes are raw codes (signed
    codes negative), not table indices. Uses all rows unless ``n_rows`` is given.
    Population std (ddof=0) over every (row, output channel) element.
    """
    x = _as_array(x_rows)
    r, k = _rows_2d(x)
    w = _weights_2d(_integer_array(w_codes, "weight codes"), k).astype(np.float64)
    zw = np.asarray(w_zero_point, dtype=np.float64)
    if zw.ndim == 0:
        w = w - zw
    elif zw.shape == (w.shape[0],):
        w = w - zw[:, None]  # per-output-channel zero point
    else:
        raise QosError(f"w_zero_point must be a scalar or have shape ({w.shape[0]},), got {zw.shape}")
    rows = sample_rows(r, n_rows, rng)
    # Chunked with Chan's pairwise combination of (count, mean, M2): the full output can be
    # too large to hold, and a one-pass sum of squares would cancel when |mean| >> std.
    count, mean, m2 = 0, 0.0, 0.0
    step = max(1, _GATHER_CHUNK // (8 * max(w.shape[0], 1)))
    for i in range(0, rows.size, step):
        xc = _integer_array(x[rows[i:i + step]], "activation codes").astype(np.float64)
        y = (xc - float(x_zero_point)) @ w.T  # exact: integer values < 2**53
        c, mu = y.size, float(y.mean())
        m2c = float(((y - mu) ** 2).sum())
        delta = mu - mean
        tot = count + c
        mean += delta * c / tot
        m2 += m2c + delta * delta * count * c / tot
        count = tot
    return float(np.sqrt(m2 / count))


# ----------------------------------------------------------------------------- prediction
def predict_error_std_many(
    x_rows: Any,
    w_codes: Any,
    mults: Sequence[Multiplier],
    n_rows: int | None = 512,
    rng: Any = None,
) -> np.ndarray:
    """Predicted error std ``σ_{l,m}`` at the neuron output (integer accumulator units)
    for every circuit in ``mults`` (all of one signedness), sharing the histograms.

    Per sampled row i with activation histogram ``p_x(i)`` (over table indices, summing
    to 1) and the weight histogram ``p_w``:
    ``μ_i = Σ_ab E[a,b]·p_w[a]·p_x(i)[b]`` and ``σ_i² = Σ_ab (E[a,b] − μ_i)²·p_w[a]·p_x(i)[b] / K``;
    mixture ``σ² = [Σ_i (μ_i² + σ_i²) − (Σ_i μ_i)²/N]/N`` (computed in the algebraically
    identical, numerically stable form ``mean(σ_i²) + var(μ_i)``); returns ``K·σ``.
    Cost: O(M·256²) for the weight contraction plus two (N,256)@(256,M) products.
    """
    off = _same_signedness(mults)
    name = mults[0].name if len(mults) == 1 else f"the {'signed' if off else 'unsigned'} circuits"
    x = _as_array(x_rows)
    r, k = _rows_2d(x)
    wi = _table_index(w_codes, off, "weight codes", name).ravel()
    if wi.size == 0:
        raise QosError("w_codes must be a non-empty array of weight codes")
    # Sample before widening: traced layers can have 10^5 rows, only n_rows are used.
    xs = _table_index(x[sample_rows(r, n_rows, rng)], off, "activation codes", name)
    n = xs.shape[0]
    # Per-row activation histograms over the 256 table indices, in one bincount.
    flat = (xs + 256 * np.arange(n, dtype=np.int64)[:, None]).ravel()
    p_x = np.bincount(flat, minlength=256 * n).reshape(n, 256).astype(np.float64) / k
    p_w = np.bincount(wi, minlength=256).astype(np.float64) / wi.size
    errs = np.stack([m.error for m in mults]).astype(np.float64)      # (M, A=weight, B=activation)
    e1 = np.einsum("a,mab->mb", p_w, errs)                             # E_w[E | b]   (M, 256)
    e2 = np.einsum("a,mab->mb", p_w, errs * errs)                      # E_w[E² | b]  (M, 256)
    mu = p_x @ e1.T                                                    # μ_i          (N, M)
    var_term = np.clip(p_x @ e2.T - mu * mu, 0.0, None)                # K·σ_i²       (N, M)
    sigma2 = var_term.mean(axis=0) / k + mu.var(axis=0)
    return k * np.sqrt(np.clip(sigma2, 0.0, None))


def predict_error_std(
    x_rows: Any, w_codes: Any, mult: Multiplier, n_rows: int | None = 512, rng: Any = None
) -> float:
    """Predicted error std ``σ_{l,m}`` of one circuit (see :func:`predict_error_std_many`).

    The exact circuit predicts exactly 0.0.
    """
    return float(predict_error_std_many(x_rows, w_codes, [mult], n_rows=n_rows, rng=rng)[0])


# ----------------------------------------------------------------------------- measurement
def measure_error_std(
    x_rows: Any,
    w_codes: Any,
    mult: Multiplier,
    n_rows: int | None = 512,
    rng: Any = None,
    n_neurons: int | None = None,
) -> float:
    """Monte-Carlo check: std of ``acc_approx − acc_exact`` over the sampled rows × neurons.

    ``acc_approx[n, o] = Σ_k lut[w[o,k], x[n,k]]`` (as :func:`qos_compile.reference.approx_gemm_acc`)
    and ``acc_exact`` its exact counterpart; their difference is ``Σ_k E[w[o,k], x[n,k]]``,
    computed directly (int64, exact). Zero-point correction terms are identical in both
    outputs and cancel, so this is the error at the neuron output in accumulator units.
    Rows are sampled as in the prediction (same seed → same rows); ``n_neurons`` optionally
    subsamples output channels (drawn after the rows, from the same generator) for speed.
    """
    off = mult.offset
    x = _as_array(x_rows)
    r, k = _rows_2d(x)
    wi = _weights_2d(_table_index(w_codes, off, "weight codes", mult.name), k)
    gen = np.random.default_rng(rng)
    xs = _table_index(x[sample_rows(r, n_rows, gen)], off, "activation codes", mult.name)
    if n_neurons is not None:
        wi = wi[sample_rows(wi.shape[0], n_neurons, gen)]
    err_flat = np.ascontiguousarray(mult.error, dtype=np.int64).ravel()
    n, o = xs.shape[0], wi.shape[0]
    out = np.empty((n, o), dtype=np.int64)
    step = max(1, _GATHER_CHUNK // (n * k))
    for o0 in range(0, o, step):
        idx = wi[o0:o0 + step, None, :] * 256 + xs[None, :, :]        # (c, N, K) flat table index
        out[:, o0:o0 + step] = err_flat.take(idx).sum(axis=2).T
    return float(out.std())


# ----------------------------------------------------------------------------- agreement
def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as Spearman's correlation needs)."""
    order = np.argsort(a, kind="stable")
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = np.arange(a.size, dtype=np.float64)
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


def agreement(predicted: Any, measured: Any) -> dict[str, Any]:
    """How well predicted and measured error stds agree (JSON-ready dict for reports).

    Pairs where both are 0 (exact circuits) agree trivially and are counted in ``both_zero``;
    pairs where exactly one is 0 cannot be compared by ratio and are counted in ``one_zero``.
    On the remaining pairs: ``pearson_log``/``spearman_log`` (correlation of log values;
    None with fewer than 2 pairs or no spread), ``median_ratio`` (predicted/measured),
    ``worst_ratio`` (max of max(r, 1/r), ≥ 1) and ``within_2x`` (fraction with 0.5 ≤ r ≤ 2).
    """
    p = np.asarray(predicted, dtype=np.float64).ravel()
    m = np.asarray(measured, dtype=np.float64).ravel()
    if p.shape != m.shape:
        raise QosError(f"predicted ({p.size}) and measured ({m.size}) differ in length")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(m))) or (p < 0).any() or (m < 0).any():
        raise QosError("error stds must be finite and non-negative")
    both_zero = (p == 0) & (m == 0)
    one_zero = (p == 0) != (m == 0)
    pos = (p > 0) & (m > 0)
    ratio = p[pos] / m[pos]
    lp, lm = np.log(p[pos]), np.log(m[pos])
    return {
        "n": int(p.size),
        "n_compared": int(pos.sum()),
        "both_zero": int(both_zero.sum()),
        "one_zero": int(one_zero.sum()),
        "pearson_log": _pearson(lp, lm),
        "spearman_log": _pearson(_ranks(lp), _ranks(lm)) if pos.sum() >= 2 else None,
        "median_ratio": float(np.median(ratio)) if ratio.size else None,
        "worst_ratio": float(np.max(np.maximum(ratio, 1.0 / ratio))) if ratio.size else None,
        "within_2x": float(np.mean((ratio >= 0.5) & (ratio <= 2.0))) if ratio.size else None,
    }
