"""Structure-aware lowering: which kernel variant computes each approximate conv layer on a target.

Chosen per layer at compile time from ALL circuits the layer runs over the operating
points (the kernel is shared by the OPs; per-OP tensors switch at run time), and verified
on every one of their 65,536 table entries before it is used. The candidates are the
entries of the registry ``variants.VARIANTS`` of the layer's datatype that the target can
run (``Variant.requires``) and that compute its tables (``Variant.fits``):

* ``masked``  - every circuit is "clear low bits of port A, then multiply exactly"
  (``multipliers.structure.is_masked``, the exact circuit included): an exact int8 conv on
  the weights read from the LUT's code-1 column (``kernels.masked_conv2d``).
* ``lowrank-tT`` / ``ISA-dot-tT`` - every table is a sum of ``T`` <= ``lut_factors.MAX_TERMS``
  separable integer terms (masked and exact circuits are one term): one exact conv over the
  terms (``lut_factors``), or, where the target has a multiply-add that sums several
  products per lane (``vpdpbusd``, ``vpmaddwd``, ``sdot``), the terms sharing its lanes
  (``lut_dot``); the per-OP (T, 256) factor tables are extra slots.
* ``ISA-rows`` - a byte permute (AVX-512 VBMI, AVX2, NEON) and every table fits 16 bits after one
  common bias (``multipliers.structure.fits_rows``): the per-weight table-row kernel (``lut_rows``).
* ``ISA-rows8`` - the same permutes (VBMI, AVX2's ``vpshufb``, NEON) where every table is the
  exact product plus a byte per row (``fits_rows8``): the exact conv on the target's cheapest
  exact kernel plus one byte plane of the residual, looked up by residual column class.
* ``gather``  - the fallback that always works: the scheduled TE lookup conv.

Cost decides, always: the cheapest candidate by ``Variant.cost`` (``kernel_costs.DEFAULT_COSTS``
updated by the target file's ``[kernel_costs]``, measured with ``python -m
qos_compile.bench.kernels`` or estimated with ``python -m qos_compile.bench.estimate``);
among equal costs the earlier registry entry (masked before the factor kernels).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ..errors import QosError
from ..multipliers.table import exact_table
from . import variants as V
from .lut_rows import lookup_share

#: The ``--lowering`` families (a family forces all its variants; a registry name one).
LOWERINGS = V.FAMILIES
#: The families that may compute the exact part of a ``rows8`` layer.
EXACT_FAMILIES = ("masked", "lowrank", "gather")


@dataclass(frozen=True)
class ConvLowering:
    """The kernel of one approximate conv layer: a registry variant and how it fits the layer."""

    variant: V.Variant
    fit: V.Fit
    cost: float = 0.0             # its price on the target (kernel time / exact int8 conv time)
    exact: "ConvLowering | None" = None   # rows8: the kernel of its exact part (cost included)
    #: the layer's output positions Ho*Wo and groups (0: not given): the rows kernels tile by
    #: them, so its per-OP tensors (``Variant.per_op``) and its emission must agree on them
    positions: int = 0
    groups: int = 1

    @property
    def kind(self) -> str:
        """The ``--lowering`` family: masked, lowrank (the TE and dot kernels), rows or gather."""
        return self.variant.family

    @property
    def isa(self) -> str | None:
        """The dot-product or byte-permute ISA (``lut_dot.DOT_ISAS`` / ``lut_rows.ROW_ISAS`` key)."""
        return self.variant.isa

    @property
    def terms(self) -> int:
        return self.fit.terms

    @property
    def dtype(self) -> str:
        return self.fit.dtype

    @property
    def bias(self) -> int:
        return self.fit.bias

    @property
    def why(self) -> str:
        return self.fit.why

    @property
    def symbol(self) -> str:
        """The C-identifier form of the name its PrimFuncs carry (``Variant.symbol``)."""
        return self.variant.symbol

    def describe(self) -> str:
        """The registry name: logs, reports, the manifest and ``qos-run --profile``."""
        return self.variant.name

    @property
    def slot_terms(self) -> int:
        """Rows of a low-rank layer's per-OP factor tables: its ``terms`` (0 for other kinds)."""
        return self.terms if self.kind == "lowrank" else 0


def gather_lowering(signed: bool) -> ConvLowering:
    """The fallback lowering of any layer of this signedness (the gather kernel)."""
    v = V.gather_variant(signed)
    return ConvLowering(v, v.fits(V.LayerTables((), signed)), v.cost())


def lowering_allow(lowering: str) -> tuple[str, ...]:
    """``allow`` of ``choose_conv_lowering`` for a ``--lowering`` value: ``auto`` (every family),
    a family, or a registry name; a forced one falls back to gather where it does not fit."""
    if lowering == "auto":
        return LOWERINGS
    if lowering in LOWERINGS:
        return (lowering, "gather")
    return (V.get_variant(lowering).name, "gather")


def variant_lowering(v: V.Variant, tables: V.LayerTables, features: frozenset[str],
                     costs: dict[str, float] | None = None) -> ConvLowering | None:
    """``v`` as the lowering of a layer with ``tables`` (None if it does not fit): its fit and
    price; a ``rows8`` variant priced by its residual's column classes (``lut_rows.lookup_share``)
    plus the cheapest kernel of its exact part."""
    fit = v.fits(tables)
    if fit is None:
        return None
    if v.kind != "rows8":
        return ConvLowering(v, fit, v.cost(costs))
    exact = choose_conv_lowering([exact_table(tables.signed)], tables.signed, features, EXACT_FAMILIES, tables.taps,
                                 costs)
    return ConvLowering(v, fit, v.cost(costs) * lookup_share(v.isa, fit.classes) + exact.cost, exact)


def choose_conv_lowering(luts: Sequence[np.ndarray], signed: bool, features: frozenset[str],
                         allow: Sequence[str] = LOWERINGS, taps: int = 1,
                         costs: dict[str, float] | None = None, positions: int = 0,
                         groups: int = 1) -> ConvLowering:
    """The kernel of a conv layer whose circuits (over all OPs) are ``luts``, on a CPU with
    ``features``: the cheapest registry variant that fits, by ``Variant.cost`` with the
    target's ``costs`` (the first in registry order among equal costs).

    ``taps``: products per output (C/groups * kh * kw), for the low-rank overflow check.
    ``positions`` (Ho*Wo) and ``groups``: the layer's shape, which the result carries for the
    kernels that tile by it (``ConvLowering.positions``).
    ``allow`` restricts the choice to families and/or registry names (tests, benchmarks and
    ``--lowering`` force one): then the cheapest allowed variant that fits other than gather
    wins, gather only where none does.
    """
    if not luts:
        raise QosError("a layer needs at least one circuit table")
    bad = [k for k in allow if k not in LOWERINGS and k not in V.BY_NAME]
    if bad:
        raise QosError(f"unknown lowering {bad[0]!r} (one of {', '.join(LOWERINGS)}, or a registry name "
                       f"such as {V.VARIANTS[0].name})")
    tables = V.LayerTables(list(luts), bool(signed), int(taps))
    feats = frozenset(features)
    fits = [low for v in V.VARIANTS
            if v.signed == bool(signed) and v.available(feats) and V.allowed(v, allow)
            for low in [variant_lowering(v, tables, feats, costs)] if low is not None]
    if not fits:
        raise QosError(f"none of the lowerings {', '.join(allow)} fits this layer on a CPU with "
                       f"features {', '.join(sorted(feats)) or 'none'}")
    if set(allow) != set(LOWERINGS):         # forced: the asked-for variants wherever one fits
        fits = [f for f in fits if f.kind != "gather"] or fits
    return replace(min(fits, key=lambda f: f.cost), positions=int(positions), groups=int(groups))
