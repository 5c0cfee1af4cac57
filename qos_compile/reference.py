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
from .multipliers.multiplier import INT32_MAX, INT32_MIN, Multiplier, code_offset, validate_table


def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    t = tuple(int(x) for x in v)
    if len(t) != 2:
        raise QosError(f"{what} must be an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def conv_pads(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    """Normalise padding to (top, left, bottom, right), ONNX order; accepts int, (h, w) or 4 values."""
    if isinstance(padding, (int, np.integer)):
        p = int(padding)
        return p, p, p, p
    t = tuple(int(x) for x in padding)
    if len(t) == 2:
        return t[0], t[1], t[0], t[1]
    if len(t) == 4:
        return t  # type: ignore[return-value]
    raise QosError(f"padding must be an int, (h, w) or (top, left, bottom, right), got {padding!r}")


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
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
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
