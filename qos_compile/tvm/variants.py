"""The one registry of approximate-conv kernel variants (in the style of XNNPACK's microkernel tables).

Every kernel an approximate conv layer can run is ONE entry of ``VARIANTS``, named
``<datatype>-<op>[-<isa>]-<variant>[-t<T>]``, every part free of hyphens:

* ``datatype``: ``s8`` (signed circuits, int8 codes) or ``u8`` (unsigned, uint8 codes);
* ``op``: ``lutconv`` (a conv through a 256x256 multiplier table);
* ``isa``: the instruction set the kernel is written for, XNNPACK's tokens: ``avx512vnni``
  (``vpdpbusd``), ``avxvnni`` (its VEX form on 256 bits), ``avx512bw`` / ``avx2`` (``vpmaddwd``; for ``rows``: ``vpshufb``), ``neondot``
  (ARM ``sdot``), ``avx512vbmi`` (``vpermi2b``), ``neon`` (``tbl``/``tbx``); absent for the portable TE
  kernels, which ``kernels.schedule_primfunc`` schedules by the target's features;
* ``variant``: the algorithm: ``masked`` (exact conv on the masked weights), ``gather``
  (table lookups), ``lowrank`` (exact conv over T factor terms, ``lut_factors``), ``dot``
  (the factor terms summed by a multiply-add per lane, ``lut_dot``), ``rows`` (per-weight
  table rows looked up by a byte permute, ``lut_rows``), ``rows8`` (the exact conv on its own
  cheapest kernel plus the residual over the exact product, one byte per entry, looked up by
  a byte permute, ``lut_rows``);
* ``-t<T>``: the factor terms T (1..``lut_factors.MAX_TERMS``) of a ``lowrank``/``dot`` kernel.

E.g. ``s8-lutconv-masked``, ``u8-lutconv-gather``, ``s8-lutconv-avx512vnni-dot-t3``,
``u8-lutconv-avx512vbmi-rows``, ``u8-lutconv-avx2-rows8``, ``s8-lutconv-neondot-dot-t3``,
``s8-lutconv-lowrank-t3``.

An entry (``Variant``) names its **family module** (``kernels``, ``lut_factors``,
``lut_dot``, ``lut_rows``), which owns its TE/TIR, its block schedules (``SCHEDULES``:
block annotation ``kernels.KERNEL_ATTR`` -> hook, merged by ``block_schedules``), its Relax
emission and its stand-alone stages for benchmarks. ``fits(tables)`` says whether (and
with which parameters) it computes a layer's tables bit-exactly, ``requires`` the target
features it needs, ``cost_key``/``units`` its price: ``cost = costs[cost_key] * units``
(``units``: factor terms for ``lowrank``, factor terms / G for ``dot``, else 1), with
``costs`` = ``DEFAULT_COSTS`` updated by the target file's ``[kernel_costs]``; a ``rows8``
layer adds the price of its exact part (``lowering.variant_lowering``).

Everything that names a kernel reads this table: the lowering choice (``lowering``), the
Relax importer's dispatch (``relax_import``), the block schedules, the benchmark
(``bench.kernels``) and the cost estimate (``bench.estimate``), ``qos-compile --lowering``,
the cost keys a target file may state (``COST_KEYS``), and the kernel name the manifest,
``report.json`` and ``qos-run --profile`` show per layer (``Variant.name``; its PrimFuncs are
named ``Variant.symbol``, with ``_<stage>`` for the stages of a multi-stage kernel:
``s8_lutconv_neondot_dot_t3_inputs`` ... ``_micro``). ``python -m qos_compile.tvm.variants
[TARGET]`` prints the table. The dense layers' one kernel (``kernels.approx_dense``) is
named ``dense_kernel_name``: ``s8-lutgemm-gather`` / ``u8-lutgemm-gather``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import lru_cache
from types import ModuleType
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import QosError
from ..kernel_costs import DEFAULT_COSTS
from ..multipliers.structure import fits_rows, fits_rows8, is_masked, residual_column_classes
from . import kernels, lut_dot, lut_factors, lut_rows

#: Registry datatype token -> signed circuits.
DATATYPES = {"s8": True, "u8": False}
OP = "lutconv"
#: ``--lowering`` family names: a family forces every variant of its kind (``lowrank``: the
#: TE and the dot-product kernels).
FAMILIES = ("masked", "lowrank", "rows", "gather")
#: ISA token in the registry name -> the family module's key for it (the same string).
DOT_ISA_ORDER = ("avx512vnni", "avxvnni", "avx512bw", "avx2", "neondot")
ROWS_ISA_ORDER = ("avx512vbmi", "avx2", "neon")
ROWS8_ISA_ORDER = ("avx512vbmi", "avx2", "neon")
_ROWS_REQUIRES = {"avx512vbmi": frozenset({"avx512vbmi"}), "avx2": frozenset({"avx2"}), "neon": frozenset({"neon"})}
#: Cost key of a rows variant per ISA: ``vpshufb`` (16 shuffles per 32 lookups and plane) is
#: priced apart from the 128/64-entry permutes of VBMI and NEON.
_ROWS_COST = {"avx512vbmi": "", "avx2": "pshufb_", "neon": ""}


@dataclass
class LayerTables:
    """The circuit tables a conv layer runs over all its OPs, analysed once (lazily) for
    every variant's ``fits``. ``taps``: products per output (C/groups * kh * kw), for the
    low-rank overflow check."""

    luts: Sequence[np.ndarray]
    signed: bool
    taps: int = 1
    _memo: dict = field(default_factory=dict, repr=False)

    def _get(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def masked(self) -> bool:
        """Every table is "clear low bits of port A, then multiply exactly" (exact included)."""
        return self._get("masked", lambda: all(is_masked(t, self.signed) for t in self.luts))

    def factor_terms(self) -> tuple[int, str] | None:
        """(terms, factor dtype) of the layer's common integer factorisation (``lut_factors.layer_terms``)."""
        return self._get("terms", lambda: lut_factors.layer_terms(self.luts, self.signed, self.taps))

    def rows_bias(self) -> int | None:
        """The bias that makes every table fit 16 bits (``fits_rows``), None if none does."""
        return self._get("rows", lambda: fits_rows(self.luts))

    def rows8(self) -> bool:
        """Every table is the exact product plus one byte per row (``fits_rows8``)."""
        return self._get("rows8", lambda: fits_rows8(self.luts, self.signed))

    def column_classes(self) -> tuple[int, ...]:
        """The class of each activation's residual column over all the tables
        (``residual_column_classes``)."""
        return self._get("classes", lambda: tuple(int(c) for c in residual_column_classes(self.luts, self.signed)))


@dataclass(frozen=True)
class Fit:
    """What a variant needs to know about a layer it computes: why it fits, and its parameters."""

    why: str
    terms: int = 0                # lowrank / dot: factor terms T
    dtype: str = ""               # lowrank / dot: operand type of the factors
    bias: int = 0                 # rows: the common bias of the 16-bit table planes
    #: rows8: per activation table index, the class of its residual column (equal columns in
    #: every table of the layer share one; the kernel looks up classes, not codes)
    classes: tuple[int, ...] = ()


@dataclass(frozen=True)
class ConvOperands:
    """One ApproxConv node as the Relax importer hands it to ``Variant.emit``."""

    x: Any                        # relax expr: activation codes (N, C, H, W)
    w: Any                        # relax expr: weight codes (O, C/groups, kh, kw)
    lut: Any                      # relax expr: the (256, 256) int32 table slot
    conv: dict                    # call_te attributes: stride, padding, dilation, groups, pad_code, signed
    spec: Any                     # kernels.ConvSpec
    weights: np.ndarray | None    # the weights, where they are a constant
    slot_inputs: Callable[[tuple[str, ...], str], list]   # (suffixes, what) -> per-OP graph inputs


@dataclass(frozen=True)
class Variant:
    """One kernel variant of an approximate conv (see the module docstring)."""

    name: str                     # registry name, e.g. s8-lutconv-neondot-dot-t3
    datatype: str                 # s8 | u8
    family: str                   # --lowering family (FAMILIES)
    kind: str                     # variant token: masked | gather | lowrank | dot | rows | rows8
    isa: str | None               # ISA token (the family module's key for it), None: portable
    terms: int                    # factor terms T (lowrank, dot), else 0
    module: ModuleType            # the family module: TE/TIR, SCHEDULES, emit, stages
    requires: frozenset[str]      # target features it needs
    cost_key: str                 # key of its cost (DEFAULT_COSTS, [kernel_costs])
    units: float                  # cost = costs[cost_key] * units
    fits: Callable[[LayerTables], "Fit | None"]
    emit: Callable[..., Any]      # (bb, ConvOperands, ConvLowering) -> relax expr of the int32 accumulators
    stages: Callable[..., dict]   # (spec, ConvLowering, w, target) -> {stage: PrimFunc}, stand-alone
    run: Callable[..., tuple]     # (built, prefix, spec, ConvLowering, x, w, lut, repeat, threads) -> (acc, ms)
    const_weights: bool = False   # needs the weights at compile time (else the importer uses gather)
    #: (w, lut, ConvLowering) -> {suffix: array}: the per-OP tensors ``slot.<layer>.<suffix>`` of
    #: one circuit that its kernels read besides the table, computed by the compiler; None: none
    per_op: Callable[..., dict] | None = None

    @property
    def signed(self) -> bool:
        return DATATYPES[self.datatype]

    @property
    def symbol(self) -> str:
        """The name as a C identifier: what its PrimFuncs (and so ``qos-run --profile``) are called."""
        return self.name.replace("-", "_")

    def available(self, features: frozenset[str]) -> bool:
        """Whether a target with ``features`` can run it."""
        return self.requires <= frozenset(features)

    def cost(self, costs: dict[str, float] | None = None) -> float:
        """Its price per layer: ``costs[cost_key] * units`` (``costs`` over ``DEFAULT_COSTS``)."""
        return {**DEFAULT_COSTS, **(costs or {})}[self.cost_key] * self.units


# --------------------------------------------------------------------------- fits
def _fits_masked(t: LayerTables) -> Fit | None:
    return Fit("every circuit masks port A, then multiplies exactly") if t.masked() else None


def _fits_gather(t: LayerTables) -> Fit:
    return Fit("table lookups: computes any circuit")


def _fits_lowrank(terms: int) -> Callable[[LayerTables], "Fit | None"]:
    def fits(t: LayerTables) -> Fit | None:
        lr = t.factor_terms()
        if lr is None or lr[0] != terms:
            return None
        return Fit(f"exact conv over {terms} {lr[1]} factor term(s) of every table", terms, lr[1])
    return fits


def _fits_dot(isa: str, terms: int) -> Callable[[LayerTables], "Fit | None"]:
    d = lut_dot.DOT_ISAS[isa]

    def fits(t: LayerTables) -> Fit | None:
        lr = t.factor_terms()
        if lr is None or lr[0] != terms or not lut_dot.multiplies(isa, lr[1]):
            return None
        return Fit(f"{terms} {lr[1]} factor term(s) of every table, {d.group} per {isa} multiply-add", terms, lr[1])
    return fits


def _fits_rows(isa: str) -> Callable[[LayerTables], "Fit | None"]:
    def fits(t: LayerTables) -> Fit | None:
        bias = t.rows_bias()
        return None if bias is None else Fit(f"{isa} byte permute, every table fits 16 bits", bias=bias)
    return fits


def _fits_rows8(isa: str) -> Callable[[LayerTables], "Fit | None"]:
    def fits(t: LayerTables) -> Fit | None:
        if not t.rows8():
            return None
        cls = t.column_classes()
        return Fit(f"exact conv + {isa} byte permute of the residual (every row of it fits 8 bits, "
                   f"{max(cls) + 1} distinct columns)", classes=cls)
    return fits


# --------------------------------------------------------------------------- the table
def _name(datatype: str, kind: str, isa: str | None = None, terms: int = 0) -> str:
    return "-".join([datatype, OP, *([isa] if isa else []), kind, *([f"t{terms}"] if terms else [])])


def _table() -> tuple[Variant, ...]:
    out: list[Variant] = []
    k, lf, ld, lr = kernels, lut_factors, lut_dot, lut_rows
    for dt in DATATYPES:
        out.append(Variant(_name(dt, "masked"), dt, "masked", "masked", None, 0, k, frozenset(), "masked", 1,
                           _fits_masked, k.emit_masked, k.masked_stages, k.run_single_stage))
        for isa in DOT_ISA_ORDER:
            d = ld.DOT_ISAS[isa]
            for t in range(1, lf.MAX_TERMS + 1):
                out.append(Variant(_name(dt, "dot", isa, t), dt, "lowrank", "dot", isa, t, ld, d.requires, "dot",
                                   t / d.group, _fits_dot(isa, t), ld.emit_conv, ld.bench_stages,
                                   ld.bench_run, per_op=ld.per_op_tensors))
        for t in range(1, lf.MAX_TERMS + 1):
            out.append(Variant(_name(dt, "lowrank", None, t), dt, "lowrank", "lowrank", None, t, lf, frozenset(),
                               "lowrank", t, _fits_lowrank(t), lf.emit_conv, lf.bench_stages, lf.bench_run,
                               per_op=lf.per_op_tensors))
        for kind, fits, isas in (("rows8", _fits_rows8, ROWS8_ISA_ORDER), ("rows", _fits_rows, ROWS_ISA_ORDER)):
            for isa in isas:
                out.append(Variant(_name(dt, kind, isa), dt, "rows", kind, isa, 0, lr, _ROWS_REQUIRES[isa],
                                   _ROWS_COST[isa] + kind, 1, fits(isa), lr.emit_conv, lr.bench_stages, lr.bench_run,
                                   const_weights=True, per_op=lr.per_op_tensors))
        out.append(Variant(_name(dt, "gather"), dt, "gather", "gather", None, 0, k, frozenset(), "gather", 1,
                           _fits_gather, k.emit_gather, k.gather_stages, k.run_single_stage))
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise QosError("internal error: duplicate kernel variant names")
    return tuple(out)


#: Every variant, in order of preference among equal costs.
VARIANTS: tuple[Variant, ...] = _table()
BY_NAME: dict[str, Variant] = {v.name: v for v in VARIANTS}
#: The cost keys of the variants: what a target file's ``[kernel_costs]`` may state.
COST_KEYS: tuple[str, ...] = tuple(dict.fromkeys(v.cost_key for v in VARIANTS))   # == kernel_costs.COST_KEYS
#: What ``qos-compile --lowering`` accepts: auto, a family, or a registry name.
LOWERING_CHOICES: tuple[str, ...] = ("auto", *FAMILIES, *BY_NAME)
if set(COST_KEYS) != set(DEFAULT_COSTS):
    raise QosError("internal error: every kernel cost key needs a default (DEFAULT_COSTS)")


def dense_kernel_name(signed: bool) -> str:
    """The name of the one approximate fully connected kernel (``kernels.approx_dense``, table
    lookups; not a conv variant): ``s8-lutgemm-gather`` / ``u8-lutgemm-gather``."""
    return f"{'s8' if signed else 'u8'}-lutgemm-gather"


def get_variant(name: str) -> Variant:
    """The variant with this registry name (QosError naming the families otherwise)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise QosError(f"unknown kernel variant {name!r}: a registry name such as {VARIANTS[0].name} "
                       f"(python -m qos_compile.tvm.variants lists them) or a family "
                       f"({', '.join(FAMILIES)})") from None


def gather_variant(signed: bool) -> Variant:
    """The fallback that computes every layer: the gather kernel of the datatype."""
    return BY_NAME[_name("s8" if signed else "u8", "gather")]


def allowed(v: Variant, allow: Sequence[str]) -> bool:
    """Whether ``allow`` (family names and/or registry names) admits ``v``."""
    return v.family in allow or v.name in allow


def family_modules() -> list[ModuleType]:
    """The family modules, in table order (each once)."""
    return list(dict.fromkeys(v.module for v in VARIANTS))


@lru_cache(maxsize=1)
def block_schedules() -> dict[str, Callable[..., None]]:
    """Block annotation -> schedule hook ``(sch, block, features, style)``, from every family
    module's ``SCHEDULES`` (``kernels.schedule_primfunc`` applies them)."""
    out: dict[str, Callable[..., None]] = {}
    for mod in family_modules():
        for kind, hook in mod.SCHEDULES.items():
            if kind in out:
                raise QosError(f"internal error: block kind {kind!r} is scheduled by two family modules")
            out[kind] = hook
    return out


def table_text(features: frozenset[str] | None = None, costs: dict[str, float] | None = None) -> str:
    """The registry as a Markdown table (only the variants a target with ``features`` runs, if given)."""
    rows = ["| variant | family module | requires | cost key x units | cost |", "| --- | --- | --- | --- | ---: |"]
    for v in VARIANTS:
        if features is not None and not v.available(features):
            continue
        rows.append(f"| `{v.name}` | `{v.module.__name__.rsplit('.', 1)[-1]}` | {', '.join(sorted(v.requires)) or '-'} "
                    f"| {v.cost_key} x {v.units} | {v.cost(costs):.2f} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qos_compile.tvm.variants [TARGET]``: print the registry (for a target: its variants and costs)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args:
        from ..targets import get_target

        t = get_target(args[0])
        print(f"# kernel variants on {t.name} (costs: {t.costs_text()})")
        print(table_text(t.features, t.kernel_costs))
    else:
        print(table_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
