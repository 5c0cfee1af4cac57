"""Bit-exactness of the fast approximate accumulators against qos_compile.reference."""
from __future__ import annotations

import zlib
from collections import Counter

import numpy as np
import pytest
import torch

from qos_compile import reference
from qos_compile.errors import QosError
from qos_compile.multipliers import bundled, get
from qos_compile.nn import functional as qf
from qos_compile.nn import kernels
from qos_compile.nn.emulation import STRATEGIES, force_strategy, plan_for
from qos_compile.nn.quant import QuantConfig, quantize

CIRCUITS = list(bundled())
IDS = [m.name for m in CIRCUITS]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny shapes gain nothing from threads, and on shared cores spinning threads cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# (x shape, w shape, conv kwargs): plain, depthwise stride 2 dilation 2 asymmetric padding,
# grouped with rectangular stride/padding, strided 1x1
CONVS = [
    ((2, 4, 6, 5), (5, 4, 3, 3), dict(stride=1, padding=1, dilation=1, groups=1)),
    ((2, 4, 7, 7), (4, 1, 3, 3), dict(stride=2, padding=(1, 0, 2, 1), dilation=2, groups=4)),
    ((1, 6, 5, 6), (4, 3, 2, 2), dict(stride=(2, 1), padding=(0, 2), dilation=1, groups=2)),
    ((2, 3, 4, 4), (2, 3, 1, 1), dict(stride=2, padding=0, dilation=1, groups=1)),
]


def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _codes(rng: np.random.Generator, signed: bool, shape: tuple[int, ...]) -> np.ndarray:
    lo, hi = (-128, 127) if signed else (0, 255)
    return rng.integers(lo, hi + 1, shape).astype(np.int8 if signed else np.uint8)


def _conv_case(m, ci: int, strategy: str | None = None) -> None:
    xs, ws, kw = CONVS[ci]
    rng = _rng(m.name, ci)
    x, w = _codes(rng, m.signed, xs), _codes(rng, m.signed, ws)
    pad = int(_codes(rng, m.signed, (1,))[0])
    want = reference.approx_conv2d_acc(x, w, m, pad_code=pad, **kw)
    with force_strategy(strategy):
        got = qf.approx_conv2d_acc(torch.from_numpy(x), torch.from_numpy(w), m, pad_code=pad, **kw)
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("m", CIRCUITS, ids=IDS)
def test_conv_bit_exact_every_circuit(m):
    for ci in range(len(CONVS)):
        _conv_case(m, ci)


@pytest.mark.parametrize("m", CIRCUITS, ids=IDS)
def test_linear_bit_exact_every_circuit(m):
    rng = _rng(m.name, "gemm")
    x, w = _codes(rng, m.signed, (5, 37)), _codes(rng, m.signed, (3, 37))
    got = qf.approx_linear_acc(torch.from_numpy(x), torch.from_numpy(w), m)
    np.testing.assert_array_equal(got.numpy(), reference.approx_gemm_acc(x, w, m))


@pytest.mark.parametrize("m", CIRCUITS, ids=IDS)
def test_general_kernel_every_circuit(m):
    """The C lookup kernel (or its fallback) on every table, whatever the plan chose."""
    _conv_case(m, 0, "general")
    _conv_case(m, 1, "general")


def test_straightforward_lookup_baseline():
    for name in ("mul8u_12N4", "mul8s_1KR6"):
        for ci in range(len(CONVS)):
            _conv_case(get(name), ci, "lookup")


def test_every_strategy_is_used():
    plans = {m.name: plan_for(m) for m in CIRCUITS}
    counts = Counter(p.strategy for p in plans.values())
    assert set(counts) == set(STRATEGIES), counts
    assert plans["mul8u_1JFF"].strategy == "exact"
    assert plans["mul8s_1KR8"].strategy == "masked" and plans["mul8s_1KR8"].mask_bits == 1
    assert plans["mul8s_1KR6"].strategy == "lowrank"
    assert plans["mul8u_1446"].strategy == "lowrank"
    assert plans["mul8s_1L2H"].strategy == "lowrank" and plans["mul8s_1L2H"].terms == 1  # table rank 1
    assert plans["mul8u_12N4"].strategy == "general"
    assert plans["mul8u_L40"].strategy == "general"
    assert all(plans[m.name].strategy != "general" for m in CIRCUITS if m.signed and m.name != "mul8s_1KX2")


@pytest.mark.parametrize("m", [m for m in CIRCUITS if plan_for(m, max_terms=16).strategy == "lowrank"],
                         ids=lambda m: m.name)
def test_lowrank_plans_up_to_16_terms(m):
    """Low-rank factorizations that this machine may not choose (cheaper general kernel) are exact too."""
    plan = plan_for(m, max_terms=16)
    assert plan.terms <= 16
    table = (plan.wterms.T @ plan.xterms)
    np.testing.assert_array_equal(table, plan.denom * m.lut.astype(np.int64))
    xs, ws, kw = CONVS[0]
    rng = _rng(m.name, "lowrank16")
    x, w = _codes(rng, m.signed, xs), _codes(rng, m.signed, ws)
    got = qf.approx_conv2d_acc(torch.from_numpy(x), torch.from_numpy(w), plan, pad_code=3, **kw)
    np.testing.assert_array_equal(got.numpy(), reference.approx_conv2d_acc(x, w, m, pad_code=3, **kw))


@pytest.mark.parametrize("signed", [False, True])
def test_random_int32_table_general_path(signed):
    rng = np.random.default_rng(7)
    table = rng.integers(-(2**20), 2**20, (256, 256)).astype(np.int32)
    assert plan_for(table, signed).strategy == "general"
    for ci in range(len(CONVS)):
        xs, ws, kw = CONVS[ci]
        x, w = _codes(rng, signed, xs), _codes(rng, signed, ws)
        got = qf.approx_conv2d_acc(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(table),
                                   pad_code=1, signed=signed, **kw)
        np.testing.assert_array_equal(got.numpy(), reference.approx_conv2d_acc(x, w, table, pad_code=1,
                                                                               signed=signed, **kw))


def test_int32_overflow_is_an_error():
    table = np.full((256, 256), 2**30, dtype=np.int32)
    x = np.ones((1, 2, 3, 3), dtype=np.uint8)
    w = np.ones((1, 2, 3, 3), dtype=np.uint8)
    with pytest.raises(QosError, match="overflow"):
        qf.approx_conv2d_acc(torch.from_numpy(x), torch.from_numpy(w), table, signed=False)


@pytest.mark.parametrize("name", ["mul8u_1JFF", "mul8s_1KR3", "mul8s_1KR6", "mul8s_1L2H", "mul8u_1446", "mul8u_17QU",
                                  "mul8u_12N4"])
def test_per_channel_centred_accumulator(name):
    """conv_centered with per-channel weight zero points = the zero-point formula on the reference acc."""
    m = get(name)
    off = m.offset
    rng = _rng(name, "centred")
    for xs, ws, kw in CONVS[:3]:
        x, w = _codes(rng, m.signed, xs), _codes(rng, m.signed, ws)
        pad = int(_codes(rng, m.signed, (1,))[0])
        centers = torch.from_numpy(_codes(rng, m.signed, (ws[0],)).astype(np.int64))
        acc = reference.approx_conv2d_acc(x, w, m, pad_code=pad, **kw).astype(np.int64)
        # sum of x over each receptive field (padding included) through the reference itself
        ones = np.broadcast_to((np.arange(256) - off)[None, :], (256, 256))
        sum_x = reference.approx_conv2d_acc(x, np.zeros_like(w), ones, pad_code=pad, signed=m.signed,
                                            **kw).astype(np.int64)
        k = int(np.prod(ws[1:]))
        sum_w = w.astype(np.int64).reshape(ws[0], -1).sum(1)[None, :, None, None]
        c = centers.numpy()[None, :, None, None]
        want = acc - c * sum_x - pad * sum_w + k * c * pad
        geo = qf.conv_geometry(xs, ws, kw["stride"], kw["padding"], kw["dilation"], kw["groups"])
        x_idx = torch.from_numpy((x.astype(np.int16) + off).astype(np.uint8))
        w_idx = torch.from_numpy((w.astype(np.int16) + off).astype(np.uint8))
        got = qf.conv_centered(x_idx, w_idx, plan_for(m), geo, pad + off, centers, exact=True)
        np.testing.assert_array_equal(got.numpy(), want.astype(np.float64))


def test_split_and_float64_convolutions(monkeypatch):
    """Layers whose partial sums could exceed 2**24 are split / widened, and stay exact."""
    for limit in (3000.0, 1.0):  # several float32 chunks; every unit in float64
        monkeypatch.setattr(qf, "_F32_EXACT", limit)
        for name in ("mul8u_1446", "mul8s_1KR6", "mul8u_17QU"):
            for ci in range(2):
                _conv_case(get(name), ci)


def test_large_layer_multithreaded():
    """A layer big enough for several threads, on each strategy kind."""
    rng = _rng("large")
    torch.set_num_threads(2)
    try:
        for name in ("mul8u_1JFF", "mul8s_1KR6", "mul8u_12N4"):
            m = get(name)
            x, w = _codes(rng, m.signed, (4, 16, 20, 20)), _codes(rng, m.signed, (24, 16, 3, 3))
            got = qf.approx_conv2d_acc(torch.from_numpy(x), torch.from_numpy(w), m, padding=1, pad_code=2)
            np.testing.assert_array_equal(got.numpy(), reference.approx_conv2d_acc(x, w, m, padding=1, pad_code=2))
    finally:
        torch.set_num_threads(1)


def test_torch_fallbacks_without_c_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "load", lambda portable=False: None)
    for name in ("mul8u_12N4", "mul8s_1KR6", "mul8u_1446"):
        for ci in range(len(CONVS)):
            _conv_case(get(name), ci)


@pytest.mark.skipif(kernels.load() is None, reason="no C compiler")
def test_portable_kernel_bit_exact():
    rng = np.random.default_rng(3)
    for table in (get("mul8u_L40").lut, rng.integers(-(2**22), 2**22, (256, 256)).astype(np.int32)):
        x = torch.from_numpy(rng.integers(0, 256, (4, 50, 300)).astype(np.uint8))
        w = torch.from_numpy(rng.integers(0, 256, (2, 3, 50)).astype(np.uint8))
        lut = torch.from_numpy(np.array(table, dtype=np.int32))
        want = np.stack([[table.astype(np.int64)[w[b % 2, o].numpy()[:, None], x[b].numpy()].sum(0) for o in range(3)]
                         for b in range(4)])
        for portable in (False, True):
            got = kernels.lut_gemm(x, w, lut, groups=2, portable=portable)
            np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.skipif(kernels.load() is None, reason="no C compiler")
@pytest.mark.parametrize("signed", [False, True])
def test_quantize_kernel_matches_torch(signed):
    qc = QuantConfig(signed=signed)
    gen = torch.Generator().manual_seed(5)
    for scale in (0.125, 0.0371):  # 0.125: many exact ties (x.5 codes)
        x = torch.randn(200_000, generator=gen) * 9
        x[::3] = torch.round(x[::3] / scale * 2) * scale / 2
        s = torch.tensor(scale, dtype=torch.float32)
        z = torch.tensor(3 if signed else 120)
        idx, lo, hi = kernels.quantize_indices(x, float((1.0 / s).item()), int(z), qc.qmin, qc.qmax, qc.offset)
        want = (quantize(x, s, z, qc) + qc.offset).to(torch.uint8)
        assert torch.equal(idx, want)
        assert (lo, hi) == (int(want.min()), int(want.max()))


def test_bad_inputs():
    m = get("mul8u_1446")
    x = torch.zeros((1, 2, 4, 4), dtype=torch.int64)
    w = torch.zeros((3, 2, 3, 3), dtype=torch.int64)
    with pytest.raises(QosError, match="code range"):
        qf.approx_conv2d_acc(x + 300, w, m)
    with pytest.raises(QosError, match="integer"):
        qf.approx_conv2d_acc(x.float(), w, m)
    with pytest.raises(QosError, match="groups"):
        qf.approx_conv2d_acc(x, w, m, groups=2)
    with pytest.raises(QosError, match="empty"):
        qf.approx_conv2d_acc(x[:, :, :2, :2], w, m)
    with pytest.raises(QosError, match="signed"):
        qf.approx_conv2d_acc(x, w, m.lut)  # bare table, int64 codes: signedness unknown
    with pytest.raises(QosError, match="contradicts"):
        qf.approx_conv2d_acc(x, w, m, signed=True)
    with pytest.raises(QosError, match="gemm shapes"):
        qf.approx_linear_acc(torch.zeros((2, 3), dtype=torch.uint8), torch.zeros((2, 4), dtype=torch.uint8), m)
    with pytest.raises(QosError, match="forced strategy"):
        with force_strategy("fast"):
            pass


def test_exact_despite_reduced_float32_precision_settings():
    """bf16/TF32 shortcuts for float32 GEMMs must not leak into the exact emulation."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        m = get("mul8u_1446")
        rng = _rng("precision")
        x, w = _codes(rng, False, (7, 300)), _codes(rng, False, (9, 300))
        got = qf.approx_linear_acc(torch.from_numpy(x), torch.from_numpy(w), m)
        np.testing.assert_array_equal(got.numpy(), reference.approx_gemm_acc(x, w, m))
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # restored afterwards
    finally:
        torch.set_float32_matmul_precision(old)


def test_exact_after_a_caller_set_torchs_per_operator_precision():
    """A caller (scripts/gpu_check.sh, a user's training script) that sets one of torch's new
    per-operator ``fp32_precision`` settings must not make the emulation raise: torch refuses
    the legacy ``allow_tf32`` flags once the new ones disagree, which the first GPU run hit."""
    conv = torch.backends.cudnn.conv
    old = conv.fp32_precision
    conv.fp32_precision = "ieee" if old != "ieee" else "tf32"     # now cuDNN's conv and RNN settings differ
    try:
        m = get("mul8u_1446")
        rng = _rng("per-operator precision")
        x = torch.from_numpy(_codes(rng, False, (2, 5, 6, 6)))
        w = torch.from_numpy(_codes(rng, False, (3, 5, 3, 3)))
        got = qf.approx_conv2d_acc(x, w, m, padding=1)
        np.testing.assert_array_equal(got.numpy(), reference.approx_conv2d_acc(x.numpy(), w.numpy(), m, padding=1))
        assert conv.fp32_precision != old                              # the caller's setting is restored
    finally:
        conv.fp32_precision = old


@pytest.mark.parametrize("circuit", ["mul8u_1JFF", "mul8u_1446", "mul8u_2NDH"])   # exact, lowrank, general
def test_large_accumulators_round_once_like_the_device(circuit):
    """Q beyond 2**24 (float32 cannot hold every integer there): the float32 result is Q rounded
    once, as the device's Cast(int32 -> float32) rounds it, whatever the strategy's chunking."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(200, 256, (2, 64, 6, 6), generator=g).to(torch.uint8)
    w = torch.randint(200, 256, (8, 64, 3, 3), generator=g).to(torch.uint8)
    plan = plan_for(get(circuit))
    geo = qf.conv_geometry(x.shape, w.shape, 1, 1, 1, 1)
    prep = qf.prepare_weights(w, plan, 0, torch.zeros(8, dtype=torch.int64))
    q32 = qf.conv_prepared(x, prep, geo)
    q64 = qf.conv_prepared(x, prep, geo, exact=True)
    ref = reference.approx_conv2d_acc(x.numpy().astype(np.int64), w.numpy().astype(np.int64),
                                      get(circuit).lut.astype(np.int64), padding=1, pad_code=0, signed=False)
    assert float(np.abs(ref).max()) > 2 ** 24 and not np.all(ref % 2 == 0)
    assert np.array_equal(q64.numpy(), ref.astype(np.float64))
    assert q32.dtype == torch.float32 and np.array_equal(q32.numpy(), ref.astype(np.float32))
