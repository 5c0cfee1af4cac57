"""Structure of a multiplier table: exact, masked, low-rank, or none; found once, verified exactly.

Every backend that wants to compute a circuit faster than by table lookup asks this module
(NumPy only: the compiler needs no torch). A table is written as a sum of ``T`` separable
terms, ``denom * lut[a, b] = sum_t wterms[t, a] * xterms[t, b]`` (``a`` = weight index, ``b``
= activation index), and classified (``analyse``):

* ``exact``   - ``lut == a*b``: one term, ``code(a) * code(b)``.
* ``masked``  - ``lut == (a & mask) * b``: the circuit clears the low ``k`` bits of port A
  (two's complement for signed circuits), then multiplies exactly; one term on the masked
  weight codes (``mask_bits``, ``is_masked``).
* ``lowrank`` - the error table ``lut - a*b`` (or the table itself) has small exact rank:
  the exact product plus ``r`` integer factor pairs of the error table (basis rows or
  columns and their exact rational coefficients, scaled to integers by ``denom``), or
  ``rank(lut)`` factor pairs of the table when that needs fewer terms, as long as there are
  at most ``max_terms`` terms.
* ``general`` - everything else (no terms).

A factorisation is returned only after it reproduces all 65,536 table entries exactly in
integer arithmetic. ``integer_factors`` is the integer (``denom == 1``) view the compiler's
low-rank kernels use, and ``fits_rows`` the 16-bit condition of its table-row kernels.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import QosError
from ..numerics import code_range, table_codes
from .table import exact_table, table_sha256, validate_table

__all__ = ["KINDS", "MAX_DENOM", "MAX_BOUND_RATIO", "Structure", "Factors", "analyse", "clear_low_bits",
           "mask_bits", "is_masked", "integer_factors", "fits_rows"]

KINDS = ("exact", "masked", "lowrank", "general")
#: Largest common denominator accepted for rational factors (it scales every partial sum).
MAX_DENOM = 64
#: Largest accepted partial-sum bound of a factorization relative to the exact product's
#: (255*255 per position): beyond it float32 convolutions would have to be split so often
#: that the general kernel is faster (only mul8u_1A0M's factors are that large).
MAX_BOUND_RATIO = 8.0


@dataclass(frozen=True, eq=False)
class Structure:
    """The verified decomposition ``denom * lut[a, b] == sum_t wterms[t, a] * xterms[t, b]``.

    ``kind``: one of ``KINDS``. ``wterms``/``xterms``: (T, 256) int64 port-A (weight) /
    port-B (activation) factors, read-only; empty for ``general``. ``main_term``:
    ``xterms[0]`` is the activation code itself (term 0 is ``wterms[0](a) * code(b)``).
    ``rank``: exact rank of the error table; ``mask_bits``: ``k`` of a masked table, else 0.
    """

    kind: str
    signed: bool
    rank: int
    wterms: np.ndarray
    xterms: np.ndarray
    denom: int
    main_term: bool
    mask_bits: int

    @property
    def terms(self) -> int:
        """Number of separable terms; 0 for ``general``."""
        return int(self.wterms.shape[0])


@dataclass(frozen=True)
class Factors:
    """Integer factor tables of one circuit: ``lut == wterms.T @ xterms`` (both (T, 256) int64)."""

    wterms: np.ndarray
    xterms: np.ndarray

    @property
    def terms(self) -> int:
        """Number of separable terms T."""
        return int(self.wterms.shape[0])


# --------------------------------------------------------------------------- masked circuits
def clear_low_bits(codes: np.ndarray, k: int) -> np.ndarray:
    """``codes`` with their low ``k`` bits cleared (two's complement: -1 -> -2 for k = 1)."""
    return codes & ~((1 << k) - 1)


def mask_bits(lut: Any, signed: bool) -> int | None:
    """The smallest ``k`` in 0..8 with ``lut[a, b] == clear_low_bits(code(a), k) * code(b)`` on
    all 65,536 entries (0: the exact product), or None when the table is not masked."""
    t = np.asarray(validate_table(lut), dtype=np.int64)
    codes = table_codes(signed)
    for k in range(0, 9):
        if np.array_equal(t, np.outer(clear_low_bits(codes, k), codes)):
            return k
    return None


def is_masked(lut: Any, signed: bool) -> bool:
    """True when the table is masked (``mask_bits``, the exact product included) and its masked
    weights are themselves codes of the circuit (all but signed ``k = 8``, whose -256 is none),
    so an exact 8-bit product of ``lut[a, code 1]`` and the activation code computes it."""
    k = mask_bits(lut, signed)
    if k is None:
        return False
    lo, hi = code_range(signed)
    masked = clear_low_bits(table_codes(signed), k)
    return bool(masked.min() >= lo and masked.max() <= hi)


# --------------------------------------------------------------------------- low-rank factorisation
def _ro(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.int64)
    a.flags.writeable = False
    return a


def _independent_rows(m: np.ndarray, r: int, order: np.ndarray, lead: np.ndarray | None) -> np.ndarray | None:
    """``r`` linearly independent rows: ``lead`` (if given) first, then rows of ``m`` picked
    greedily in ``order`` (float64 Gram-Schmidt). Numerical misjudgement is harmless: the
    final factorization is verified exactly."""
    basis: list[np.ndarray] = []
    chosen: list[np.ndarray] = []
    candidates = ([lead] if lead is not None else []) + [m[i] for i in order]
    for row in candidates:
        v = row.astype(np.float64)
        norm = np.linalg.norm(v)
        if norm == 0.0:
            continue
        res = v.copy()
        for q in basis:  # twice for stability (re-orthogonalisation)
            res -= (q @ res) * q
        for q in basis:
            res -= (q @ res) * q
        rn = np.linalg.norm(res)
        if rn > 1e-7 * norm:
            basis.append(res / rn)
            chosen.append(row)
            if len(chosen) == r:
                return np.stack(chosen).astype(np.int64)
    return None


def _rational_coefficients(m: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, int] | None:
    """Integer ``c`` and ``d`` with ``c @ basis == d * m`` exactly, or None."""
    coef, *_ = np.linalg.lstsq(basis.T.astype(np.float64), m.T.astype(np.float64), rcond=None)
    coef = coef.T  # (256, r)
    d = 1
    for v in np.unique(np.round(coef, 9)):
        d = math.lcm(d, Fraction(float(v)).limit_denominator(MAX_DENOM).denominator)
        if d > MAX_DENOM:
            return None
    ci = np.rint(coef * d).astype(np.int64)
    if np.abs(ci).max(initial=0) * np.abs(basis).max(initial=0) * basis.shape[0] >= 2**62:
        return None
    if not np.array_equal(ci @ basis, d * m):
        return None
    return ci, d


def _factorizations(m: np.ndarray, r: int, lead: np.ndarray | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Candidate exact integer factorizations ``d * m == f.T @ g`` of rank ``r``: ``r`` basis
    rows (``g``, functions of the activation) or columns (``f``, functions of the weight)
    and their exact rational coefficients. With ``lead``, ``g[0] == lead`` (rows only)."""
    for transpose in ((False,) if lead is not None else (False, True)):
        mt = m.T if transpose else m
        mags = np.abs(mt).max(axis=1)
        _, first, counts = np.unique(mt, axis=0, return_index=True, return_counts=True)
        by_count = first[np.argsort(-counts, kind="stable")]
        for order in (np.argsort(mags, kind="stable"), by_count, np.arange(256)):
            basis = _independent_rows(mt, r, order, lead)
            if basis is None or (lead is not None and not np.array_equal(basis[0], lead)):
                continue
            sol = _rational_coefficients(mt, basis)
            if sol is None:
                continue
            coef, d = sol
            # mt = coef/d @ basis; with transpose, m = basis.T @ coef.T / d
            yield (basis, coef.T, d) if transpose else (coef.T, basis, d)


def _cost(wterms: np.ndarray, xterms: np.ndarray) -> float:
    """Bound on |partial sums| per accumulated position (smaller = fewer split convolutions)."""
    return sum(float(np.abs(f).max()) * float(g.max() - g.min()) for f, g in zip(wterms, xterms))


def _rank(m: np.ndarray) -> int:
    return int(np.linalg.matrix_rank(m.astype(np.float64)))


def _analyse(table: np.ndarray, signed: bool, max_terms: int) -> Structure:
    lut = table.astype(np.int64)
    codes = table_codes(signed)
    err = lut - exact_table(signed)
    if not err.any():
        return Structure("exact", signed, rank=0, wterms=_ro(codes[None]), xterms=_ro(codes[None]), denom=1,
                         main_term=True, mask_bits=0)
    rank = _rank(err)
    k = mask_bits(table, signed)          # >= 1 here: the table is not exact
    if k is not None:
        return Structure("masked", signed, rank=rank, wterms=_ro(clear_low_bits(codes, k)[None]),
                         xterms=_ro(codes[None]), denom=1, main_term=True, mask_bits=k)
    # Candidate classes in order of preference (fewest terms, then a code term first):
    # factors of the table led by the code, plain factors of the table, and the exact
    # product plus factors of the error table. The first class with an acceptable
    # candidate wins; within it the smallest partial-sum bound.
    limit = MAX_BOUND_RATIO * 255 * 255
    lut_rank = _rank(lut)
    classes: list[tuple[int, Callable[[], Iterator[tuple[np.ndarray, np.ndarray, int, bool]]]]] = []
    if 0 < lut_rank <= rank:
        if _rank(np.vstack([lut, codes[None]])) == lut_rank:
            classes.append((lut_rank, lambda: ((f, g, d, True) for f, g, d in _factorizations(lut, lut_rank,
                                                                                            lead=codes))))
        classes.append((lut_rank, lambda: ((f, g, d, False) for f, g, d in _factorizations(lut, lut_rank))))
    classes.append((rank + 1, lambda: ((np.concatenate([d * codes[None], f]), np.concatenate([codes[None], g]), d,
                                        True) for f, g, d in _factorizations(err, rank))))
    for terms, candidates in classes:
        if terms > max_terms:
            continue
        good = [c for c in candidates() if _cost(c[0], c[1]) <= limit]
        if not good:
            continue
        wt, xt, d, main = min(good, key=lambda c: _cost(c[0], c[1]))
        # the verification the module doc promises: every entry, integer arithmetic
        if np.array_equal(wt.T @ xt, d * lut):
            return Structure("lowrank", signed, rank=rank, wterms=_ro(wt), xterms=_ro(xt), denom=d,
                             main_term=main, mask_bits=0)
    empty = _ro(np.zeros((0, 256), dtype=np.int64))
    return Structure("general", signed, rank=rank, wterms=empty, xterms=empty, denom=1, main_term=False,
                     mask_bits=0)


def _one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """Single-threaded BLAS for the small (256 x 256) linear algebra of the analysis: extra
    BLAS threads gain nothing there and, on shared cores, spin-wait for ~100x longer."""
    try:
        from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


_CACHE: dict[tuple[str, bool, int], Structure] = {}   # by (table SHA-256, signed, max_terms)


def analyse(lut: Any, signed: bool, max_terms: int) -> Structure:
    """The verified structure of a (256, 256) table (see the module doc), cached by the table's
    SHA-256, ``signed`` and ``max_terms`` (the most terms a ``lowrank`` result may have)."""
    table = validate_table(lut)
    key = (table_sha256(table), bool(signed), int(max_terms))
    found = _CACHE.get(key)
    if found is None:
        with _one_blas_thread():
            found = _analyse(table, key[1], key[2])
        found = _CACHE.setdefault(key, found)       # atomic: racing threads share one result
    return found


def integer_factors(lut: Any, signed: bool, max_terms: int) -> Factors | None:
    """``lut == wterms.T @ xterms`` with integer factors of at most ``max_terms`` terms (exact,
    masked and ``denom == 1`` low-rank tables), re-checked on all 65,536 entries; else None."""
    s = analyse(lut, signed, max_terms)
    if s.kind == "general" or s.denom != 1 or s.terms > max_terms:
        return None
    f = Factors(np.asarray(s.wterms, dtype=np.int64), np.asarray(s.xterms, dtype=np.int64))
    if not np.array_equal(f.wterms.T @ f.xterms, np.asarray(lut, dtype=np.int64)):
        raise QosError("internal error: a table structure does not reproduce its table")
    return f


# --------------------------------------------------------------------------- 16-bit tables
def fits_rows(luts: Sequence[np.ndarray]) -> int | None:
    """The common ``bias`` that makes every table a 16-bit unsigned value (``0 <= lut + bias <=
    0xFFFF``; the smallest such bias, 0 for non-negative tables), or None if none does."""
    lo = min(int(np.min(t)) for t in luts)
    hi = max(int(np.max(t)) for t in luts)
    bias = -lo if lo < 0 else 0
    return bias if hi + bias <= 0xFFFF else None


def residual_rows(lut: np.ndarray, signed: bool) -> np.ndarray:
    """``lut[a, b] - code(a) * code(b)`` (int64): what a table adds to the exact product."""
    return np.asarray(lut, dtype=np.int64) - exact_table(signed).astype(np.int64)


def residual_column_classes(luts: Sequence[np.ndarray], signed: bool) -> np.ndarray:
    """(256,) uint8: per activation table index b, the class of its residual column
    (``residual_rows``): b and b' share a class iff their columns are equal in every table.
    Classes are numbered by first appearance. Evolved circuits often have few: the residual of
    mul8u_DG8 takes 29 distinct columns, of mul8u_C67 50, so a lookup by class needs a 32- or
    64-entry table where one by b needs 256."""
    cols = np.concatenate([residual_rows(t, signed) for t in luts], axis=0).T           # (256, rows)
    _, first, inv = np.unique(cols, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))                       # class ids by first appearance
    return order[np.asarray(inv).reshape(-1)].astype(np.uint8)


def fits_rows8(luts: Sequence[np.ndarray], signed: bool) -> bool:
    """Whether every row of every table's residual (``residual_rows``) spans at most 255: then
    ``residual - min(row)`` is one byte and the table is the exact product plus one byte plane."""
    return all(int(np.max(np.ptp(residual_rows(t, signed), axis=1))) <= 0xFF for t in luts)
