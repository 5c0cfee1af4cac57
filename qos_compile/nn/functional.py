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
* general: a table lookup per product on the tensors' own device, by the backend that
  ``emulation.table_backend`` selects: the C kernel in ``kernels`` over an im2col'd uint8
  copy of the input (CPU), or ``table_conv``, pure torch (embedding-bag sums of gathered
  table rows), bit-exact with it. ``lookup_gemm``, the straightforward chunked gather
  ``lut[w, x]``, is the benchmark's baseline (``force_strategy("lookup")``).

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
from .emulation import EmulationPlan, forced_strategy, plan_for, table_backend

__all__ = ["approx_conv2d_acc", "approx_linear_acc", "conv_centered", "conv_prepared", "prepare_weights",
           "PreparedWeights", "ConvGeometry", "conv_geometry", "linear_geometry", "resolve_plan", "table_conv",
           "lookup_gemm"]

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
    default) would silently break.

    Only torch's per-operator ``fp32_precision`` settings are touched: reading or writing the
    legacy ``allow_tf32`` flags once a caller has set any of the new ones raises in torch
    ("a mix of the legacy and new APIs"). ``"none"`` inherits a parent setting that may be
    TF32, so every setting that is not ``"ieee"`` is pinned and restored afterwards."""
    settings = [torch.backends.mkldnn.conv, torch.backends.mkldnn.matmul, torch.backends.cudnn.conv,
                torch.backends.cuda.matmul]
    saved = [(b, b.fp32_precision) for b in settings if b.fp32_precision != "ieee"]
    for b, _ in saved:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        for b, value in saved:
            b.fp32_precision = value


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
    # each part is exact (an integer below 2**24 in float32, or float64); they, the constant and
    # the centre term are combined in float64 (exact below 2**53), so a float32 result is Q
    # rounded once, as the device's Cast(int32 -> float32) rounds it
    total: torch.Tensor | None = None
    for u0, u1, wide in ranges:
        cdt = torch.float64 if wide else torch.float32
        xpart = xs[:, :, u0:u1].reshape(n, g * (u1 - u0), h, wd).to(cdt)
        part = _conv_float(xpart, prep.stacked[:, u0:u1].to(cdt), geo, g).to(torch.float64)
        total = part if total is None else total + part
    assert total is not None
    total = total + prep.const.to(torch.float64).view(1, -1, 1, 1)
    if not prep.fold_center and bool(prep.center.any()):
        xc = (x_idx.to(torch.int16) - pad_idx).to(torch.float32)
        s = _receptive_sum(xc, geo, o).to(torch.float64)     # |sum| <= K*255: exact in float32
        total = total - d * prep.center.to(torch.float64).view(1, -1, 1, 1) * s
    total = total / d if d != 1 else total
    return total if exact else total.to(torch.float32)


# --- table strategies ------------------------------------------------------------------


def _im2col(x_idx: torch.Tensor, geo: ConvGeometry, pad_idx: int) -> torch.Tensor:
    """(N, C, H, W) uint8 -> (G, Cg*kh*kw, N*Ho*Wo) uint8, padding holding ``pad_idx``, on
    ``x_idx``'s device.

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


def _check_gemm_operands(cols: torch.Tensor, w_rows: torch.Tensor, table: torch.Tensor) -> None:
    if (cols.ndim != 3 or w_rows.ndim != 3 or cols.shape[0] != w_rows.shape[0] or cols.shape[1] != w_rows.shape[2]
            or tuple(table.shape) != (256, 256)):
        raise QosError(f"table GEMM shapes do not match: x {tuple(cols.shape)} (want (G, K, P)), w "
                       f"{tuple(w_rows.shape)} (want (G, O, K)), table {tuple(table.shape)} (want (256, 256))")
    if cols.dtype != torch.uint8 or w_rows.dtype != torch.uint8 or table.dtype not in (torch.int32, torch.int64):
        raise QosError(f"table GEMM wants uint8 indices and an int32 table, got {cols.dtype}, {w_rows.dtype}, "
                       f"{table.dtype}")
    if not cols.device == w_rows.device == table.device:
        raise QosError(f"table GEMM operands on different devices: {cols.device}, {w_rows.device}, {table.device}")


def lookup_gemm(cols: torch.Tensor, w_rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Straightforward per-element lookup ``out[g, o, p] = sum_k table[w[g, o, k], x[g, k, p]]``
    via a materialised ``lut[w_idx, x_idx]`` gather per chunk (the way other simulators
    emulate approximate multipliers): the benchmark's baseline (``force_strategy("lookup")``).

    cols: (G, K, P) uint8 indices; w_rows: (G, O, K) uint8; table: (256, 256) integer, all on
    one device. Returns int64 (G, O, P) there.
    """
    _check_gemm_operands(cols, w_rows, table)
    g, k, p = cols.shape
    o = w_rows.shape[1]
    flat = table.reshape(-1).long()
    wi = w_rows.long() * 256
    out = torch.empty((g, o, p), dtype=torch.int64, device=cols.device)
    step = max(1, _LOOKUP_CHUNK // max(1, o * k))
    for b in range(g):
        xb = cols[b].long()
        for p0 in range(0, p, step):
            idx = wi[b][:, :, None] + xb[None, :, p0:p0 + step]  # (O, K, chunk)
            out[b, :, p0:p0 + step] = flat[idx].sum(1)
    return out


# Regimes of ``table_conv`` (break-evens measured on a 2-core EPYC, AVX-512, one thread):
#: outputs per group up to which each output gathers from its own 256-entry weight rows
#: (depthwise convolutions): an embedding row of one or two floats costs more than a gather.
_GATHER_OUTPUTS = 2
#: positions per group below which every (position, output) sums scalar lookups of the
#: whole table: building 256-entry rows for every (tap, output) costs more than that.
_DIRECT_POSITIONS = 64
#: bytes of one block of gathered weight rows: within a core's L2 cache on the CPU (lookups
#: measured 2-5x faster than from a block that spills to L3/DRAM); larger elsewhere, where
#: every kernel launch costs more.
_ROWS_BYTES = {"cpu": 4 << 20}
_ROWS_BYTES_OTHER = 32 << 20
_CHUNK_BYTES = 64 << 20  # indices / gathered values of one chunk of positions


def _im2col_taps_last(x_idx: torch.Tensor, geo: ConvGeometry, pad_idx: int) -> torch.Tensor:
    """(N, C, H, W) uint8 -> (G, N*Ho*Wo, kh*kw*Cg) uint8, taps ordered (kh, kw, channel),
    padding holding ``pad_idx``: every position's taps contiguous. Copied from a channels-last
    map, whose rows of Cg channels are contiguous (from NCHW the copy is ~20x slower)."""
    pt, pl, pb, pr = geo.pads
    xl = x_idx.permute(0, 2, 3, 1)
    xl = F.pad(xl, (0, 0, pl, pr, pt, pb), value=pad_idx) if any(geo.pads) else xl.contiguous()
    n, _, _, c = xl.shape
    kh, kw = geo.kernel
    ho, wo = geo.out_hw
    g = geo.groups
    sn, sh_, sw_, sc = xl.stride()
    cols = xl.as_strided((g, n, ho, wo, kh, kw, c // g),
                         (sc * (c // g), sn, geo.stride[0] * sh_, geo.stride[1] * sw_, geo.dilation[0] * sh_,
                          geo.dilation[1] * sw_, sc), xl.storage_offset())
    return cols.reshape(g, n * ho * wo, kh * kw * (c // g))


def table_conv(x_idx: torch.Tensor, w_idx: torch.Tensor, table: torch.Tensor, geo: ConvGeometry,
               pad_idx: int) -> torch.Tensor:
    """Exact accumulators ``acc[n, o] = sum_k table[w_k, x_k]`` of a convolution over table
    indices, in pure torch on the operands' device: int64 (N, O, Ho, Wo), bit-exact with the
    C kernel (``kernels.lut_gemm``).

    x_idx: (N, C, H, W) uint8 activation indices; w_idx: (O, C/groups, kh, kw) uint8 weight
    indices; table: (256, 256) int32, row = weight; ``geo`` from ``conv_geometry``; padding
    feeds ``pad_idx``. Three regimes, by the shape of the GEMM behind the convolution:

    * rows (the common case): a block of taps ``k`` and outputs ``o`` becomes an embedding
      matrix ``E[v*kc + k, o] = table[w[o, k], v] - mid``; each position's partial accumulator
      is the sum of ``kc`` rows of ``E`` picked by its activation indices, one
      ``F.embedding_bag(mode="sum")`` call over all positions;
    * direct (fewer than ``_DIRECT_POSITIONS`` positions per group): the same bags over the
      whole table as a (65536, 1) embedding, indexed by ``256*w + x`` per (position, output);
    * gather (at most ``_GATHER_OUTPUTS`` outputs per group, e.g. depthwise): ``torch.gather``
      from each output's int32 rows ``table[w[o, k], :]``, summed in int64.

    The embedding paths centre the table on its range's midpoint ``mid`` and bound the taps per
    bag so that every partial sum is an integer of magnitude at most 2**24 in float32 (2**53
    in float64, for tables too wide for bags of 8 taps): any summation order is then exact.
    Blocks of taps are summed in the same float type while ``K * max|table - mid|`` allows
    it, else in float64 (exact below 2**53); ``K * mid`` is added back in int64.
    """
    if x_idx.dtype != torch.uint8 or w_idx.dtype != torch.uint8 or table.dtype not in (torch.int32, torch.int64):
        raise QosError(f"table_conv wants uint8 indices and an int32 table, got {x_idx.dtype}, {w_idx.dtype}, "
                       f"{table.dtype}")
    if tuple(table.shape) != (256, 256) or not x_idx.device == w_idx.device == table.device:
        raise QosError(f"table_conv wants a (256, 256) table and every operand on one device, got table "
                       f"{tuple(table.shape)} and devices {x_idx.device}, {w_idx.device}, {table.device}")
    n = x_idx.shape[0]
    o, cg, kh, kw = w_idx.shape
    g = geo.groups
    og, k = o // g, cg * kh * kw
    ho, wo = geo.out_hw
    p = n * ho * wo
    dev = x_idx.device
    if min(p, o, k) == 0:
        return torch.zeros((n, o, ho, wo), dtype=torch.int64, device=dev)
    if og <= _GATHER_OUTPUTS:
        out = _gather_gemm(_im2col(x_idx, geo, pad_idx), w_idx.reshape(g, og, k), table)  # (G, Og, P)
        return out.view(g, og, n, ho, wo).permute(2, 0, 1, 3, 4).reshape(n, o, ho, wo)
    cols = _im2col_taps_last(x_idx, geo, pad_idx)  # (G, P, K), taps (kh, kw, c)
    w_rows = w_idx.permute(0, 2, 3, 1).reshape(g, og, k)
    t64 = table.long()
    lo, hi = (int(v) for v in torch.aminmax(t64))
    mid = (lo + hi) // 2
    spread = max(hi - mid, mid - lo, 1)
    f32 = int(FLOAT32_EXACT) // spread >= min(k, 8)  # float32 while bags of a few taps stay exact
    kc = max(1, min(k, int(FLOAT32_EXACT if f32 else FLOAT64_EXACT) // spread))
    centred = (t64 - mid).to(torch.float32 if f32 else torch.float64)
    acc = (_direct_bags if p < _DIRECT_POSITIONS else _row_bags)(cols, w_rows, centred, kc, k * spread)  # (G, P, Og)
    out = acc.to(torch.int64)
    if mid:
        out.add_(k * mid)
    # a view for one group (channels-last strides): callers convert it anyway
    return out.view(g, n, ho, wo, og).permute(1, 0, 4, 2, 3).reshape(n, o, ho, wo)


def _gather_gemm(cols: torch.Tensor, w_rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """int64 (G, O, P) ``sum_k table[w[g, o, k], x[g, k, p]]`` by ``torch.gather`` from each
    (group, output, tap)'s 256-entry int32 row; cols: (G, K, P)."""
    g, k, p = cols.shape
    o = w_rows.shape[1]
    # int32 sums where they cannot overflow (casting the gathered values to int64 costs more
    # than the gather)
    dtype = torch.int32 if k * max(1, int(table.long().abs().max())) <= INT32_MAX else torch.int64
    tab = table.to(dtype)
    out = torch.empty((g, o, p), dtype=torch.int64, device=cols.device)
    gb = max(1, min(g, _CHUNK_BYTES // (o * k * 256 * 8)))
    for g0 in range(0, g, gb):
        g1 = min(g, g0 + gb)
        rows = tab[w_rows[g0:g1].long()]  # (gb, O, K, 256)
        pc = max(1, min(p, _CHUNK_BYTES // (16 * (g1 - g0) * o * k)))  # int64 index + values
        for p0 in range(0, p, pc):
            p1 = min(p, p0 + pc)
            idx = cols[g0:g1, :, p0:p1].long()[:, None].expand(g1 - g0, o, k, p1 - p0)
            out[g0:g1, :, p0:p1] = torch.gather(rows, 3, idx).sum(2, dtype=dtype)
    return out


def _balanced(total: int, most: int) -> int:
    """Block size of at most ``most`` splitting ``total`` into the fewest, nearly equal blocks
    (144 taps by at most 128: two blocks of 72, not 128 + 16)."""
    most = max(1, min(total, most))
    blocks = -(-total // most)
    return -(-total // blocks)


class _BagSum:
    """Sum of embedding-bag partial results over blocks of taps, exactly: in the bags' own
    float dtype while ``bound`` (the largest possible |sum|) stays within its exact integers,
    else in float64 (exact below 2**53); a single block covering everything is kept as it is."""

    def __init__(self, shape: tuple[int, ...], bound: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype if bound <= (FLOAT32_EXACT if dtype == torch.float32 else FLOAT64_EXACT) else torch.float64
        self.shape, self.device = shape, device
        self.acc: torch.Tensor | None = None

    def add(self, where: tuple[Any, ...], part: torch.Tensor) -> None:
        """Add ``part`` into ``acc[where]``."""
        if self.acc is None:
            if tuple(part.shape) == self.shape:  # one block covers everything
                self.acc = part.to(self.dtype)
                return
            self.acc = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self.acc[where] += part

    def total(self) -> torch.Tensor:
        """The sums so far."""
        assert self.acc is not None
        return self.acc


def _direct_bags(cols: torch.Tensor, w_rows: torch.Tensor, centred: torch.Tensor, kc: int,
                 bound: int) -> torch.Tensor:
    """Exact float (G, P, O) sums of the centred table's entries ``[w, x]`` in bags of at most
    ``kc`` taps; cols: (G, P, K); ``bound``: the largest possible |sum|."""
    g, p, k = cols.shape
    o = w_rows.shape[1]
    dev = cols.device
    flat = centred.reshape(-1, 1)
    acc = _BagSum((g, p, o), bound, centred.dtype, dev)
    w256 = w_rows.to(torch.int32).mul_(256)
    kc = _balanced(k, kc)
    for b in range(g):
        for k0 in range(0, k, kc):
            k1 = min(k, k0 + kc)
            pc = max(1, min(p, _CHUNK_BYTES // (4 * o * (k1 - k0))))
            for p0 in range(0, p, pc):
                p1 = min(p, p0 + pc)
                idx = torch.empty((p1 - p0, o, k1 - k0), dtype=torch.int32, device=dev)
                torch.add(w256[b, None, :, k0:k1], cols[b, p0:p1, None, k0:k1].to(torch.int32), out=idx)
                part = F.embedding_bag(idx.view(-1, k1 - k0), flat, mode="sum")
                acc.add((b, slice(p0, p1)), part.view(p1 - p0, o))
    return acc.total()


def _row_bags(cols: torch.Tensor, w_rows: torch.Tensor, centred: torch.Tensor, kc: int,
              bound: int) -> torch.Tensor:
    """Exact float (G, P, O) sums over embedding blocks of weight rows (see ``table_conv``) of at
    most ``kc`` taps; cols: (G, P, K); ``bound``: the largest possible |sum|."""
    g, p, k = cols.shape
    o = w_rows.shape[1]
    dev = cols.device
    rows_t = centred.t().contiguous()  # (256 activations, 256 weights): a block is a column gather
    pairs = _ROWS_BYTES.get(dev.type, _ROWS_BYTES_OTHER) // (256 * centred.element_size())  # (tap, output)s
    kc = _balanced(k, min(kc, max(8, pairs // o)))
    oc = _balanced(o, max(1, pairs // kc))
    gb = max(1, min(g, pairs // (kc * o))) if oc == o and kc >= k else 1  # several small groups per block
    acc = _BagSum((g, p, o), bound, centred.dtype, dev)
    w_t = w_rows.permute(0, 2, 1)  # (G, K, O)
    buf = torch.empty(256 * gb * kc * oc, dtype=centred.dtype, device=dev)  # every block, one allocation
    for g0 in range(0, g, gb):
        g1 = min(g, g0 + gb)
        nb = g1 - g0
        for k0 in range(0, k, kc):
            k1 = min(k, k0 + kc)
            width = nb * (k1 - k0)
            # row v*width + b*(k1 - k0) + j of a block: activation index v at group g0 + b, tap k0 + j
            base = torch.arange(width, dtype=torch.int32, device=dev).view(nb, 1, k1 - k0)
            pc = max(1, min(p, _CHUNK_BYTES // (4 * width)))
            for p0 in range(0, p, pc):
                p1 = min(p, p0 + pc)
                idx = cols[g0:g1, p0:p1, k0:k1].to(torch.int32)  # (a mixed uint8/int32 add is ~10x slower)
                idx = torch.add(base, idx, alpha=width, out=idx).view(-1, k1 - k0)
                for o0 in range(0, o, oc):
                    o1 = min(o, o0 + oc)
                    sel = w_t[g0:g1, k0:k1, o0:o1].reshape(-1).long()
                    block = buf[:256 * sel.numel()].view(256, -1)
                    torch.index_select(rows_t, 1, sel, out=block)
                    block = block.view(256 * width, o1 - o0)
                    part = F.embedding_bag(idx, block, mode="sum")
                    acc.add((slice(g0, g1), slice(p0, p1), slice(o0, o1)), part.view(nb, p1 - p0, o1 - o0))
    return acc.total()


def _native_gemm(cols: torch.Tensor, w_rows: torch.Tensor, table: torch.Tensor, key: str | None) -> torch.Tensor:
    """The C kernel on (G, K, P) CPU columns: int32 (G, O, P), or int64 when the taps had to be
    split into blocks whose int32 sums cannot overflow."""
    g, k, _ = cols.shape
    spread = max(1, int(table.long().abs().max()))
    kc = max(1, min(k, INT32_MAX // spread))  # the kernel accumulates in int32
    total: torch.Tensor | None = None
    for k0 in range(0, max(k, 1), kc):
        part = kernels.lut_gemm(cols[:, k0:k0 + kc], w_rows[:, :, k0:k0 + kc], table, groups=g, key=key)
        if part is None:
            raise QosError("the C table-lookup kernel is unavailable; use --emulation auto or torch")
        if kc >= k:
            return part
        total = part.long() if total is None else total.add_(part)
    assert total is not None
    return total


@lru_cache(maxsize=256)
def _device_table(plan: EmulationPlan, device: torch.device) -> torch.Tensor:
    """The plan's int32 table on ``device`` (one copy per device, not one per call)."""
    return _plan_tables(plan)[2].to(device)


def _table_acc(x_idx: torch.Tensor, w_idx: torch.Tensor, plan: EmulationPlan, geo: ConvGeometry, pad_idx: int,
               lookup: bool) -> torch.Tensor:
    """Exact accumulators (N, O, Ho, Wo) of the general path on ``x_idx``'s device: int32 (C
    kernel) or int64. ``lookup``: the straightforward gather, else the backend that
    ``emulation.table_backend`` selects."""
    n = x_idx.shape[0]
    o, cg, kh, kw = w_idx.shape
    g = geo.groups
    ho, wo = geo.out_hw
    dev = x_idx.device
    native = not lookup and table_backend(dev) == "native"  # before any work: may refuse
    w_idx, table = w_idx.to(dev), _device_table(plan, dev)
    if not (lookup or native):
        return table_conv(x_idx, w_idx, table, geo, pad_idx)
    cols = _im2col(x_idx, geo, pad_idx)
    w_rows = w_idx.reshape(g, o // g, cg * kh * kw).contiguous()
    out = _native_gemm(cols, w_rows, table, plan.sha256) if native else lookup_gemm(cols, w_rows, table)
    # (G, Og, N*Ho*Wo) -> (N, O, Ho, Wo)
    return out.reshape(g, o // g, n, ho, wo).permute(2, 0, 1, 3, 4).reshape(n, o, ho, wo)


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
    acc = _table_acc(x_idx, prep.w_idx, plan, geo, pad_idx, prep.strategy == "lookup")
    # combined in float64 (exact), then rounded once (see _terms_q)
    q = acc.to(torch.float64) + prep.const.to(torch.float64).view(1, -1, 1, 1)
    if bool(prep.center.any()):
        xc = (x_idx.to(torch.int16) - pad_idx).to(torch.float32)
        s = _receptive_sum(xc, geo, prep.w_idx.shape[0]).to(torch.float64)
        q = q - prep.center.to(torch.float64).view(1, -1, 1, 1) * s
    return q if exact else q.to(torch.float32)


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
    acc = acc.round() if acc.dtype.is_floating_point else acc
    return acc.to(torch.int32, memory_format=torch.contiguous_format)  # the torch table path leaves NHWC strides


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
        return _finish(_table_acc(x_idx, w_idx, plan, geo, pad_idx, forced == "lookup"))
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
