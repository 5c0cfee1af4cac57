"""Numeric facts every backend shares: operand codes, table indexing, integer limits, conv geometry.

The numerics contract (``docs/design.md``; ``qos_compile.reference`` is its executable
definition): an 8x8 circuit is a table ``lut[A, B]`` of shape ``LUT_SHAPE`` (int32), port A
takes the weight code, port B the activation code. Unsigned circuits take codes 0..255 and
index the table with the code itself; signed circuits take codes -128..127 and index it with
``code + 128``. Accumulators are int32.

NumPy only (no torch, no tvm), so that every layer of the package can import it.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import QosError

__all__ = ["LUT_SHAPE", "INT32_MIN", "INT32_MAX", "FLOAT32_EXACT", "FLOAT64_EXACT", "code_range", "code_offset",
           "code_dtype", "table_codes", "pair", "conv_pads"]

#: Shape of every multiplier table: (port A = weight index, port B = activation index).
LUT_SHAPE = (256, 256)
#: The accumulator type's limits (every backend accumulates in int32).
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: Integers of magnitude below these are exact in float32 / float64 (sums of them too while
#: every partial sum stays below).
FLOAT32_EXACT = 2**24
FLOAT64_EXACT = 2**53


def code_range(signed: bool) -> tuple[int, int]:
    """Inclusive range of the 8-bit operand codes of a signed or unsigned circuit."""
    return (-128, 127) if signed else (0, 255)


def code_offset(signed: bool) -> int:
    """What to add to a code to get its table index (128 for signed circuits, else 0)."""
    return 128 if signed else 0


def code_dtype(signed: bool) -> str:
    """The natural 8-bit type of the codes (a NumPy and a TVM dtype name): int8 or uint8."""
    return "int8" if signed else "uint8"


def table_codes(signed: bool) -> np.ndarray:
    """The code of each table index 0..255, int64 (``table_codes(s)[code + code_offset(s)] == code``)."""
    return np.arange(256, dtype=np.int64) - code_offset(signed)


def pair(v: int | Sequence[int] | Any, what: str) -> tuple[int, int]:
    """Normalise a stride, dilation or kernel size: an integer (an int, a NumPy integer, any
    non-iterable with ``__index__``) becomes ``(v, v)``; a pair stays a pair; anything else is
    a QosError."""
    if isinstance(v, (int, np.integer)) or (hasattr(v, "__index__") and not hasattr(v, "__iter__")):
        return int(v), int(v)
    try:
        t = tuple(int(x) for x in v)
    except TypeError:
        raise QosError(f"{what} must be an int or a pair, got {v!r}") from None
    if len(t) != 2:
        raise QosError(f"{what} must be an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def conv_pads(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    """Normalise padding to (top, left, bottom, right), ONNX order; accepts int, (h, w) or 4 values."""
    if isinstance(padding, (int, np.integer)):
        p = int(padding)
        return p, p, p, p
    t = tuple(int(x) for x in padding)
    if len(t) == 2:
        return t[0], t[1], t[0], t[1]
    if len(t) == 4:
        return t  # type: ignore[return-value]
    raise QosError(f"padding must be an int, (h, w) or (top, left, bottom, right), got {padding!r}")
