"""Structure-aware lowering: which kernel computes each approximate conv layer on a target.

Chosen per layer at compile time from ALL circuits the layer runs over the operating
points (the kernel is shared by the OPs; per-OP tensors switch at run time), and verified
on every one of their 65,536 table entries before it is used:

* ``masked``  - every circuit is "clear low bits of port A, then multiply exactly"
  (``multipliers.structure.is_masked``, the exact circuit included; then ``lut[a, b] ==
  lut[a, code 1] * code(b)``): an exact int8 conv on the weights read from the LUT's code-1
  column (``kernels.masked_conv2d``).
* ``lowrank`` - every table is a sum of at most ``lut_factors.MAX_TERMS`` separable
  integer terms (the exact product plus low-rank corrections, or the table's own factors):
  one exact conv over ``T`` factor terms, with the per-OP (T, 256) weight and activation
  factor tables as extra slots. Where the target has a multiply-add that sums several
  products per lane (``lut_dot.dot_isa``: AVX-512 VNNI, AVX-512 BW, AVX2, ARM dot product)
  the terms share its lanes (``lut_dot``, ``lowrank-T-ISA``); else the TE kernel
  (``lut_factors``, ``lowrank-T``).
* ``rows``    - the target has a byte permute (``lut_rows.rows_isa``: AVX-512 VBMI, NEON)
  and every table fits 16 bits after one common bias (``multipliers.structure.fits_rows``):
  the per-weight table-row kernel (``lut_rows``).
* ``gather``  - the fallback that always works: the scheduled TE lookup conv
  (``kernels.approx_conv2d``).

Masked wins whenever it fits (it is the exact conv); otherwise the cheapest kernel that
fits by ``KERNEL_COST`` (time / exact int8 conv time, measured with ``python -m
qos_compile.bench.kernels``), which a target file's ``[kernel_costs]`` overrides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import QosError
from ..multipliers.structure import fits_rows, is_masked
from . import lut_factors
from .lut_dot import DOT_ISAS, dot_isa, groups_of
from .lut_rows import rows_isa

LOWERINGS = ("masked", "lowrank", "rows", "gather")
#: Kernel time / exact int8 conv time over ResNet-20's convs, measured on the x86-64 host
#: (AVX-512 VBMI + VNNI, 1 thread; ``python -m qos_compile.bench.kernels``): ``lowrank`` is
#: per factor term (TE kernel), ``dot`` per term group (one multiply-add per tap and vector,
#: ``lut_dot``). A target file's ``[kernel_costs]`` replaces any of them with its own
#: measurement (``targets.Target.kernel_costs``).
KERNEL_COST = {"lowrank": 1.05, "dot": 0.45, "rows": 1.35, "gather": 5.7}


@dataclass(frozen=True)
class ConvLowering:
    """The kernel of one approximate conv layer: ``kind`` in LOWERINGS (+ rows ISA and bias)."""

    kind: str
    isa: str | None = None
    bias: int = 0
    why: str = ""
    terms: int = 0                # lowrank: factor terms T
    dtype: str = ""               # lowrank: operand type of the factors

    def describe(self) -> str:
        """Short label for logs, reports and the manifest."""
        if self.kind == "rows":
            return f"rows-{self.isa}"
        if self.kind == "lowrank":
            return f"lowrank-{self.terms}" + (f"-{self.isa}" if self.isa else "")
        return self.kind

    @property
    def slot_terms(self) -> int:
        """Rows of a low-rank layer's per-OP factor tables: ``terms``, rounded up to whole
        groups of the dot-product ISA (zero terms fill them)."""
        if self.kind != "lowrank":
            return 0
        return groups_of(self.terms, self.isa) * DOT_ISAS[self.isa].group if self.isa else self.terms


def choose_conv_lowering(luts: Sequence[np.ndarray], signed: bool, features: frozenset[str],
                         allow: Sequence[str] = LOWERINGS, taps: int = 1,
                         costs: dict[str, float] | None = None) -> ConvLowering:
    """The kernel of a conv layer whose circuits (over all OPs) are ``luts``, on a CPU with
    ``features``: masked where every circuit is masked (it IS the exact conv), else the
    cheapest that fits by ``KERNEL_COST`` updated with the target's ``costs``.

    ``taps``: products per output (C/groups * kh * kw), for the low-rank overflow check.
    ``allow`` restricts the choice (tests, benchmarks and ``--lowering`` force one): then
    the first allowed kind that fits wins, ``gather`` last (it always fits).
    """
    if not luts:
        raise QosError("a layer needs at least one circuit table")
    bad = [k for k in allow if k not in LOWERINGS]
    if bad:
        raise QosError(f"unknown lowering {bad[0]!r} (one of {', '.join(LOWERINGS)})")
    if "masked" in allow and all(is_masked(t, signed) for t in luts):
        return ConvLowering("masked", why="every circuit masks port A, then multiplies exactly")
    cost = {**KERNEL_COST, **(costs or {})}
    fits: list[tuple[float, ConvLowering]] = []
    if "lowrank" in allow:
        lr = lut_factors.layer_terms(luts, signed, taps)
        if lr is not None:
            t, dt = lr
            dot = dot_isa(frozenset(features), dt)
            if dot is not None:
                fits.append((cost["dot"] * groups_of(t, dot), ConvLowering(
                    "lowrank", isa=dot, terms=t, dtype=dt,
                    why=f"{t} {dt} factor term(s) of every table, {DOT_ISAS[dot].group} per {dot} multiply-add")))
            else:
                fits.append((cost["lowrank"] * t, ConvLowering(
                    "lowrank", terms=t, dtype=dt, why=f"exact conv over {t} {dt} factor term(s) of every table")))
    isa = rows_isa(frozenset(features))
    if "rows" in allow and isa is not None:
        bias = fits_rows(luts)
        if bias is not None:
            fits.append((cost["rows"], ConvLowering("rows", isa=isa, bias=bias,
                                                    why=f"{isa} byte permute, tables fit 16 bits")))
    if "gather" in allow:
        fits.append((cost["gather"], ConvLowering("gather", why="the cheapest kernel that fits")))
    if not fits:
        raise QosError(f"none of the lowerings {', '.join(allow)} fits this layer on a CPU with "
                       f"features {', '.join(sorted(features)) or 'none'}")
    if set(allow) != set(LOWERINGS):         # forced: the asked-for kind wherever it fits
        fits = [f for f in fits if f[1].kind != "gather"] or fits
    return min(fits, key=lambda f: f[0])[1]
