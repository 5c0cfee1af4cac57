"""Per-weight table-row kernels: approximate conv as byte-permute lookups, emitted from TIR.

With the weights fixed at compile time, weight code ``a`` selects one 256-entry row
``lut[a, :]`` of the (per-OP, run-time) table; an output channel is the sum over its
``K = C/groups * kh * kw`` weights of that weight's row looked up at the activation codes
of every output position. A row is kept as byte planes and looked up with the CPU's byte
permute, one vector of output positions at a time. Two variants (``RowsLayout.residual``):

* ``rows``: the whole table, two planes (low and high byte of ``lut[a, b] + bias``, a 16-bit
  value; ``fits_rows``);
* ``rows8``: the exact conv plus the residual ``lut[a, b] - code(a) * code(b)`` in ONE
  plane: ``residual - rowmin[a]`` must fit 8 bits in every row of every table of the layer
  (``fits_rows8``; mul8u_DG8 and mul8u_GTR do, a residual range of 44 and 231). Half the
  lookups; the exact part runs on the cheapest exact kernel of the target (``variants``),
  and ``rowmin`` comes back in per output channel (``sum_k rowmin[row(k)]``).

Byte permutes per ISA (``ROW_ISAS``: positions per vector):

* ``avx512vbmi`` (x86-64): 64 positions per vector, ``vpermi2b`` over two 64-byte
  registers covers 128 entries, bit 7 of the index picks the half (``vpmovb2m`` + blend):
  2 permutes per 64 lookups and plane.
* ``avx2`` (x86-64): 32 positions, ``vpshufb`` looks up 16 entries per 128-bit lane; the
  16 sub-tables of a plane are stored twice (one copy per lane), and sub-table ``j``
  answers the positions whose index has high nibble ``j``: ``u = min(idx - 16j, 0x8F) +
  0x70`` keeps the low nibble where it matches and sets bit 7 (``vpshufb`` writes 0)
  elsewhere, so the 16 results are OR-ed: 16 shuffles per 32 lookups and plane.
* ``neon`` (aarch64): 16 positions per vector, ``tbl`` over four 16-byte registers covers
  64 entries, three ``tbx`` fill in the other quarters.

Sums of bytes are kept exact in 16-bit lanes: per word lane (two neighbouring positions)
the kernel adds the plane's word (``lo(2q) + 256*lo(2q+1)`` mod 2**16) and its high byte
(``lo(2q+1)``); both stay exact for up to ``CHUNK`` = 256 weights, after which the two
positions' byte sums are recovered and added into the int32 accumulator (``flush``).
Everything is emitted from TIR (``T.call_llvm_pure_intrin``); the kernels are bit-exact by
construction whenever their ``fits`` condition holds for every circuit of the layer,
which the lowering checks before it picks them.

Stages (each its own PrimFunc, so the plan shows them): ``taps`` packs the padded
activation table indices position-major per weight tap (``(N, G, Kg, P_pad)`` uint8); the
microkernel reads the rows of the layer's distinct weight codes as byte planes (``(R, planes *
PLANE_BYTES)`` uint8, ``planes``; ``rows8`` subtracts each row's ``rowmin``, ``(R,)`` int32,
``row_minima``). Weights and table are constants of an OP, so both are per-OP tensors the
compiler computes once per OP (``slot.<layer>.planes``, ``.rowmin``; at most 256 rows of
``PLANE_BYTES`` per plane), not per inference (per call they took 6% of a ResNet-20); the
microkernel
(``rows_microkernel``) writes int32 ``(N, O, P_pad)``; the caller's epilogue reads the
first ``Ho*Wo`` positions. Threads split ``n x o`` (output channels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import te
from tvm.script import tirx as T

from ..errors import QosError
from ..multipliers.structure import fits_rows, fits_rows8, residual_rows  # noqa: F401 - fits_*: the kernels' conditions
from ..multipliers.table import exact_table
from ..numerics import code_offset
from .kernels import KERNEL_ATTR, register_block_schedules

#: Byte-permute ISAs with a rows microkernel: lanes (positions per vector) per ISA.
ROW_ISAS = {"avx512vbmi": 64, "avx2": 32, "neon": 16}
#: Bytes one 256-entry plane takes in the ``planes`` stage (AVX2: each 16-byte sub-table twice).
PLANE_BYTES = {"avx512vbmi": 256, "avx2": 512, "neon": 256}
#: Weights accumulated in 16-bit lanes before a flush (byte sums stay below 2**16).
CHUNK = 256
#: Most position vectors one output tile keeps in registers.
MAX_VECTORS = 4


@dataclass(frozen=True)
class RowsLayout:
    """Compile-time layout of one rows conv: distinct weight codes and the tiling."""

    isa: str
    codes: np.ndarray        # (R,) int32 table indices (code + offset) of the distinct weights
    wrow: np.ndarray         # (O, Kg) int32: row of each weight in ``codes``
    positions: int           # Ho * Wo
    vectors: int             # position vectors per tile
    p_pad: int               # positions rounded up to whole tiles
    residual: bool = False   # rows8: one plane of the residual over the exact product

    @property
    def lanes(self) -> int:
        return ROW_ISAS[self.isa]

    @property
    def planes(self) -> int:
        return 1 if self.residual else 2


def rows_layout(w: np.ndarray, signed: bool, positions: int, isa: str, residual: bool = False) -> RowsLayout:
    """Distinct weight rows and the tile shape for weights ``w`` (O, Cg, kh, kw) codes."""
    if isa not in ROW_ISAS:
        raise QosError(f"no rows microkernel for {isa!r} (have {', '.join(ROW_ISAS)})")
    idx = w.astype(np.int64).reshape(w.shape[0], -1) + code_offset(signed)
    codes, inv = np.unique(idx, return_inverse=True)
    lanes = ROW_ISAS[isa]
    vectors = max(1, min(MAX_VECTORS, -(-positions // lanes)))
    tile = lanes * vectors
    return RowsLayout(isa, codes.astype(np.int32), inv.reshape(idx.shape).astype(np.int32), positions,
                      vectors, -(-positions // tile) * tile, residual)


# --------------------------------------------------------------------------- TE stages
def taps(xp: te.Tensor, groups: int, kh: int, kw: int, stride: tuple[int, int], dilation: tuple[int, int],
         ho: int, wo: int, p_pad: int, name: str = "rows_taps") -> te.Tensor:
    """(N, G, Cg*kh*kw, p_pad) uint8: the index each weight tap reads at each output position."""
    n, c = int(xp.shape[0]), int(xp.shape[1])
    cg = c // groups
    (sh, sw), (dh, dw) = stride, dilation
    kk = kh * kw

    def f(nn, g, k, p):
        i = tvm.tirx.min(p // wo, ho - 1)            # padding positions re-read the last row
        ci, r = k // kk, k % kk
        return xp[nn, g * cg + ci, i * sh + (r // kw) * dh, (p % wo) * sw + (r % kw) * dw]

    # row width as a block annotation: the schedule splits p into (row, column) and
    # vectorises the column copy
    return te.compute((n, groups, cg * kk, p_pad), f, name=name, attrs={KERNEL_ATTR: "rows_taps", "qos_row": wo})


#: The per-OP graph input of a ``rows8`` layer: each weight row's smallest residual.
ROWMIN_SUFFIX = "rowmin"
#: The per-OP graph input of a ``rows``/``rows8`` layer: its weight rows as byte planes.
PLANES_SUFFIX = "planes"


def row_minima(lut: np.ndarray, codes: np.ndarray, signed: bool) -> np.ndarray:
    """(R,) int32: the smallest residual (``multipliers.structure.residual_rows``) of each weight
    row ``codes`` of one table (``rows8``). A constant of an OP: the compiler computes it once
    per OP (the per-OP tensor ``slot.<layer>.rowmin``), not per inference."""
    return residual_rows(lut, signed)[np.asarray(codes, np.int64)].min(1).astype(np.int32)


def planes(lut: np.ndarray, codes: np.ndarray, bias: int, isa: str, rowmin: np.ndarray | None = None,
           signed: bool = False) -> np.ndarray:
    """(R, planes * PLANE_BYTES[isa]) uint8 for every activation b: ``rows``: low then high byte
    of ``lut[codes[r], b] + bias``; ``rows8`` (``rowmin`` given): the residual minus
    ``rowmin[r]``. AVX2 stores each 16-entry sub-table twice (both 128-bit lanes of a
    ``vpshufb``)."""
    e = np.arange(PLANE_BYTES[isa])
    entry = (e // 32) * 16 + e % 16 if isa == "avx2" else e   # byte e of a plane -> activation index
    rows = np.asarray(lut, np.int64)[np.asarray(codes, np.int64)][:, entry]          # (R, width)
    if rowmin is not None:
        off = code_offset(signed)
        a = np.asarray(codes, np.int64)[:, None] - off
        return (rows - a * (entry[None, :] - off) - np.asarray(rowmin, np.int64)[:, None]).astype(np.uint8)
    v = rows + bias
    return np.ascontiguousarray(np.concatenate([v & 255, (v >> 8) & 255], axis=1).astype(np.uint8))


def _lookup_vbmi(pl: Any, row: Any, plane: int, idx: Any) -> Any:
    """256-entry byte lookup of 64 indices in plane ``plane`` of row ``row`` (4 registers)."""
    t = [pl[row, T.ramp(plane * 256 + 64 * i, 1, 64)] for i in range(4)]
    perm = "llvm.x86.avx512.vpermi2var.qi.512"
    a = T.call_llvm_pure_intrin("uint8x64", perm, t[0], idx, t[1])
    b = T.call_llvm_pure_intrin("uint8x64", perm, t[2], idx, t[3])
    return T.Select(T.reinterpret("int8x64", idx) < T.broadcast(T.int8(0), 64), b, a)


def _lookup_neon(pl: Any, row: Any, plane: int, idx: Any) -> Any:
    """256-entry byte lookup of 16 indices in plane ``plane`` of row ``row`` (16 registers)."""
    t = [pl[row, T.ramp(plane * 256 + 16 * i, 1, 16)] for i in range(16)]
    out = T.call_llvm_pure_intrin("uint8x16", "llvm.aarch64.neon.tbl4", t[0], t[1], t[2], t[3], idx)
    for q in range(1, 4):
        iq = idx - T.broadcast(T.uint8(64 * q), 16)
        out = T.call_llvm_pure_intrin("uint8x16", "llvm.aarch64.neon.tbx4", out, t[4 * q], t[4 * q + 1],
                                      t[4 * q + 2], t[4 * q + 3], iq)
    return out


def _lookup_avx2(pl: Any, row: Any, nplanes: int, idx: Any) -> list:
    """256-entry byte lookups of 32 indices in every plane of row ``row``: 16 ``vpshufb`` per plane,
    the sub-table selectors ``u`` shared by the planes."""
    outs: list = [None] * nplanes
    for j in range(16):
        u = T.min(idx - T.broadcast(T.uint8(16 * j), 32), T.broadcast(T.uint8(0x8F), 32)) + T.broadcast(
            T.uint8(0x70), 32)
        for p in range(nplanes):
            t = pl[row, T.ramp(p * 512 + 32 * j, 1, 32)]
            hit = T.call_llvm_pure_intrin("uint8x32", "llvm.x86.avx2.pshuf.b", t, u)
            outs[p] = hit if outs[p] is None else T.bitwise_or(outs[p], hit)
    return outs


def _lookups(isa: str, pl: Any, row: Any, nplanes: int, idx: Any) -> list:
    if isa == "avx2":
        return _lookup_avx2(pl, row, nplanes, idx)
    one = _lookup_vbmi if isa == "avx512vbmi" else _lookup_neon
    return [one(pl, row, p, idx) for p in range(nplanes)]


def rows_microkernel(n: int, groups: int, o: int, kg: int, r: int, layout: RowsLayout, bias: int,
                     name: str | None = None) -> "tvm.tirx.PrimFunc":
    """PrimFunc ``(taps (N, G, Kg, P_pad) u8, planes (R, planes * PLANE_BYTES) u8, wrow (O, Kg) i32,
    rowmin (R,) i32, acc (N, O, P_pad) i32)``; ``rowmin`` is read by ``rows8`` only (``rows``: zeros)."""
    lanes, nv, p_pad, isa = layout.lanes, layout.vectors, layout.p_pad, layout.isa
    tile, words = lanes * nv, lanes // 2
    og = o // groups
    nkc = -(-kg // CHUNK)
    u16v = f"uint16x{words}"
    npl, width = layout.planes, layout.planes * PLANE_BYTES[isa]
    base = 0 if layout.residual else bias            # what every looked-up value carries on top

    @T.prim_func(private=True)
    def kernel(tp: T.Buffer((n, groups, kg, p_pad), "uint8"), pl: T.Buffer((r, width), "uint8"),
               wrow: T.Buffer((o, kg), "int32"), rowmin: T.Buffer((r,), "int32"),
               acc: T.Buffer((n, o, p_pad), "int32")):
        T.func_attr({"qos_prescheduled": True})
        for no in T.parallel(n * o):
            corr = T.decl_buffer((1,), "int32", scope="local")
            corr[0] = 0
            if layout.residual:
                for k in range(kg):
                    corr[0] = corr[0] + rowmin[wrow[no % o, k]]
            for pt in range(p_pad // tile):
                for p in T.vectorized(tile):
                    acc[no // o, no % o, pt * tile + p] = corr[0]
                for kc in range(nkc):
                    s0 = T.decl_buffer((nv * words,), "uint16", scope="local")
                    s1 = T.decl_buffer((nv * words,), "uint16", scope="local")
                    s2 = T.decl_buffer((nv * words,), "uint16", scope="local")
                    s3 = T.decl_buffer((nv * words,), "uint16", scope="local")
                    for q in T.vectorized(nv * words):
                        s0[q] = T.uint16(0)
                        s1[q] = T.uint16(0)
                        s2[q] = T.uint16(0)
                        s3[q] = T.uint16(0)
                    for k in range(kc * CHUNK, T.min(kg, kc * CHUNK + CHUNK)):
                        row: T.let = wrow[no % o, k]
                        for v in T.unroll(nv):
                            idx: T.let = tp[no // o, (no % o) // og, k, T.ramp(pt * tile + v * lanes, 1, lanes)]
                            lo: T.let = T.reinterpret(u16v, _lookups(isa, pl, row, npl, idx)[0])
                            s0[T.ramp(v * words, 1, words)] = s0[T.ramp(v * words, 1, words)] + lo
                            s1[T.ramp(v * words, 1, words)] = s1[T.ramp(v * words, 1, words)] + T.shift_right(
                                lo, T.broadcast(T.uint16(8), words))
                            if npl == 2:
                                hi: T.let = T.reinterpret(u16v, _lookups(isa, pl, row, npl, idx)[1])
                                s2[T.ramp(v * words, 1, words)] = s2[T.ramp(v * words, 1, words)] + hi
                                s3[T.ramp(v * words, 1, words)] = s3[T.ramp(v * words, 1, words)] + T.shift_right(
                                    hi, T.broadcast(T.uint16(8), words))
                    # flush: the two positions of each word lane from (word sum, high-byte sum)
                    cnt: T.let = T.min(kg, kc * CHUNK + CHUNK) - kc * CHUNK
                    for v in range(nv):
                        for q in range(words):
                            lodd: T.let = T.Cast("int32", s1[v * words + q])
                            hodd: T.let = T.Cast("int32", s3[v * words + q])
                            leven: T.let = T.Cast("int32", T.Cast("uint16", s0[v * words + q] - T.Cast("uint16", lodd * 256)))
                            heven: T.let = T.Cast("int32", T.Cast("uint16", s2[v * words + q] - T.Cast("uint16", hodd * 256)))
                            pos: T.let = pt * tile + v * lanes + 2 * q
                            acc[no // o, no % o, pos] = acc[no // o, no % o, pos] + leven + heven * 256 - cnt * base
                            acc[no // o, no % o, pos + 1] = acc[no // o, no % o, pos + 1] + lodd + hodd * 256 - cnt * base

    return kernel.with_attr("global_symbol", name) if name else kernel


def rows_inputs(x: te.Tensor, kh: int, kw: int, stride: tuple[int, int], padding: tuple[int, int, int, int],
                dilation: tuple[int, int], groups: int, pad_code: int, signed: bool, ho: int, wo: int,
                p_pad: int) -> te.Tensor:
    """TE for ``bb.call_te``: the padded table indices of ``x`` packed by ``taps``."""
    from .kernels import _padded_index

    xp = _padded_index(x, padding, pad_code, code_offset(signed), "rows_pad")
    return taps(xp, groups, kh, kw, stride, dilation, ho, wo, p_pad)


def unpack_positions(acc: te.Tensor, ho: int, wo: int) -> te.Tensor:
    """(N, O, P_pad) -> (N, O, Ho, Wo): the first Ho*Wo positions (fuses into the epilogue)."""
    n, o = int(acc.shape[0]), int(acc.shape[1])
    return te.compute((n, o, ho, wo), lambda a, b, i, j: acc[a, b, i * wo + j], name="rows_unpack")


def rows_stage_funcs(spec: Any, w: np.ndarray, isa: str, bias: int, residual: bool = False
                     ) -> tuple[RowsLayout, dict[str, Any]]:
    """Stand-alone PrimFuncs of the stages for one conv ``spec`` (kernels.ConvSpec) with
    weights ``w``: ``taps(x) -> tp``, ``micro(tp, pl, wrow, m) -> acc`` (N, O, P_pad; ``rows8``:
    the residual part only) with ``pl = planes(...)`` and (``rows8``) ``m = row_minima(...)``
    computed ahead like the compiler's per-OP tensors. For benchmarks and tests; the compiler
    builds the same stages through Relax."""
    from .kernels import _finish

    layout = rows_layout(w, spec.signed, spec.ho * spec.wo, isa, residual)
    xs = te.placeholder(spec.x_shape, spec.code_dtype, name="x")
    tp = rows_inputs(xs, spec.kh, spec.kw, spec.stride, spec.padding, spec.dilation, spec.groups, spec.pad_code,
                     spec.signed, spec.ho, spec.wo, layout.p_pad)
    kg = (spec.c // spec.groups) * spec.kh * spec.kw
    funcs = {"taps": _finish([xs, tp], None, None, True),
             "micro": rows_microkernel(spec.n, spec.groups, spec.o, kg, len(layout.codes), layout, bias)}
    return layout, funcs


def run_rows_conv(built: Any, prefix: str, layout: RowsLayout, x: np.ndarray, lut: np.ndarray, spec: Any,
                  bias: int, repeat: int = 0, threads: int | None = None) -> tuple[np.ndarray, float]:
    """Run the stages built from ``rows_stage_funcs`` (named ``prefix + stage``) on the planes of
    ``lut`` (``bias``: the ``rows`` planes' bias): accumulators (N, O, Ho, Wo) (``rows8``: the residual part) and the summed best time in ms of the stages
    (0 unless ``repeat``)."""
    ms = 0.0

    def run(stage: str, *args: Any) -> Any:
        nonlocal ms
        out = built.run(prefix + stage, *args, repeat=repeat, threads=threads)
        ms += built.last_time_ns / 1e6 if repeat else 0.0
        return out

    lut = np.asarray(lut, np.int32)
    tp = run("taps", x)
    if layout.residual:
        m = row_minima(lut, layout.codes, spec.signed)
        pl = planes(lut, layout.codes, 0, layout.isa, m, spec.signed)
    else:
        m, pl = np.zeros(len(layout.codes), np.int32), planes(lut, layout.codes, bias, layout.isa)
    acc = run("micro", tp, pl, layout.wrow, m)
    n, o, ho, wo = spec.out_shape
    return acc[:, :, :ho * wo].reshape(n, o, ho, wo), ms


# --------------------------------------------------------------------------- registry hooks
def _schedule_taps(sch: "tvm.s_tir.Schedule", block: Any, features: frozenset[str], style: str | None) -> None:
    """(n, g, k, p): p -> (row, column), ``n, g, k`` in parallel, columns copied as vectors."""
    n, g, k, p = sch.get_loops(block)
    wo = int(sch.get(block).annotations["qos_row"])
    _, col = sch.split(p, [None, wo])
    sch.parallel(sch.fuse(n, g, k))
    sch.vectorize(col)


#: Block schedules of this module's TE stages (``variants.block_schedules``); the
#: microkernel is written in its final form (``qos_prescheduled``).
SCHEDULES = {"rows_taps": _schedule_taps}
register_block_schedules(SCHEDULES)


def emit_conv(bb: Any, ops: Any, low: Any) -> Any:
    """Relax emission of a ``rows``/``rows8`` variant (``variants.Variant.emit``; needs constant
    weights): taps + the byte-permute microkernel on the per-OP graph input
    ``slot.<layer>.planes``, then the positions unpacked; ``rows8`` reads its row minima from
    ``slot.<layer>.rowmin`` and adds the exact conv of ``low.exact`` (its own variant, emitted
    by its own family on constant exact-product operands, so its weight-only stages fold at
    compile time). Every PrimFunc is named after the variant."""
    from tvm import relax

    spec, wn, sym = ops.spec, ops.weights, low.symbol
    residual = low.variant.kind == "rows8"
    layout = rows_layout(wn, spec.signed, spec.ho * spec.wo, low.isa, residual)
    kg = wn.shape[1] * spec.kh * spec.kw
    tp = bb.call_te(rows_inputs, ops.x, spec.kh, spec.kw, spec.stride, spec.padding, spec.dilation,
                    spec.groups, spec.pad_code, spec.signed, spec.ho, spec.wo, layout.p_pad,
                    primfunc_name_hint=f"{sym}_taps")
    if residual:
        pl, m = ops.slot_inputs((PLANES_SUFFIX, ROWMIN_SUFFIX), "rows8 planes and row minima")
    else:
        pl = ops.slot_inputs((PLANES_SUFFIX,), "rows planes")[0]
        m = relax.const(np.zeros(len(layout.codes), np.int32))
    micro = rows_microkernel(spec.n, spec.groups, spec.o, kg, len(layout.codes), layout, low.bias)
    gv = bb.add_func(micro, f"{sym}_micro")
    acc = bb.emit(relax.call_tir(gv, [tp, pl, relax.const(layout.wrow), m],
                                 relax.TensorType((spec.n, spec.o, layout.p_pad), "int32")))
    out = bb.call_te(unpack_positions, acc, spec.ho, spec.wo, primfunc_name_hint=f"{sym}_unpack")
    if not residual:
        return out
    exact = low.exact
    return bb.emit(relax.op.add(exact.variant.emit(bb, exact_operands(ops, exact), exact), out))


def exact_operands(ops: Any, exact: Any) -> Any:
    """``ops`` with the exact product's table (and, for a factor kernel, its factor tables and
    dot bias) as constants: the operands of the exact part of a ``rows8`` layer."""
    from dataclasses import replace

    from tvm import relax

    table = exact_table(ops.spec.signed).astype(np.int32)
    slots = exact.variant.per_op(ops.weights, table, exact) if exact.variant.per_op else {}
    return replace(ops, lut=relax.const(table),
                   slot_inputs=lambda suffixes, what: [relax.const(np.ascontiguousarray(slots[s])) for s in suffixes])


def per_op_tensors(w: np.ndarray, lut: np.ndarray, low: Any) -> dict[str, np.ndarray]:
    """The per-OP tensors of a ``rows``/``rows8`` layer running the circuit ``lut``
    (``variants.Variant.per_op``): its byte planes and (``rows8``) the row minima of its
    residual plane."""
    signed = low.variant.signed
    if low.variant.kind != "rows8":
        return {PLANES_SUFFIX: planes(lut, rows_layout(w, signed, 1, low.isa).codes, low.bias, low.isa)}
    codes = rows_layout(w, signed, 1, low.isa, True).codes
    m = row_minima(lut, codes, signed)
    return {PLANES_SUFFIX: planes(lut, codes, 0, low.isa, m, signed), ROWMIN_SUFFIX: m}


def bench_stages(spec: Any, low: Any, w: np.ndarray, target: Any) -> dict[str, Any]:
    """Stand-alone PrimFuncs of a ``rows``/``rows8`` variant for the weights ``w``
    (``rows_stage_funcs``; ``rows8``: the exact part as ``exact_<stage>``)."""
    funcs = rows_stage_funcs(spec, w, low.isa, low.bias, low.variant.kind == "rows8")[1]
    if low.variant.kind == "rows8":
        ex = low.exact
        funcs.update({f"exact_{k}": f for k, f in ex.variant.stages(spec, ex, w, target).items()})
    return funcs


def bench_run(built: Any, prefix: str, spec: Any, low: Any, x: Any, w: np.ndarray, lut: np.ndarray, repeat: int = 0,
              threads: int | None = None) -> tuple[np.ndarray, float]:
    """Run a ``rows``/``rows8`` variant built from ``bench_stages``: (acc, summed best ms of the stages or 0)."""
    residual = low.variant.kind == "rows8"
    layout = rows_layout(w, spec.signed, spec.ho * spec.wo, low.isa, residual)
    acc, ms = run_rows_conv(built, prefix, layout, x, np.asarray(lut, np.int32), spec, low.bias, repeat, threads)
    if residual:
        ex = low.exact
        acc_x, ms_x = ex.variant.run(built, prefix + "exact_", spec, ex, x, w,
                                     exact_table(spec.signed).astype(np.int32), repeat, threads)
        acc, ms = acc + acc_x, ms + ms_x
    return acc, ms
