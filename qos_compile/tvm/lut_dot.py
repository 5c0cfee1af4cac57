"""Low-rank conv on dot-product instructions: several factor terms summed by one instruction.

The low-rank lowering (``lut_factors``) writes an approximate conv as an exact conv over
``T`` factor terms, ``acc = sum_t sum_taps wterms[t][w] * xterms[t][x]``. The reduction of
one tap (kernel row and column) runs over the pairs (input channel ``c``, term ``t``) of the
conv group, flattened to ``k = c*T + t`` and cut into *chunks* of ``G``; a CPU multiply-add
that sums ``G`` products per int32 lane computes one chunk at once (the exact product, T = 1,
packs ``G`` channels per lane as an ordinary int8 conv does; a chunk past the group's last
channel is zero-filled):

* ``avx512vnni`` (x86-64): ``vpdpbusd``, 4 unsigned x signed byte products per lane,
  accumulated (G = 4). int8 factors: the activation factors are stored + 128 (unsigned) and
  ``dot_bias`` takes the offset's share back out per output channel. Factors in 0..255 (an
  unsigned circuit's exact product, the exact part of its ``rows8`` kernel): the weights are
  the unsigned operand and the activation factors are stored - 128 (signed), the same bias
  with the other sign;
* ``avxvnni`` (x86-64 with AVX-VNNI but no AVX-512, e.g. Intel Alder Lake and later client
  cores): the same ``vpdpbusd`` in its VEX form, on 256-bit vectors;
* ``avx512bw`` / ``avx2``: ``vpmaddwd``, 2 int16 products per lane (G = 2);
* ``neondot`` (aarch64, ARMv8.2-A feature ``dotprod``): ``sdot``, 4 int8 products per lane,
  accumulated (G = 4); factors in 0..255 on ``udot`` (the same extension, unsigned bytes),
  no offset.

A ``T``-term layer then costs ``T/G`` ``vpdpbusd``/``sdot`` (``T/2`` ``vpmaddwd``) per
channel, tap and vector, against one ``vpmulld`` (2 micro-ops) of the plain exact conv.
(``vpdpwssd``, the fused ``vpmaddwd``, measured no faster than ``vpmaddwd`` + add.) The
result is exact: the operands are the factors themselves (int8 for the bundled signed
circuits), none of these instructions saturates (int32 lanes wrap, so intermediate sums
may wrap freely), and ``lut_factors.accumulator_bound`` guarantees the final sum fits int32.

Stages (each its own PrimFunc):

* ``dot_inputs`` (TE): the activations' factors, ``(N*groups, K, Hp, S, Wph, G)`` with the G
  factors of chunk ``k`` side by side per column and the padded columns regrouped by stride
  phase (column ``S*j + s`` at ``s*Wph + j``), so the positions of one output vector read
  ONE contiguous vector for any stride and dilation;
* ``pack_weights`` (NumPy, at compile time): the G weight factors of each chunk packed into
  one int32, ``(O, K, kh, kw)``, a per-OP tensor ``slot.<layer>.dotw`` (weights and factor
  tables are constants of an OP; ``4*T/G`` bytes per weight and circuit);
* ``dot_bias`` (NumPy, at compile time): the per-channel start of the accumulators that
  takes an activation offset back out, a per-OP tensor ``slot.<layer>.dotbias`` (``O`` int32);
* ``dot_microkernel`` (TIR, ``T.call_llvm_pure_intrin``): a register tile of ``OT``
  channels x ``R`` rows x ``V`` vectors of int32 accumulators over the whole reduction;
  threads split ``n x channel tiles``; writes ``(N, O, Ho, Wo_pad)``, and ``unpack`` keeps
  the first ``Wo`` columns (it fuses into the epilogue).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import te
from tvm.script import tirx as T

from ..errors import QosError
from ..numerics import code_offset
from .kernels import KERNEL_ATTR, register_block_schedules, _largest_divisor
from .lut_factors import XTERMS_SUFFIX, layer_factors


@dataclass(frozen=True)
class DotIsa:
    """One multiply-add family: ``group`` products summed into each int32 lane.

    ``dtype``: its operand type; ``staging``: per factor type it multiplies
    (``lut_factors.operand_dtype``), how the operands go in: (the type the activation factors
    are staged in, the offset added to them, whether the weights are the first multiplicand).
    vpdpbusd multiplies unsigned by signed bytes, so one side is offset by 128 and the weights'
    share of the offset comes back out per output channel (``dot_bias``)."""

    group: int
    dtype: str
    staging: dict                 # factor type -> (activation staging type, offset, weights first)
    fused: bool                   # intrinsic(acc, a, b) accumulates; else acc + intrinsic(a, b)
    intrinsics: dict              # int32 lanes per vector -> LLVM intrinsic
    accumulators: int             # accumulator vectors one tile keeps in registers
    requires: frozenset           # target features every width of it needs
    #: factor type -> its own intrinsics where they differ (NEON: ``udot`` for unsigned bytes)
    dtype_intrinsics: dict = field(default_factory=dict)

    def intrinsic(self, dtype: str, lanes: int) -> str:
        """The LLVM intrinsic multiplying ``dtype`` factors on ``lanes`` int32 lanes."""
        return self.dtype_intrinsics.get(dtype, self.intrinsics)[lanes]


#: Dot-product ISAs (keys: the ISA tokens of the registry names, ``variants``) in order of
#: preference; ``dot_isa`` picks the first a target has that multiplies the layer's factor type.
DOT_ISAS = {
    "avx512vnni": DotIsa(4, "int8", {"int8": ("uint8", 128, False), "uint8": ("int8", -128, True)}, True,
                         {16: "llvm.x86.avx512.vpdpbusd.512",
                                                          8: "llvm.x86.avx512.vpdpbusd.256",
                                                          4: "llvm.x86.avx512.vpdpbusd.128"}, 16,
                         frozenset({"avx512vnni", "avx512vl"})),
    # the same intrinsics: LLVM encodes them VEX (AVX-VNNI) where the target has no AVX512VL
    "avxvnni": DotIsa(4, "int8", {"int8": ("uint8", 128, False), "uint8": ("int8", -128, True)}, True,
                      {8: "llvm.x86.avx512.vpdpbusd.256", 4: "llvm.x86.avx512.vpdpbusd.128"}, 8,
                      frozenset({"avx_vnni"})),
    "avx512bw": DotIsa(2, "int16", dict.fromkeys(("int8", "uint8", "int16"), ("int16", 0, False)), False,
                       {16: "llvm.x86.avx512.pmaddw.d.512",
                                                        8: "llvm.x86.avx2.pmadd.wd", 4: "llvm.x86.sse2.pmadd.wd"}, 16,
                       frozenset({"avx512bw"})),
    "avx2": DotIsa(2, "int16", dict.fromkeys(("int8", "uint8", "int16"), ("int16", 0, False)), False,
                   {8: "llvm.x86.avx2.pmadd.wd", 4: "llvm.x86.sse2.pmadd.wd"}, 8,
                   frozenset({"avx2"})),
    # sdot for int8 factors; udot (the same extension) for factors in 0..255, both operands unsigned
    "neondot": DotIsa(4, "int8", {"int8": ("int8", 0, False), "uint8": ("uint8", 0, True)}, True,
                      {4: "llvm.aarch64.neon.sdot.v4i32.v16i8"}, 16, frozenset({"dotprod"}),
                      {"uint8": {4: "llvm.aarch64.neon.udot.v4i32.v16i8"}}),
}


def dot_isa(features: frozenset[str], dtype: str) -> str | None:
    """The dot-product ISA a target's ``features`` offer for factors of ``dtype`` (None: none)."""
    for name, isa in DOT_ISAS.items():
        if isa.requires <= features and dtype in isa.staging:
            return name
    return None


def multiplies(isa: str, dtype: str) -> bool:
    """Whether ``isa`` multiplies factors of type ``dtype``."""
    return dtype in DOT_ISAS[isa].staging


def chunks_of(channels: int, terms: int, isa: str) -> int:
    """Chunks of ``G`` (multiply-adds per tap and vector) of ``channels`` input channels of
    a ``terms``-term layer on ``isa``."""
    return -(-channels * terms // DOT_ISAS[isa].group)


@dataclass(frozen=True)
class DotLayout:
    """Compile-time tiling of one dot conv."""

    isa: str
    dtype: str                    # the factors' type (``lut_factors.operand_dtype``)
    terms: int                    # T factor terms per channel (the slots hold T terms)
    chunks: int                   # K chunks of G (channel, term) pairs per conv group
    lanes: int                    # int32 lanes (output positions) per vector
    channels: int                 # OT output channels per tile
    rows: int                     # R output rows per tile
    vectors: int                  # V vectors per tile row
    wph: int                      # staged columns per stride phase
    wo_pad: int                   # output columns rounded up to whole tiles

    @property
    def group(self) -> int:
        return DOT_ISAS[self.isa].group

    @property
    def staging(self) -> tuple[str, int, bool]:
        """(activation staging type, offset, weights first) of this layout's factors."""
        return DOT_ISAS[self.isa].staging[self.dtype]


def dot_layout(spec: Any, isa: str, terms: int, dtype: str = "int8") -> DotLayout:
    """Tile shape of the dot conv for a ``kernels.ConvSpec`` with ``terms`` factor terms of ``dtype``."""
    if isa not in DOT_ISAS:
        raise QosError(f"no dot-product kernel for {isa!r} (have {', '.join(DOT_ISAS)})")
    d = DOT_ISAS[isa]
    if dtype not in d.staging:
        raise QosError(f"the {isa} dot kernel does not multiply {dtype} factors")
    widths = sorted(d.intrinsics)
    lanes = max([w for w in widths if w <= spec.wo] or widths[:1])    # no vector wider than a row
    channels = _largest_divisor(spec.o // spec.groups, 4)
    vectors = min(-(-spec.wo // lanes), 4, max(1, d.accumulators // channels))
    wo_pad = -(-spec.wo // (lanes * vectors)) * lanes * vectors
    rows = _largest_divisor(spec.ho, max(1, d.accumulators // (channels * vectors)))
    _, pl, _, pr = spec.padding
    sw, dw = spec.stride[1], spec.dilation[1]
    wph = max(-(-(spec.w + pl + pr) // sw), wo_pad + (spec.kw - 1) * dw // sw)
    return DotLayout(isa, dtype, terms, chunks_of(spec.c // spec.groups, terms, isa), lanes, channels, rows, vectors,
                     wph, wo_pad)


# --------------------------------------------------------------------------- TE stages
def dot_inputs(x: te.Tensor, xtab: te.Tensor, layout: DotLayout, spec: Any, name: str = "dot_inputs") -> te.Tensor:
    """(N*groups, K, Hp, S, Wph, G): the factor of every (channel, term) pair at every padded
    activation (plus the staging offset, ``DotLayout.staging``), the G pairs of a chunk side by side, columns by
    stride phase (N and the conv groups share a dimension: the C runtime's tensors have rank
    <= 6). The pairs past the group's last channel hold the offset alone (their weight is 0)."""
    d = DOT_ISAS[layout.isa]
    g, t_, k_ = d.group, layout.terms, layout.chunks
    xdtype, xoffset, _ = layout.staging
    if int(xtab.shape[0]) != t_:
        raise QosError(f"the dot kernel wants {t_} activation factor terms, got {int(xtab.shape[0])}")
    n, c, h, w = spec.x_shape
    cg = c // spec.groups
    pt, pl, pb, pr = spec.padding
    sw = spec.stride[1]
    off = code_offset(spec.signed)
    pad_idx = spec.pad_code + off

    def f(ng, k, i, ph, jj, e):
        j = jj * sw + ph                                    # the padded column
        pair = k * g + e
        cc, t = pair // t_, pair % t_
        ch = ng % spec.groups * cg + tvm.tirx.min(cc, cg - 1)
        v = tvm.tirx.if_then_else(tvm.tirx.all(i >= pt, i < h + pt, j >= pl, j < w + pl),
                                  x[ng // spec.groups, ch, i - pt, j - pl].astype("int32") + off, pad_idx)
        factor = tvm.tirx.if_then_else(cc < cg, xtab[t, v].astype("int32"), 0)
        return (factor + xoffset).astype(xdtype)

    return te.compute((n * spec.groups, k_, h + pt + pb, sw, layout.wph, g), f, name=name,
                      attrs={KERNEL_ATTR: "dot_inputs"})


def pack_weights(w: np.ndarray, wterms: np.ndarray, isa: str, signed: bool) -> np.ndarray:
    """(O, K, kh, kw) int32: the G weight factors of chunk k of every tap, packed little-endian
    (pair ``k*G + e`` = channel ``(k*G + e) // T``, term ``% T`` in sub-lane e; 0 past the
    group's last channel). ``wterms``: the (T, 256) weight factor table of one circuit."""
    g = DOT_ISAS[isa].group
    bits, t_ = 32 // g, int(wterms.shape[0])
    o, cg, kh, kw = (int(v) for v in w.shape)
    k_ = chunks_of(cg, t_, isa)
    f = np.asarray(wterms, np.int64)[:, np.asarray(w, np.int64) + code_offset(signed)]   # (T, O, Cg, kh, kw)
    pairs = np.zeros((o, k_ * g, kh, kw), np.int64)
    pairs[:, :cg * t_] = f.transpose(1, 2, 0, 3, 4).reshape(o, cg * t_, kh, kw)
    lanes = (pairs.reshape(o, k_, g, kh, kw) & ((1 << bits) - 1)) << (bits * np.arange(g)).reshape(1, 1, g, 1, 1)
    return np.ascontiguousarray(lanes.sum(2).astype(np.uint32).view(np.int32))


#: The per-OP graph input of a dot layer: its packed weight factors (``pack_weights``).
WEIGHTS_SUFFIX = "dotw"
#: The per-OP graph input of a dot layer whose ISA stores the activation factors with an offset.
BIAS_SUFFIX = "dotbias"


def needs_bias(isa: str, dtype: str) -> bool:
    """Whether a dot kernel on ``isa`` with ``dtype`` factors starts its accumulators from
    ``dot_bias`` (an activation offset)."""
    return bool(DOT_ISAS[isa].staging[dtype][1])


def dot_bias(w: np.ndarray, wterms: np.ndarray, isa: str, signed: bool) -> np.ndarray:
    """(O,) int32: what the activations' staging offset adds to each output channel, negated
    (``-offset * sum`` of every weight factor of the channel; the factors' type is
    ``wterms``'). Weights and factors are
    constants of an OP, so the compiler computes it once per OP (the per-OP tensor
    ``slot.<layer>.dotbias``), not per inference."""
    off = code_offset(signed)
    offset = DOT_ISAS[isa].staging[str(np.asarray(wterms).dtype)][1]
    per_code = -offset * np.asarray(wterms, np.int64).sum(0)                      # (256,)
    idx = np.asarray(w, np.int64).reshape(w.shape[0], -1) + off
    return per_code[idx].sum(1).astype(np.int32)


def unpack(acc: te.Tensor, wo: int) -> te.Tensor:
    """(N, O, Ho, Wo_pad) -> (N, O, Ho, Wo): the real columns (fuses into the epilogue)."""
    n, o, ho = (int(s) for s in acc.shape[:3])
    return te.compute((n, o, ho, wo), lambda a, b, i, j: acc[a, b, i, j], name="dot_unpack")


# --------------------------------------------------------------------------- microkernel
def dot_microkernel(spec: Any, layout: DotLayout, name: str | None = None) -> "tvm.tirx.PrimFunc":
    """PrimFunc ``(xf (N*groups, K, Hp, S, Wph, G), wp (O, K, kh, kw) i32, bias (O,) i32,
    acc (N, O, Ho, Wo_pad) i32)``: ``bias`` starts each channel's accumulators (``dot_bias``
    for an ISA with an activation offset, else zeros)."""
    d = DOT_ISAS[layout.isa]
    g, k_, lanes = d.group, layout.chunks, layout.lanes
    ot_, r_, v_ = layout.channels, layout.rows, layout.vectors
    n, c, o, kh, kw, ho = spec.n, spec.c, spec.o, spec.kh, spec.kw, spec.ho
    og = spec.o // spec.groups
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    pt, _, pb, _ = spec.padding
    hp, wph, wo_pad = spec.h + pt + pb, layout.wph, layout.wo_pad
    wst = sw * wph
    tiles, span = o // ot_, v_ * lanes
    xdtype, _, weights_first = layout.staging
    wvt, ivt = f"{('u' if weights_first else '') + d.dtype}x{lanes * g}", f"int32x{lanes}"
    intrin = d.intrinsic(layout.dtype, lanes)
    size = n * spec.groups * k_ * hp * wst * g

    def lane(z):                      # accumulator vector z of the tile
        return T.ramp(z * lanes, 1, lanes)

    def dot(a, xv, wv):
        u, v = (wv, xv) if weights_first else (xv, wv)      # vpdpbusd: unsigned operand first
        if d.fused:
            return T.call_llvm_pure_intrin(ivt, intrin, a, u, v)
        return a + T.call_llvm_pure_intrin(ivt, intrin, u, v)

    @T.prim_func(private=True)
    def kernel(xf: T.Buffer((n * spec.groups, k_, hp, sw, wph, g), xdtype), wp: T.Buffer((o, k_, kh, kw), "int32"),
               bias: T.Buffer((o,), "int32"), acc: T.Buffer((n, o, ho, wo_pad), "int32")):
        T.func_attr({"qos_prescheduled": True})
        xs = T.decl_buffer((size,), xdtype, data=xf.data)
        for nt in T.parallel(n * tiles):
            for it in range(ho // r_):
                for jt in range(wo_pad // span):
                    a = T.decl_buffer((ot_ * r_ * v_ * lanes,), "int32", scope="local")
                    for ot in T.unroll(ot_):
                        for z in T.unroll(r_ * v_):
                            a[lane(ot * r_ * v_ + z)] = T.broadcast(bias[nt % tiles * ot_ + ot], lanes)
                    for k, u, v in T.grid(k_, kh, kw):
                        for r in T.unroll(r_):
                            for vv in T.unroll(v_):
                                col: T.let = (v * dw) % sw * wph + (v * dw) // sw + jt * span + vv * lanes
                                row: T.let = (nt // tiles * spec.groups + nt % tiles * ot_ // og) * k_ + k
                                base: T.let = ((row * hp + (it * r_ + r) * sh + u * dh) * wst + col) * g
                                xv: T.let = xs[T.ramp(base, 1, lanes * g)]
                                for ot in T.unroll(ot_):
                                    wv: T.let = T.reinterpret(wvt, T.broadcast(wp[nt % tiles * ot_ + ot, k, u, v],
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
    ``inputs(x, xterms) -> xf``, ``micro(xf, wp, b) -> acc`` (N, O, Ho, Wo_pad), with
    ``wp = pack_weights(...)`` and ``b = dot_bias(...)`` (zeros without an activation offset)
    computed ahead like the compiler's per-OP tensors. The factor tables hold ``terms`` terms
    (``lut_factors.layer_factors``). For benchmarks and tests; the compiler builds the same
    stages through Relax."""
    from .kernels import _finish

    layout = dot_layout(spec, isa, terms, dtype)
    t = layout.terms
    xs = te.placeholder(spec.x_shape, spec.code_dtype, name="x")
    xt = te.placeholder((t, 256), dtype, name="xterms")
    funcs = {"inputs": _finish([xs, xt, dot_inputs(xs, xt, layout, spec)], None, target, True),
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

    xf, wp = run("inputs", x, xterms), pack_weights(w, wterms, isa, spec.signed)
    dtype = str(np.asarray(wterms).dtype)
    bias = dot_bias(w, wterms, isa, spec.signed) if needs_bias(isa, dtype) else np.zeros(spec.o, np.int32)
    return run("micro", xf, wp, bias)[..., :spec.wo], ms


# --------------------------------------------------------------------------- registry hooks
def _schedule_inputs(sch: "tvm.s_tir.Schedule", block: Any, features: frozenset[str], style: str | None) -> None:
    """(n*groups, chunk, i, phase, column, pair): ``n*groups x chunks`` in parallel, the G pairs of
    a column unrolled."""
    ng, k, *_, e = sch.get_loops(block)
    sch.parallel(sch.fuse(ng, k))
    sch.unroll(e)


#: Block schedules of this module's TE stages (``variants.block_schedules``); the
#: microkernel is written in its final form (``qos_prescheduled``).
SCHEDULES = {"dot_inputs": _schedule_inputs}
register_block_schedules(SCHEDULES)


def emit_conv(bb: Any, ops: Any, low: Any) -> Any:
    """Relax emission of a ``dot`` variant (``variants.Variant.emit``): inputs + the
    microkernel, then ``unpack``; the activation factor table and the packed weights are the
    per-OP graph inputs ``slot.<layer>.xterms|dotw`` (``per_op_tensors``), and with an
    activation offset the accumulators start from the per-OP graph input
    ``slot.<layer>.dotbias``. Every PrimFunc is named after the variant."""
    from tvm import relax

    xt, wp = ops.slot_inputs((XTERMS_SUFFIX, WEIGHTS_SUFFIX), "dot-kernel factors")
    spec, sym = ops.spec, low.symbol
    layout = dot_layout(spec, low.isa, low.terms, low.dtype)
    # a closure: call_te passes only tensors and plain values through
    xf = bb.call_te(lambda a, t: dot_inputs(a, t, layout, spec), ops.x, xt, primfunc_name_hint=f"{sym}_inputs")
    if needs_bias(low.isa, low.dtype):
        bias = ops.slot_inputs((BIAS_SUFFIX,), "dot-kernel bias")[0]
    else:
        bias = relax.const(np.zeros(spec.o, np.int32))
    gv = bb.add_func(dot_microkernel(spec, layout), f"{sym}_micro")
    acc = bb.emit(relax.call_tir(gv, [xf, wp, bias],
                                 relax.TensorType((spec.n, spec.o, spec.ho, layout.wo_pad), "int32")))
    return bb.call_te(unpack, acc, spec.wo, primfunc_name_hint=f"{sym}_unpack")


def per_op_tensors(w: np.ndarray, lut: np.ndarray, low: Any) -> dict[str, np.ndarray]:
    """The per-OP tensors of a ``dot`` layer with weights ``w`` running the circuit ``lut``
    (``variants.Variant.per_op``): activation factors, packed weight factors and, with an
    activation offset, the accumulator start."""
    signed = low.variant.signed
    wt, xt = layer_factors(lut, signed, low.terms, low.dtype)
    out = {XTERMS_SUFFIX: xt, WEIGHTS_SUFFIX: pack_weights(w, wt, low.isa, signed)}
    if needs_bias(low.isa, low.dtype):
        out[BIAS_SUFFIX] = dot_bias(w, wt, low.isa, signed)
    return out


def bench_stages(spec: Any, low: Any, w: Any, target: Any) -> dict[str, Any]:
    """Stand-alone PrimFuncs of a ``dot`` variant (``dot_stage_funcs``)."""
    return dot_stage_funcs(spec, low.terms, low.dtype, low.isa, target)[1]


def bench_run(built: Any, prefix: str, spec: Any, low: Any, x: Any, w: Any, lut: np.ndarray, repeat: int = 0,
              threads: int | None = None) -> tuple[np.ndarray, float]:
    """Run a ``dot`` variant built from ``bench_stages`` on the circuit ``lut``: (acc, summed best ms or 0)."""
    wt, xt = layer_factors(lut, spec.signed, low.terms, low.dtype)
    return run_dot_conv(built, prefix, spec, x, w, wt, xt, low.isa, repeat, threads)
