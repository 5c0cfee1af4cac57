"""Operating points from scaled tolerances and one k-means over all OPs (method step 5).

Layout conventions (used by every array here):

* ``sigma_pred`` (L, M): predicted error std of circuit m in layer l (accumulator units);
* ``tolerance`` (L,): ``T_l = |σ_l|·s_l`` (see :func:`layer_tolerance`);
* ratio matrices are **scale-major**: row ``s·L + l`` is OP (scale) s, layer l, so
  ``r.reshape(S, L, M)[s, l]`` is one (OP, layer) row.

The exact circuit is always a candidate (its σ is 0, so it fits every row), so every
cluster can fall back to it. Rows whose cluster circuit does not fit them (r > 1) are
reported as misfits, never hidden. OPs come out ordered from the most accurate (highest
relative power) to the cheapest; when the clustering makes a larger scale cost more
than a smaller one, the OPs are re-sorted by power and ``op_order`` records it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import QosError

__all__ = [
    "DEFAULT_SCALES",
    "OperatingPointResult",
    "compress_ratios",
    "layer_tolerance",
    "ratio_matrix",
    "select_operating_points",
]

DEFAULT_SCALES: tuple[float, ...] = (0.3, 1.0, 2.0)
_EPS = 1e-6    # the method's guard against a zero tolerance
_N_INIT = 10   # fixed k-means restarts (sklearn's "auto" could change between versions)


def layer_tolerance(agn_sigma: Any, spread: Any) -> np.ndarray:
    """``T_l = |σ_l|·s_l`` from the learned AGN noise scales and the reference spreads."""
    sig = np.abs(np.asarray(agn_sigma, dtype=np.float64))
    spr = np.asarray(spread, dtype=np.float64)
    if sig.shape != spr.shape or sig.ndim != 1:
        raise QosError(f"AGN sigmas {sig.shape} and spreads {spr.shape} must be equal-length vectors")
    if not (np.all(np.isfinite(sig)) and np.all(np.isfinite(spr))) or (spr < 0).any():
        raise QosError("AGN sigmas and spreads must be finite, spreads non-negative")
    return sig * spr


def _check_inputs(sigma_pred: Any, tolerance: Any, scales: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sig = np.asarray(sigma_pred, dtype=np.float64)
    tol = np.asarray(tolerance, dtype=np.float64)
    sc = np.asarray(scales, dtype=np.float64)
    if sig.ndim != 2 or sig.shape[0] < 1 or sig.shape[1] < 1:
        raise QosError(f"sigma_pred must be a non-empty (layers, circuits) matrix, got shape {sig.shape}")
    if tol.shape != (sig.shape[0],):
        raise QosError(f"tolerance must have one value per layer ({sig.shape[0]}), got shape {tol.shape}")
    if sc.ndim != 1 or sc.size < 1:
        raise QosError(f"scales must be a non-empty list, got {scales!r}")
    if not np.all(np.isfinite(sig)) or (sig < 0).any():
        raise QosError("predicted error stds must be finite and non-negative")
    if not np.all(np.isfinite(tol)) or (tol < 0).any():
        raise QosError("tolerances must be finite and non-negative")
    if not np.all(np.isfinite(sc)) or (sc <= 0).any():
        raise QosError(f"scales must be positive, got {list(sc)}")
    return sig, tol, sc


def ratio_matrix(sigma_pred: Any, tolerance: Any, scales: Sequence[float] = DEFAULT_SCALES) -> np.ndarray:
    """``r[s·L + l, m] = σ_{l,m} / (scales[s]·T_l + 1e-6)`` (scale-major rows), shape (S·L, M).

    Circuit m fits (OP s, layer l) when the ratio is <= 1.
    """
    sig, tol, sc = _check_inputs(sigma_pred, tolerance, scales)
    denom = sc[:, None] * tol[None, :] + _EPS                   # (S, L)
    return (sig[None, :, :] / denom[:, :, None]).reshape(sc.size * tol.size, sig.shape[1])


def compress_ratios(r: Any) -> np.ndarray:
    """Keep ratios <= 1, map r > 1 to ``1 + log r`` (continuous at 1, tames huge misfits)."""
    r = np.asarray(r, dtype=np.float64)
    return np.where(r <= 1.0, r, 1.0 + np.log(np.maximum(r, 1.0)))


@dataclass(frozen=True)
class OperatingPointResult:
    """The chosen circuits per (OP, layer) and how they were found.

    OP index ``j`` in every field is the final order (most accurate first); it came from
    ``scales[op_order[j]]``. Circuit indices are columns of the caller's ``sigma_pred``.

    * ``assign`` (S, L) int: circuit of layer l in OP j;
    * ``circuits``: sorted distinct circuits used (at most ``n``);
    * ``misfits``: (op, layer, ratio) for every row whose circuit has r > 1 there;
    * ``scales`` (S,): scale of each OP, ``op_order`` (S,): its position in the input scales;
    * ``op_relative_power`` (S,): Σ_l w_l·P(m)/P(exact) with w_l the MAC shares (uniform
      without ``macs``), the key the OPs are sorted by;
    * ``ratios`` (S·L, M): raw ratio matrix, scale-major in the final OP order;
    * ``labels`` (S·L,): k-means cluster of each row (same order);
    * ``candidates``: circuits that entered k-means (fit some row, plus the exact one);
    * ``cluster_circuits`` (k,): circuit chosen for each cluster; ``centroids`` (k, len(candidates)).
    """

    assign: np.ndarray
    circuits: np.ndarray
    misfits: list[tuple[int, int, float]]
    scales: np.ndarray
    op_order: np.ndarray
    op_relative_power: np.ndarray
    ratios: np.ndarray
    labels: np.ndarray
    candidates: np.ndarray
    cluster_circuits: np.ndarray
    centroids: np.ndarray

    @property
    def reordered(self) -> bool:
        """True when clustering broke the scale order and OPs were re-sorted by power."""
        return bool(np.any(self.op_order != np.arange(self.op_order.size)))


def select_operating_points(
    sigma_pred: Any,
    tolerance: Any,
    scales: Sequence[float],
    power: Any,
    n: int = 4,
    *,
    exact_index: int,
    seed: int = 0,
    macs: Any = None,
    names: Sequence[str] | None = None,
) -> OperatingPointResult:
    """Pick at most ``n`` circuits for all OPs together and assign one to every (OP, layer).

    ``scales``: tolerance scale per OP (e.g. :data:`DEFAULT_SCALES`; larger = cheaper);
    ``power`` (M,): each circuit's power (any unit, e.g. mW; NaN allowed only for circuits
    that fit no row); ``exact_index`` (keyword-only, required): column of the exact circuit;
    ``macs`` (L,): per-layer MAC counts, used only to order OPs by relative power (uniform
    weights when None); ``names``: circuit names for messages.
    Deterministic for a given ``seed`` (KMeans random_state, fixed n_init).
    """
    from sklearn.cluster import KMeans  # heavy import, only needed here

    r = ratio_matrix(sigma_pred, tolerance, scales)
    sc = np.asarray(scales, dtype=np.float64)
    s_count, n_layers, m_count = sc.size, np.asarray(tolerance).size, r.shape[1]
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise QosError(f"n (the number of circuits) must be a positive integer, got {n!r}")
    if not isinstance(exact_index, (int, np.integer)) or not 0 <= exact_index < m_count:
        raise QosError(f"exact_index {exact_index!r} is not a circuit column (0..{m_count - 1})")
    pw = np.asarray(power, dtype=np.float64)
    if pw.shape != (m_count,):
        raise QosError(f"power must have one value per circuit ({m_count}), got shape {pw.shape}")
    w = np.ones(n_layers) if macs is None else np.asarray(macs, dtype=np.float64)
    if w.shape != (n_layers,) or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise QosError(f"macs must be {n_layers} non-negative counts with a positive sum")
    label = (lambda m: f"circuit {names[m]}") if names is not None else (lambda m: f"circuit #{m}")

    # Candidates: circuits fitting at least one row, and always the exact one (the fallback).
    fits_any = (r <= 1.0).any(axis=0)
    fits_any[exact_index] = True
    cand = np.flatnonzero(fits_any)
    for m in cand:
        if not np.isfinite(pw[m]) or pw[m] < 0:
            raise QosError(f"{label(m)} has no usable power figure; the power model needs it")
    if not pw[exact_index] > 0:
        raise QosError(f"the exact circuit ({label(exact_index)}) must have a positive power")

    feats = compress_ratios(r[:, cand])
    k = int(min(n, np.unique(feats, axis=0).shape[0]))
    km = KMeans(n_clusters=k, n_init=_N_INIT, random_state=seed).fit(feats)
    labels = km.labels_.astype(np.int64)
    centroids = km.cluster_centers_

    # Per centroid: the lowest-power candidate whose centroid ratio fits (ties: the more
    # accurate one, i.e. the smaller centroid ratio, then the lower index); else exact.
    cluster_circuits = np.empty(k, dtype=np.int64)
    for c in range(k):
        ok = np.flatnonzero(centroids[c] <= 1.0)
        if ok.size == 0:
            cluster_circuits[c] = exact_index
            continue
        order = np.lexsort((cand[ok], centroids[c][ok], pw[cand[ok]]))
        cluster_circuits[c] = cand[ok[order[0]]]

    assign = cluster_circuits[labels].reshape(s_count, n_layers)

    # Order OPs by relative power, most accurate (most power) first; stable, so ties keep
    # the given scale order.
    rel = (pw[assign] * (w / w.sum())[None, :]).sum(axis=1) / pw[exact_index]
    op_order = np.argsort(-rel, kind="stable")

    assign = assign[op_order]
    r_ops = r.reshape(s_count, n_layers, m_count)[op_order]
    labels = labels.reshape(s_count, n_layers)[op_order].reshape(-1)
    row_r = np.take_along_axis(r_ops, assign[:, :, None], axis=2)[:, :, 0]      # (S, L)
    misfits = [(int(j), int(l), float(row_r[j, l])) for j, l in zip(*np.nonzero(row_r > 1.0))]
    return OperatingPointResult(
        assign=assign,
        circuits=np.unique(assign),
        misfits=misfits,
        scales=sc[op_order],
        op_order=op_order,
        op_relative_power=rel[op_order],
        ratios=r_ops.reshape(s_count * n_layers, m_count),
        labels=labels,
        candidates=cand,
        cluster_circuits=cluster_circuits,
        centroids=centroids,
    )
