"""A multiplier table as an array: validation, the exact product table, and its hash.

The lowest module of ``multipliers``: ``metrics`` and ``multiplier`` both build on it.
Layout (``qos_compile.numerics``): ``lut[A, B]``, int32, shape (256, 256), port A = weight
code, port B = activation code, signed circuits indexed by ``code + 128``.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from ..errors import QosError
from ..numerics import INT32_MAX, INT32_MIN, LUT_SHAPE, table_codes

__all__ = ["exact_table", "validate_table", "table_sha256"]


def exact_table(signed: bool) -> np.ndarray:
    """The exact product table ``a*b`` in the table layout (int64)."""
    codes = table_codes(signed)
    return np.outer(codes, codes)


def validate_table(table: Any, what: str = "multiplier table") -> np.ndarray:
    """Check that ``table`` is a (256, 256) integer table within int32; return it as read-only int32.

    Raises QosError (one line) on a wrong shape, a non-integer dtype or values outside int32.
    """
    arr = np.asarray(table)
    if arr.shape != LUT_SHAPE:
        raise QosError(f"{what} must have shape (256, 256), got {tuple(arr.shape)}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise QosError(f"{what} must hold integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < INT32_MIN or int(arr.max()) > INT32_MAX):
        raise QosError(f"{what} has values outside int32 (min {int(arr.min())}, max {int(arr.max())})")
    out = np.ascontiguousarray(arr, dtype=np.int32).copy()
    out.flags.writeable = False
    return out


def table_sha256(lut: np.ndarray) -> str:
    """SHA-256 of the table as little-endian int32, row-major (the hash stored in checkpoints)."""
    return hashlib.sha256(np.ascontiguousarray(lut, dtype="<i4").tobytes()).hexdigest()
