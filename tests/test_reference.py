"""The NumPy reference accumulators against an independent loop formulation written here.

``loop_conv`` walks every (n, o, i, j, c, u, v) and computes the input coordinate
of each tap explicitly, so it shares no slicing or padding logic with
``approx_conv2d_acc``. Shapes are tiny so the pure-Python loops stay fast.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qos_compile.errors import QosError
from qos_compile.multipliers.library import bundled
from qos_compile.multipliers.multiplier import Multiplier, exact_table
from qos_compile.reference import approx_conv2d_acc, approx_gemm_acc, conv_pads


def loop_conv(x, w, table, off, stride, pads, dilation, groups, pad_code):
    """acc[n,o,i,j] = sum_{c,u,v} table[w[o,c,u,v]+off, X(n, g*Cg+c, i*sh+u*dh-pt, j*sw+v*dw-pl)+off]."""
    n_, c_, h, wd = x.shape
    o_, cg, kh, kw = w.shape
    sh, sw = stride
    dh, dw = dilation
    pt, pl, pb, pr = pads
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    og = o_ // groups
    out = np.zeros((n_, o_, ho, wo), dtype=np.int64)
    for n in range(n_):
        for o in range(o_):
            g = o // og
            for i in range(ho):
                for j in range(wo):
                    s = 0
                    for c in range(cg):
                        for u in range(kh):
                            for v in range(kw):
                                r = i * sh + u * dh - pt      # row in the unpadded input
                                q = j * sw + v * dw - pl
                                inside = 0 <= r < h and 0 <= q < wd
                                xc = int(x[n, g * cg + c, r, q]) if inside else pad_code
                                s += int(table[int(w[o, c, u, v]) + off, xc + off])
                    out[n, o, i, j] = s
    return out


def loop_gemm(x, w, table, off):
    out = np.zeros((x.shape[0], w.shape[0]), dtype=np.int64)
    for n in range(x.shape[0]):
        for o in range(w.shape[0]):
            out[n, o] = sum(int(table[int(w[o, k]) + off, int(x[n, k]) + off]) for k in range(x.shape[1]))
    return out


def random_table(seed: int) -> np.ndarray:
    # arbitrary asymmetric int32 table, large enough entries to catch any index mix-up
    return np.random.default_rng(seed).integers(-(2**20), 2**20, size=(256, 256), dtype=np.int64).astype(np.int32)


def _asymmetric(signed: bool) -> list[Multiplier]:
    return [m for m in bundled().select(signed) if not np.array_equal(m.lut, m.lut.T)]


SIGNED_ASYM = _asymmetric(True)
UNSIGNED_ASYM = _asymmetric(False)

# (N, C, H, W, O, groups, kh, kw, stride, dilation, pads)
CONV_CASES = [
    (1, 2, 5, 6, 3, 1, 3, 3, (1, 1), (1, 1), (1, 1, 1, 1)),
    (2, 4, 6, 5, 4, 2, 3, 2, (2, 1), (1, 1), (0, 2, 1, 0)),       # grouped, non-square stride, asym pad
    (1, 3, 7, 7, 3, 3, 3, 3, (2, 2), (1, 1), (1, 0, 2, 1)),        # depthwise: groups == C == O
    (1, 2, 7, 6, 2, 1, 2, 3, (1, 2), (2, 1), (2, 1, 0, 3)),        # dilation, everything asymmetric
    (2, 4, 4, 4, 6, 2, 1, 1, (1, 1), (1, 1), (0, 0, 0, 0)),        # 1x1, grouped
    (1, 3, 5, 5, 2, 1, 1, 1, (2, 2), (1, 1), (1, 1, 1, 1)),        # 1x1 strided with padding
    (1, 2, 6, 6, 4, 2, 3, 3, (2, 2), (2, 2), (2, 2, 2, 2)),        # dilated, strided, grouped
    (1, 6, 4, 5, 6, 6, 2, 2, (1, 2), (1, 2), (1, 2, 0, 1)),        # depthwise, non-square everything
]


def tables():
    """(label, table-or-Multiplier, signed) covering signed/unsigned, symmetric/asymmetric, random."""
    return [
        ("exact_u", bundled().exact(False), False),
        ("exact_s", bundled().exact(True), True),
        ("asym_u", UNSIGNED_ASYM[0], False),
        ("asym_u2", UNSIGNED_ASYM[len(UNSIGNED_ASYM) // 2], False),
        ("asym_s", SIGNED_ASYM[0], True),
        ("asym_s_last", SIGNED_ASYM[-1], True),
        ("random_s", random_table(7), True),
        ("random_u", random_table(8), False),
    ]


def test_bundled_library_has_asymmetric_circuits():
    assert SIGNED_ASYM and UNSIGNED_ASYM


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
@pytest.mark.parametrize("label, lut, signed", tables(), ids=[t[0] for t in tables()])
def test_conv_matches_loop(case, label, lut, signed):
    n, c, h, wd, o, groups, kh, kw, stride, dilation, pads = CONV_CASES[case]
    rng = np.random.default_rng(1000 * case + sum(map(ord, label)))  # deterministic, unlike hash()
    lo, hi = (-128, 127) if signed else (0, 255)
    x = rng.integers(lo, hi + 1, size=(n, c, h, wd))
    w = rng.integers(lo, hi + 1, size=(o, c // groups, kh, kw))
    pad_code = int(rng.integers(lo, hi + 1))
    while pad_code == 0:  # a non-zero pad code, so padding with a literal 0 would be caught
        pad_code = int(rng.integers(lo, hi + 1))
    got = approx_conv2d_acc(x, w, lut, stride=stride, padding=pads, dilation=dilation, groups=groups,
                            pad_code=pad_code, signed=signed)
    table = lut.lut if isinstance(lut, Multiplier) else lut
    off = 128 if signed else 0
    want = loop_conv(x, w, table, off, stride, pads, dilation, groups, pad_code)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("label, lut, signed", tables(), ids=[t[0] for t in tables()])
def test_gemm_matches_loop(label, lut, signed):
    rng = np.random.default_rng(len(label))
    lo, hi = (-128, 127) if signed else (0, 255)
    x = rng.integers(lo, hi + 1, size=(3, 17))
    w = rng.integers(lo, hi + 1, size=(5, 17))
    got = approx_gemm_acc(x, w, lut, signed=signed)
    table = lut.lut if isinstance(lut, Multiplier) else lut
    np.testing.assert_array_equal(got, loop_gemm(x, w, table, 128 if signed else 0))
    assert got.dtype == np.int32 and got.shape == (3, 5)


def test_signedness_from_dtype():
    rng = np.random.default_rng(0)
    t = random_table(3)
    x8 = rng.integers(-128, 128, size=(2, 9)).astype(np.int8)
    w8 = rng.integers(-128, 128, size=(4, 9)).astype(np.int8)
    np.testing.assert_array_equal(approx_gemm_acc(x8, w8, t), loop_gemm(x8, w8, t, 128))
    xu = x8.view(np.uint8)
    wu = w8.view(np.uint8)
    np.testing.assert_array_equal(approx_gemm_acc(xu, wu, t), loop_gemm(xu, wu, t, 0))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("case", [0, 1, 2, 3, 6, 7])
def test_exact_table_equals_integer_conv(signed, case):
    n, c, h, wd, o, groups, kh, kw, stride, dilation, pads = CONV_CASES[case]
    rng = np.random.default_rng(100 + case)
    lo, hi = (-128, 127) if signed else (0, 255)
    x = rng.integers(lo, hi + 1, size=(n, c, h, wd))
    w = rng.integers(lo, hi + 1, size=(o, c // groups, kh, kw))
    pad_code = 77 if not signed else -45
    got = approx_conv2d_acc(x, w, exact_table(signed), stride=stride, padding=pads, dilation=dilation,
                            groups=groups, pad_code=pad_code, signed=signed)
    pt, pl, pb, pr = pads
    xp = F.pad(torch.tensor(x, dtype=torch.float64), (pl, pr, pt, pb), value=float(pad_code))
    want = F.conv2d(xp, torch.tensor(w, dtype=torch.float64), stride=stride, dilation=dilation, groups=groups)
    np.testing.assert_array_equal(got, want.numpy().astype(np.int64))


def test_exact_gemm_equals_matmul():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, size=(4, 33))
    w = rng.integers(0, 256, size=(6, 33))
    np.testing.assert_array_equal(approx_gemm_acc(x, w, bundled().exact(False)), x @ w.T)


def test_port_order_weight_is_port_a():
    """With an asymmetric table the result depends on which operand goes to port A."""
    m = SIGNED_ASYM[0]
    rng = np.random.default_rng(11)
    x = rng.integers(-128, 128, size=(1, 2, 5, 5))
    w = rng.integers(-128, 128, size=(3, 2, 3, 3))
    got = approx_conv2d_acc(x, w, m, padding=1, pad_code=5)
    swapped = approx_conv2d_acc(x, w, m.lut.T.copy(), padding=1, pad_code=5, signed=True)
    assert not np.array_equal(got, swapped)  # so this test could fail if the reference swapped ports
    np.testing.assert_array_equal(got, loop_conv(x, w, m.lut, 128, (1, 1), (1, 1, 1, 1), (1, 1), 1, 5))
    # elementwise: the single-tap accumulator is exactly lut[w + 128, x + 128]
    one = approx_conv2d_acc(np.array([[[[7]]]]), np.array([[[[-50]]]]), m)
    assert one[0, 0, 0, 0] == m.lut[-50 + 128, 7 + 128] == m(-50, 7)
    a, b = (int(v) - 128 for v in np.argwhere(m.lut != m.lut.T)[0])   # codes where port order matters
    gx, gw = np.array([[b, 3]]), np.array([[a, -100]])
    g = approx_gemm_acc(gx, gw, m)
    assert g[0, 0] == m.lut[a + 128, b + 128] + m.lut[-100 + 128, 3 + 128]
    gs = approx_gemm_acc(gx, gw, m.lut.T.copy(), signed=True)
    assert gs[0, 0] - g[0, 0] == (m.lut[b + 128, a + 128] - m.lut[a + 128, b + 128]) + \
        (m.lut[3 + 128, -100 + 128] - m.lut[-100 + 128, 3 + 128])


def test_conv_pads_forms():
    assert conv_pads(2) == (2, 2, 2, 2)
    assert conv_pads((1, 3)) == (1, 3, 1, 3)
    assert conv_pads((1, 2, 3, 4)) == (1, 2, 3, 4)
    with pytest.raises(QosError):
        conv_pads((1, 2, 3))


def _conv_ok():
    return np.zeros((1, 2, 4, 4), dtype=np.int64), np.zeros((2, 2, 3, 3), dtype=np.int64)


@pytest.mark.parametrize("kind", [
    "x_high", "x_low_unsigned", "w_signed_high", "pad_code", "float_x", "float_w", "x_3d", "w_5d",
    "groups_mismatch", "groups_zero", "channel_mismatch", "empty_output", "no_signedness", "signed_contradicts",
    "bad_table_shape", "float_table", "bad_stride",
])
def test_conv_bad_inputs(kind):
    x, w = _conv_ok()
    lut, kw = bundled().exact(False), {}
    if kind == "x_high":
        x[0, 0, 0, 0] = 256
    elif kind == "x_low_unsigned":
        x[0, 0, 0, 0] = -1
    elif kind == "w_signed_high":
        lut, w[0, 0, 0, 0] = bundled().exact(True), 128
    elif kind == "pad_code":
        kw = {"padding": 1, "pad_code": 300}
    elif kind == "float_x":
        x = x.astype(np.float32)
    elif kind == "float_w":
        w = w.astype(np.float64)
    elif kind == "x_3d":
        x = x[0]
    elif kind == "w_5d":
        w = w[None]
    elif kind == "groups_mismatch":
        kw = {"groups": 2}            # C/groups = 1 but w has 2 input channels per group
    elif kind == "groups_zero":
        kw = {"groups": 0}
    elif kind == "channel_mismatch":
        w = np.zeros((2, 3, 3, 3), dtype=np.int64)
    elif kind == "empty_output":
        w = np.zeros((2, 2, 5, 5), dtype=np.int64)
    elif kind == "no_signedness":
        lut = random_table(1)
    elif kind == "signed_contradicts":
        kw = {"signed": True}
    elif kind == "bad_table_shape":
        lut, kw = np.zeros((256, 255), dtype=np.int32), {"signed": False}
    elif kind == "float_table":
        lut, kw = np.zeros((256, 256), dtype=np.float32), {"signed": False}
    elif kind == "bad_stride":
        kw = {"stride": (1, 2, 3)}
    with pytest.raises(QosError) as info:
        approx_conv2d_acc(x, w, lut, **kw)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["k_mismatch", "x_1d", "code_range", "float_codes", "table_shape"])
def test_gemm_bad_inputs(kind):
    x, w, lut = np.zeros((2, 4), dtype=np.int64), np.zeros((3, 4), dtype=np.int64), bundled().exact(True)
    if kind == "k_mismatch":
        w = np.zeros((3, 5), dtype=np.int64)
    elif kind == "x_1d":
        x = x[0]
    elif kind == "code_range":
        x[1, 1] = -129
    elif kind == "float_codes":
        x = x.astype(np.float64)
    elif kind == "table_shape":
        lut = np.zeros((128, 256), dtype=np.int32)
    with pytest.raises(QosError):
        approx_gemm_acc(x, w, lut, signed=True)
