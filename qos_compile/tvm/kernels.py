"""TIR table-lookup kernels for approximate conv2d / dense, their schedules, and an exact int8 conv.

Numerics (docs/design.md, section 3 "Numerics contract"; ``qos_compile.reference`` is the definition)::

    acc[n, o, i, j] = sum_{c, u, v} lut[w[o, c, u, v] + off, xp[n, g*Cg + c, i*sh + u*dh, j*sw + v*dw] + off]

* Codes come in their natural 8-bit type: ``uint8`` for unsigned circuits (``off = 0``),
  ``int8`` for signed ones (``off = 128``); weights and activations share the type.
* ``lut`` is an ARGUMENT of the kernel: an int32 tensor of shape (256, 256), port A
  (first index) = weight code, port B = activation code, exactly ``Multiplier.lut``. The
  runtime switches circuits by passing another table pointer; nothing is baked in.
* ``pad_code`` (the activation zero point's code) is a compile-time constant of the kernel:
  it is fixed per layer across operating points. Padding is materialised once per call
  into a uint8 *index* buffer (``code + off``), which the inner loops gather through.
* Outputs are int32 accumulators, NCHW (conv) or (N, O) (dense). Any mix of stride,
  dilation, asymmetric ONNX padding (top, left, bottom, right) and groups (depthwise too).

Each builder returns TE tensors (usable from Relax ``bb.call_te``) and ``*_func`` wraps it
in a scheduled ``PrimFunc``. Blocks carry the annotation ``qos_kernel`` so that
``schedule_primfunc`` can find and schedule them inside any module.

Schedules (``schedule_*``), picked from the target's features; times are one thread on
this host (Xeon "emeraldrapids", AVX-512) for a 3x3 conv 64->64 at 32x32, best of runs:
unscheduled 19.3 ms, "gather" 7.5 ms, exact int8 conv 1.04 ms (``python -m qos_compile.tvm.build``).

The two default styles put the reduction over input channels OUTSIDE the sweep over
output positions, so the LUT rows of the current weights stay in L1 while every output
position of the plane looks up in them (the accumulator tile, ``i_inner x Wo`` int32, is
sized to <= 16 KiB); every style splits ``n x o_outer`` across threads (``∥`` = parallel):

* "gather" (default with AVX2/AVX-512): ``n·o_outer ∥ / i_outer / c, u, v / i_inner, j /
  o_inner(2)``. One LUT row per weight (c, u, v) is hot; the 2 ``o_inner`` channels share
  each activation-index load. The innermost output-position loop ``j`` is vectorised by
  LLVM's loop vectoriser into ``vpgatherdd`` (TIR's own ``vectorize`` scalarises a gather
  into insert/extract chains: measured 2x slower), so it is left as a plain loop.
* "taps" (default without a gather instruction: NEON, SSE2): ``n·o ∥ / i_outer / c /
  i_inner / j_outer / u, v (unrolled) / j_inner(4, unrolled)``. The kh·kw LUT rows of one
  (o, c) stay hot over the whole output plane, the kh·kw taps of 4 output positions are
  summed in registers, and the accumulator in memory is updated once per (c, position)
  instead of once per tap. x86-64 baseline (SSE2, no gather): 8.1 ms vs 12.6 ms for the
  "gather" loop nest and 18.9 ms for "reg-tile"; under qemu-aarch64 it also ran fewest
  guest instructions (emulated 49 ms vs 121 ms "gather", 69 ms "reg-tile").
* "reg-tile" (alternative): ``n·o_outer ∥ / i / j_outer / c, u, v / o_inner(4) /
  j_inner(4)`` with 16 accumulators in registers (``cache_write`` "local"); fewest
  instructions per lookup, but every output tile revisits all LUT rows (AVX-512 15.8 ms).

* exact conv: register tiling. ``n·o_outer (parallel) / i_outer / j_outer / c, u, v /
  o_inner (4) / i_inner (4) / j_inner (vector)``: a 4 x 4 x lanes tile of int32
  accumulators (``cache_write`` to "local") stays in registers over the whole reduction,
  ``j_inner`` is vectorised by TIR (16 int32 lanes with AVX-512, 8 AVX2, 4 NEON/SSE).
* approx dense: batch >= 4: ``o (parallel) / k / n`` so each LUT row serves the whole
  batch; small batch: ``o (parallel) / n / k`` with ``k`` innermost, vectorised by LLVM
  as a gather + add reduction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import tvm
from tvm import te

from ..errors import QosError
from ..numerics import LUT_SHAPE, code_dtype, code_offset, code_range, conv_pads, pair

#: The block annotation naming a block's kind (its schedule hook, ``variants.block_schedules``);
#: every family module imports it from here.
KERNEL_ATTR = "qos_kernel"


# --------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ConvSpec:
    """Shapes and attributes of one conv layer (NCHW activations, OIHW weights)."""

    n: int
    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)   # ONNX order: top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    pad_code: int = 0
    signed: bool = False

    @classmethod
    def make(cls, x_shape: Sequence[int], w_shape: Sequence[int], stride: int | Sequence[int] = 1,
             padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
             pad_code: int = 0, signed: bool = False) -> "ConvSpec":
        """Build and check a spec from tensor shapes and ONNX/PyTorch-style attributes."""
        if len(x_shape) != 4 or len(w_shape) != 4:
            raise QosError(f"conv wants x (N, C, H, W) and w (O, C/groups, kh, kw), got {x_shape} and {w_shape}")
        n, c, h, w = (int(v) for v in x_shape)
        o, cg, kh, kw = (int(v) for v in w_shape)
        spec = cls(n, c, h, w, o, kh, kw, pair(stride, "stride"), conv_pads(padding),
                   pair(dilation, "dilation"), int(groups), int(pad_code), bool(signed))
        if groups < 1 or c % groups or o % groups or c // groups != cg:
            raise QosError(f"groups={groups} does not fit x channels {c} and w {tuple(w_shape)}")
        lo, hi = code_range(signed)
        if not lo <= pad_code <= hi:
            raise QosError(f"pad code {pad_code} outside the {'signed' if signed else 'unsigned'} code range {lo}..{hi}")
        if min(spec.stride + spec.dilation) < 1 or min(spec.padding) < 0:
            raise QosError("stride and dilation must be >= 1 and padding >= 0")
        if spec.ho < 1 or spec.wo < 1:
            raise QosError("convolution output would be empty")
        return spec

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return self.n, self.o, self.ho, self.wo

    @property
    def ho(self) -> int:
        pt, _, pb, _ = self.padding
        return (self.h + pt + pb - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1

    @property
    def wo(self) -> int:
        _, pl, _, pr = self.padding
        return (self.w + pl + pr - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return self.n, self.c, self.h, self.w

    @property
    def w_shape(self) -> tuple[int, int, int, int]:
        return self.o, self.c // self.groups, self.kh, self.kw

    @property
    def code_dtype(self) -> str:
        return code_dtype(self.signed)

    @property
    def macs(self) -> int:
        return self.n * self.o * self.ho * self.wo * (self.c // self.groups) * self.kh * self.kw


@dataclass(frozen=True)
class DenseSpec:
    """Shapes of one fully connected layer: x (N, K), w (O, K) (nn.Linear layout)."""

    n: int
    k: int
    o: int
    signed: bool = False

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.n, self.o

    @property
    def code_dtype(self) -> str:
        return code_dtype(self.signed)


# --------------------------------------------------------------------------- TE definitions
def _signed_of(x: te.Tensor, w: te.Tensor, signed: bool | None) -> bool:
    dts = {str(x.dtype), str(w.dtype)}
    if dts == {"int8"}:
        s = True
    elif dts == {"uint8"}:
        s = False
    else:
        raise QosError(f"codes must be both uint8 (unsigned circuits) or both int8 (signed), got {sorted(dts)}")
    if signed is not None and signed != s:
        raise QosError(f"signed={signed} contradicts the code dtype {x.dtype}")
    return s


def _padded_index(x: te.Tensor, pads: tuple[int, int, int, int], pad_code: int, off: int,
                  name: str, classes: Any = None) -> te.Tensor:
    """uint8 table-index tensor ``x + off``, padded with ``pad_code + off`` (one pass over x).
    ``classes``: a (256,) uint8 tensor each index (padding included) is mapped through."""
    n, c, h, w = (int(v) for v in x.shape)
    pt, pl, pb, pr = pads
    pad_idx = tvm.tirx.const(pad_code + off, "uint8")

    def f(nn, cc, i, j):
        v = x[nn, cc, i - pt, j - pl]
        v = v.astype("uint8") if off == 0 else (v.astype("int32") + off).astype("uint8")
        if pt != 0 or pl != 0 or pb != 0 or pr != 0:
            v = tvm.tirx.if_then_else(tvm.tirx.all(i >= pt, i < h + pt, j >= pl, j < w + pl), v, pad_idx)
        return v if classes is None else classes[v.astype("int32")]

    return te.compute((n, c, h + pt + pb, w + pl + pr), f, name=name,
                      attrs={KERNEL_ATTR: "pad_index"})


def approx_conv2d(x: te.Tensor, w: te.Tensor, lut: te.Tensor, stride: int | Sequence[int] = 1,
                  padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                  pad_code: int = 0, signed: bool | None = None, name: str = "approx_conv2d") -> te.Tensor:
    """TE approximate conv: int32 accumulators (N, O, Ho, Wo) of ``lut[w + off, x + off]`` sums.

    x: (N, C, H, W) uint8/int8 codes; w: (O, C/groups, kh, kw) same dtype; lut: (256, 256) int32.
    padding: int, (h, w) or ONNX (top, left, bottom, right); pad_code: the code padding feeds.
    """
    s = _signed_of(x, w, signed)
    if tuple(int(v) for v in lut.shape) != LUT_SHAPE or str(lut.dtype) != "int32":
        raise QosError(f"lut must be an int32 (256, 256) tensor, got {lut.dtype} {tuple(lut.shape)}")
    spec = ConvSpec.make([int(v) for v in x.shape], [int(v) for v in w.shape], stride, padding, dilation,
                         groups, pad_code, s)
    off = code_offset(s)
    xp = _padded_index(x, spec.padding, spec.pad_code, off, name + "_pad")
    cg, og = spec.c // spec.groups, spec.o // spec.groups
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    rc = te.reduce_axis((0, cg), "rc")
    ru = te.reduce_axis((0, spec.kh), "ru")
    rv = te.reduce_axis((0, spec.kw), "rv")

    def acc(nn, o, i, j):
        xc = rc if spec.groups == 1 else (o // og) * cg + rc
        wi = w[o, rc, ru, rv].astype("int32")
        if off:
            wi = wi + off
        return te.sum(lut[wi, xp[nn, xc, i * sh + ru * dh, j * sw + rv * dw].astype("int32")],
                      axis=[rc, ru, rv])

    return te.compute(spec.out_shape, acc, name=name, attrs={KERNEL_ATTR: "approx_conv2d"})


def exact_conv2d(x: te.Tensor, w: te.Tensor, stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, pad_code: int = 0,
                 name: str = "exact_conv2d") -> te.Tensor:
    """TE exact int8 conv (same shapes/attributes as ``approx_conv2d``): int32 sums of ``w * x``."""
    s = _signed_of(x, w, None)
    spec = ConvSpec.make([int(v) for v in x.shape], [int(v) for v in w.shape], stride, padding, dilation,
                         groups, pad_code, s)
    pt, pl, pb, pr = spec.padding
    n, c, h, wd = spec.x_shape
    pc = tvm.tirx.const(pad_code, x.dtype)
    if any(spec.padding):
        xp = te.compute((n, c, h + pt + pb, wd + pl + pr),
                        lambda nn, cc, i, j: tvm.tirx.if_then_else(
                            tvm.tirx.all(i >= pt, i < h + pt, j >= pl, j < wd + pl),
                            x[nn, cc, i - pt, j - pl], pc),
                        name=name + "_pad", attrs={KERNEL_ATTR: "pad"})
    else:
        xp = x
    cg, og = spec.c // spec.groups, spec.o // spec.groups
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    rc = te.reduce_axis((0, cg), "rc")
    ru = te.reduce_axis((0, spec.kh), "ru")
    rv = te.reduce_axis((0, spec.kw), "rv")

    def acc(nn, o, i, j):
        xc = rc if spec.groups == 1 else (o // og) * cg + rc
        return te.sum(w[o, rc, ru, rv].astype("int32") * xp[nn, xc, i * sh + ru * dh, j * sw + rv * dw].astype("int32"),
                      axis=[rc, ru, rv])

    return te.compute(spec.out_shape, acc, name=name, attrs={KERNEL_ATTR: "exact_conv2d"})


def masked_conv2d(x: te.Tensor, w: te.Tensor, lut: te.Tensor, stride: int | Sequence[int] = 1,
                  padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                  pad_code: int = 0, signed: bool | None = None, name: str = "masked_conv2d") -> te.Tensor:
    """Exact int8 conv on the weights the circuit actually multiplies: ``lut[w, code 1]``.

    Valid only for tables with ``lut[a, b] == lut[a, code 1] * code(b)`` ("masked": the
    circuit clears low bits of port A, then multiplies exactly; the exact circuit too),
    which ``lowering.choose_conv_lowering`` verifies for every circuit of the layer. The
    masked weights are read from the LUT argument on every call, so the run-time switch of
    circuits stays a pointer swap.
    """
    s = _signed_of(x, w, signed)
    off = code_offset(s)
    wm = te.compute(tuple(int(v) for v in w.shape),
                    lambda *i: lut[w[i].astype("int32") + off, off + 1].astype(w.dtype),
                    name=name + "_weights", attrs={KERNEL_ATTR: "masked_weights"})
    return exact_conv2d(x, wm, stride, padding, dilation, groups, pad_code, name=name)


def approx_dense(x: te.Tensor, w: te.Tensor, lut: te.Tensor, signed: bool | None = None,
                 name: str = "approx_dense") -> te.Tensor:
    """TE approximate dense: acc[n, o] = sum_k lut[w[o, k] + off, x[n, k] + off] (int32 (N, O))."""
    s = _signed_of(x, w, signed)
    if tuple(int(v) for v in lut.shape) != LUT_SHAPE or str(lut.dtype) != "int32":
        raise QosError(f"lut must be an int32 (256, 256) tensor, got {lut.dtype} {tuple(lut.shape)}")
    if len(x.shape) != 2 or len(w.shape) != 2 or int(x.shape[1]) != int(w.shape[1]):
        raise QosError(f"dense shapes do not match: x {tuple(x.shape)}, w {tuple(w.shape)} (want (N, K), (O, K))")
    off = code_offset(s)
    k = te.reduce_axis((0, int(x.shape[1])), "rk")

    def idx(v):
        v = v.astype("int32")
        return v + off if off else v

    return te.compute((int(x.shape[0]), int(w.shape[0])),
                      lambda n, o: te.sum(lut[idx(w[o, k]), idx(x[n, k])], axis=k),
                      name=name, attrs={KERNEL_ATTR: "approx_dense"})


# --------------------------------------------------------------------------- schedules
def _features(target: Any) -> frozenset[str]:
    """CPU features of a qos Target (or a name), empty for None."""
    if target is None:
        return frozenset()
    from ..targets import Target, get_target

    t = target if isinstance(target, Target) else get_target(target)
    return t.features


def _vector_lanes32(features: frozenset[str]) -> int:
    """int32 lanes of the widest vector register the target declares."""
    if "avx512f" in features:
        return 16
    if "avx2" in features:
        return 8
    return 4        # NEON, SSE2


def _largest_divisor(n: int, limit: int) -> int:
    limit = max(1, min(n, limit))
    return max(d for d in range(1, limit + 1) if n % d == 0)


def _sblocks(sch: "tvm.s_tir.Schedule", kind: str) -> list:
    """Blocks of the scheduled function annotated ``qos_kernel = kind``."""
    out = []
    stack = [sch.get_sblock("root")]
    while stack:
        for child in sch.get_child_blocks(stack.pop()):
            if str(sch.get(child).annotations.get(KERNEL_ATTR, "")) == kind:
                out.append(child)
            stack.append(child)
    return out


def _schedule_pad(sch, block) -> None:
    loops = sch.get_loops(block)
    sch.parallel(sch.fuse(loops[0], loops[1]))


APPROX_CONV_STYLES = ("gather", "taps", "reg-tile")


def default_approx_style(features: frozenset[str]) -> str:
    """"gather" where the CPU has a vector gather (AVX2/AVX-512), else "taps" (NEON, SSE2)."""
    return "gather" if ("avx2" in features or "avx512f" in features) else "taps"


def schedule_approx_conv2d(sch: "tvm.s_tir.Schedule", block, spec_out: Sequence[int], features=frozenset(),
                           style: str | None = None, l1_bytes: int = 16384) -> None:
    """Schedule one approx conv block; ``style`` in APPROX_CONV_STYLES (default from ``features``).

    See the module docstring for what each style does and what it measured.
    """
    n_, o_, ho, wo = (int(v) for v in spec_out)
    style = style or default_approx_style(frozenset(features))
    n, o, i, j, rc, ru, rv = sch.get_loops(block)
    if style == "gather":
        oi_n = 2 if o_ % 2 == 0 else 1
        it = _largest_divisor(ho, l1_bytes // max(1, 4 * wo * oi_n))
        oo, oi = sch.split(o, [None, oi_n])
        io, ii = sch.split(i, [None, it])
        sch.reorder(n, oo, io, rc, ru, rv, ii, j, oi)
        if oi_n > 1:
            sch.unroll(oi)
    elif style == "taps":
        jt = _largest_divisor(wo, 4)
        it = _largest_divisor(ho, l1_bytes // max(1, 4 * wo))
        oo = o
        io, ii = sch.split(i, [None, it])
        jo, ji = sch.split(j, [None, jt])
        sch.reorder(n, oo, io, rc, ii, jo, ru, rv, ji)
        sch.unroll(ru)
        sch.unroll(rv)
        sch.unroll(ji)
    elif style == "reg-tile":
        oi_n, jt = _largest_divisor(o_, 4), _largest_divisor(wo, 4)
        oo, oi = sch.split(o, [None, oi_n])
        jo, ji = sch.split(j, [None, jt])
        sch.reorder(n, oo, i, jo, rc, ru, rv, oi, ji)
        local = sch.cache_write(block, 0, "local")   # oi_n x jt accumulators in registers
        sch.reverse_compute_at(local, jo)
        sch.unroll(oi)
        sch.unroll(ji)
    else:
        raise QosError(f"unknown approx conv schedule style {style!r} (one of {', '.join(APPROX_CONV_STYLES)})")
    sch.parallel(sch.fuse(n, oo))
    sch.decompose_reduction(block, rc)


def schedule_exact_conv2d(sch: "tvm.s_tir.Schedule", block, spec_out: Sequence[int], features=frozenset()) -> None:
    """Register-tiled exact conv schedule: ``o`` tiles in registers, ``j`` vectorised (see module docstring)."""
    n_, o_, ho, wo = (int(v) for v in spec_out)
    lanes = _vector_lanes32(features)
    n, o, i, j, *red = sch.get_loops(block)        # red: (term,) c, u, v
    oi_n, it, vec = _largest_divisor(o_, 4), _largest_divisor(ho, 4), _largest_divisor(wo, lanes)
    oo, oi = sch.split(o, [None, oi_n])
    io, ii = sch.split(i, [None, it])
    jo, ji = sch.split(j, [None, vec])
    sch.reorder(n, oo, io, jo, *red, oi, ii, ji)
    local = sch.cache_write(block, 0, "local")      # (oi_n x it x vec) accumulators in registers
    sch.reverse_compute_at(local, jo)
    sch.unroll(oi)
    sch.unroll(ii)
    if vec > 1:
        sch.vectorize(ji)
        sch.vectorize(sch.get_loops(local)[-1])
    sch.parallel(sch.fuse(n, oo))
    sch.decompose_reduction(block, red[0])


def schedule_approx_dense(sch: "tvm.s_tir.Schedule", block, spec_out: Sequence[int], features=frozenset()) -> None:
    """Dense schedule: LUT row reused over the batch when N >= 4, else k-innermost gather reduction."""
    n_, o_ = (int(v) for v in spec_out)
    n, o, k = sch.get_loops(block)
    if n_ >= 4:
        sch.reorder(o, k, n)
        sch.parallel(o)
        sch.decompose_reduction(block, k)
    else:
        sch.reorder(o, n, k)
        sch.parallel(o)


def on_output_shape(fn: Any) -> Any:
    """A block schedule hook ``(sch, block, features, style)`` from a schedule
    ``fn(sch, block, out_shape, features)`` that wants the block's output shape."""
    def hook(sch: "tvm.s_tir.Schedule", block: Any, features: frozenset[str], style: str | None) -> None:
        out = sch.get(block).writes[0].source
        fn(sch, block, [int(v) for v in out.shape], features)
    return hook


def parallel_outer(sch: "tvm.s_tir.Schedule", block: Any, features: frozenset[str], style: str | None) -> None:
    """Block schedule hook: the outermost loop in parallel (small per-call table lookups)."""
    sch.parallel(sch.get_loops(block)[0])


def _approx_conv_hook(sch: "tvm.s_tir.Schedule", block: Any, features: frozenset[str], style: str | None) -> None:
    out = sch.get(block).writes[0].source
    schedule_approx_conv2d(sch, block, [int(v) for v in out.shape], features, style=style)


def _pad_hook(sch: "tvm.s_tir.Schedule", block: Any, features: frozenset[str], style: str | None) -> None:
    _schedule_pad(sch, block)


#: This module's block schedules (annotation ``KERNEL_ATTR`` -> hook(sch, block, features,
#: style)); ``variants.block_schedules`` merges them with the other family modules'.
SCHEDULES = {
    "approx_conv2d": _approx_conv_hook,
    "exact_conv2d": on_output_shape(schedule_exact_conv2d),
    "approx_dense": on_output_shape(schedule_approx_dense),
    "pad_index": _pad_hook,
    "pad": _pad_hook,
    "masked_weights": parallel_outer,
}


#: Block annotation -> schedule hook, for every family module imported so far. A module that
#: builds a kind of block registers its hooks on import, so the blocks it makes can always be
#: scheduled; kernels.py imports no family module (the registry, ``variants``, imports them).
_BLOCK_SCHEDULES: dict[str, Any] = {}


def register_block_schedules(hooks: dict[str, Any]) -> None:
    """Add a family module's ``SCHEDULES`` (block annotation -> hook) to ``schedule_primfunc``."""
    for kind, hook in hooks.items():
        if _BLOCK_SCHEDULES.get(kind, hook) is not hook:
            raise QosError(f"internal error: block kind {kind!r} is scheduled by two family modules")
        _BLOCK_SCHEDULES[kind] = hook


register_block_schedules(SCHEDULES)


def schedule_primfunc(func: "tvm.tirx.PrimFunc", target: Any = None,
                      approx_style: str | None = None) -> "tvm.tirx.PrimFunc":
    """Apply the qos schedules to every annotated block of ``func`` (unknown blocks stay as they are).

    Each block is scheduled by the hook its family module declares for its ``KERNEL_ATTR``
    annotation (``SCHEDULES`` of each family module, registered with
    ``register_block_schedules`` when that module is imported). Works on the
    PrimFuncs that ``relax.BlockBuilder.call_te(approx_conv2d, ...)`` creates, too.
    """
    feats = _features(target)
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    for kind, hook in list(_BLOCK_SCHEDULES.items()):
        for b in _sblocks(sch, kind):
            hook(sch, b, feats, approx_style)
    return sch.mod["main"]


# --------------------------------------------------------------------------- registry hooks
def emit_masked(bb: Any, ops: Any, low: Any) -> Any:
    """Relax emission of a ``masked`` variant (``variants.Variant.emit``)."""
    return bb.call_te(masked_conv2d, ops.x, ops.w, ops.lut, **ops.conv, primfunc_name_hint=low.symbol)


def emit_gather(bb: Any, ops: Any, low: Any) -> Any:
    """Relax emission of a ``gather`` variant (``variants.Variant.emit``)."""
    return bb.call_te(approx_conv2d, ops.x, ops.w, ops.lut, **ops.conv, primfunc_name_hint=low.symbol)


def masked_stages(spec: ConvSpec, low: Any, w: Any, target: Any) -> dict[str, Any]:
    """Stand-alone PrimFuncs of a ``masked`` variant: ``{"main": (x, w, lut) -> acc}``."""
    return {"main": masked_conv2d_func(spec, target)}


def gather_stages(spec: ConvSpec, low: Any, w: Any, target: Any) -> dict[str, Any]:
    """Stand-alone PrimFuncs of a ``gather`` variant: ``{"main": (x, w, lut) -> acc}``."""
    return {"main": approx_conv2d_func(spec, target)}


def run_single_stage(built: Any, prefix: str, spec: ConvSpec, low: Any, x: Any, w: Any, lut: Any,
                     repeat: int = 0, threads: int | None = None) -> tuple[Any, float]:
    """Run a one-stage variant built from its ``stages``: (accumulators, best ms or 0)."""
    acc = built.run(prefix + "main", x, w, lut, repeat=repeat, threads=threads)
    return acc, (built.last_time_ns / 1e6 if repeat else 0.0)


# --------------------------------------------------------------------------- PrimFunc builders
def _finish(args: list, func_name: str | None, target: Any, schedule: bool,
            style: str | None = None) -> "tvm.tirx.PrimFunc":
    f = te.create_prim_func(args)
    if schedule:
        f = schedule_primfunc(f, target, style)
    if func_name:
        f = f.with_attr("global_symbol", func_name)
    return f


def approx_conv2d_func(spec: ConvSpec, target: Any = None, schedule: bool = True,
                       func_name: str | None = None, style: str | None = None) -> "tvm.tirx.PrimFunc":
    """PrimFunc ``(x, w, lut, acc)`` of an approximate conv, scheduled for ``target`` unless schedule=False."""
    dt = spec.code_dtype
    x = te.placeholder(spec.x_shape, dt, name="x")
    w = te.placeholder(spec.w_shape, dt, name="w")
    lut = te.placeholder(LUT_SHAPE, "int32", name="lut")
    acc = approx_conv2d(x, w, lut, spec.stride, spec.padding, spec.dilation, spec.groups, spec.pad_code, spec.signed)
    return _finish([x, w, lut, acc], func_name, target, schedule, style)


def exact_conv2d_func(spec: ConvSpec, target: Any = None, schedule: bool = True,
                      func_name: str | None = None) -> "tvm.tirx.PrimFunc":
    """PrimFunc ``(x, w, acc)`` of the exact int8 conv with the same shapes/attributes."""
    dt = spec.code_dtype
    x = te.placeholder(spec.x_shape, dt, name="x")
    w = te.placeholder(spec.w_shape, dt, name="w")
    acc = exact_conv2d(x, w, spec.stride, spec.padding, spec.dilation, spec.groups, spec.pad_code)
    return _finish([x, w, acc], func_name, target, schedule)


def approx_dense_func(spec: DenseSpec, target: Any = None, schedule: bool = True,
                      func_name: str | None = None) -> "tvm.tirx.PrimFunc":
    """PrimFunc ``(x, w, lut, acc)`` of an approximate dense layer."""
    dt = spec.code_dtype
    x = te.placeholder((spec.n, spec.k), dt, name="x")
    w = te.placeholder((spec.o, spec.k), dt, name="w")
    lut = te.placeholder(LUT_SHAPE, "int32", name="lut")
    return _finish([x, w, lut, approx_dense(x, w, lut, spec.signed)], func_name, target, schedule)


def masked_conv2d_func(spec: ConvSpec, target: Any = None, schedule: bool = True,
                       func_name: str | None = None) -> "tvm.tirx.PrimFunc":
    """PrimFunc ``(x, w, lut, acc)`` of ``masked_conv2d`` (exact conv on ``lut[w, code 1]``)."""
    dt = spec.code_dtype
    x = te.placeholder(spec.x_shape, dt, name="x")
    w = te.placeholder(spec.w_shape, dt, name="w")
    lut = te.placeholder(LUT_SHAPE, "int32", name="lut")
    acc = masked_conv2d(x, w, lut, spec.stride, spec.padding, spec.dilation, spec.groups, spec.pad_code, spec.signed)
    return _finish([x, w, lut, acc], func_name, target, schedule)
