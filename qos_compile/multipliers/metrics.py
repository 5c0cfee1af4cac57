"""Error metrics of an 8x8 multiplier table, with EvoApproxLib's conventions.

Let ``e = approx - exact`` over all N = 65,536 operand pairs (exact = a*b as an
integer). Then

* ``mae`` = mean |e|, ``wce`` = max |e|, ``mse`` = mean e^2 (units of the product, "lsb");
* ``mae_pct`` / ``wce_pct`` are ``mae`` / ``wce`` as a percentage of 2^16, the 16-bit output
  range, **for signed circuits too** (that is how EvoApprox publishes them);
* ``mre_pct`` / ``wcre_pct`` are the mean / max of |e| / |exact| * 100 over the pairs with
  ``exact != 0`` only: pairs with a zero product are left out of both numerator and
  denominator (EvoApprox's convention; it ignores circuits that output non-zero for a
  zero operand, see docs/design.md, "Odd circuits");
* ``ep_pct`` = share of pairs with ``e != 0``, in %;
* ``mean_error`` = mean e (bias: > 0 means the circuit overestimates), ``std_error`` =
  population standard deviation of e (ddof = 0).

These reproduce every published EvoApprox figure to its published number of digits,
except for six known rounding quirks of the publisher (docs/design.md, "The publisher's
rounding quirks"; tests/test_metrics.py checks them).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .table import exact_table, validate_table

#: Number of operand pairs of an 8x8 multiplier.
N_PAIRS = 256 * 256
#: Denominator of the percentage metrics ``mae_pct`` and ``wce_pct`` (16-bit output range).
OUTPUT_RANGE = 2**16


@dataclass(frozen=True)
class Metrics:
    """Error metrics of one table; see the module docstring for the exact definitions."""

    mae: float
    mae_pct: float
    wce: float
    wce_pct: float
    mre_pct: float
    wcre_pct: float
    ep_pct: float
    mse: float
    mean_error: float
    std_error: float

    def to_dict(self) -> dict[str, float]:
        """The metrics as a plain ``{field: float}`` dict (JSON-ready), in field order."""
        return asdict(self)


def compute_metrics(lut: Any, signed: bool) -> Metrics:
    """Compute the error metrics of a (256, 256) table ``lut[A, B]`` (signed: index = code + 128).

    Raises QosError if ``lut`` is not a valid table (see ``validate_table``).
    """
    table = validate_table(lut)
    exact = exact_table(signed)
    err = table.astype(np.int64) - exact
    abs_err = np.abs(err)

    # Sums are exact integers; Python ints avoid any int64 overflow in the variance
    # (N * sum(e^2) can exceed 2^63 for a table with errors near the int32 limits).
    s1 = int(err.sum(dtype=np.int64))
    s_abs = int(abs_err.sum(dtype=np.int64))
    wce = int(abs_err.max())
    if wce < 2**27:  # e^2 < 2^54, so a row of 256 squares sums below 2^62: int64 is exact
        s2 = sum(int(v) for v in (err * err).sum(axis=1, dtype=np.int64))
    else:  # errors near the int32 limits: square in Python ints
        s2 = sum(v * v for v in err.ravel().tolist())

    mae = s_abs / N_PAIRS
    mse = s2 / N_PAIRS
    mean_error = s1 / N_PAIRS
    # Population variance as an exact fraction, then one rounding: no cancellation error.
    std_error = math.sqrt((N_PAIRS * s2 - s1 * s1) / (N_PAIRS * N_PAIRS))

    nonzero = exact != 0  # EvoApprox's MRE/WCRE ignore pairs with a zero product
    rel = abs_err[nonzero] / np.abs(exact[nonzero])
    mre_pct = float(rel.mean() * 100.0) if rel.size else 0.0
    wcre_pct = float(rel.max() * 100.0) if rel.size else 0.0

    return Metrics(
        mae=mae,
        mae_pct=mae / OUTPUT_RANGE * 100.0,
        wce=float(wce),
        wce_pct=wce / OUTPUT_RANGE * 100.0,
        mre_pct=mre_pct,
        wcre_pct=wcre_pct,
        ep_pct=int(np.count_nonzero(err)) / N_PAIRS * 100.0,
        mse=mse,
        mean_error=mean_error,
        std_error=std_error,
    )
