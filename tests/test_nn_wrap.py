"""wrap_model / QoSNet / MultiplierBank: conversion, operating points, assignment, state round trips."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from qos_compile.errors import QosError
from qos_compile.multipliers import bundled, get
from qos_compile.nn import (ApproxConv2d, ApproxLinear, LayerInfo, Mode, MultiBatchNorm2d, MultiplierBank, QoSNet,
                            QuantConfig, approx_layers, wrap_model)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Block(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5))


UNSIGNED = ["mul8u_1JFF", "mul8u_1446", "mul8u_12N4"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny shapes gain nothing from threads, and on shared cores spinning threads cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _wrapped(num_ops: int = 3, names=UNSIGNED, **kw) -> QoSNet:
    return wrap_model(_model(), [get(n) for n in names], num_ops=num_ops, **kw)


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _calibrated(net: QoSNet) -> QoSNet:
    net.set_mode(Mode.QUANT)
    net.train()
    with torch.no_grad():
        for op in range(net.num_ops):
            net.set_operating_point(op)
            net(_x(1))
    net.set_operating_point(0)
    net.eval()
    return net


def test_wrap_converts_in_place():
    model = _model()
    net = wrap_model(model, num_ops=2, input_shape=(3, 8, 8))
    assert net.net is model
    assert isinstance(model[0], ApproxConv2d) and isinstance(model[0], nn.Conv2d)
    assert isinstance(model[3].conv, ApproxConv2d) and isinstance(model[3].bn, MultiBatchNorm2d)
    assert isinstance(model[6], ApproxLinear)
    infos = net.approx_layers()
    assert [(i.name, i.kind) for i in infos] == [("0", "conv"), ("3.conv", "conv"), ("6", "linear")]
    assert all(isinstance(i, LayerInfo) for i in infos)
    # macs per sample: 3*3*4*4*3*4, 3*3*4*4*2*4, 16*5
    assert [i.macs for i in infos] == [1728, 1152, 80]
    assert approx_layers(model) == approx_layers(net) == infos
    assert net.bank.names == ["mul8u_1JFF"] and net.qconfig.signed is False  # default: exact circuit
    assert net.assignment() == [[0, 0, 0], [0, 0, 0]]
    with pytest.raises(QosError, match="already"):
        wrap_model(model)


def test_macs_recorded_on_first_forward():
    net = _wrapped(1)
    assert all(i.macs is None for i in net.approx_layers())
    net.eval()
    net(_x())
    assert [i.macs for i in net.approx_layers()] == [1728, 1152, 80]


def test_bank_signedness_sets_quantization():
    net = wrap_model(_model(), [get("mul8s_1KR6"), bundled().exact(True)], qconfig=QuantConfig(per_channel=True))
    assert net.qconfig == QuantConfig(signed=True, per_channel=True)
    assert all(i.module.qconfig.signed for i in net.approx_layers())
    default = wrap_model(_model(), qconfig=QuantConfig(signed=True))
    assert default.bank.multipliers()[0].is_exact and default.bank.signed


def test_operating_points_switch_circuits_and_bns():
    net = _calibrated(_wrapped(3))
    net.set_assignment([[0, 0, 0], [1, 1, 1], ["mul8u_12N4", 2, 2]])
    assert net.assignment() == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
    net.set_mode(Mode.APPROX)
    outs = []
    with torch.no_grad():
        for op in range(3):
            net.set_operating_point(op)
            assert net.operating_point == op
            outs.append(net(_x()))
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    # same circuits, different BatchNorm per OP
    net.set_assignment([[0, 0, 0]] * 3)
    with torch.no_grad():
        net.net[1].bns[2].bias.add_(0.5)
        net.set_operating_point(np.int64(1))  # any integer type
        y1 = net(_x())
        net.set_operating_point(2)
        y2 = net(_x())
    assert not torch.allclose(y1, y2)


def _perturbed(net: QoSNet) -> QoSNet:
    """Give every OP its own BN statistics, BN affine and biases, as per-OP fine-tuning would."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, MultiBatchNorm2d):
                for bn in mod.bns:
                    for t in (bn.weight, bn.bias, bn.running_mean):
                        t.add_(0.2 * torch.randn(t.shape, generator=g))
                    bn.running_var.mul_(1 + 0.3 * torch.rand(bn.running_var.shape, generator=g))
            if isinstance(mod, (ApproxConv2d, ApproxLinear)) and mod.bias_per_op is not None:
                mod.bias_per_op.add_(0.3 * torch.randn(mod.bias_per_op.shape, generator=g))
            if isinstance(mod, (ApproxConv2d, ApproxLinear)):
                mod.sigma.add_(0.01)
    return net


def test_state_dict_round_trips_every_op():
    net = _perturbed(_calibrated(_wrapped(3)))
    net.set_assignment([[0, 1, 2], [1, 2, 0], [2, 2, 1]])
    net.freeze_observers()
    state = net.state_dict()
    # every OP's BN and bias rows are in the state
    for i in range(3):
        assert f"net.1.bns.{i}.weight" in state and f"net.3.bn.bns.{i}.running_var" in state
    assert state["net.0.bias_per_op"].shape == (3, 4) and state["net.6.bias_per_op"].shape == (3, 5)
    assert "bank.luts" in state and state["bank._extra_state"]["names"] == UNSIGNED
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    fresh = _wrapped(3)
    fresh.load_state_dict(loaded)
    fresh.eval()
    assert fresh.assignment() == net.assignment()
    assert fresh.bank.names == UNSIGNED
    for mode in (Mode.APPROX, Mode.QUANT):
        net.set_mode(mode)
        fresh.set_mode(mode)
        with torch.no_grad():
            for op in range(3):
                net.set_operating_point(op)
                fresh.set_operating_point(op)
                assert torch.equal(net(_x(5)), fresh(_x(5))), (mode, op)


def test_optimizer_sees_every_op():
    net = _wrapped(3)
    params = {id(p) for p in net.parameters()}
    for mod in net.modules():
        if isinstance(mod, MultiBatchNorm2d):
            assert all(id(bn.weight) in params and id(bn.bias) in params for bn in mod.bns)
    assert id(net.net[0].bias_per_op) in params
    assert [id(s) for s in net.sigmas()] == [id(i.module.sigma) for i in net.approx_layers()]
    assert all(id(s) in params for s in net.sigmas())


def test_bank_state_into_other_bank_and_from_state_dict():
    net = _wrapped(1)
    other = wrap_model(_model(), [get("mul8u_1JFF"), get("mul8u_Y48"), get("mul8u_L40")])
    other.load_state_dict(net.state_dict())  # same size: the tables and names come along
    assert other.bank.names == UNSIGNED and other.bank.plan(2).strategy == net.bank.plan(2).strategy
    bank = MultiplierBank.from_state_dict(net.state_dict(), prefix="bank.")
    assert bank.sha256 == net.bank.sha256
    bad = net.state_dict()
    bad["bank.luts"] = bad["bank.luts"].clone()
    bad["bank.luts"][1, 3, 3] += 1
    with pytest.raises(QosError, match="SHA-256"):
        _wrapped(1).load_state_dict(bad)
    signed = wrap_model(_model(), [get("mul8s_1KR6"), get("mul8s_1KR8"), get("mul8s_1L2H")])
    with pytest.raises(QosError, match="signedness"):
        signed.load_state_dict(net.state_dict())


def test_bad_inputs():
    net = _wrapped(2)
    with pytest.raises(QosError, match="operating point"):
        net.set_operating_point(2)
    with pytest.raises(QosError, match="operating point"):
        net.set_operating_point(-1)
    with pytest.raises(QosError, match="operating point"):
        net.set_operating_point(True)
    with pytest.raises(QosError, match="operating point"):
        net.set_operating_point(1.0)
    with pytest.raises(QosError, match="signedness"):
        wrap_model(_model(), [get("mul8u_1446"), get("mul8s_1KR6")])
    with pytest.raises(QosError, match="2 operating point"):
        net.set_assignment([[0, 0, 0]])
    with pytest.raises(QosError, match="3 layer"):
        net.set_assignment([[0, 0], [0, 0]])
    with pytest.raises(QosError, match="out of range"):
        net.set_assignment([[0, 0, 3], [0, 0, 0]])
    with pytest.raises(QosError, match="out of range"):
        net.set_assignment([[0, -1, 0], [0, 0, 0]])
    with pytest.raises(QosError, match="bank indices"):
        net.set_assignment([[0, 1.5, 0], [0, 0, 0]])
    with pytest.raises(QosError, match="bank indices"):
        net.set_assignment([[0, True, 0], [0, 0, 0]])
    with pytest.raises(QosError, match="not in the bank"):
        net.set_assignment([[0, "mul8u_L40", 0], [0, 0, 0]])
    assert net.assignment() == [[0, 0, 0], [0, 0, 0]]  # failed calls change nothing
    with pytest.raises(QosError, match="mode"):
        net.set_mode("approximate")
    with pytest.raises(QosError, match="num_ops"):
        wrap_model(_model(), num_ops=0)
    with pytest.raises(QosError, match="at least one"):
        wrap_model(_model(), [])
    with pytest.raises(QosError, match="no Conv2d or Linear"):
        wrap_model(nn.Sequential(nn.ReLU()))


def test_emulation_speed_benchmark_runs(capsys):
    pytest.importorskip("qos_compile.models")
    from qos_compile.bench import emulation_speed

    threads = torch.get_num_threads()
    try:
        assert emulation_speed.main(["--batch", "1", "--repeats", "1", "--lookup-repeats", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| approx mul8u_12N4 | general" in out and "threads 1" in out
