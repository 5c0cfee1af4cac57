"""ApproxConv2d / ApproxLinear / MultiBatchNorm2d: numerics in every mode, gradients, observers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qos_compile import reference
from qos_compile.errors import QosError
from qos_compile.multipliers import bundled, get
from qos_compile.nn import ApproxConv2d, ApproxLinear, Mode, MultiBatchNorm2d, MultiplierBank, QuantConfig


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny shapes gain nothing from threads, and on shared cores spinning threads cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

CONV_CFGS = [
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, bias=True),
    dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=2, dilation=2, groups=4, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), groups=2, bias=True),
]


def _conv(cfg: dict, qc: QuantConfig, bank: MultiplierBank, num_ops: int = 1) -> ApproxConv2d:
    torch.manual_seed(0)
    layer = ApproxConv2d.from_float(nn.Conv2d(**cfg), qc, num_ops)
    layer.attach_bank(bank)
    return layer


def _calibrate(layer: nn.Module, x: torch.Tensor) -> None:
    layer.train()
    layer.set_mode(Mode.QUANT)
    with torch.no_grad():
        layer(x)
    layer.eval()


def _input(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2 + 0.5


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("cfg", CONV_CFGS, ids=["plain", "depthwise-dilated", "grouped-rect"])
def test_conv_approx_with_exact_circuit_equals_quant(cfg, per_channel, signed):
    """Proves the zero-point correction, padding (zero-point code) included."""
    qc = QuantConfig(signed=signed, per_channel=per_channel)
    layer = _conv(cfg, qc, MultiplierBank([bundled().exact(signed)]))
    x = _input((2, cfg["in_channels"], 9, 8))
    _calibrate(layer, x)
    with torch.no_grad():
        layer.set_mode(Mode.QUANT)
        yq = layer(x)
        layer.set_mode(Mode.APPROX)
        ya = layer(x)
    assert int(layer.act_qparams()[1]) != qc.qmin  # a non-trivial zero point, so padding matters
    torch.testing.assert_close(ya, yq, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_linear_approx_with_exact_circuit_equals_quant(per_channel, signed):
    torch.manual_seed(0)
    layer = ApproxLinear.from_float(nn.Linear(20, 7), QuantConfig(signed=signed, per_channel=per_channel))
    layer.attach_bank(MultiplierBank([bundled().exact(signed)]))
    x = _input((3, 5, 20))  # extra leading dim: (*, in)
    _calibrate(layer, x)
    with torch.no_grad():
        layer.set_mode(Mode.QUANT)
        yq = layer(x)
        layer.set_mode(Mode.APPROX)
        ya = layer(x)
    assert ya.shape == (3, 5, 7)
    torch.testing.assert_close(ya, yq, rtol=1e-5, atol=1e-5)


def _sum_table(signed: bool) -> np.ndarray:
    """A table whose accumulator is the sum of the activation codes."""
    codes = np.arange(256) - (128 if signed else 0)
    return np.broadcast_to(codes[None, :], (256, 256))


@pytest.mark.parametrize("name", ["mul8u_1446", "mul8u_12N4", "mul8s_1KR6", "mul8s_1L2H"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("cfg", CONV_CFGS, ids=["plain", "depthwise-dilated", "grouped-rect"])
def test_conv_approx_equals_dequantized_reference(cfg, per_channel, name):
    m = get(name)
    qc = QuantConfig(signed=m.signed, per_channel=per_channel)
    layer = _conv(cfg, qc, MultiplierBank([m]))
    x = _input((2, cfg["in_channels"], 7, 9), seed=4)
    _calibrate(layer, x)
    layer.set_mode(Mode.APPROX)
    with torch.no_grad():
        y = layer(x)
    xc, s_x, z_x = layer.quantize_input(x)
    wc, s_w, z_w = layer.weight_codes()
    kw = dict(stride=layer.stride, padding=layer.pads(), dilation=layer.dilation, groups=layer.groups,
              pad_code=int(z_x))
    acc = reference.approx_conv2d_acc(xc.numpy(), wc.numpy(), m, **kw).astype(np.float64)
    sum_x = reference.approx_conv2d_acc(xc.numpy(), np.zeros_like(wc.numpy()), _sum_table(m.signed),
                                        signed=m.signed, **kw).astype(np.float64)
    sum_w = wc.numpy().astype(np.float64).reshape(wc.shape[0], -1).sum(1)[None, :, None, None]
    k = float(np.prod(wc.shape[1:]))
    zw = np.broadcast_to(z_w.numpy().astype(np.float64), (wc.shape[0],))[None, :, None, None]
    sw = np.broadcast_to(s_w.numpy().astype(np.float64), (wc.shape[0],))[None, :, None, None]
    zx = float(z_x)
    want = float(s_x) * sw * (acc - zx * sum_w - zw * sum_x + k * zx * zw)
    if layer.bias_per_op is not None:
        want = want + layer.bias_per_op[0].detach().numpy().astype(np.float64)[None, :, None, None]
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    layer.set_mode(Mode.QUANT)
    with torch.no_grad():
        assert not torch.allclose(y, layer(x))  # the circuit is really approximate


@pytest.mark.parametrize("name", ["mul8u_1446", "mul8u_12N4"])
def test_linear_approx_equals_dequantized_reference(name):
    m = get(name)
    torch.manual_seed(0)
    layer = ApproxLinear.from_float(nn.Linear(30, 6), QuantConfig(per_channel=True))
    layer.attach_bank(MultiplierBank([m]))
    x = _input((4, 30), seed=9)
    _calibrate(layer, x)
    layer.set_mode(Mode.APPROX)
    with torch.no_grad():
        y = layer(x)
    xc, s_x, z_x = layer.quantize_input(x)
    wc, s_w, z_w = layer.weight_codes()
    acc = reference.approx_gemm_acc(xc.numpy(), wc.numpy(), m).astype(np.float64)
    x64, w64 = xc.numpy().astype(np.float64), wc.numpy().astype(np.float64)
    zx, zw = float(z_x), z_w.numpy().astype(np.float64)[None, :]
    corr = acc - zx * w64.sum(1)[None, :] - zw * x64.sum(1)[:, None] + 30 * zx * zw
    want = float(s_x) * s_w.numpy().astype(np.float64)[None, :] * corr + layer.bias_per_op[0].detach().numpy()
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-6)


def _tiny_net(qc: QuantConfig, bank: MultiplierBank, num_ops: int) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        ApproxConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1, bias=True), qc, num_ops),
        MultiBatchNorm2d.from_bn(nn.BatchNorm2d(4), num_ops),
        nn.ReLU(),
        nn.Flatten(),
        ApproxLinear.from_float(nn.Linear(4 * 5 * 5, 3), qc, num_ops),
    )
    for mod in net:
        if isinstance(mod, (ApproxConv2d, ApproxLinear)):
            mod.attach_bank(bank)
    return net


@pytest.mark.parametrize("mode", list(Mode))
def test_gradients_reach_weights_biases_bn_and_sigma(mode):
    bank = MultiplierBank([bundled().exact(False), get("mul8u_1446")])
    net = _tiny_net(QuantConfig(), bank, num_ops=2)
    conv, mbn, lin = net[0], net[1], net[4]
    for layer in (conv, lin):
        layer.assign.copy_(torch.tensor([0, 1]))
        layer.set_mode(mode)
        layer.set_operating_point(1)
    mbn.set_operating_point(1)
    net.train()
    x = _input((6, 3, 5, 5))
    with torch.no_grad():
        net(x)  # observers
    loss = net(x).pow(2).sum()
    loss.backward()
    for layer in (conv, lin):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        assert layer.bias_per_op.grad[1].abs().sum() > 0  # the active OP's bias row
        assert layer.bias_per_op.grad[0].abs().sum() == 0
        if mode == Mode.NOISE:
            assert layer.sigma.grad is not None and layer.sigma.grad.abs() > 0
        else:
            assert layer.sigma.grad is None or layer.sigma.grad.abs() == 0
    assert mbn.bns[1].weight.grad.abs().sum() > 0 and mbn.bns[1].bias.grad.abs().sum() > 0
    assert mbn.bns[0].weight.grad is None


def test_noise_mode():
    bank = MultiplierBank([bundled().exact(False)])
    layer = _conv(CONV_CFGS[0], QuantConfig(), bank)
    x = _input((4, 3, 6, 6))
    _calibrate(layer, x)
    layer.set_mode(Mode.QUANT)
    yq = layer(x)
    layer.set_mode(Mode.NOISE)
    torch.testing.assert_close(layer(x), yq)  # eval: NOISE == QUANT
    layer.train()
    layer.freeze_observers()
    layer.sigma.data.fill_(0.5)
    torch.manual_seed(3)
    yn = layer(x)
    layer.set_mode(Mode.QUANT)
    noise = (yn - layer(x)).detach()
    assert 0.3 < float(noise.std() / yq.detach().std()) < 0.7  # eps * std(y) * sigma


def test_observers():
    qc = QuantConfig(act_momentum=0.5)
    bank = MultiplierBank([bundled().exact(False)])
    layer = _conv(CONV_CFGS[0], qc, bank)
    x = torch.rand(2, 3, 5, 5) + 1.0  # positive: the range must still include 0
    layer.train()
    layer.set_mode(Mode.FLOAT)
    layer(x)  # documented choice: FLOAT training calibrates too
    assert bool(layer.act_observed)
    lo, hi = float(layer.act_range[0]), float(layer.act_range[1])
    s, z = layer.act_qparams()
    assert int(z) == 0 and abs(float(s) * 255 - hi) < 1e-6
    layer.set_mode(Mode.QUANT)
    layer(x * 3)
    assert abs(float(layer.act_range[1]) - (hi + 0.5 * (float((x * 3).max()) - hi))) < 1e-5
    layer.freeze_observers()
    before = layer.act_range.clone()
    layer(x * 10)
    assert torch.equal(layer.act_range, before)
    layer.eval()
    layer.freeze_observers(False)
    layer(x * 10)
    assert torch.equal(layer.act_range, before)  # eval never updates
    assert lo == float(x.min())


def test_codes_and_macs():
    bank = MultiplierBank([get("mul8s_1KR6")])
    qc = QuantConfig(signed=True, per_channel=True)
    layer = _conv(CONV_CFGS[2], qc, bank)
    x = _input((2, 4, 6, 7))
    _calibrate(layer, x)
    codes, s, z = layer.quantize_input(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and s.ndim == 0 and z.ndim == 0
    wc, sw, zw = layer.weight_codes()
    assert wc.dtype == torch.int8 and wc.shape == layer.weight.shape and sw.shape == (6,) and zw.shape == (6,)
    # kh*kw*Ho*Wo*(Cin/groups)*Cout: Ho = 6+2-2+1 = 7, Wo = (7-3)//2+1 = 3
    assert layer.macs((4, 6, 7)) == 2 * 3 * 7 * 3 * 2 * 6 == layer.macs()
    lin = ApproxLinear.from_float(nn.Linear(10, 4), qc)
    assert lin.macs((10,)) == 40 and lin.macs((3, 10)) == 120
    with pytest.raises(QosError, match="input shape"):
        lin.macs()


def test_from_float_and_state():
    conv = nn.Conv2d(3, 5, 3, bias=True)
    layer = ApproxConv2d.from_float(conv, QuantConfig(), num_ops=3)
    assert isinstance(layer, nn.Conv2d) and layer.bias is None
    assert torch.equal(layer.weight, conv.weight)
    assert layer.bias_per_op.shape == (3, 5) and torch.equal(layer.bias_per_op[2], conv.bias)
    keys = set(layer.state_dict())
    assert {"weight", "bias_per_op", "sigma", "assign", "act_range", "weight_min", "weight_max"} <= keys
    assert "bias" not in keys
    assert sum(p is layer.bias_per_op for p in layer.parameters()) == 1
    with pytest.raises(QosError, match="padding_mode"):
        ApproxConv2d.from_float(nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(QosError, match="operating point"):
        layer.set_operating_point(3)
    with pytest.raises(QosError, match="mode"):
        layer.set_mode("fast")
    layer.set_mode(Mode.APPROX)
    with pytest.raises(QosError, match="bank"):
        layer(torch.randn(1, 3, 5, 5))
    with pytest.raises(QosError, match="signedness"):
        layer.attach_bank(MultiplierBank([get("mul8s_1KR6")]))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_same_padding_string():
    conv = nn.Conv2d(2, 3, (2, 4), padding="same", bias=False)
    layer = ApproxConv2d.from_float(conv, QuantConfig())
    layer.attach_bank(MultiplierBank([bundled().exact(False)]))
    x = _input((1, 2, 5, 6))
    _calibrate(layer, x)
    with torch.no_grad():
        layer.set_mode(Mode.QUANT)
        yq = layer(x)
        layer.set_mode(Mode.APPROX)
        torch.testing.assert_close(layer(x), yq, rtol=1e-5, atol=1e-5)


def test_multi_batchnorm():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.running_mean.uniform_(-1, 1)
    bn.eval()
    mbn = MultiBatchNorm2d.from_bn(bn, 3)
    assert len(mbn.bns) == 3 and not mbn.training
    x = torch.randn(2, 4, 3, 3)
    for i in range(3):
        mbn.set_operating_point(i)
        torch.testing.assert_close(mbn(x), bn(x))
    with torch.no_grad():
        mbn.bns[2].bias.add_(1.0)
    mbn.set_operating_point(2)
    assert not torch.allclose(mbn(x), bn(x))
    assert {f"bns.{i}.running_mean" for i in range(3)} <= set(mbn.state_dict())
    with pytest.raises(QosError):
        mbn.set_operating_point(-1)


def test_weight_codes_cache_follows_updates():
    layer = _conv(CONV_CFGS[0], QuantConfig(), MultiplierBank([get("mul8u_1446")]))
    x = _input((2, 3, 6, 6))
    _calibrate(layer, x)
    layer.set_mode(Mode.APPROX)
    with torch.no_grad():
        y1 = layer(x)
        prep = layer._wcache[1]
        assert torch.equal(layer(x), y1) and layer._wcache[1] is prep  # reused
        layer.weight.mul_(0.5)  # in place, like an optimizer step
        y2 = layer(x)
        assert layer._wcache[1] is not prep and not torch.allclose(y1, y2)
        del layer._wcache
        assert torch.equal(layer(x), y2)  # same as computed from scratch
    # BN-only fine-tuning: frozen weights in training mode keep the cache
    layer.train()
    layer.weight.requires_grad_(False)
    layer(x)
    prep = layer._wcache[1]
    layer(x)
    assert layer._wcache[1] is prep
