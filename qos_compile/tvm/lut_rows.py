"""Per-weight table-row kernels: approximate conv as byte-permute lookups, emitted from TIR.

With the weights fixed at compile time, weight code ``a`` selects one 256-entry row
``lut[a, :]`` of the (per-OP, run-time) table; an output channel is the sum over its
``K = C/groups * kh * kw`` weights of that weight's row looked up at the activation codes
of every output position. The row is kept as two byte planes (low and high byte of
``lut[a, b] + bias``, a 16-bit value) and looked up with the CPU's byte permute, one
vector of output positions at a time:

* ``avx512vbmi`` (x86-64): 64 positions per vector, ``vpermi2b`` over two 64-byte
  registers covers 128 entries, bit 7 of the index picks the half (``vpmovb2m`` + blend):
  4 permutes per 64 lookups for both planes.
* ``neon`` (aarch64): 16 positions per vector, ``tbl`` over four 16-byte registers covers
  64 entries, three ``tbx`` fill in the other quarters.

Sums of bytes are kept exact in 16-bit lanes: per word lane (two neighbouring positions)
the kernel adds the plane's word (``lo(2q) + 256*lo(2q+1)`` mod 2**16) and its high byte
(``lo(2q+1)``); both stay exact for up to ``CHUNK`` = 256 weights, after which the two
positions' byte sums are recovered and added into the int32 accumulator (``flush``).
Everything is emitted from TIR (``T.call_llvm_pure_intrin``); the kernel is bit-exact
by construction whenever every table of the layer fits 16 bits after ``bias``, which
``fits_rows`` checks for all circuits of a layer before the compiler picks it.

Stages (each its own PrimFunc, so the plan shows them): ``taps`` packs the padded
activation table indices position-major per weight tap (``(N, G, Kg, P_pad)`` uint8);
``planes`` cuts the rows of the layer's distinct weight codes out of the LUT argument
(``(R, 512)`` uint8, rebuilt per call: the LUT is switched at run time); the microkernel
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
from ..multipliers.structure import fits_rows  # noqa: F401 - the kernel's condition, importable from here
from ..numerics import LUT_SHAPE, code_offset
from .kernels import KERNEL_ATTR, register_block_schedules

#: Byte-permute ISAs with a rows microkernel: lanes (positions per vector) per ISA.
ROW_ISAS = {"avx512vbmi": 64, "neon": 16}
#: Weights accumulated in 16-bit lanes before a flush (byte sums stay below 2**16).
CHUNK = 256
#: Most position vectors one output tile keeps in registers.
MAX_VECTORS = 4


def rows_isa(features: frozenset[str]) -> str | None:
    """The byte-permute ISA a target's features allow (None: no rows kernel)."""
    if "avx512vbmi" in features:
        return "avx512vbmi"
    if "neon" in features or "asimd" in features:
        return "neon"
    return None


@dataclass(frozen=True)
class RowsLayout:
    """Compile-time layout of one rows conv: distinct weight codes and the tiling."""

    isa: str
    codes: np.ndarray        # (R,) int32 table indices (code + offset) of the distinct weights
    wrow: np.ndarray         # (O, Kg) int32: row of each weight in ``codes``
    positions: int           # Ho * Wo
    vectors: int             # position vectors per tile
    p_pad: int               # positions rounded up to whole tiles

    @property
    def lanes(self) -> int:
        return ROW_ISAS[self.isa]


def rows_layout(w: np.ndarray, signed: bool, positions: int, isa: str) -> RowsLayout:
    """Distinct weight rows and the tile shape for weights ``w`` (O, Cg, kh, kw) codes."""
    if isa not in ROW_ISAS:
        raise QosError(f"no rows microkernel for {isa!r} (have {', '.join(ROW_ISAS)})")
    idx = w.astype(np.int64).reshape(w.shape[0], -1) + code_offset(signed)
    codes, inv = np.unique(idx, return_inverse=True)
    lanes = ROW_ISAS[isa]
    vectors = max(1, min(MAX_VECTORS, -(-positions // lanes)))
    tile = lanes * vectors
    return RowsLayout(isa, codes.astype(np.int32), inv.reshape(idx.shape).astype(np.int32), positions,
                      vectors, -(-positions // tile) * tile)


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


def planes(lut: te.Tensor, codes: te.Tensor, bias: int, name: str = "rows_planes") -> te.Tensor:
    """(R, 512) uint8: low then high byte of ``lut[codes[r], b] + bias`` for every activation b."""
    def f(r, e):
        v = lut[codes[r], e % 256] + bias
        return tvm.tirx.Cast("uint8", tvm.tirx.bitwise_and(tvm.tirx.shift_right(v, (e // 256) * 8), 255))

    return te.compute((int(codes.shape[0]), 512), f, name=name, attrs={KERNEL_ATTR: "rows_planes"})


# --------------------------------------------------------------------------- microkernels
def _lookup_vbmi(t: list, idx: Any) -> Any:
    """256-entry byte lookup of 64 indices in the 4 registers ``t`` (one plane)."""
    perm = "llvm.x86.avx512.vpermi2var.qi.512"
    a = T.call_llvm_pure_intrin("uint8x64", perm, t[0], idx, t[1])
    b = T.call_llvm_pure_intrin("uint8x64", perm, t[2], idx, t[3])
    return T.Select(T.reinterpret("int8x64", idx) < T.broadcast(T.int8(0), 64), b, a)


def _lookup_neon(t: list, idx: Any) -> Any:
    """256-entry byte lookup of 16 indices in the 16 registers ``t`` (one plane)."""
    out = T.call_llvm_pure_intrin("uint8x16", "llvm.aarch64.neon.tbl4", t[0], t[1], t[2], t[3], idx)
    for q in range(1, 4):
        iq = idx - T.broadcast(T.uint8(64 * q), 16)
        out = T.call_llvm_pure_intrin("uint8x16", "llvm.aarch64.neon.tbx4", out, t[4 * q], t[4 * q + 1],
                                      t[4 * q + 2], t[4 * q + 3], iq)
    return out


def rows_microkernel(n: int, groups: int, o: int, kg: int, r: int, layout: RowsLayout, bias: int,
                     name: str | None = None) -> "tvm.tirx.PrimFunc":
    """PrimFunc ``(taps (N, G, Kg, P_pad) u8, planes (R, 512) u8, wrow (O, Kg) i32, acc (N, O, P_pad) i32)``."""
    lanes, nv, p_pad = layout.lanes, layout.vectors, layout.p_pad
    tile, words = lanes * nv, lanes // 2
    og = o // groups
    nkc = -(-kg // CHUNK)
    u8v, u16v = f"uint8x{lanes}", f"uint16x{words}"
    regs = 4 if layout.isa == "avx512vbmi" else 16          # registers per 256-byte plane
    step = 256 // regs
    lookup = _lookup_vbmi if layout.isa == "avx512vbmi" else _lookup_neon

    def plane_regs(pl, row, plane):
        return [pl[row, T.ramp(plane * 256 + step * i, 1, step)] for i in range(regs)]

    @T.prim_func(private=True)
    def kernel(tp: T.Buffer((n, groups, kg, p_pad), "uint8"), pl: T.Buffer((r, 512), "uint8"),
               wrow: T.Buffer((o, kg), "int32"), acc: T.Buffer((n, o, p_pad), "int32")):
        T.func_attr({"qos_prescheduled": True})
        for no in T.parallel(n * o):
            for pt in range(p_pad // tile):
                for p in T.vectorized(tile):
                    acc[no // o, no % o, pt * tile + p] = 0
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
                            lo: T.let = T.reinterpret(u16v, lookup(plane_regs(pl, row, 0), idx))
                            hi: T.let = T.reinterpret(u16v, lookup(plane_regs(pl, row, 1), idx))
                            s0[T.ramp(v * words, 1, words)] = s0[T.ramp(v * words, 1, words)] + lo
                            s1[T.ramp(v * words, 1, words)] = s1[T.ramp(v * words, 1, words)] + T.shift_right(
                                lo, T.broadcast(T.uint16(8), words))
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
                            acc[no // o, no % o, pos] = acc[no // o, no % o, pos] + leven + heven * 256 - cnt * bias
                            acc[no // o, no % o, pos + 1] = acc[no // o, no % o, pos + 1] + lodd + hodd * 256 - cnt * bias

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


def rows_stage_funcs(spec: Any, w: np.ndarray, isa: str, bias: int) -> tuple[RowsLayout, dict[str, Any]]:
    """Stand-alone PrimFuncs of the three stages for one conv ``spec`` (kernels.ConvSpec) with
    weights ``w``: ``taps(x) -> tp``, ``planes(lut, codes) -> pl``, ``micro(tp, pl, wrow) -> acc``
    (N, O, P_pad). For benchmarks and tests; the compiler builds the same stages through Relax."""
    from .kernels import _finish

    layout = rows_layout(w, spec.signed, spec.ho * spec.wo, isa)
    xs = te.placeholder(spec.x_shape, spec.code_dtype, name="x")
    tp = rows_inputs(xs, spec.kh, spec.kw, spec.stride, spec.padding, spec.dilation, spec.groups, spec.pad_code,
                     spec.signed, spec.ho, spec.wo, layout.p_pad)
    ls = te.placeholder(LUT_SHAPE, "int32", name="lut")
    cs = te.placeholder(layout.codes.shape, "int32", name="codes")
    kg = (spec.c // spec.groups) * spec.kh * spec.kw
    return layout, {
        "taps": _finish([xs, tp], None, None, True),
        "planes": _finish([ls, cs, planes(ls, cs, bias)], None, None, True),
        "micro": rows_microkernel(spec.n, spec.groups, spec.o, kg, len(layout.codes), layout, bias),
    }


def run_rows_conv(built: Any, prefix: str, layout: RowsLayout, x: np.ndarray, lut: np.ndarray, spec: Any,
                  repeat: int = 0, threads: int | None = None) -> tuple[np.ndarray, float]:
    """Run the stages built from ``rows_stage_funcs`` (named ``prefix + stage``): accumulators
    (N, O, Ho, Wo) and the summed best time in ms of the three stages (0 unless ``repeat``)."""
    ms = 0.0
    tp = built.run(prefix + "taps", x, repeat=repeat, threads=threads)
    ms += built.last_time_ns / 1e6 if repeat else 0.0
    pl = built.run(prefix + "planes", np.asarray(lut, np.int32), layout.codes, repeat=repeat, threads=threads)
    ms += built.last_time_ns / 1e6 if repeat else 0.0
    acc = built.run(prefix + "micro", tp, pl, layout.wrow, repeat=repeat, threads=threads)
    ms += built.last_time_ns / 1e6 if repeat else 0.0
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


def _schedule_planes(sch: "tvm.s_tir.Schedule", block: Any, features: frozenset[str], style: str | None) -> None:
    """(r, e): e -> (plane, byte), rows in parallel, bytes as vectors."""
    r, e = sch.get_loops(block)
    _, byte = sch.split(e, [None, 256])
    sch.parallel(r)
    sch.vectorize(byte)


#: Block schedules of this module's TE stages (``variants.block_schedules``); the
#: microkernel is written in its final form (``qos_prescheduled``).
SCHEDULES = {"rows_taps": _schedule_taps, "rows_planes": _schedule_planes}
register_block_schedules(SCHEDULES)


def emit_conv(bb: Any, ops: Any, low: Any) -> Any:
    """Relax emission of a ``rows`` variant (``variants.Variant.emit``; needs constant weights):
    taps + planes + the byte-permute microkernel, then the positions unpacked. Every
    PrimFunc is named after the variant."""
    from tvm import relax

    spec, wn, sym = ops.spec, ops.weights, low.symbol
    layout = rows_layout(wn, spec.signed, spec.ho * spec.wo, low.isa)
    kg = wn.shape[1] * spec.kh * spec.kw
    tp = bb.call_te(rows_inputs, ops.x, spec.kh, spec.kw, spec.stride, spec.padding, spec.dilation,
                    spec.groups, spec.pad_code, spec.signed, spec.ho, spec.wo, layout.p_pad,
                    primfunc_name_hint=f"{sym}_taps")
    pl = bb.call_te(planes, ops.lut, relax.const(layout.codes), low.bias, primfunc_name_hint=f"{sym}_planes")
    micro = rows_microkernel(spec.n, spec.groups, spec.o, kg, len(layout.codes), layout, low.bias)
    gv = bb.add_func(micro, f"{sym}_micro")
    acc = bb.emit(relax.call_tir(gv, [tp, pl, relax.const(layout.wrow)],
                                 relax.TensorType((spec.n, spec.o, layout.p_pad), "int32")))
    return bb.call_te(unpack_positions, acc, spec.ho, spec.wo, primfunc_name_hint=f"{sym}_unpack")


def bench_stages(spec: Any, low: Any, w: np.ndarray, target: Any) -> dict[str, Any]:
    """Stand-alone PrimFuncs of a ``rows`` variant for the weights ``w`` (``rows_stage_funcs``)."""
    return rows_stage_funcs(spec, w, low.isa, low.bias)[1]


def bench_run(built: Any, prefix: str, spec: Any, low: Any, x: Any, w: np.ndarray, lut: np.ndarray, repeat: int = 0,
              threads: int | None = None) -> tuple[np.ndarray, float]:
    """Run a ``rows`` variant built from ``bench_stages``: (acc, summed best ms of the stages or 0)."""
    layout = rows_layout(w, spec.signed, spec.ho * spec.wo, low.isa)
    return run_rows_conv(built, prefix, layout, x, np.asarray(lut, np.int32), spec, repeat, threads)
