"""The AGN tolerance stage: penalty, MAC shares, training moves σ and lowers the loss; presets."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from qos_compile.data import ImageDataset, load_dataset
from qos_compile.errors import QosError
from qos_compile.models import build_model
from qos_compile.nn import Mode, wrap_model
from qos_compile.search.agn import AGNConfig, agn_penalty, mac_shares, train_agn
from qos_compile.search.presets import agn_preset, stage_defaults

torch.set_num_threads(2)


def _cut(ds: ImageDataset, n: int) -> ImageDataset:
    return ImageDataset(ds.images[:n], ds.labels[:n], ds.mean.flatten().tolist(), ds.std.flatten().tolist())


@pytest.fixture(scope="module")
def digits8():
    s = load_dataset("digits", image_size=8)
    return dataclasses.replace(s, train=_cut(s.train, 192), val=_cut(s.val, 64), test=_cut(s.test, 64))


def _qnet(sigma_init: float = 0.05):
    torch.manual_seed(0)
    return wrap_model(build_model("resnet8", 10, 1, 8), num_ops=1, input_shape=(1, 8, 8), sigma_init=sigma_init)


def test_mac_shares_follow_layer_macs():
    q = _qnet()
    macs = torch.tensor([i.macs for i in q.approx_layers()], dtype=torch.float64)
    shares = mac_shares(q)
    assert shares.shape == (len(macs),)
    assert torch.allclose(shares.double(), macs / macs.sum(), atol=1e-7)
    assert abs(float(shares.sum()) - 1.0) < 1e-6


def test_penalty_is_capped_weighted_abs_sigma():
    q = _qnet()
    shares = mac_shares(q)
    vals = torch.linspace(-0.5, 0.5, len(q.sigmas()))
    with torch.no_grad():
        for s, v in zip(q.sigmas(), vals):
            s.fill_(float(v))
    pen = agn_penalty(q, shares, sigma_max=0.3)
    expect = (shares.double() * vals.double().abs().clamp(max=0.3)).sum()
    assert abs(float(pen.detach()) - float(expect)) < 1e-6
    pen.backward()
    # above the cap the reward has no gradient; below it, d/dσ = share·sign(σ)
    for s, v, w in zip(q.sigmas(), vals, shares):
        g = 0.0 if abs(float(v)) > 0.3 else float(w) * (1.0 if float(v) > 0 else -1.0 if float(v) < 0 else 0.0)
        assert abs(float(s.grad) - g) < 1e-6


def test_train_agn_moves_sigma_and_lowers_loss(digits8):
    q = _qnet()
    q.set_mode(Mode.QUANT)
    q.train()
    with torch.no_grad():  # calibrate observers as QAT would
        q(digits8.train[:64][0])
    cfg = AGNConfig(lam=1.0, sigma_max=0.5, sigma_init=0.05, epochs=3, batch_size=32, seed=0)
    res = train_agn(q, digits8, cfg, progress=False)
    assert q.mode == Mode.QUANT
    assert len(res.sigmas) == len(q.approx_layers()) == len(res.sigma_history[0])
    assert res.sigma_history[0] == pytest.approx([0.05] * len(res.sigmas))  # reset to sigma_init
    moved = [abs(a - b) for a, b in zip(res.sigmas, res.sigma_history[0])]
    assert max(moved) > 0.01                                    # σ learned something
    assert sum(abs(s) for s in res.sigmas) > 0.05 * len(res.sigmas)  # the reward pushed them up on the whole
    assert len(res.penalty) == len(res.loss) == 3
    assert res.penalty[-1] > res.penalty[0]
    assert res.loss[-1] < res.loss[0]                           # CE − λ·penalty went down
    js = res.to_json()
    assert js["abs_sigmas"] == [abs(s) for s in res.sigmas] and js["layers"][0] == "conv1"


def test_noise_only_in_training_mode():
    q = _qnet(sigma_init=0.5)
    x = torch.randn(4, 1, 8, 8)
    q.set_mode(Mode.QUANT)
    q.train()
    with torch.no_grad():
        q(x)
    q.eval()
    with torch.no_grad():
        ref = q(x)
        q.set_mode(Mode.NOISE)
        assert torch.equal(q(x), ref)  # eval: NOISE == QUANT
        q.train()
        q.freeze_observers(True)
        assert not torch.equal(q(x), ref)


def test_agn_config_checks():
    with pytest.raises(QosError):
        AGNConfig(lam=-1.0)
    with pytest.raises(QosError):
        AGNConfig(sigma_max=0.0)
    with pytest.raises(QosError):
        AGNConfig(epochs=-1)


def test_presets_from_the_method_notes():
    p = agn_preset("resnet8")
    assert (p.lam, p.sigma_max, p.sigma_init, p.n) == (0.3, 0.3, 0.1, 4)
    p = agn_preset("resnet20", "cifar10")
    assert (p.lam, p.sigma_max, p.sigma_init, p.n) == (0.2, 0.075, 0.01, 3)
    p = agn_preset("resnet32", "cifar100")
    assert (p.lam, p.sigma_max, p.sigma_init) == (0.001, 0.005, 0.001)
    assert agn_preset("resnet32", "cifar10").lam == 0.15
    assert agn_preset("resnet14").sigma_max == 0.15
    assert agn_preset("mobilenetv2").n == 4
    assert agn_preset("no-such-model").n >= 1
    assert stage_defaults("resnet8", "digits").agn_epochs <= 5
    assert stage_defaults("mobilenetv2", "tinyimagenet").ft_lr == 3e-3
