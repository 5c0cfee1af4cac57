"""Numerics contract v2: the integer epilogue (``reference.requant_params`` / ``requantize``), its
torch twin, which layers get it, and the one-line errors where it cannot be represented."""
from __future__ import annotations

import copy
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from qos_compile import reference
from qos_compile.errors import QosError
from qos_compile.multipliers import get
from qos_compile.nn import Mode, QuantConfig, float_epilogues, wrap_model
from qos_compile.nn.affine import Requant, requantize_torch
from qos_compile.nn.fold import requant_map, residual_map
from qos_compile.onnx import export_onnx, run_onnxruntime


def _exact_round_half_up(q: int, M: int, B: int, n: int) -> int:
    """floor((q*M + B) / 2**n) by exact rational arithmetic."""
    v = Fraction(q * M + B, 2**n)
    return v.numerator // v.denominator


@pytest.mark.parametrize("seed", range(4))
def test_requantize_is_the_stated_fixed_point_rounding(seed):
    """M, B, n hold m and b to n fractional bits; requantize is floor((q*M + B) / 2^n) + z, clipped,
    and equals round-half-up of q*m + b wherever q*m + b is not within the multiplier's error of a tie."""
    rng = np.random.default_rng(seed)
    c = 12
    m = rng.uniform(1e-6, 3.0, c) * rng.choice([-1, 1], c)
    b = rng.uniform(-2000, 2000, c)
    q_bound = 2**26
    M, B, n = reference.requant_params(m, b, q_bound)
    assert M.dtype == B.dtype == n.dtype == np.int64
    assert np.all(np.abs(M) < 2**reference.MULT_BITS) and np.all(np.abs(M) >= 2**(reference.MULT_BITS - 1))
    q = rng.integers(-2**20, 2**20, (5, c, 3)).astype(np.int32)
    got = reference.requantize(q, M, B, n, 7, -128, 127)
    for idx in np.ndindex(q.shape):
        ch = idx[1]
        want = min(127, max(-128, _exact_round_half_up(int(q[idx]), int(M[ch]), int(B[ch]), int(n[ch])) + 7))
        assert got[idx] == want
    real = q.astype(np.float64) * m[None, :, None] + b[None, :, None]
    err = np.abs(q.astype(np.float64)) * np.ldexp(1.0, -n - 1)[None, :, None] + np.ldexp(1.0, -n)[None, :, None]
    clear = np.abs(real - np.floor(real) - 0.5) > err                 # not near a rounding tie
    ideal = np.clip(np.floor(real + 0.5) + 7, -128, 127)
    np.testing.assert_array_equal(got[clear], ideal[clear])
    # the torch twin, on the emulation's float64 accumulators, on both axes layouts
    rq = Requant(M, B, n, 7, -128, 127)
    np.testing.assert_array_equal(requantize_torch(torch.from_numpy(q).double(), rq).numpy(), got)
    np.testing.assert_array_equal(requantize_torch(torch.from_numpy(q[:, :, 0]), rq).numpy(), got[:, :, 0])


@pytest.mark.parametrize("seed", range(3))
def test_requantize_add_is_the_stated_fixed_point_rounding(seed):
    """A residual add's two multipliers share one shift: requantize_add is floor((q*M + d*Ms + B) / 2^n)
    + z, clipped, and rounds q*m + d*ms + b half up wherever that is clear of a tie by the error bound."""
    rng = np.random.default_rng(10 + seed)
    c = 9
    m = rng.uniform(1e-5, 0.2, c) * rng.choice([-1, 1], c)
    m[0] = 0.0                                        # a dead channel: the skip alone
    b = rng.uniform(-300, 300, c)
    ms = float(rng.uniform(0.05, 4.0))
    q_bound = 2**24
    M, Ms, B, n = reference.requant_add_params(m, b, ms, q_bound)
    assert all(v.dtype == np.int64 for v in (M, Ms, B, n))
    q = rng.integers(-2**22, 2**22, (4, c, 3)).astype(np.int32)
    d = rng.integers(-255, 256, (4, c, 3))
    got = reference.requantize_add(q, d, M, Ms, B, n, -3, -128, 127)
    for idx in np.ndindex(q.shape):
        ch = idx[1]
        t = Fraction(int(q[idx]) * int(M[ch]) + int(d[idx]) * int(Ms[ch]) + int(B[ch]), 2**int(n[ch]))
        assert got[idx] == min(127, max(-128, t.numerator // t.denominator - 3))
    real = q * m[None, :, None] + d * ms + b[None, :, None]
    err = (np.abs(q) + np.abs(d)) * np.ldexp(1.0, -n - 1)[None, :, None] + np.ldexp(1.0, -n)[None, :, None]
    clear = np.abs(real - np.floor(real) - 0.5) > err
    np.testing.assert_array_equal(got[clear], np.clip(np.floor(real + 0.5) - 3, -128, 127)[clear])
    with pytest.raises(QosError, match="skip connection's scale is .* too large"):
        reference.requant_add_params([1e-3], [0.0], 2.0**55, q_bound)
    with pytest.raises(QosError, match="cannot requantize exactly enough"):   # the skip's error counts too
        reference.requant_add_params([1e-3], [0.0], 2.0**50, 2**8)


def test_zero_and_tiny_multipliers_keep_their_offset():
    """A dead channel (m = 0, e.g. a BatchNorm with gamma = 0) gives round(b) + z for every q."""
    M, B, n = reference.requant_params([0.0, 1e-30, 0.0], [5.4, -2.5, 1e6], 2**30)
    q = np.array([[-2**30, 0, 2**30]], np.int32).T.repeat(3, 1)      # (3 samples, 3 channels)
    np.testing.assert_array_equal(reference.requantize(q, M, B, n, 0, -10**9, 10**9),
                                  [[5, -2, 10**6]] * 3)


@pytest.mark.parametrize("m, b, bound, match", [
    ([2.0**29], [0.0], 10, "multiplier .* too large"),
    ([1e-3], [2.0**60], 10, "offset .* too large"),
    ([1e-3], [2.0**55], 2**30, "exactly enough"),
    ([float("nan")], [0.0], 10, "finite"),
])
def test_unrepresentable_requantization_is_one_line(m, b, bound, match):
    with pytest.raises(QosError, match=match) as e:
        reference.requant_params(m, b, bound, "layer net.x")
    assert "\n" not in str(e.value) and "layer net.x" in str(e.value)


def test_requantize_wants_int32_accumulators():
    with pytest.raises(QosError, match="int32"):
        reference.requantize(np.zeros((1, 1), np.int64), [1], [0], [1], 0, 0, 255)


class _Chains(nn.Module):
    """Every kind of link, and layers that must keep the float epilogue."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 6, 3, padding=1)              # a -> bn -> ReLU6 -> dropout -> b
        self.drop = nn.Dropout(0.1)
        self.c = nn.Conv2d(6, 6, 1)                         # b -> F.relu -> c; c's output fans out
        self.d = nn.Conv2d(6, 6, 3, padding=1)              # d -> bn -> + c's codes -> ReLU -> e
        self.bn_d = nn.BatchNorm2d(6)
        self.e = nn.Conv2d(6, 6, 3, padding=1)              # e + skip -> global pool -> fc1: integer mean
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 4)                         # fc1 -> .relu() -> fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(nn.functional.relu6(self.bn_a(self.a(x))))
        h = torch.nn.functional.relu(self.b(h))
        h = self.c(h)
        h = torch.relu(self.bn_d(self.d(h)) + h)            # residual add: an integer rescale into e's codes
        h = self.e(h) + h                                   # rescaled into fc1's codes, then averaged
        h = torch.flatten(self.pool(h), 1)
        return self.fc2(self.fc1(h).relu())


def _chains_qnet(signed: bool) -> object:
    torch.manual_seed(3)
    circuits = [get("mul8s_1KR6" if signed else "mul8u_2NDH"), get("mul8s_1L2H" if signed else "mul8u_DG8")]
    qnet = wrap_model(_Chains(), circuits, num_ops=2, qconfig=QuantConfig(signed=signed, per_channel=signed),
                      input_shape=(3, 8, 8))
    gen = torch.Generator().manual_seed(4)
    qnet.set_mode(Mode.QUANT)
    qnet.train()
    with torch.no_grad():
        for _ in range(3):
            qnet(torch.randn(32, 3, 8, 8, generator=gen))
    for mod in qnet.net.modules():                          # a BatchNorm worth folding
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight.data.uniform_(-1.5, 1.5, generator=gen)
            mod.running_var.uniform_(0.5, 2.0, generator=gen)
    qnet.eval()
    qnet.freeze_observers(True)
    qnet.set_mode(Mode.APPROX)
    qnet.set_assignment([[0] * 7, [1] * 7])
    return qnet


@pytest.mark.parametrize("signed", [False, True])
def test_links_and_bit_identity_with_onnxruntime(signed):
    """conv -> BN -> ReLU6 -> Dropout -> conv, conv -> F.relu -> conv, a conv whose output also feeds
    a skip connection, and linear -> .relu() -> linear requantize in integers; so does the residual
    add of a conv (with its BatchNorm) and those codes into the next conv, and a residual add whose
    sum a global average pool hands to a linear layer (rescaled into its codes, then averaged in
    integers); the network's output keeps the float epilogue. PyTorch inference equals
    onnxruntime bit for bit at every OP, and differs from the float epilogue."""
    qnet = _chains_qnet(signed)
    assert requant_map(qnet.net) == {"a": ("b", (0.0, 6.0)), "b": ("c", (0.0, None)), "c": ("d", (None, None)),
                                     "fc1": ("fc2", (0.0, None))}
    assert residual_map(qnet.net) == {"d": ("e", "d"), "e": ("fc1", "e")}   # the skips hold d's, e's input codes
    ex = export_onnx(qnet, input_shape=(3, 8, 8))
    assert {layer.name: (layer.requantizes_into, layer.residual) for layer in ex.layers} == {
        "a": ("b", False), "b": ("c", False), "c": ("d", False), "d": ("e", True), "e": ("fc1", True),
        "fc1": ("fc2", False), "fc2": (None, False)}
    nodes = ex.model.graph.node                          # every activation is a clamp of the codes now
    assert not any(n.op_type == "Relu" for n in nodes)
    assert all("requant" in n.name or "quantize" in n.name for n in nodes if n.op_type == "Clip")
    assert [layer.name for layer in ex.layers if layer.output] == ["fc2"]      # the output: float32(q + B) * s
    names = {n.name for n in nodes}
    assert {"fc2/output/add_bias", "fc2/output/to_float", "fc2/output/scale"} <= names
    assert not any(n.startswith("fc2/affine") for n in names)
    divides = [n for n in nodes if n.op_type == "Div"]              # the pool: an integer mean of e's sums
    assert [n.name for n in divides] == ["e/mean_codes/divide"]
    assert not any(n.op_type in ("GlobalAveragePool", "ReduceMean", "AveragePool") for n in nodes)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2
    seen: list[torch.Tensor] = []
    hooks = [getattr(qnet.net, k).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
             for k in ("b", "e", "fc1")]

    def on_code_grid(v: torch.Tensor, layer: str) -> bool:      # float32(code - z) * s for integer codes
        s, _ = getattr(qnet.net, layer).act_qparams()
        return bool(torch.equal(v, torch.round(v / s) * s))

    for op in range(2):
        qnet.set_operating_point(op)
        with torch.no_grad():
            y = qnet(x)
            with float_epilogues():
                qnet(x)
        np.testing.assert_array_equal(run_onnxruntime(ex, x, operating_point=op), y.numpy())
        # the integer path is what ran: b's, e's and fc1's inputs are their codes, dequantized; v1
        # hands them floats
        assert on_code_grid(seen[-6], "b") and on_code_grid(seen[-5], "e") and on_code_grid(seen[-4], "fc1")
        assert not any(on_code_grid(v, k) for v, k in zip(seen[-3:], ("b", "e", "fc1")))
    for hook in hooks:
        hook.remove()
    twin = copy.deepcopy(qnet)          # as the BN-only fine-tune copies a network: same integer adds
    with torch.no_grad():
        assert torch.equal(twin(x), qnet(x))


def test_export_refuses_an_unrepresentable_layer():
    """A BatchNorm channel so steep that one accumulator unit is worth 2^28 codes: one line naming
    the layer and channel, from the exporter and from PyTorch inference alike."""
    qnet = _chains_qnet(False)
    qnet.net.bn_a.bns[1].weight.data[2] = 1e15
    with pytest.raises(QosError, match=r"layer net\.a, channel 2: cannot requantize") as e:
        export_onnx(qnet, input_shape=(3, 8, 8))
    assert "\n" not in str(e.value)
    qnet.set_operating_point(1)
    with torch.no_grad(), pytest.raises(QosError, match=r"layer net\.a, channel 2"):
        qnet(torch.zeros(1, 3, 8, 8))


def test_mean_codes_rounds_half_up_in_integers():
    """reference.mean_codes: the exact mean rounded half up (ties included: 2x2 and 4x4 windows),
    the same for any lower bound, and its torch twin on dequantized codes gives the same codes."""
    from qos_compile.nn.affine import mean_codes_torch

    rng = np.random.default_rng(7)
    for lo, hi, (h, w) in ((0, 255, (2, 2)), (-128, 127, (4, 4)), (0, 255, (3, 5)), (-128, 127, (1, 1))):
        q = rng.integers(lo, hi + 1, (3, 5, h, w))
        q[0, 0] = lo                                            # the ends of the range
        q[0, 1] = hi
        q[1, 0, 0, 0] = lo + 1                                  # a tie where the window is even
        # floor(mean + 1/2), exactly
        want = np.array([[math.floor(Fraction(int(v.sum()), h * w) + Fraction(1, 2)) for v in row]
                         for row in q.reshape(3, 5, -1)])
        got = reference.mean_codes(q, lo)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(reference.mean_codes(q, lo - 7), want)   # any bound below the codes
        s, z = torch.tensor(0.0473), int(rng.integers(lo, hi + 1))
        x = (torch.from_numpy(q - z).to(torch.float32) * s)
        back = torch.round(mean_codes_torch(x, s, z).double() / float(s)).to(torch.int64) + z
        np.testing.assert_array_equal(back[..., 0, 0].numpy(), want)
    assert reference.mean_codes(np.array([[[[1, 2]]]]), 0).tolist() == [[2]]        # 1.5 -> 2
    assert reference.mean_codes(np.array([[[[-2, -1]]]]), -128).tolist() == [[-1]]  # -1.5 -> -1
    with pytest.raises(QosError, match="integer codes"):
        reference.mean_codes(np.zeros((1, 1, 2, 2)), 0)
    with pytest.raises(QosError, match="at least lo"):
        reference.mean_codes(np.full((1, 1, 2, 2), -1), 0)


class _MeanHeads(nn.Module):
    """Global means spelled as tensor methods: x.mean((2, 3)) straight into a linear layer, and
    torch.mean(..., keepdim=True) then .flatten(1)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.fa = nn.Linear(8, 5)
        self.fb = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.relu(self.bn(self.a(x))).mean((2, 3))
        v = torch.mean(nn.functional.relu6(self.b(x)), dim=(-2, -1), keepdim=True).flatten(1)
        return self.fa(u) + self.fb(v)


@pytest.mark.parametrize("signed", [False, True])
def test_global_means_of_codes_feed_linear_layers(signed):
    torch.manual_seed(5)
    circuits = [get("mul8s_1KR6" if signed else "mul8u_2NDH")]
    qnet = wrap_model(_MeanHeads(), circuits, num_ops=1, qconfig=QuantConfig(signed=signed, per_channel=signed),
                      input_shape=(3, 6, 6))
    qnet.set_mode(Mode.QUANT)
    qnet.train()
    with torch.no_grad():
        for _ in range(3):
            qnet(torch.randn(32, 3, 6, 6))
    qnet.eval()
    qnet.set_mode(Mode.APPROX)
    assert requant_map(qnet.net) == {"a": ("fa", (0.0, None)), "b": ("fb", (0.0, 6.0))}
    ex = export_onnx(qnet, input_shape=(3, 6, 6))
    assert sorted(n.name for n in ex.model.graph.node if n.op_type == "Div") == ["a/mean_codes/divide",
                                                                                "b/mean_codes/divide"]
    x = torch.randn(40, 3, 6, 6, generator=torch.Generator().manual_seed(6)) * 2
    with torch.no_grad():
        y = qnet(x)
        with float_epilogues():
            y_float = qnet(x)
    np.testing.assert_array_equal(run_onnxruntime(ex, x, operating_point=0), y.numpy())
    assert not torch.equal(y, y_float)


def test_output_epilogue_is_one_multiply():
    """reference.output_params/output_values: B = round(shift/scale) fits int32 beside the
    accumulator bound, y = float32(q + B) * s; a zero or non-finite scale, or a B too large,
    leaves the float epilogue (None)."""
    scale = np.array([0.01, -0.25, 3e-4])
    shift = np.array([0.123, 1.0, -2.5])
    B, s = reference.output_params(scale, shift, 1000)
    assert B.dtype == np.int32 and s.dtype == np.float32
    assert B.tolist() == [12, -4, -8333] and np.array_equal(s, scale.astype(np.float32))
    q = np.array([[5, -7, 900]], np.int32)
    want = np.array([np.float32(5 + 12) * np.float32(0.01), np.float32(-7 - 4) * np.float32(-0.25),
                     np.float32(900 - 8333) * np.float32(3e-4)], np.float32)
    np.testing.assert_array_equal(reference.output_values(q, B, s)[0], want)
    # within half an accumulator unit of the float epilogue
    assert np.all(np.abs(reference.output_values(q, B, s) - (q * scale + shift)) <= 0.5 * np.abs(scale) + 1e-6)
    assert reference.output_params(np.array([0.0, 1.0]), np.zeros(2), 10) is None
    assert reference.output_params(np.array([np.nan]), np.zeros(1), 10) is None
    assert reference.output_params(np.array([1e-9]), np.array([10.0]), 10) is None      # B = 1e10
    with pytest.raises(QosError, match="int32"):
        reference.output_values(q.astype(np.int64), B, s)
