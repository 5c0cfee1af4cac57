"""Low-rank conv on dot-product instructions: several factor terms summed by one instruction.

The low-rank lowering (``lut_factors``) writes an approximate conv as an exact conv over
``T`` factor terms, ``acc = sum_t sum_taps wterms[t][w] * xterms[t][x]``. This kernel puts
``G`` consecutive terms of one tap into the sub-lanes of one int32 lane, so a CPU
multiply-add that sums ``G`` products per lane computes ``G`` terms at once:

* ``avx512vnni`` (x86-64): ``vpdpbusd``, 4 unsigned x signed byte products per lane,
  accumulated (G = 4): the activation factors are stored + 128 and ``dot_bias`` takes the
  offset's share back out per output channel;
* ``avx512bw`` / ``avx2``: ``vpmaddwd``, 2 int16 products per lane (G = 2);
* ``neondot`` (aarch64, ARMv8.2-A feature ``dotprod``): ``sdot``, 4 int8 products per lane,
  accumulated (G = 4).

A 3-term layer (the exact product and 2 corrections) then costs one ``vpdpbusd`` or
``sdot``, or 2 ``vpmaddwd``, per tap and vector, against one ``vpmulld`` (2 micro-ops) of
the exact conv. (``vpdpwssd``, the fused ``vpmaddwd``, measured no faster than
``vpmaddwd`` + add.) The result is exact: the operands are the factors themselves (int8 for
the bundled signed circuits), none of these instructions saturates (int32 lanes wrap, so
intermediate sums may wrap freely), and ``lut_factors.accumulator_bound`` guarantees the
final sum fits int32.

Stages (each its own PrimFunc):

* ``dot_inputs`` (TE): the activations' factors, ``(N*C, Q, Hp, S, Wph, G)`` with the G
  terms of group ``q`` side by side per column and the padded columns regrouped by stride
  phase (column ``S*j + s`` at ``s*Wph + j``), so the positions of one output vector read
  ONE contiguous vector for any stride and dilation;
* ``dot_weights`` (TE): each weight's G factors of group ``q`` packed into one int32,
  ``(O, Cg, kh, kw, Q)``, rebuilt per call from the per-OP factor tables (a few KiB);
* ``dot_bias`` (NumPy, at compile time): the per-channel start of the accumulators that
  takes an activation offset back out, a per-OP tensor ``slot.<layer>.dotbias`` (``O`` int32);
* ``dot_microkernel`` (TIR, ``T.call_llvm_pure_intrin``): a register tile of ``OT``
  channels x ``R`` rows x ``V`` vectors of int32 accumulators over the whole reduction;
  threads split ``n x channel tiles``; writes ``(N, O, Ho, Wo_pad)``, and ``unpack`` keeps
  the first ``Wo`` columns (it fuses into the epilogue).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import te
from tvm.script import tirx as T

from ..errors import QosError
from ..numerics import code_offset
from .kernels import KERNEL_ATTR, register_block_schedules, _largest_divisor, parallel_outer
from .lut_factors import SLOT_SUFFIXES, layer_factors


@dataclass(frozen=True)
class DotIsa:
    """One multiply-add family: ``group`` products summed into each int32 lane.

    ``dtype``: the widest factor type it multiplies; ``xdtype``: the type the activation
    factors are staged in, ``xoffset`` added (vpdpbusd multiplies unsigned by signed bytes,
    so the activation factors are stored + 128 and the weights' share of the offset is
    subtracted per output channel, ``dot_bias``)."""

    group: int
    dtype: str
    xdtype: str
    xoffset: int
    fused: bool                   # intrinsic(acc, a, b) accumulates; else acc + intrinsic(a, b)
    intrinsics: dict              # int32 lanes per vector -> LLVM intrinsic
    accumulators: int             # accumulator vectors one tile keeps in registers
    requires: frozenset           # target features every width of it needs


#: Dot-product ISAs (keys: the ISA tokens of the registry names, ``variants``) in order of
#: preference; ``dot_isa`` picks the first a target has that multiplies the layer's factor type.
DOT_ISAS = {
    "avx512vnni": DotIsa(4, "int8", "uint8", 128, True, {16: "llvm.x86.avx512.vpdpbusd.512",
                                                          8: "llvm.x86.avx512.vpdpbusd.256",
                                                          4: "llvm.x86.avx512.vpdpbusd.128"}, 16,
                         frozenset({"avx512vnni", "avx512vl"})),
    "avx512bw": DotIsa(2, "int16", "int16", 0, False, {16: "llvm.x86.avx512.pmaddw.d.512",
                                                        8: "llvm.x86.avx2.pmadd.wd", 4: "llvm.x86.sse2.pmadd.wd"}, 16,
                       frozenset({"avx512bw"})),
    "avx2": DotIsa(2, "int16", "int16", 0, False, {8: "llvm.x86.avx2.pmadd.wd", 4: "llvm.x86.sse2.pmadd.wd"}, 8,
                   frozenset({"avx2"})),
    "neondot": DotIsa(4, "int8", "int8", 0, True, {4: "llvm.aarch64.neon.sdot.v4i32.v16i8"}, 16,
                      frozenset({"dotprod"})),
}
_WIDTH = {"int8": 8, "int16": 16, "int32": 32}


def dot_isa(features: frozenset[str], dtype: str) -> str | None:
    """The dot-product ISA a target's ``features`` offer for factors of ``dtype`` (None: none)."""
    for name, isa in DOT_ISAS.items():
        if isa.requires <= features and _WIDTH[dtype] <= _WIDTH[isa.dtype]:
            return name
    return None


def groups_of(terms: int, isa: str) -> int:
    """Term groups (instructions per tap and vector) of a ``terms``-term layer on ``isa``."""
    g = DOT_ISAS[isa].group
    return -(-terms // g)


@dataclass(frozen=True)
class DotLayout:
    """Compile-time tiling of one dot conv."""

    isa: str
    groups: int                   # Q term groups (the slots hold Q * G terms)
    lanes: int                    # int32 lanes (output positions) per vector
    channels: int                 # OT output channels per tile
    rows: int                     # R output rows per tile
    vectors: int                  # V vectors per tile row
    wph: int                      # staged columns per stride phase
    wo_pad: int                   # output columns rounded up to whole tiles

    @property
    def group(self) -> int:
        return DOT_ISAS[self.isa].group


def dot_layout(spec: Any, isa: str, terms: int) -> DotLayout:
    """Tile shape of the dot conv for a ``kernels.ConvSpec`` with ``terms`` factor terms."""
    if isa not in DOT_ISAS:
        raise QosError(f"no dot-product kernel for {isa!r} (have {', '.join(DOT_ISAS)})")
    d = DOT_ISAS[isa]
    widths = sorted(d.intrinsics)
    lanes = max([w for w in widths if w <= spec.wo] or widths[:1])    # no vector wider than a row
    channels = _largest_divisor(spec.o // spec.groups, 4)
    vectors = min(-(-spec.wo // lanes), 4, max(1, d.accumulators // channels))
    wo_pad = -(-spec.wo // (lanes * vectors)) * lanes * vectors
    rows = _largest_divisor(spec.ho, max(1, d.accumulators // (channels * vectors)))
    _, pl, _, pr = spec.padding
    sw, dw = spec.stride[1], spec.dilation[1]
    wph = max(-(-(spec.w + pl + pr) // sw), wo_pad + (spec.kw - 1) * dw // sw)
    return DotLayout(isa, groups_of(terms, isa), lanes, channels, rows, vectors, wph, wo_pad)


# --------------------------------------------------------------------------- TE stages
def dot_inputs(x: te.Tensor, xtab: te.Tensor, layout: DotLayout, spec: Any, name: str = "dot_inputs") -> te.Tensor:
    """(N*C, Q, Hp, S, Wph, G): the factor of every term at every padded activation (plus
    the ISA's ``xoffset``), the G terms of a group side by side, columns by stride phase
    (N and C share a dimension: the C runtime's tensors have rank <= 6)."""
    d = DOT_ISAS[layout.isa]
    g, q_ = d.group, layout.groups
    if int(xtab.shape[0]) != g * q_:
        raise QosError(f"the dot kernel wants {g * q_} activation factor terms, got {int(xtab.shape[0])}")
    n, c, h, w = spec.x_shape
    pt, pl, pb, pr = spec.padding
    sw = spec.stride[1]
    off = code_offset(spec.signed)
    pad_idx = spec.pad_code + off

    def f(nc, q, i, ph, jj, e):
        j = jj * sw + ph                                    # the padded column
        v = tvm.tirx.if_then_else(tvm.tirx.all(i >= pt, i < h + pt, j >= pl, j < w + pl),
                                  x[nc // c, nc % c, i - pt, j - pl].astype("int32") + off, pad_idx)
        return (xtab[q * g + e, v].astype("int32") + d.xoffset).astype(d.xdtype)

    return te.compute((n * c, q_, h + pt + pb, sw, layout.wph, g), f, name=name, attrs={KERNEL_ATTR: "dot_inputs"})


def dot_weights(w: te.Tensor, wtab: te.Tensor, layout: DotLayout, signed: bool,
                name: str = "dot_weights") -> te.Tensor:
    """(O, Cg, kh, kw, Q) int32: the G factors of term group q of every weight, packed
    little-endian (term ``q*G + e`` in sub-lane e); one lookup per weight and group in a
    (Q, 256) table of packed factors."""
    g = layout.group
    bits = 32 // g
    mask = (1 << bits) - 1
    off = code_offset(signed)

    def pack(q, a):
        out = tvm.tirx.bitwise_and(wtab[q * g, a].astype("int32"), mask)
        for e in range(1, g):
            part = tvm.tirx.bitwise_and(wtab[q * g + e, a].astype("int32"), mask)
            out = tvm.tirx.bitwise_or(out, tvm.tirx.shift_left(part, bits * e))
        return out

    packed = te.compute((layout.groups, 256), pack, name=name + "_table", attrs={KERNEL_ATTR: "dot_table"})
    o, cg, kh, kw = (int(s) for s in w.shape)
    return te.compute((o, cg, kh, kw, layout.groups),
                      lambda oo, cc, u, v, q: packed[q, w[oo, cc, u, v].astype("int32") + off],
                      name=name, attrs={KERNEL_ATTR: "dot_weights"})


#: The per-OP graph input of a dot layer whose ISA stores the activation factors with an offset.
BIAS_SUFFIX = "dotbias"


def needs_bias(isa: str) -> bool:
    """Whether a dot kernel on ``isa`` starts its accumulators from ``dot_bias`` (an activation offset)."""
    return bool(DOT_ISAS[isa].xoffset)


def dot_bias(w: np.ndarray, wterms: np.ndarray, isa: str, signed: bool) -> np.ndarray:
    """(O,) int32: what the activations' ``xoffset`` adds to each output channel, negated
    (``-xoffset * sum`` of every weight factor of the channel). Weights and factors are
    constants of an OP, so the compiler computes it once per OP (the per-OP tensor
    ``slot.<layer>.dotbias``), not per inference."""
    off = code_offset(signed)
    per_code = -DOT_ISAS[isa].xoffset * np.asarray(wterms, np.int64).sum(0)        # (256,)
    idx = np.asarray(w, np.int64).reshape(w.shape[0], -1) + off
    return per_code[idx].sum(1).astype(np.int32)


def unpack(acc: te.Tensor, wo: int) -> te.Tensor:
    """(N, O, Ho, Wo_pad) -> (N, O, Ho, Wo): the real columns (fuses into the epilogue)."""
    n, o, ho = (int(s) for s in acc.shape[:3])
    return te.compute((n, o, ho, wo), lambda a, b, i, j: acc[a, b, i, j], name="dot_unpack")


# --------------------------------------------------------------------------- microkernel
def dot_microkernel(spec: Any, layout: DotLayout, name: str | None = None) -> "tvm.tirx.PrimFunc":
    """PrimFunc ``(xf (N*C, Q, Hp, S, Wph, G), wp (O, Cg, kh, kw, Q) i32, bias (O,) i32,
    acc (N, O, Ho, Wo_pad) i32)``: ``bias`` starts each channel's accumulators (``dot_bias``
    for an ISA with an activation offset, else zeros)."""
    d = DOT_ISAS[layout.isa]
    g, q_, lanes = d.group, layout.groups, layout.lanes
    ot_, r_, v_ = layout.channels, layout.rows, layout.vectors
    n, c, o, kh, kw, ho = spec.n, spec.c, spec.o, spec.kh, spec.kw, spec.ho
    cg, og = spec.c // spec.groups, spec.o // spec.groups
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    pt, _, pb, _ = spec.padding
    hp, wph, wo_pad = spec.h + pt + pb, layout.wph, layout.wo_pad
    wst = sw * wph
    tiles, span = o // ot_, v_ * lanes
    wvt, ivt = f"{d.dtype}x{lanes * g}", f"int32x{lanes}"
    intrin = d.intrinsics[lanes]
    size = n * c * q_ * hp * wst * g

    def lane(z):                      # accumulator vector z of the tile
        return T.ramp(z * lanes, 1, lanes)

    def dot(a, xv, wv):
        if d.fused:
            return T.call_llvm_pure_intrin(ivt, intrin, a, xv, wv)
        return a + T.call_llvm_pure_intrin(ivt, intrin, xv, wv)

    @T.prim_func(private=True)
    def kernel(xf: T.Buffer((n * c, q_, hp, sw, wph, g), d.xdtype), wp: T.Buffer((o, cg, kh, kw, q_), "int32"),
               bias: T.Buffer((o,), "int32"), acc: T.Buffer((n, o, ho, wo_pad), "int32")):
        T.func_attr({"qos_prescheduled": True})
        xs = T.decl_buffer((size,), d.xdtype, data=xf.data)
        for nt in T.parallel(n * tiles):
            for it in range(ho // r_):
                for jt in range(wo_pad // span):
                    a = T.decl_buffer((ot_ * r_ * v_ * lanes,), "int32", scope="local")
                    for ot in T.unroll(ot_):
                        for z in T.unroll(r_ * v_):
                            a[lane(ot * r_ * v_ + z)] = T.broadcast(bias[nt % tiles * ot_ + ot], lanes)
                    for cc, u, v, q in T.grid(cg, kh, kw, q_):
                        for r in T.unroll(r_):
                            for vv in T.unroll(v_):
                                col: T.let = (v * dw) % sw * wph + (v * dw) // sw + jt * span + vv * lanes
                                row: T.let = (nt // tiles * c + nt % tiles * ot_ // og * cg + cc) * q_ + q
                                base: T.let = ((row * hp + (it * r_ + r) * sh + u * dh) * wst + col) * g
                                xv: T.let = xs[T.ramp(base, 1, lanes * g)]
                                for ot in T.unroll(ot_):
                                    wv: T.let = T.reinterpret(wvt, T.broadcast(wp[nt % tiles * ot_ + ot, cc, u, v, q],
                                                                               lanes))
                                    a[lane((ot * r_ + r) * v_ + vv)] = dot(a[lane((ot * r_ + r) * v_ + vv)], xv, wv)
                    for ot in T.unroll(ot_):
                        for r in T.unroll(r_):
                            for vv in T.unroll(v_):
                                acc[nt // tiles, nt % tiles * ot_ + ot, it * r_ + r,
                                    T.ramp(jt * span + vv * lanes, 1, lanes)] = a[lane((ot * r_ + r) * v_ + vv)]

    return kernel.with_attr("global_symbol", name) if name else kernel


def dot_stage_funcs(spec: Any, terms: int, dtype: str, isa: str, target: Any = None) -> tuple[DotLayout, dict]:
    """Stand-alone PrimFuncs of the stages for one conv ``spec`` (kernels.ConvSpec):
    ``inputs(x, xterms) -> xf``, ``weights(w, wterms) -> wp``, ``micro(xf, wp, b) -> acc`` (N,
    O, Ho, Wo_pad), with ``b = dot_bias(...)`` (zeros without an activation offset), computed
    ahead like the compiler's per-OP tensor. The factor tables hold ``groups * G`` terms
    (``lut_factors.layer_factors``). For benchmarks and tests; the compiler builds the same
    stages through Relax."""
    from .kernels import _finish

    layout = dot_layout(spec, isa, terms)
    t = layout.groups * layout.group
    xs = te.placeholder(spec.x_shape, spec.code_dtype, name="x")
    ws = te.placeholder(spec.w_shape, spec.code_dtype, name="w")
    xt = te.placeholder((t, 256), dtype, name="xterms")
    wt = te.placeholder((t, 256), dtype, name="wterms")
    funcs = {"inputs": _finish([xs, xt, dot_inputs(xs, xt, layout, spec)], None, target, True),
             "weights": _finish([ws, wt, dot_weights(ws, wt, layout, spec.signed)], None, target, True),
             "micro": dot_microkernel(spec, layout)}
    return layout, funcs


def run_dot_conv(built: Any, prefix: str, spec: Any, x: Any, w: Any, wterms: Any, xterms: Any, isa: str,
                 repeat: int = 0, threads: int | None = None) -> tuple[Any, float]:
    """Run the stages built from ``dot_stage_funcs`` (named ``prefix + stage``): accumulators
    (N, O, Ho, Wo) and the summed best time in ms of the stages (0 unless ``repeat``)."""
    ms = 0.0

    def run(stage: str, *args: Any) -> Any:
        nonlocal ms
        out = built.run(prefix + stage, *args, repeat=repeat, threads=threads)
        ms += built.last_time_ns / 1e6 if repeat else 0.0
        return out

    xf, wp = run("inputs", x, xterms), run("weights", w, wterms)
    bias = dot_bias(w, wterms, isa, spec.signed) if needs_bias(isa) else np.zeros(spec.o, np.int32)
    return run("micro", xf, wp, bias)[..., :spec.wo], ms


# --------------------------------------------------------------------------- registry hooks
def _schedule_inputs(sch: "tvm.s_tir.Schedule", block: Any, features: frozenset[str], style: str | None) -> None:
    """(n*c, q, i, phase, column, term): ``n*c`` in parallel, the G terms of a column unrolled."""
    nc, *_, e = sch.get_loops(block)
    sch.parallel(nc)
    sch.unroll(e)


#: Block schedules of this module's TE stages (``variants.block_schedules``); the
#: microkernel is written in its final form (``qos_prescheduled``).
SCHEDULES = {"dot_inputs": _schedule_inputs, "dot_weights": parallel_outer}
register_block_schedules(SCHEDULES)


def emit_conv(bb: Any, ops: Any, low: Any) -> Any:
    """Relax emission of a ``dot`` variant (``variants.Variant.emit``): inputs + weights + the
    microkernel, then ``unpack``; the factor tables are the per-OP graph inputs
    ``slot.<layer>.wterms|xterms``, and with an activation offset the accumulators start from
    the per-OP graph input ``slot.<layer>.dotbias`` (``dot_bias``). Every PrimFunc is named after
    the variant."""
    from tvm import relax

    wt, xt = ops.slot_inputs(SLOT_SUFFIXES, "low-rank factors")
    spec, sym = ops.spec, low.symbol
    layout = dot_layout(spec, low.isa, low.terms)
    # closures: call_te passes only tensors and plain values through
    xf = bb.call_te(lambda a, t: dot_inputs(a, t, layout, spec), ops.x, xt, primfunc_name_hint=f"{sym}_inputs")
    wp = bb.call_te(lambda a, t: dot_weights(a, t, layout, spec.signed), ops.w, wt,
                    primfunc_name_hint=f"{sym}_weights")
    if needs_bias(low.isa):
        bias = ops.slot_inputs((BIAS_SUFFIX,), "dot-kernel bias")[0]
    else:
        bias = relax.const(np.zeros(spec.o, np.int32))
    gv = bb.add_func(dot_microkernel(spec, layout), f"{sym}_micro")
    acc = bb.emit(relax.call_tir(gv, [xf, wp, bias],
                                 relax.TensorType((spec.n, spec.o, spec.ho, layout.wo_pad), "int32")))
    return bb.call_te(unpack, acc, spec.wo, primfunc_name_hint=f"{sym}_unpack")


def bench_stages(spec: Any, low: Any, w: Any, target: Any) -> dict[str, Any]:
    """Stand-alone PrimFuncs of a ``dot`` variant (``dot_stage_funcs``)."""
    return dot_stage_funcs(spec, low.terms, low.dtype, low.isa, target)[1]


def bench_run(built: Any, prefix: str, spec: Any, low: Any, x: Any, w: Any, lut: np.ndarray, repeat: int = 0,
              threads: int | None = None) -> tuple[np.ndarray, float]:
    """Run a ``dot`` variant built from ``bench_stages`` on the circuit ``lut``: (acc, summed best ms or 0)."""
    wt, xt = layer_factors(lut, spec.signed, low.slot_terms, low.dtype)
    return run_dot_conv(built, prefix, spec, x, w, wt, xt, low.isa, repeat, threads)
