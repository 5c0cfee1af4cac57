"""Structure-aware lowering: which kernel computes each approximate conv layer on a target.

Chosen per layer at compile time from ALL circuits the layer runs over the operating
points (the kernel is shared by the OPs; the LUT argument switches at run time), and
verified on every one of their 65,536 table entries before it is used:

* ``masked``  - every circuit is "clear low bits of port A, then multiply exactly"
  (``lut[a, b] == lut[a, code 1] * code(b)``, the exact circuit included): an exact int8
  conv on the weights read from the LUT's code-1 column (``kernels.masked_conv2d``).
* ``rows``    - the target has a byte permute (``lut_rows.rows_isa``: AVX-512 VBMI, NEON)
  and every table fits 16 bits after one common bias: the per-weight table-row kernel
  (``lut_rows``).
* ``gather``  - the fallback that always works: the scheduled TE lookup conv
  (``kernels.approx_conv2d``).

Low-rank circuits (exact product plus a few separable error terms, the PyTorch
emulator's ``lowrank`` strategy) take the ``rows`` kernel here: their factors differ per
circuit, and the compiled kernel sees only the LUT of the current OP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import QosError
from .lut_rows import fits_rows, rows_isa

LOWERINGS = ("masked", "rows", "gather")
#: Rows ISAs picked without being asked: measured faster than the gather kernel here. NEON's
#: rows kernel is bit-exact but ran 13x the exact conv's EMULATED time under qemu (which runs
#: each tbl/tbx through a helper call) while gather ran 0.6x, and no board was available to
#: time it for real: on aarch64 it is used when asked for (``--lowering rows``).
AUTO_ROWS = ("avx512vbmi",)


@dataclass(frozen=True)
class ConvLowering:
    """The kernel of one approximate conv layer: ``kind`` in LOWERINGS (+ rows ISA and bias)."""

    kind: str
    isa: str | None = None
    bias: int = 0
    why: str = ""

    def describe(self) -> str:
        """Short label for logs, reports and the manifest."""
        return f"rows-{self.isa}" if self.kind == "rows" else self.kind


def _codes(signed: bool) -> np.ndarray:
    return np.arange(-128, 128, dtype=np.int64) if signed else np.arange(256, dtype=np.int64)


def is_masked(lut: np.ndarray, signed: bool) -> bool:
    """True when ``lut[a, b] == lut[a, code 1] * code(b)`` for all 65,536 entries and the
    code-1 column is itself a valid weight code (so the exact conv can consume it)."""
    t = np.asarray(lut, dtype=np.int64)
    if t.shape != (256, 256):
        raise QosError(f"a LUT must be (256, 256), got {t.shape}")
    codes = _codes(signed)
    col = t[:, int(np.nonzero(codes == 1)[0][0])]
    lo, hi = (-128, 127) if signed else (0, 255)
    if col.min() < lo or col.max() > hi:
        return False
    return bool(np.array_equal(t, np.outer(col, codes)))


def choose_conv_lowering(luts: Sequence[np.ndarray], signed: bool, features: frozenset[str],
                         allow: Sequence[str] = LOWERINGS) -> ConvLowering:
    """The fastest verified kernel for a conv layer whose circuits (over all OPs) are ``luts``.

    ``allow`` restricts the choice (tests, benchmarks and ``--lowering`` force one); ``gather``
    always fits. A rows ISA outside AUTO_ROWS is used only when the choice is restricted.
    """
    if not luts:
        raise QosError("a layer needs at least one circuit table")
    bad = [k for k in allow if k not in LOWERINGS]
    if bad:
        raise QosError(f"unknown lowering {bad[0]!r} (one of {', '.join(LOWERINGS)})")
    if "masked" in allow and all(is_masked(t, signed) for t in luts):
        return ConvLowering("masked", why="every circuit masks port A, then multiplies exactly")
    isa = rows_isa(frozenset(features))
    if "rows" in allow and isa is not None and (isa in AUTO_ROWS or set(allow) != set(LOWERINGS)):
        bias = fits_rows(luts)
        if bias is not None:
            return ConvLowering("rows", isa=isa, bias=bias, why=f"{isa} byte permute, tables fit 16 bits")
    if "gather" not in allow:
        raise QosError(f"none of the lowerings {', '.join(allow)} fits this layer on a CPU with "
                       f"features {', '.join(sorted(features)) or 'none'}")
    why = ("no byte permute on this target" if isa is None else
           f"{isa} rows kernel only when asked for" if isa not in AUTO_ROWS else "a table does not fit 16 bits")
    return ConvLowering("gather", why=why)
