"""How to emulate one multiplier circuit fast: strategy analysis, done once per table.

A table is written as a sum of ``T`` separable terms,
``denom * lut[a, b] = sum_t wterms[t, a] * xterms[t, b]`` (``a`` = weight index, ``b`` =
activation index), and emulated with ordinary float convolutions over the transformed
operands ``wterms[t][w]`` and ``xterms[t][x]`` when that is cheap:

* ``exact``   - ``lut == a*b``: one term, ``code(a) * code(b)``.
* ``masked``  - ``lut == (a & mask) * b`` (low weight bits cleared, two's complement
  for signed circuits): one term on masked weight codes.
* ``lowrank`` - the error table ``lut - a*b`` (or the table itself) has small exact rank:
  the exact product plus ``r`` integer factor pairs of the error table (basis rows or
  columns and their exact rational coefficients, scaled to integers by ``denom``), or
  ``rank(lut)`` factor pairs of the table when that needs fewer terms (the three signed
  circuits of table rank 1 become a single convolution), as long as the number of terms
  stays below what the general kernel costs on this machine (``max_lowrank_terms``).
* ``general`` - everything else: the C table-lookup kernel (``kernels``).

A plan is used only after it reproduces all 65,536 table entries exactly in integer
arithmetic. Whether the float convolutions that evaluate it are exact for a given
layer (all partial sums integers below 2**24 in float32) is checked per call in
``functional``, which splits or widens the convolution when the bound fails.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import QosError
from ..multipliers.multiplier import Multiplier, code_offset, exact_table, table_sha256, validate_table
from . import kernels

STRATEGIES = ("exact", "masked", "lowrank", "general")
#: Largest common denominator accepted for rational factors (it scales every partial sum).
MAX_DENOM = 64
#: Largest accepted partial-sum bound of a factorization relative to the exact product's
#: (255*255 per position): beyond it float32 convolutions would have to be split so often
#: that the general kernel is faster (only mul8u_1A0M's factors are that large).
MAX_BOUND_RATIO = 8.0


@dataclass(frozen=True, eq=False)
class EmulationPlan:
    """The verified decomposition ``denom * lut[a, b] == sum_t wterms[t, a] * xterms[t, b]``.

    ``wterms``/``xterms``: (T, 256) int64 port-A (weight) / port-B (activation) factors,
    read-only; empty for the general strategy. ``main_term``: ``xterms[0]`` is the
    activation code itself (term 0 is ``wterms[0](a) * code(b)``), so weight centring can
    be folded into it.
    ``rank``: exact rank of the error table; ``table``: the int32 table (general strategy).
    """

    strategy: str
    signed: bool
    rank: int
    wterms: np.ndarray
    xterms: np.ndarray
    denom: int
    main_term: bool
    mask_bits: int
    table: np.ndarray
    sha256: str

    @property
    def offset(self) -> int:
        """Table index of code 0."""
        return code_offset(self.signed)

    @property
    def terms(self) -> int:
        """Number of stacked convolution terms; 0 for the general kernel."""
        return self.wterms.shape[0]

    def describe(self) -> str:
        """One line for logs and reports."""
        if self.strategy == "masked":
            return f"masked (weight low {self.mask_bits} bits cleared)"
        if self.strategy == "lowrank":
            pairs = self.terms - self.main_term
            main = "code term + " if self.main_term else ""
            return f"lowrank ({main}{pairs} factor pair{'s' * (pairs != 1)}, denom {self.denom})"
        if self.strategy == "general":
            return f"general (error rank {self.rank})"
        return self.strategy


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


def _mask_bits(lut: np.ndarray, codes: np.ndarray) -> int | None:
    for k in range(1, 9):
        masked = codes & ~((1 << k) - 1)
        if np.array_equal(lut, np.outer(masked, codes)):
            return k
    return None


def _rank(m: np.ndarray) -> int:
    return int(np.linalg.matrix_rank(m.astype(np.float64)))


def max_lowrank_terms() -> int:
    """Most stacked convolution terms for which a low-rank plan beats the general path here.

    Measured on ResNet-20 (batch 32, 2 cores, AVX-512): every term costs ~15-20 ms of
    float32 convolution and expansion; the AVX-512 VBMI lookup kernel costs ~65 ms over
    the exact plan (break-even at 4 terms), the portable C kernel ~5x that, and the
    torch gather fallback ~100x that.
    """
    if kernels.simd_enabled():
        return 4
    return 16 if kernels.load() is not None else 64


def _analyse(table: np.ndarray, signed: bool, sha: str, max_terms: int) -> EmulationPlan:
    lut = table.astype(np.int64)
    codes = np.arange(256, dtype=np.int64) - code_offset(signed)
    err = lut - exact_table(signed)
    frozen = np.array(table, dtype=np.int32)
    frozen.flags.writeable = False
    common = dict(signed=signed, table=frozen, sha256=sha)
    if not err.any():
        return EmulationPlan("exact", rank=0, wterms=_ro(codes[None]), xterms=_ro(codes[None]), denom=1,
                             main_term=True, mask_bits=0, **common)
    rank = _rank(err)
    k = _mask_bits(lut, codes)
    if k is not None:
        return EmulationPlan("masked", rank=rank, wterms=_ro((codes & ~((1 << k) - 1))[None]),
                             xterms=_ro(codes[None]), denom=1, main_term=True, mask_bits=k, **common)
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
            return EmulationPlan("lowrank", rank=rank, wterms=_ro(wt), xterms=_ro(xt), denom=d, main_term=main,
                                 mask_bits=0, **common)
    empty = np.zeros((0, 256), dtype=np.int64)
    return EmulationPlan("general", rank=rank, wterms=_ro(empty), xterms=_ro(empty), denom=1, main_term=False,
                         mask_bits=0, **common)


_PLANS: dict[tuple[str, bool, int], EmulationPlan] = {}  # by (table SHA-256, signed, max_terms)


def _one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """Single-threaded BLAS for the small (256 x 256) linear algebra of the analysis: extra
    BLAS threads gain nothing there and, on shared cores, spin-wait for ~100x longer."""
    try:
        from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def plan_for(lut: Multiplier | np.ndarray | torch.Tensor, signed: bool | None = None,
             max_terms: int | None = None) -> EmulationPlan:
    """The verified emulation plan of a circuit or table (cached by SHA-256 and signedness).

    ``signed`` is required for a bare table and must agree with a Multiplier's;
    ``max_terms``: most convolution terms of a low-rank plan (default: what pays off with
    this machine's kernels, ``max_lowrank_terms()``).
    """
    if isinstance(lut, Multiplier):
        if signed is not None and signed != lut.signed:
            raise QosError(f"signed={signed} contradicts circuit {lut.name}")
        table, signed, sha = lut.lut, lut.signed, lut.sha256
    else:
        if signed is None:
            raise QosError("pass signed=True/False with a bare multiplier table")
        if isinstance(lut, torch.Tensor):
            lut = lut.detach().cpu().numpy()
        table = validate_table(lut)
        sha = table_sha256(table)
    key = (sha, bool(signed), max_lowrank_terms() if max_terms is None else int(max_terms))
    plan = _PLANS.get(key)
    if plan is None:
        with _one_blas_thread():
            plan = _PLANS[key] = _analyse(table, key[1], sha, key[2])
    return plan


_forced = threading.local()


def forced_strategy() -> str | None:
    """The strategy override of this thread (see ``force_strategy``), or None."""
    return getattr(_forced, "name", None)


@contextlib.contextmanager
def force_strategy(name: str | None) -> Iterator[None]:
    """Route every table through one path, for tests and the benchmark.

    ``"general"``: the C kernel (or its torch fallback); ``"lookup"``: the straightforward
    chunked per-element ``lut[w, x]`` gather in torch; None: each plan's own strategy.
    """
    if name not in (None, "general", "lookup"):
        raise QosError(f"unknown forced strategy {name!r}; use 'general', 'lookup' or None")
    old = forced_strategy()
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = old
