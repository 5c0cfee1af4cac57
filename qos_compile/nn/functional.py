"""Fast, bit-exact approximate convolution and GEMM accumulators in torch.

Same contract as ``qos_compile.reference`` (``acc = sum_k lut[w_k + off, x_k + off]``,
port A = weight, padding feeds ``pad_code``), evaluated per circuit with the strategy
chosen in ``emulation``:

* term strategies (exact / masked / lowrank): ``acc`` is a sum of ``T`` ordinary
  convolutions over transformed operands, stacked into one float convolution. Every
  input term is centred on its value at the pad code, so zero padding is exact, and
  the centring constants are folded back per output channel. Before each call an
  upper bound of every partial sum is computed from the actual weights and activation
  range; float32 is used only where that bound is below 2**24 (then every partial sum
  is an exactly represented integer, whatever order the convolution adds in), other
  parts are split into separate float32 convolutions or computed in float64.
* general: the C kernel in ``kernels`` over an im2col'd uint8 copy of the input, or
  (no compiler) the straightforward chunked gather ``lut[w, x]`` that also serves as
  the benchmark baseline.

Layers use ``prepare_weights`` + ``conv_prepared`` (the weight side is cached between
forward passes) to get the zero-point-corrected accumulator ``Q`` directly, as float.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..errors import QosError
from ..multipliers.multiplier import Multiplier
from ..numerics import FLOAT32_EXACT, FLOAT64_EXACT, INT32_MAX, INT32_MIN, conv_pads, pair
from . import kernels
from .emulation import EmulationPlan, forced_strategy, plan_for

__all__ = ["approx_conv2d_acc", "approx_linear_acc", "conv_centered", "conv_prepared", "prepare_weights",
           "PreparedWeights", "ConvGeometry", "conv_geometry", "linear_geometry", "resolve_plan"]

#: Exactness bounds of float32 / float64 partial sums (module-level so tests can lower them).
_F32_EXACT = float(FLOAT32_EXACT)
_F64_EXACT = float(FLOAT64_EXACT)
_LOOKUP_CHUNK = 1 << 22  # elements of the per-chunk index tensor in the straightforward lookup


@dataclass(frozen=True)
class ConvGeometry:
    """Validated convolution geometry (a GEMM is a 1x1 convolution on 1x1 maps)."""

    stride: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    groups: int
    out_hw: tuple[int, int]
    kernel: tuple[int, int]


def _geometry(x_shape: Sequence[int], w_shape: Sequence[int], stride: Any, padding: Any, dilation: Any,
              groups: int) -> ConvGeometry:
    if len(x_shape) != 4 or len(w_shape) != 4:
        raise QosError(f"conv wants x (N, C, H, W) and w (O, C/groups, kh, kw), got {tuple(x_shape)} and "
                       f"{tuple(w_shape)}")
    _, c, h, wd = x_shape
    o, cg, kh, kw = w_shape
    if groups < 1 or c % groups or o % groups or c // groups != cg:
        raise QosError(f"groups={groups} does not fit x channels {c}, w {tuple(w_shape)}")
    sh, sw = pair(stride, "stride")
    dh, dw = pair(dilation, "dilation")
    pads = conv_pads(padding)
    if min(sh, sw, dh, dw) < 1 or min(pads) < 0:
        raise QosError("stride and dilation must be >= 1 and padding >= 0")
    ho = (h + pads[0] + pads[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + pads[1] + pads[3] - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise QosError("convolution output would be empty")
    return ConvGeometry((sh, sw), pads, (dh, dw), groups, (ho, wo), (kh, kw))


def resolve_plan(lut: Any, signed: bool | None, *codes: torch.Tensor) -> EmulationPlan:
    """The emulation plan for ``lut`` (a Multiplier, a table, or a plan itself), inferring
    signedness like the reference."""
    if isinstance(lut, EmulationPlan):
        if signed is not None and signed != lut.signed:
            raise QosError(f"signed={signed} contradicts the plan's signedness")
        return lut
    if isinstance(lut, Multiplier):
        return plan_for(lut, signed)
    if signed is None:
        kinds = {c.dtype for c in codes}
        if kinds == {torch.int8}:
            signed = True
        elif kinds == {torch.uint8}:
            signed = False
        else:
            raise QosError("pass signed=True/False (or int8/uint8 codes, or a Multiplier) to choose the table offset")
    return plan_for(lut, signed)


def _indices(codes: Any, off: int, what: str) -> torch.Tensor:
    """Table indices (code + offset) as uint8, after checking the code range."""
    t = torch.as_tensor(codes)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise QosError(f"{what} must be integer codes, got dtype {t.dtype}")
    if t.numel():
        lo, hi = int(t.min()) + off, int(t.max()) + off
        if lo < 0 or hi > 255:
            raise QosError(f"{what} out of the 8-bit code range {-off}..{255 - off}")
    return (t.to(torch.int16) + off).to(torch.uint8)


# --- term strategies -------------------------------------------------------------------


@lru_cache(maxsize=256)
def _plan_tables(plan: EmulationPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch copies of a plan: (T, 256) int64 weight and activation term tables, int32 table."""
    return (torch.from_numpy(plan.wterms.copy()), torch.from_numpy(plan.xterms.copy()),
            torch.from_numpy(plan.table.copy()))


@contextlib.contextmanager
def _ieee_float32() -> Iterator[None]:
    """Keep float32 convolutions/GEMMs in IEEE float32: the exactness bound assumes a 24-bit
    significand, which bf16/TF32 shortcuts (``set_float32_matmul_precision``, cuDNN's TF32
    default) would silently break."""
    mk = torch.backends.mkldnn
    saved = [(b, b.fp32_precision) for b in (mk.conv, mk.matmul) if b.fp32_precision not in ("none", "ieee")]
    cuda_mm = torch.backends.cuda.matmul.allow_tf32
    for b, _ in saved:
        b.fp32_precision = "ieee"
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        for b, value in saved:
            b.fp32_precision = value
        torch.backends.cuda.matmul.allow_tf32 = cuda_mm


def _conv_float(x: torch.Tensor, w: torch.Tensor, geo: ConvGeometry, groups: int) -> torch.Tensor:
    """Zero-padded float convolution (F.linear when it is really a GEMM), in IEEE precision."""
    with _ieee_float32():
        if x.shape[2:] == (1, 1) and w.shape[2:] == (1, 1) and groups == 1 and sum(geo.pads) == 0:
            return F.linear(x.flatten(1), w.flatten(1))[:, :, None, None]
        pt, pl, pb, pr = geo.pads
        if pt == pb and pl == pr:
            return F.conv2d(x, w, None, geo.stride, (pt, pl), geo.dilation, groups)
        return F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, None, geo.stride, 0, geo.dilation, groups)


def _chunks(bound: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Split units (columns of the per-output-channel bound matrix (O, U)) into ranges
    [u0, u1) whose bound stays below 2**24 for every output; flag ranges needing float64."""
    cum = torch.cat([torch.zeros(bound.shape[0], 1, dtype=bound.dtype, device=bound.device), bound.cumsum(1)], 1)
    n = bound.shape[1]
    out: list[tuple[int, int, bool]] = []
    u0 = 0
    while u0 < n:
        span = (cum[:, u0 + 1:] - cum[:, u0:u0 + 1]).amax(0)  # bound of [u0, u0 + 1 + i)
        fits = (span < _F32_EXACT).nonzero()
        # the spans grow with i, so the fitting ones are a prefix
        u1 = u0 + 1 + int(fits[-1]) if fits.numel() else u0 + 1
        out.append((u0, u1, not fits.numel()))
        u0 = u1
    return out


def _expand(x_idx: torch.Tensor, table: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, H, W) indices -> (N, G, T, C/G, H, W) float32 planes ``table[t][x]``."""
    if x_idx.device.type == "cpu":
        out = kernels.expand(x_idx, table, groups)
        if out is not None:
            return out
    n, c, h, w = x_idx.shape
    t = table.shape[0]
    planes = torch.index_select(table.to(x_idx.device), 1, x_idx.reshape(-1).long())  # (T, N*C*H*W)
    return planes.view(t, n, groups, c // groups, h, w).permute(1, 2, 0, 3, 4, 5).contiguous()


@dataclass(frozen=True, eq=False)
class PreparedWeights:
    """Weight-side operands of ``conv_prepared``; reusable while the weight codes, the
    centre and the pad code stay the same (layers cache it between forward passes).

    ``const``: exact per-output-channel constant (see ``_terms_q``; for table strategies
    ``-p*sum_k w``); ``stacked``: (O, T*Cg, kh, kw) float32 term weights with the centre
    folded in when ``fold_center``; ``wabs``: (T, O, Cg) sums of |term weights| per input
    channel, for the exactness bound; ``xtab``: (T, 256) activation tables centred at the
    pad code.
    """

    plan: EmulationPlan
    strategy: str
    pad_idx: int
    w_idx: torch.Tensor
    center: torch.Tensor
    fold_center: bool
    const: torch.Tensor
    stacked: torch.Tensor | None = None
    wabs: torch.Tensor | None = None
    xtab: torch.Tensor | None = None


def prepare_weights(w_idx: torch.Tensor, plan: EmulationPlan, pad_idx: int, w_center: torch.Tensor) -> PreparedWeights:
    """Precompute everything of ``conv_centered`` that depends on the weights only."""
    strategy = forced_strategy() or plan.strategy
    dev = w_idx.device
    off, p = plan.offset, pad_idx - plan.offset
    widx = w_idx.long()
    center = w_center.to(device=dev, dtype=torch.int64)
    sum_w = (widx - off).flatten(1).sum(1)
    if strategy in ("general", "lookup"):
        return PreparedWeights(plan, strategy, pad_idx, w_idx, center, False, (-p * sum_w).to(torch.float64))
    wtab, xtab = (t.to(dev) for t in _plan_tables(plan)[:2])
    d = plan.denom
    gamma = xtab[:, pad_idx]  # each activation term's value at the pad code
    wt = wtab[:, widx]  # (T, O, Cg, kh, kw) int64
    const = (wt * gamma.view(-1, 1, 1, 1, 1)).flatten(2).sum(2).sum(0) - d * p * sum_w
    if plan.main_term:
        wt[0] -= d * center.view(-1, 1, 1, 1)
    t, o, cg, kh, kw = wt.shape
    return PreparedWeights(
        plan, strategy, pad_idx, w_idx, center, plan.main_term, const.to(torch.float64),
        stacked=wt.permute(1, 0, 2, 3, 4).reshape(o, t * cg, kh, kw).to(torch.float32),
        wabs=wt.abs().sum((3, 4)).to(torch.float64),
        xtab=(xtab - gamma[:, None]).to(torch.float32))


def _terms_q(x_idx: torch.Tensor, prep: PreparedWeights, geo: ConvGeometry, exact: bool,
             x_range: tuple[int, int] | None) -> torch.Tensor:
    """``Q = sum_k lut(w,x) - c_o*x - p*w + c_o*p`` (codes) by one stacked float convolution.

    With ``F_t``/``G_t`` the plan's terms, ``γ_t = G_t(p)`` and ``d`` its denominator:
    ``d*Q = sum_t sum_k F_t(w)(G_t(x) - γ_t) + sum_t γ_t sum_k F_t(w) - d*p*sum_k w - d*c*S``,
    ``S = sum_k (x - p)``; a main term (``G_0`` = code) absorbs ``-d*c*S`` as ``F_0 - d*c``.
    """
    assert prep.stacked is not None and prep.wabs is not None and prep.xtab is not None
    d, pad_idx = prep.plan.denom, prep.pad_idx
    n, _, h, wd = x_idx.shape
    t, o, cg = prep.wabs.shape
    g = geo.groups
    # bound of every partial sum, from the activation codes actually present
    if x_range is None:
        lo, hi = (int(v) for v in torch.aminmax(x_idx.flatten()))
    else:
        lo, hi = x_range
    lo, hi = min(lo, pad_idx), max(hi, pad_idx)
    xrange = prep.xtab[:, lo:hi + 1].abs().amax(1).to(torch.float64)  # (T,)
    unit_bound = (prep.wabs * xrange.view(-1, 1, 1)).permute(1, 0, 2).reshape(o, t * cg)  # units ordered (t, c)
    worst = float(unit_bound.sum(1).max())
    if worst < _F32_EXACT:
        ranges = [(0, t * cg, False)]
    else:
        if worst >= _F64_EXACT:
            raise QosError("approximate accumulator cannot be computed exactly (partial sums exceed 2**53)")
        ranges = _chunks(unit_bound)
        if len(ranges) > 4:  # one float64 convolution beats many float32 ones
            ranges = [(0, t * cg, True)]
    # stacked activations (N, G, T*Cg, H, W): channel t*Cg + c of each group
    xs = _expand(x_idx, prep.xtab, g).view(n, g, t * cg, h, wd)
    dtype = torch.float64 if exact else torch.float32
    total: torch.Tensor | None = None
    for u0, u1, wide in ranges:
        cdt = torch.float64 if wide else torch.float32
        xpart = xs[:, :, u0:u1].reshape(n, g * (u1 - u0), h, wd).to(cdt)
        part = _conv_float(xpart, prep.stacked[:, u0:u1].to(cdt), geo, g).to(dtype)
        total = part if total is None else total + part
    assert total is not None
    total = total + prep.const.to(dtype).view(1, -1, 1, 1)
    if not prep.fold_center and bool(prep.center.any()):
        xc = (x_idx.to(torch.int16) - pad_idx).to(dtype)
        total = total - d * prep.center.to(dtype).view(1, -1, 1, 1) * _receptive_sum(xc, geo, o)
    return total / d if d != 1 else total


# --- table strategies ------------------------------------------------------------------


def _im2col(x_idx: torch.Tensor, geo: ConvGeometry, pad_idx: int) -> torch.Tensor:
    """(N, C, H, W) uint8 -> (G, Cg*kh*kw, N*Ho*Wo) uint8, padding holding ``pad_idx``.

    The batch is folded into the positions so that small feature maps (and GEMMs, whose
    "maps" are 1x1) still fill the kernel's 64-wide vectors.
    """
    pt, pl, pb, pr = geo.pads
    xp = F.pad(x_idx, (pl, pr, pt, pb), value=pad_idx) if any(geo.pads) else x_idx.contiguous()
    n, c, _, _ = xp.shape
    kh, kw = geo.kernel
    ho, wo = geo.out_hw
    g = geo.groups
    sn, sc, sh_, sw_ = xp.stride()
    cols = xp.as_strided((g, c // g, kh, kw, n, ho, wo),
                         (sc * (c // g), sc, geo.dilation[0] * sh_, geo.dilation[1] * sw_, sn,
                          geo.stride[0] * sh_, geo.stride[1] * sw_), xp.storage_offset())
    return cols.reshape(g, (c // g) * kh * kw, n * ho * wo)


def lookup_gemm(cols: torch.Tensor, w_rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Straightforward per-element lookup ``out[g, o, p] = sum_k table[w[g, o, k], x[g, k, p]]``
    via a materialised ``lut[w_idx, x_idx]`` gather per chunk (the way other simulators
    emulate approximate multipliers). Returns int64 (G, O, P)."""
    g, k, p = cols.shape
    _, o, _ = w_rows.shape
    flat = table.reshape(-1).long()
    wi = w_rows.long() * 256
    out = torch.empty((g, o, p), dtype=torch.int64)
    step = max(1, _LOOKUP_CHUNK // max(1, o * k))
    for b in range(g):
        xb = cols[b].long()
        for p0 in range(0, p, step):
            idx = wi[b][:, :, None] + xb[None, :, p0:p0 + step]  # (O, K, chunk)
            out[b, :, p0:p0 + step] = flat[idx].sum(1)
    return out


def _table_acc(x_idx: torch.Tensor, w_idx: torch.Tensor, table: torch.Tensor, geo: ConvGeometry, pad_idx: int,
               lookup: bool, key: str | None = None) -> torch.Tensor:
    """Exact accumulators (N, O, Ho, Wo) of the general path: int32 (C kernel) or int64 (gather)."""
    n = x_idx.shape[0]
    o, cg, kh, kw = w_idx.shape
    g = geo.groups
    ho, wo = geo.out_hw
    k = cg * kh * kw
    cols = _im2col(x_idx.cpu(), geo, pad_idx)
    w_rows = w_idx.cpu().reshape(g, o // g, k).contiguous()
    table = table.cpu()
    fits = k * int(table.abs().max()) <= INT32_MAX  # the kernel accumulates in int32
    out = None
    if not lookup and fits:
        out = kernels.lut_gemm(cols, w_rows, table, groups=g, key=key)
    if out is None:
        out = lookup_gemm(cols, w_rows, table)
    # (G, Og, N*Ho*Wo) -> (N, O, Ho, Wo)
    out = out.view(g, o // g, n, ho, wo).permute(2, 0, 1, 3, 4).reshape(n, o, ho, wo)
    return out.to(x_idx.device)


def _receptive_sum(xc: torch.Tensor, geo: ConvGeometry, out_channels: int) -> torch.Tensor:
    """``sum_k (x_k - p)`` over each receptive field (padding contributes 0), per output channel."""
    n, c, h, w = xc.shape
    g = geo.groups
    kh, kw = geo.kernel
    per_group = xc.view(n, g, c // g, h, w).sum(2)
    ones = torch.ones(g, 1, kh, kw, dtype=xc.dtype, device=xc.device)
    s = _conv_float(per_group, ones, geo, g)  # (N, G, Ho, Wo)
    return s.repeat_interleave(out_channels // g, dim=1)


# --- entry points ----------------------------------------------------------------------


def conv_prepared(x_idx: torch.Tensor, prep: PreparedWeights, geo: ConvGeometry, exact: bool = False,
                  x_range: tuple[int, int] | None = None) -> torch.Tensor:
    """``conv_centered`` with weight-side operands from ``prepare_weights``."""
    if prep.strategy not in ("general", "lookup"):
        return _terms_q(x_idx, prep, geo, exact, x_range)
    plan, pad_idx = prep.plan, prep.pad_idx
    acc = _table_acc(x_idx, prep.w_idx, _plan_tables(plan)[2], geo, pad_idx, prep.strategy == "lookup", plan.sha256)
    dtype = torch.float64 if exact else torch.float32
    q = acc.to(dtype) + prep.const.to(dtype).view(1, -1, 1, 1)
    if bool(prep.center.any()):
        xc = (x_idx.to(torch.int16) - pad_idx).to(dtype)
        q = q - prep.center.to(dtype).view(1, -1, 1, 1) * _receptive_sum(xc, geo, prep.w_idx.shape[0])
    return q


def conv_centered(x_idx: torch.Tensor, w_idx: torch.Tensor, plan: EmulationPlan, geo: ConvGeometry, pad_idx: int,
                  w_center: torch.Tensor, exact: bool = False,
                  x_range: tuple[int, int] | None = None) -> torch.Tensor:
    """``Q = acc - c_o*sum(x) - p*sum(w) + K*c_o*p`` per output, as float (float64 and exact
    when ``exact``, else float32), where ``c_o`` = ``w_center`` (weight codes, per output
    channel) and ``p`` the pad code. With ``c_o`` = weight zero point and ``p`` = activation
    zero point, ``Q`` is the zero-point-corrected accumulator of a quantized layer.

    x_idx: (N, C, H, W) uint8 table indices; w_idx: (O, Cg, kh, kw) uint8 table indices;
    ``x_range``: smallest and largest index in ``x_idx`` when already known.
    """
    return conv_prepared(x_idx, prepare_weights(w_idx, plan, pad_idx, w_center), geo, exact, x_range)


def _finish(acc: torch.Tensor) -> torch.Tensor:
    if acc.numel() and (float(acc.min()) < INT32_MIN or float(acc.max()) > INT32_MAX):
        raise QosError("accumulator overflows int32")
    return acc.round().to(torch.int32) if acc.dtype.is_floating_point else acc.to(torch.int32)


def approx_conv2d_acc(x_codes: Any, w_codes: Any, lut: Any, stride: int | Sequence[int] = 1,
                      padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                      pad_code: int = 0, signed: bool | None = None) -> torch.Tensor:
    """Accumulators of an approximate 2-D convolution (NCHW, OIHW): int32 (N, O, Ho, Wo).

    Bit-identical to ``qos_compile.reference.approx_conv2d_acc`` (same arguments; codes as
    torch integer tensors; ``lut`` a Multiplier, a (256, 256) table, or an EmulationPlan
    from ``emulation.plan_for``); ``padding`` is an int, (h, w) or (top, left, bottom,
    right) and feeds ``pad_code``.
    """
    x, w = torch.as_tensor(x_codes), torch.as_tensor(w_codes)
    plan = resolve_plan(lut, signed, x, w)
    geo = _geometry(x.shape, w.shape, stride, padding, dilation, groups)
    off = plan.offset
    x_idx, w_idx = _indices(x, off, "activation codes"), _indices(w, off, "weight codes")
    pad_idx = int(_indices(torch.tensor([pad_code]), off, "pad code")[0])
    forced = forced_strategy()
    if (forced or plan.strategy) in ("general", "lookup"):
        return _finish(_table_acc(x_idx, w_idx, _plan_tables(plan)[2], geo, pad_idx, forced == "lookup",
                                  plan.sha256))
    # centring the weights on each channel's mean code keeps the float32 bound small
    # (only a main term absorbs the centring for free)
    w_long = w_idx.long() - off
    center = w_long.flatten(1).float().mean(1).round().long()
    if not plan.main_term:
        center.zero_()
    q = conv_centered(x_idx, w_idx, plan, geo, pad_idx, center, exact=True)
    # acc = Q + c*sum_k(x_k - p) + p*sum_k(w_k)
    sum_w = w_long.flatten(1).sum(1).to(torch.float64)
    acc = q + (pad_idx - off) * sum_w.view(1, -1, 1, 1)
    if bool(center.any()):
        xc = (x_idx.to(torch.int16) - pad_idx).to(torch.float64)
        acc = acc + center.to(torch.float64).view(1, -1, 1, 1) * _receptive_sum(xc, geo, w.shape[0])
    return _finish(acc)


def approx_linear_acc(x_codes: Any, w_codes: Any, lut: Any, signed: bool | None = None) -> torch.Tensor:
    """Accumulators of an approximate GEMM: ``acc[n, o] = sum_k lut[w[o, k], x[n, k]]``, int32 (N, O).

    x: (N, K) activation codes; w: (O, K) weight codes (nn.Linear layout). Bit-identical to
    ``qos_compile.reference.approx_gemm_acc``.
    """
    x, w = torch.as_tensor(x_codes), torch.as_tensor(w_codes)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise QosError(f"gemm shapes do not match: x {tuple(x.shape)}, w {tuple(w.shape)} (want (N, K) and (O, K))")
    return approx_conv2d_acc(x[:, :, None, None], w[:, :, None, None], lut, signed=signed)[:, :, 0, 0]


def linear_geometry() -> ConvGeometry:
    """The geometry of a GEMM seen as a 1x1 convolution on 1x1 images."""
    return ConvGeometry((1, 1), (0, 0, 0, 0), (1, 1), 1, (1, 1), (1, 1))


def conv_geometry(x_shape: Sequence[int], w_shape: Sequence[int], stride: Any, padding: Any, dilation: Any,
                  groups: int) -> ConvGeometry:
    """Validated geometry of a convolution (for layers calling ``conv_centered``)."""
    return _geometry(x_shape, w_shape, stride, padding, dilation, groups)
