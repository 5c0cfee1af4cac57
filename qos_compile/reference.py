"""The slow, obviously-correct definition of approximate conv/GEMM accumulators (NumPy).

Every backend (PyTorch emulation, ONNX Runtime, TVM x86-64/aarch64, the C
runtime) is tested against these two functions. They compute

    acc[n, o, ...] = sum_k lut[w_k + off, x_k + off]      (int32)

with port A = weight code, port B = activation code, ``off`` = 128 for signed
circuits and 0 for unsigned ones. Padding feeds ``pad_code`` (the activation
zero point's code), never a literal 0 unless that is the zero point.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import QosError
from .multipliers.multiplier import Multiplier
from .multipliers.table import validate_table
from .numerics import INT32_MAX, INT32_MIN, code_offset, conv_pads, pair


def _table_and_offset(lut: Any, signed: bool | None, *codes: np.ndarray) -> tuple[np.ndarray, int]:
    if isinstance(lut, Multiplier):
        if signed is not None and signed != lut.signed:
            raise QosError(f"signed={signed} contradicts circuit {lut.name}")
        return lut.lut, lut.offset
    table = validate_table(lut)
    if signed is None:
        kinds = {c.dtype for c in codes}
        if kinds == {np.dtype(np.int8)}:
            signed = True
        elif kinds == {np.dtype(np.uint8)}:
            signed = False
        else:
            raise QosError("pass signed=True/False (or int8/uint8 codes, or a Multiplier) to choose the table offset")
    return table, code_offset(signed)


def _check_codes(a: np.ndarray, off: int, what: str) -> np.ndarray:
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.integer):
        raise QosError(f"{what} must be integer codes, got dtype {a.dtype}")
    idx = a.astype(np.int64) + off
    if idx.size and (idx.min() < 0 or idx.max() > 255):
        raise QosError(f"{what} out of the 8-bit code range {-off}..{255 - off}")
    return idx


def _to_int32(acc: np.ndarray) -> np.ndarray:
    if acc.size and (acc.min() < INT32_MIN or acc.max() > INT32_MAX):
        raise QosError("accumulator overflows int32")
    return acc.astype(np.int32)


def approx_gemm_acc(x_codes: Any, w_codes: Any, lut: Any, signed: bool | None = None) -> np.ndarray:
    """Accumulators of an approximate GEMM: ``acc[n, o] = sum_k lut[w[o, k], x[n, k]]``.

    x_codes: (N, K) activation codes; w_codes: (O, K) weight codes (nn.Linear layout);
    lut: a Multiplier or a (256, 256) table. Returns int32 (N, O).
    """
    x, w = np.asarray(x_codes), np.asarray(w_codes)
    table, off = _table_and_offset(lut, signed, x, w)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise QosError(f"gemm shapes do not match: x {x.shape}, w {w.shape} (want (N, K) and (O, K))")
    xi, wi = _check_codes(x, off, "activation codes"), _check_codes(w, off, "weight codes")
    t = table.astype(np.int64)
    acc = np.empty((x.shape[0], w.shape[0]), dtype=np.int64)
    for o in range(w.shape[0]):
        acc[:, o] = t[wi[o][None, :], xi].sum(axis=1)
    return _to_int32(acc)


def approx_conv2d_acc(
    x_codes: Any,
    w_codes: Any,
    lut: Any,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    pad_code: int = 0,
    signed: bool | None = None,
) -> np.ndarray:
    """Accumulators of an approximate 2-D convolution (NCHW, OIHW), int32 (N, O, Ho, Wo).

    ``acc[n, o, i, j] = sum_{c, u, v} lut[w[o, c, u, v], xp[n, g*Cg + c, i*sh + u*dh, j*sw + v*dw]]``
    where ``xp`` is ``x`` padded with ``pad_code`` and ``g`` is o's group.
    """
    x, w = np.asarray(x_codes), np.asarray(w_codes)
    table, off = _table_and_offset(lut, signed, x, w)
    if x.ndim != 4 or w.ndim != 4:
        raise QosError(f"conv wants x (N, C, H, W) and w (O, C/groups, kh, kw), got {x.shape} and {w.shape}")
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    if groups < 1 or c % groups or o % groups or c // groups != cg:
        raise QosError(f"groups={groups} does not fit x channels {c}, w {w.shape}")
    sh, sw = pair(stride, "stride")
    dh, dw = pair(dilation, "dilation")
    pt, pl, pb, pr = conv_pads(padding)
    xi, wi = _check_codes(x, off, "activation codes"), _check_codes(w, off, "weight codes")
    pad_idx = _check_codes(np.array([pad_code]), off, "pad code")[0]
    xp = np.full((n, c, h + pt + pb, wd + pl + pr), pad_idx, dtype=np.int64)
    xp[:, :, pt:pt + h, pl:pl + wd] = xi
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise QosError("convolution output would be empty")
    t = table.astype(np.int64)
    og = o // groups
    acc = np.zeros((n, o, ho, wo), dtype=np.int64)
    for u in range(kh):
        for v in range(kw):
            # activations seen by kernel tap (u, v) at every output position
            tap = xp[:, :, u * dh:u * dh + sh * (ho - 1) + 1:sh, v * dw:v * dw + sw * (wo - 1) + 1:sw]
            for oc in range(o):
                g = oc // og
                xs = tap[:, g * cg:(g + 1) * cg]                      # (N, Cg, Ho, Wo)
                acc[:, oc] += t[wi[oc, :, u, v][None, :, None, None], xs].sum(axis=1)
    return _to_int32(acc)


# --------------------------------------------------------------------------- float reductions
# A float sum's result depends on the order of its additions. onnxruntime's own pooling and
# ReduceMean kernels add in an order of their choosing (vector width, blocking), which is not the
# order TVM's kernels use, so one ulp can flip a later rounding and move an activation by one
# code. Every average the exporter emits is therefore spelled out as this fixed order of
# element-wise adds, which every backend computes identically.

def ordered_sum(terms: Sequence[np.ndarray]) -> np.ndarray:
    """Sum ``terms`` (same shape, float32) in the project's fixed order: a halving tree.

    With ``P`` the next power of two >= ``len(terms)`` and missing terms taken as 0, each level
    adds term ``i`` and term ``i + P/2`` for ``i < P/2``, until one term is left. (Adding an
    exact 0 changes no value, so a missing partner just passes the term through.)
    """
    level = [np.asarray(t, dtype=np.float32) for t in terms]
    if not level:
        raise QosError("ordered_sum of no terms")
    while len(level) > 1:
        half = (1 << (len(level) - 1).bit_length()) // 2
        level = [level[i] + level[i + half] if i + half < len(level) else level[i] for i in range(half)]
    return level[0]


def pool_geometry(h: int, w: int, kernel: int | Sequence[int], stride: int | Sequence[int] | None,
                  padding: int | Sequence[int], ceil_mode: bool,
                  count_include_pad: bool) -> tuple[tuple[int, int], tuple[int, int, int, int], np.ndarray]:
    """PyTorch's avg_pool2d geometry: ``((Ho, Wo), zero pads (top, left, bottom, right), divisor)``.

    The zero pads cover the symmetric padding plus what ``ceil_mode``'s last window reaches past
    it; ``divisor`` (float32, (Ho, Wo)) counts each window's elements inside the padded input
    (``count_include_pad``) or inside the input alone, as PyTorch does.
    """
    kh, kw = pair(kernel, "kernel_size")
    sh, sw = pair(stride if stride not in (None, [], ()) else kernel, "stride")
    ph, pw = pair(padding, "padding")
    if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0 or ph > kh // 2 or pw > kw // 2:
        raise QosError(f"bad pooling geometry kernel={kernel} stride={stride} padding={padding}")

    def out_len(n: int, k: int, s: int, p: int) -> int:
        o = (n + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (o - 1) * s >= n + p:
            o -= 1
        return o

    ho, wo = out_len(h, kh, sh, ph), out_len(w, kw, sw, pw)
    if ho < 1 or wo < 1:
        raise QosError(f"pooling {kh}x{kw} of a {h}x{w} input would be empty")

    def counts(n: int, o: int, k: int, s: int, p: int) -> np.ndarray:
        start = np.arange(o) * s - p
        end = np.minimum(start + k, n + p)
        if count_include_pad:
            return end - start
        return np.minimum(end, n) - np.maximum(start, 0)

    div = (counts(h, ho, kh, sh, ph)[:, None] * counts(w, wo, kw, sw, pw)[None, :]).astype(np.float32)
    pads = (ph, pw, max(ph, (ho - 1) * sh + kh - h - ph), max(pw, (wo - 1) * sw + kw - w - pw))
    return (ho, wo), pads, div


def avg_pool2d(x: Any, kernel: int | Sequence[int], stride: int | Sequence[int] | None = None,
               padding: int | Sequence[int] = 0, ceil_mode: bool = False,
               count_include_pad: bool = True) -> np.ndarray:
    """Average pooling of float32 ``x`` (N, C, H, W) as every backend computes it.

    The window's taps, in row-major order, are summed by ``ordered_sum`` (zeros at padded
    positions) and the sum is divided by the ``pool_geometry`` divisor in float32. Global
    average pooling is the kernel (H, W).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise QosError(f"avg_pool2d wants x (N, C, H, W), got {x.shape}")
    kh, kw = pair(kernel, "kernel_size")
    sh, sw = pair(stride if stride not in (None, [], ()) else kernel, "stride")
    (ho, wo), (pt, pl, pb, pr), div = pool_geometry(x.shape[2], x.shape[3], kernel, stride, padding, ceil_mode,
                                                    count_include_pad)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    taps = [xp[:, :, u:u + sh * (ho - 1) + 1:sh, v:v + sw * (wo - 1) + 1:sw] for u in range(kh) for v in range(kw)]
    return (ordered_sum(taps) / div).astype(np.float32)


def mean(x: Any, dims: Sequence[int], keepdim: bool = False) -> np.ndarray:
    """``x.mean(dims)`` of float32 ``x`` as every backend computes it: the reduced elements in
    row-major order (of ``dims`` sorted) summed by ``ordered_sum``, divided by their count."""
    x = np.asarray(x, dtype=np.float32)
    dims = sorted({int(d) % x.ndim for d in dims})
    keep = [d for d in range(x.ndim) if d not in dims]
    moved = np.transpose(x, keep + dims)
    flat = moved.reshape(moved.shape[:len(keep)] + (-1,))
    out = ordered_sum([flat[..., i] for i in range(flat.shape[-1])]) / np.float32(flat.shape[-1])
    if keepdim:
        out = out.reshape([1 if d in dims else x.shape[d] for d in range(x.ndim)])
    return out.astype(np.float32)


# --- integer requantization (numerics contract v2, docs/design.md section 3.7) ---------------

#: Bits of a non-zero requantization multiplier: ``2**(MULT_BITS - 1) <= |M| < 2**MULT_BITS``
#: where the offset leaves room (int32 either way).
MULT_BITS = 30
#: ``|q*M + B|`` stays below ``2**REQUANT_BITS``: int64 headroom for any biased evaluation.
REQUANT_BITS = 61


def requant_params(m: Any, b: Any, q_bound: int, where: str = "layer",
                   n_cap: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The integer form ``(M, B, n)`` (int64 vectors) of ``codes = round(q*m + b)`` per channel.

    ``m`` is the real multiplier (output codes per accumulator unit) and ``b`` the real offset in
    output codes, float64 per channel; ``|q| <= q_bound``. For each channel

        n = MULT_BITS - 1 - floor(log2 |m|)          (|M| gets MULT_BITS bits), lowered while
                                                      (|b| + 1) * 2**n would pass 2**(REQUANT_BITS-1)
        M = round(m * 2**n),  B = round(b * 2**n) + 2**(n-1)      (round half to even; exact scaling)

    so that ``floor((q*M + B) / 2**n)`` is ``q*m + b`` rounded half up, with ``m`` and ``b`` held to
    ``n`` fractional bits. A channel with ``m == 0`` gets ``M = 0`` and the largest such ``n``.

    QosError (one line) when a channel cannot be represented: ``|m| >= 2**(MULT_BITS-2)`` (one
    accumulator unit would be worth more than 2**28 codes), an offset so large that ``n < 1``, or a
    multiplier held so coarsely that ``q_bound * 2**-n`` passes half a code. ``n_cap`` (per channel
    or scalar) lowers ``n`` further where another term needs the room (``requant_add_params``).
    """
    m = np.asarray(m, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    if m.shape != b.shape or not (np.all(np.isfinite(m)) and np.all(np.isfinite(b))):
        raise QosError(f"{where}: requantization needs finite multipliers and offsets of one length per channel")
    with np.errstate(divide="ignore"):
        e = np.where(m != 0, np.floor(np.log2(np.abs(np.where(m != 0, m, 1.0)))), -np.inf)
    n_mult = np.where(m != 0, MULT_BITS - 1 - e, REQUANT_BITS).astype(np.float64)
    n_off = (REQUANT_BITS - 1) - np.ceil(np.log2(np.abs(b) + 1.0))        # (|b| + 1) * 2**n <= 2**(REQUANT_BITS-1)
    n = np.minimum(np.minimum(n_mult, n_off), REQUANT_BITS - 1)
    if n_cap is not None:
        n = np.minimum(n, np.broadcast_to(np.asarray(n_cap, np.float64), n.shape))
    for c in np.flatnonzero(n < 1):
        why = ("its multiplier {:.3g} codes per accumulator unit is too large".format(m[c]) if n_mult[c] < 1
               else "its offset {:.3g} codes is too large".format(b[c]))
        raise QosError(f"{where}, channel {c}: cannot requantize in int64: {why}")
    n = n.astype(np.int64)
    scale = np.ldexp(1.0, n)
    mm = np.rint(m * scale)
    # exact scaling, one rounding; the real multiplier's error is at most 2**-(n+1) per unit of q
    coarse = np.flatnonzero(q_bound * np.ldexp(1.0, -n - 1) > 0.5)
    if coarse.size:
        c = int(coarse[0])
        raise QosError(f"{where}, channel {c}: cannot requantize exactly enough: accumulators up to {q_bound} "
                       f"with a multiplier held to {int(n[c])} fractional bits could move a code")
    bb = np.rint(b * scale) + np.ldexp(1.0, n - 1)
    M, B = mm.astype(np.int64), bb.astype(np.int64)
    if np.any(np.abs(M) >= 2**MULT_BITS) or np.any(q_bound * np.abs(M) + np.abs(B) >= 2**REQUANT_BITS):
        raise QosError(f"{where}: accumulators up to {q_bound} overflow the int64 requantization")
    return M, B, n


def requantize(q: Any, M: Any, B: Any, n: Any, zero_point: int, lo: int, hi: int, axis: int = 1) -> np.ndarray:
    """Codes of the next layer from int32 accumulators ``q``: ``clip(floor((q*M + B) / 2**n) + z, lo, hi)``
    in int64 (per channel along ``axis``; ``M``, ``B``, ``n`` from ``requant_params``). int64 result."""
    q = np.asarray(q)
    if q.dtype != np.int32:
        raise QosError(f"requantize wants int32 accumulators, got {q.dtype}")
    shape = [1] * q.ndim
    shape[axis] = -1
    M, B, n = (np.asarray(v, np.int64).reshape(shape) for v in (M, B, n))
    t = (q.astype(np.int64) * M + B) >> n           # arithmetic shift: floor division by 2**n
    return np.clip(t + int(zero_point), int(lo), int(hi))


def requant_add_params(m: Any, b: Any, ms: float, q_bound: int, d_bound: int = 255,
                       where: str = "layer") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The integer form ``(M, Ms, B, n)`` (int64 per channel) of a residual add rescaled into the next
    layer's codes, ``codes = round(q*m + d*ms + b)``: ``q`` the layer's accumulator (``|q| <= q_bound``)
    with multiplier ``m`` and offset ``b`` as in ``requant_params``, ``d = code - z`` the skip
    connection's centred codes (``|d| <= d_bound``) with one real multiplier ``ms`` (its scale over
    the next layer's). Both terms share the shift ``n``, lowered so that ``d*Ms`` keeps
    ``|q*M + d*Ms + B| < 2**REQUANT_BITS``; ``Ms = round(ms * 2**n)``. The rounding is
    ``requantize_add``'s, and the multipliers' error, ``(q_bound + d_bound) * 2**-(n+1)``, stays
    below half a code, or QosError (one line)."""
    ms = float(ms)
    if not np.isfinite(ms):
        raise QosError(f"{where}: the skip connection's scale ratio is not finite")
    room = (REQUANT_BITS - 2) - np.ceil(np.log2(d_bound * abs(ms) + 1.0))    # d*Ms below 2**(REQUANT_BITS-2)
    if room < 1:
        raise QosError(f"{where}: the skip connection's scale is {ms:.3g} times the next layer's, too large to "
                       "requantize in int64")
    M, B, n = requant_params(m, b, q_bound + d_bound, where, n_cap=room)
    Ms = np.rint(ms * np.ldexp(1.0, n)).astype(np.int64)
    total = q_bound * np.abs(M).astype(np.float64) + d_bound * np.abs(Ms).astype(np.float64) + np.abs(B)
    if np.any(total >= 2.0**REQUANT_BITS):
        raise QosError(f"{where}: accumulators up to {q_bound} and the skip connection overflow the int64 "
                       "requantization")
    return M, Ms, B, n


def requantize_add(q: Any, d: Any, M: Any, Ms: Any, B: Any, n: Any, zero_point: int, lo: int, hi: int,
                   axis: int = 1) -> np.ndarray:
    """Codes of the next layer from a residual add (``requant_add_params``):
    ``clip(floor((q*M + d*Ms + B) / 2**n) + z, lo, hi)`` in int64, ``q`` int32 accumulators and ``d``
    the skip's centred codes (integers, broadcast against ``q`` as torch/ONNX broadcast)."""
    q = np.asarray(q)
    d = np.asarray(d)
    if q.dtype != np.int32 or not np.issubdtype(d.dtype, np.integer):
        raise QosError(f"requantize_add wants int32 accumulators and integer skip codes, got {q.dtype}, {d.dtype}")
    shape = [1] * max(q.ndim, d.ndim)
    shape[axis] = -1
    M, Ms, B, n = (np.asarray(v, np.int64).reshape(shape) for v in (M, Ms, B, n))
    t = (q.astype(np.int64) * M + d.astype(np.int64) * Ms + B) >> n
    return np.clip(t + int(zero_point), int(lo), int(hi))


def mean_codes(q: Any, lo: int, axes: Sequence[int] = (2, 3)) -> np.ndarray:
    """The global average pool of integer codes ``q`` (at least ``lo``) over ``axes``, rounded half
    up in integers: ``floor((sum(q - lo) + count // 2) / count) + lo``, ``count`` the cells
    averaged (the axes dropped). int64 result, on the codes' own grid (no rescale)."""
    q = np.asarray(q)
    if not np.issubdtype(q.dtype, np.integer):
        raise QosError(f"mean_codes wants integer codes, got {q.dtype}")
    axes = tuple(int(a) for a in axes)
    count = int(np.prod([q.shape[a] for a in axes]))
    if count < 1 or np.any(q < lo):
        raise QosError("mean_codes wants codes at least lo over a non-empty window")
    total = (q.astype(np.int64) - int(lo)).sum(axis=axes)
    return (total + count // 2) // count + int(lo)


def output_params(scale: Any, shift: Any, q_bound: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The integer form ``(B, s)`` of a network output layer's epilogue ``q*scale + shift``
    (float64 per channel): ``y = float32(q + B) * s`` with ``B = round(shift / scale)`` (int32)
    and ``s = float32(scale)``, one IEEE multiply, the same bits on every backend. None where a
    channel's scale is 0 or not finite, or ``q_bound + |B|`` passes int32: such a layer keeps the
    float epilogue."""
    scale, shift = np.asarray(scale, np.float64), np.asarray(shift, np.float64)
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))) or np.any(scale == 0):
        return None
    B = np.rint(shift / scale)
    if np.any(np.abs(B) + q_bound > INT32_MAX):
        return None
    return B.astype(np.int32), scale.astype(np.float32)


def output_values(q: Any, B: Any, s: Any, axis: int = 1) -> np.ndarray:
    """``float32(q + B) * s`` (``output_params``) of int32 accumulators ``q``, per channel along
    ``axis``: float32 output (``q + B`` fits int32 by ``output_params``' bound)."""
    q = np.asarray(q)
    if q.dtype != np.int32:
        raise QosError(f"output_values wants int32 accumulators, got {q.dtype}")
    shape = [1] * q.ndim
    shape[axis] = -1
    t = (q.astype(np.int64) + np.asarray(B, np.int64).reshape(shape)).astype(np.int32)
    return t.astype(np.float32) * np.asarray(s, np.float32).reshape(shape)
