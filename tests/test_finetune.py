"""Multi-OP expansion, BN-only fine-tuning (only BN/bias change), full retraining, parameter overhead."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from qos_compile.data import ImageDataset, load_dataset
from qos_compile.errors import QosError
from qos_compile.finetune import (FinetuneConfig, bn_only_parameters, count_params, evaluate_ops,
                                  expand_operating_points, finetune_bn, finetune_full, overhead_report)
from qos_compile.models import build_model
from qos_compile.multipliers import bundled, get
from qos_compile.nn import ApproxConv2d, ApproxLinear, Mode, MultiBatchNorm2d, float_epilogues, wrap_model
from qos_compile.search import param_overhead

torch.set_num_threads(2)
BANK = [bundled().exact(False), get("mul8u_2NDH"), get("mul8u_185Q")]


def _cut(ds: ImageDataset, n: int) -> ImageDataset:
    return ImageDataset(ds.images[:n], ds.labels[:n], ds.mean.flatten().tolist(), ds.std.flatten().tolist())


@pytest.fixture(scope="module")
def digits8():
    s = load_dataset("digits", image_size=8)
    return dataclasses.replace(s, train=_cut(s.train, 128), val=_cut(s.val, 48), test=_cut(s.test, 48))


@pytest.fixture(scope="module")
def single(digits8):
    """A calibrated single-OP resnet8 (the AGN stage's output shape)."""
    torch.manual_seed(0)
    q = wrap_model(build_model("resnet8", 10, 1, 8), num_ops=1, input_shape=(1, 8, 8))
    q.set_mode(Mode.QUANT)
    q.train()
    with torch.no_grad():
        for s in range(0, 128, 32):
            q(digits8.train[s:s + 32][0])
    q.eval()
    return q


def _ops(single):
    layers = len(single.approx_layers())
    assign = [[0] * layers, [1] * layers, ["mul8u_2NDH"] * (layers - 1) + ["mul8u_185Q"]]
    q = expand_operating_points(single, BANK, assign)
    q.freeze_observers(True)
    q.set_mode(Mode.APPROX)
    q.eval()
    return q


def test_expand_copies_op0_into_every_op(single, digits8):
    q = _ops(single)
    assert q.num_ops == 3 and q.bank.names == [m.name for m in BANK]
    assert q.assignment()[1] == [1] * len(q.approx_layers())
    assert q.assignment()[2][-1] == 2
    x = digits8.val[:16][0]
    single.set_mode(Mode.QUANT)
    with torch.no_grad():
        ref = single(x)
        q.set_mode(Mode.QUANT)
        for op in range(3):  # exact products: every OP is the source model
            q.set_operating_point(op)
            assert torch.equal(q(x), ref)
        # OP 0 is the source model's circuit and BatchNorm: the same integer network, bit for bit
        # (APPROX differs from QUANT by design: integer epilogues also quantize skip connections)
        q.set_mode(Mode.APPROX)
        q.set_operating_point(0)
        single.set_mode(Mode.APPROX)
        assert torch.equal(q(x), single(x))
        assert not torch.equal(q(x), ref)
        q.set_operating_point(2)
        assert not torch.equal(q(x), single(x))
        q.set_operating_point(0)
        with float_epilogues():   # contract v1's float epilogue: QUANT up to float rounding
            assert torch.allclose(q(x), ref, atol=1e-4)
        single.set_mode(Mode.QUANT)
    src = single.state_dict()
    assert torch.equal(q.net.fc.bias_per_op[2], src["net.fc.bias_per_op"][0])
    bn1 = q.net.get_submodule("layer1.0.bn1")  # a rebuilt net: no Sequential indexing
    assert torch.equal(bn1.bns[2].running_var, src["net.layer1.0.bn1.bns.0.running_var"])


def test_expand_needs_an_architecture_record():
    q = wrap_model(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), num_ops=1, input_shape=(1, 5, 5))
    with pytest.raises(QosError, match="architecture"):
        expand_operating_points(q, BANK, [[0]])


def _frozen_state(q):
    """Everything that must not change in BN-only mode: weights, σ's, observers, assignment, bank."""
    out = {}
    for name, mod in q.named_modules():
        if isinstance(mod, (ApproxConv2d, ApproxLinear)):
            for key in ("weight", "sigma", "act_range", "weight_min", "weight_max", "assign"):
                out[f"{name}.{key}"] = getattr(mod, key).detach().clone()
    out["bank.luts"] = q.bank.luts.clone()
    return out


def test_bn_only_changes_only_bn_and_biases(single, digits8):
    q = _ops(single)
    frozen = _frozen_state(q)
    flags = {n: p.requires_grad for n, p in q.named_parameters()}
    bn_before = {n: p.detach().clone() for n, p in q.named_parameters() if ".bns." in n or n.endswith("bias_per_op")}
    res = finetune_bn(q, digits8, FinetuneConfig(epochs=2, batch_size=32, lr=0.05), progress=False)
    after = _frozen_state(q)
    for k, v in frozen.items():
        assert torch.equal(after[k], v), f"{k} changed in BN-only fine-tuning"
    assert {n: p.requires_grad for n, p in q.named_parameters()} == flags  # restored
    assert q.mode == Mode.APPROX and not q.training and q.operating_point == 0
    changed = [n for n, p in q.named_parameters() if n in bn_before and not torch.equal(p, bn_before[n])]
    assert any(".bns.0." in n for n in changed) and any(".bns.2." in n for n in changed)
    assert "net.fc.bias_per_op" in changed
    # every OP has its own BatchNorm and bias now
    bn = q.net.get_submodule("layer2.0.bn2").bns
    assert not torch.equal(bn[1].weight, bn[2].weight) and not torch.equal(bn[1].running_mean, bn[2].running_mean)
    assert not torch.equal(q.net.fc.bias_per_op[1], q.net.fc.bias_per_op[2])
    assert len(res.train_loss) == 2 and len(res.train_loss[0]) == 3 and len(res.val) == 3


def test_bn_only_parameters_selects_bn_and_bias(single):
    q = _ops(single)
    params = bn_only_parameters(q)
    ids = {id(p) for p in params}
    for mod in q.net.modules():
        if isinstance(mod, MultiBatchNorm2d):
            assert all(id(p) in ids for p in mod.parameters())
        if isinstance(mod, (ApproxConv2d, ApproxLinear)):
            assert id(mod.weight) not in ids and not mod.weight.requires_grad and id(mod.sigma) not in ids
    assert id(q.net.fc.bias_per_op) in ids


def test_full_retraining_gives_each_op_its_own_weights(single, digits8):
    q = _ops(single)
    w0 = q.net.get_submodule("layer1.0.conv1").weight.detach().clone()
    models, res = finetune_full(q, digits8, FinetuneConfig(epochs=1, batch_size=32), progress=False)
    assert len(models) == 3 and len(res.val) == 3
    assert torch.equal(q.net.get_submodule("layer1.0.conv1").weight, w0)  # the source is untouched
    ws = [m.net.get_submodule("layer1.0.conv1").weight for m in models]
    assert not torch.equal(ws[1], w0) and not torch.equal(ws[1], ws[2])
    assert all(m.bank is not q.bank for m in models)


def test_evaluate_ops_restores_op_and_mode(single, digits8):
    q = _ops(single)
    q.set_operating_point(1)
    q.set_mode(Mode.QUANT)
    loader = digits8.loaders(48, shuffle=False).val
    stats = evaluate_ops(q, loader)
    assert len(stats) == 3 and q.operating_point == 1 and q.mode == Mode.QUANT
    assert stats[0].count == 48


def test_overhead_mobilenetv2_tinyimagenet_is_2_75_percent():
    model = build_model("mobilenetv2", 200, 3, 64)
    c = count_params(model)
    assert (c.total, c.bn_affine, c.bias) == (2_480_072, 34_112, 200)
    rep = overhead_report(model, 3)
    assert rep["extra_params_bn_affine"] == 68_224
    assert rep["bn_affine_pct"] == pytest.approx(100 * 68_224 / 2_480_072) == param_overhead(2_480_072, 34_112, 0, 3)
    assert round(rep["bn_affine_pct"], 2) == 2.75
    assert rep["extra_params_bn_affine_and_bias"] == 68_624
    assert rep["bn_affine_and_bias_pct"] == pytest.approx(100 * 68_624 / 2_480_072)
    # the converted 3-OP model counts one OP's copy: the same numbers
    q = wrap_model(model, num_ops=3)
    assert count_params(q) == c
