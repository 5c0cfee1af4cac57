"""Low-rank lowering: an approximate conv as an exact conv over a few factor terms.

Most circuits' tables are a short sum of separable terms (``multipliers.structure``, the
analysis the PyTorch emulator's ``lowrank`` strategy uses too; every signed EvoApprox
circuit has error rank <= 4)::

    lut[a, b] == sum_t wterms[t, a] * xterms[t, b]        (a = weight index, b = activation index)

usually the exact product ``code(a) * code(b)`` as term 0 plus small correction terms
(weight factors in {-1, 0, 1}, activation factors of a few bits for the signed circuits).
Then the layer is ONE exact integer conv with ``T`` times the reduction length::

    acc[n, o, i, j] = sum_{t, c, u, v} wterms[t][w[o, c, u, v]] * xterms[t][xp[n, c, ...]]

* ``wterms``/``xterms`` (T, 256): the circuit's factor tables, per-OP graph inputs
  ``slot.<layer>.wterms|xterms`` switched at run time like the LUT (a pointer swap; a few
  KiB per OP, and identical for every layer running the same circuit).
* Each call first maps the weights through ``wterms`` (one lookup per weight, like the
  masked kernel's) and the activations through ``xterms`` (one per activation), not per
  product.
* Operands take the narrowest of int8 / int16 / int32 that holds every factor of every
  circuit of the layer (int8 for the bundled signed circuits), and the compiler checks
  that no int32 partial sum can overflow (``accumulator_bound``).

Cost: about ``T`` exact convs (measured in ``python -m qos_compile.bench.kernels``), so
``lowering.choose_conv_lowering`` takes it when ``T`` beats the other kernels' cost.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tvm
from tvm import te

from ..errors import QosError
from ..multipliers.structure import Factors, integer_factors
from ..numerics import INT32_MAX, code_offset
from .kernels import (KERNEL_ATTR, on_output_shape, parallel_outer, register_block_schedules,
                      schedule_exact_conv2d)

#: Most terms of a layer's factorisation (beyond it the gather kernel is as fast).
MAX_TERMS = 5
#: The per-OP graph inputs a low-rank layer adds: ``slot.<layer>.<suffix>``.
SLOT_SUFFIXES = ("wterms", "xterms")
XTERMS_SUFFIX = SLOT_SUFFIXES[1]


def circuit_factors(lut: np.ndarray, signed: bool, max_terms: int = MAX_TERMS) -> Factors | None:
    """The verified integer factorisation of one table (``multipliers.structure.integer_factors``;
    None: none with at most ``max_terms`` terms)."""
    return integer_factors(lut, signed, max_terms)


def _padded(f: Factors, terms: int) -> Factors:
    extra = np.zeros((terms - f.terms, 256), dtype=np.int64)
    return Factors(np.concatenate([f.wterms, extra]), np.concatenate([f.xterms, extra]))


def operand_dtype(factors: Sequence[Factors]) -> str:
    """Narrowest integer type holding every factor of every circuit: int8, uint8 (0..255, an
    unsigned exact product's), int16 or int32."""
    hi = max(max(int(f.wterms.max()), int(f.xterms.max())) for f in factors)
    lo = min(min(int(f.wterms.min()), int(f.xterms.min())) for f in factors)
    for dt in ("int8", "uint8", "int16"):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return dt
    return "int32"


def accumulator_bound(factors: Sequence[Factors], taps: int) -> int:
    """Largest |partial sum| the conv can reach over ``taps`` products per term."""
    return max(taps * sum(int(np.abs(w).max()) * int(np.abs(x).max()) for w, x in zip(f.wterms, f.xterms))
               for f in factors)


def layer_terms(luts: Sequence[np.ndarray], signed: bool, taps: int) -> tuple[int, str] | None:
    """(terms, operand dtype) of a low-rank lowering of a layer running ``luts``, or None
    when a table has no factorisation or a partial sum could overflow int32."""
    fs = [circuit_factors(t, signed) for t in luts]
    if any(f is None for f in fs):
        return None
    if accumulator_bound(fs, taps) > INT32_MAX:
        return None
    return max(f.terms for f in fs), operand_dtype(fs)


def layer_factors(lut: np.ndarray, signed: bool, terms: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The per-OP tensors of a low-rank layer for the circuit ``lut``: weight and activation
    factor tables, both ``(terms, 256)`` of ``dtype`` (zero terms pad a shorter factorisation)."""
    f = circuit_factors(lut, signed)
    if f is None or f.terms > terms:
        raise QosError(f"the circuit has no factorisation with at most {terms} terms")
    f = _padded(f, terms)
    info = np.iinfo(dtype)
    if min(f.wterms.min(), f.xterms.min()) < info.min or max(f.wterms.max(), f.xterms.max()) > info.max:
        raise QosError(f"factors do not fit {dtype}")
    return f.wterms.astype(dtype), f.xterms.astype(dtype)


def factored_conv2d(x: te.Tensor, w: te.Tensor, wtab: te.Tensor, xtab: te.Tensor, stride: int | Sequence[int] = 1,
                    padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                    pad_code: int = 0, signed: bool | None = None, name: str = "factored_conv2d") -> te.Tensor:
    """TE low-rank conv: int32 accumulators (N, O, Ho, Wo), bit-exact with the LUT conv of
    any circuit whose factor tables ``wtab``/``xtab`` (both (T, 256)) are (``layer_factors``).

    x: (N, C, H, W) int8/uint8 codes; w: (O, C/groups, kh, kw) codes of the same type.
    """
    from .kernels import ConvSpec, _signed_of

    s = _signed_of(x, w, signed)
    t_ = int(wtab.shape[0])
    if tuple(int(v) for v in wtab.shape) != (t_, 256) or tuple(int(v) for v in xtab.shape) != (t_, 256):
        raise QosError(f"factor tables must both be (T, 256), got {tuple(wtab.shape)} and {tuple(xtab.shape)}")
    spec = ConvSpec.make([int(v) for v in x.shape], [int(v) for v in w.shape], stride, padding, dilation, groups,
                         pad_code, s)
    off = code_offset(s)
    pt, pl, pb, pr = spec.padding
    n, c, h, wd = spec.x_shape
    pad_idx = pad_code + off
    wt = te.compute((t_, *spec.w_shape), lambda t, o, cc, u, v: wtab[t, w[o, cc, u, v].astype("int32") + off],
                    name=name + "_wterms", attrs={KERNEL_ATTR: "factor_weights"})

    def lookup(t, nn, cc, i, j):        # the factor of term t at every (padded) activation
        v = x[nn, cc, i - pt, j - pl].astype("int32") + off
        if any(spec.padding):
            v = tvm.tirx.if_then_else(tvm.tirx.all(i >= pt, i < h + pt, j >= pl, j < wd + pl), v, pad_idx)
        return xtab[t, v]

    xt = te.compute((t_, n, c, h + pt + pb, wd + pl + pr), lookup, name=name + "_xterms",
                    attrs={KERNEL_ATTR: "factor_lookup"})
    cg, og = spec.c // spec.groups, spec.o // spec.groups
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    rt = te.reduce_axis((0, t_), "rt")
    rc = te.reduce_axis((0, cg), "rc")
    ru = te.reduce_axis((0, spec.kh), "ru")
    rv = te.reduce_axis((0, spec.kw), "rv")

    def acc(nn, o, i, j):
        xc = rc if spec.groups == 1 else (o // og) * cg + rc
        return te.sum(wt[rt, o, rc, ru, rv].astype("int32")
                      * xt[rt, nn, xc, i * sh + ru * dh, j * sw + rv * dw].astype("int32"),
                      axis=[rt, rc, ru, rv])

    return te.compute(spec.out_shape, acc, name=name, attrs={KERNEL_ATTR: "factored_conv2d"})


def factored_conv2d_func(spec: "object", terms: int, dtype: str, target: object = None, schedule: bool = True,
                         func_name: str | None = None) -> "tvm.tirx.PrimFunc":
    """PrimFunc ``(x, w, wterms, xterms, acc)`` of ``factored_conv2d`` for a ``kernels.ConvSpec``."""
    from .kernels import _finish

    x = te.placeholder(spec.x_shape, spec.code_dtype, name="x")
    w = te.placeholder(spec.w_shape, spec.code_dtype, name="w")
    wtab = te.placeholder((terms, 256), dtype, name="wterms")
    xtab = te.placeholder((terms, 256), dtype, name="xterms")
    acc = factored_conv2d(x, w, wtab, xtab, spec.stride, spec.padding, spec.dilation, spec.groups, spec.pad_code,
                          spec.signed)
    return _finish([x, w, wtab, xtab, acc], func_name, target, schedule)


# --------------------------------------------------------------------------- registry hooks
def _schedule_lookup(sch: "tvm.s_tir.Schedule", block: Any, features: frozenset[str], style: str | None) -> None:
    """(t, n, c, i, j): one table lookup per activation, ``t, n, c`` in parallel."""
    t, n, c, *_ = sch.get_loops(block)
    sch.parallel(sch.fuse(t, n, c))


#: Block schedules of this module (``variants.block_schedules``): the factored conv is an
#: exact conv with a term axis in its reduction, so it takes the exact conv's register tiling.
SCHEDULES = {
    "factored_conv2d": on_output_shape(schedule_exact_conv2d),
    "factor_weights": parallel_outer,
    "factor_lookup": _schedule_lookup,
}
register_block_schedules(SCHEDULES)


def emit_conv(bb: Any, ops: Any, low: Any) -> Any:
    """Relax emission of a ``lowrank`` variant (``variants.Variant.emit``): the factor tables
    are the per-OP graph inputs ``slot.<layer>.wterms|xterms``."""
    wt, xt = ops.slot_inputs(SLOT_SUFFIXES, "low-rank factors")
    return bb.call_te(factored_conv2d, ops.x, ops.w, wt, xt, **ops.conv, primfunc_name_hint=low.symbol)


def per_op_tensors(w: np.ndarray, lut: np.ndarray, low: Any) -> dict[str, np.ndarray]:
    """The per-OP tensors of a ``lowrank`` layer running the circuit ``lut``
    (``variants.Variant.per_op``): its weight and activation factor tables."""
    return dict(zip(SLOT_SUFFIXES, layer_factors(lut, low.variant.signed, low.terms, low.dtype)))


def bench_stages(spec: Any, low: Any, w: Any, target: Any) -> dict[str, Any]:
    """Stand-alone PrimFuncs of a ``lowrank`` variant: ``{"main": (x, w, wterms, xterms) -> acc}``."""
    return {"main": factored_conv2d_func(spec, low.terms, low.dtype, target)}


def bench_run(built: Any, prefix: str, spec: Any, low: Any, x: Any, w: Any, lut: np.ndarray, repeat: int = 0,
              threads: int | None = None) -> tuple[np.ndarray, float]:
    """Run a ``lowrank`` variant built from ``bench_stages`` on the circuit ``lut``: (acc, best ms or 0)."""
    wt, xt = layer_factors(lut, spec.signed, low.terms, low.dtype)
    acc = built.run(prefix + "main", x, w, wt, xt, repeat=repeat, threads=threads)
    return acc, (built.last_time_ns / 1e6 if repeat else 0.0)
