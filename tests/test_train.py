"""Float training and QAT on the bundled digits: a briefly trained ResNet-8 reaches a sensible
accuracy in both, QAT leaves the model in 8-bit QUANT mode, and training is reproducible."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import Subset

from qos_compile.data import load_dataset
from qos_compile.models import build_model
from qos_compile.nn import Mode, float_epilogues, wrap_model
from qos_compile.train import TrainConfig, evaluate, make_loader, train_float, train_qat


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(autouse=True)
def _one_thread():
    # single-threaded: faster and steadier than 2 threads on a shared 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_resnet8_float_then_qat_reaches_sensible_accuracy(digits):
    torch.manual_seed(0)
    model = build_model("resnet8", digits.num_classes, digits.in_channels, digits.image_size)
    hist = train_float(model, digits, TrainConfig(epochs=4, lr=0.05), progress=False)
    test = make_loader(digits.test, 256, shuffle=False)
    float_acc = evaluate(model, test).top1
    assert hist.train[-1].loss < hist.train[0].loss
    assert float_acc >= 90.0, f"float ResNet-8 on digits: {float_acc:.1f}% top-1"

    qnet = wrap_model(model)
    train_qat(qnet, digits, TrainConfig(epochs=2, lr=0.01), observer_epochs=1, progress=False)
    assert qnet.mode == Mode.QUANT
    qat_acc = evaluate(qnet, test).top1
    assert qat_acc >= 90.0 and qat_acc >= float_acc - 3.0, f"QAT {qat_acc:.1f}% vs float {float_acc:.1f}%"
    # the exact circuit in APPROX mode with contract v1's float epilogue computes the QUANT network
    # (up to float rounding); the integer epilogues also quantize the skip connections and the
    # pool's input, which QUANT mode does not model (bench.epilogue measures that change)
    qnet.set_mode(Mode.APPROX)
    with float_epilogues():
        assert abs(evaluate(qnet, test).top1 - qat_acc) <= 0.4
    assert evaluate(qnet, test).top1 >= 90.0


def test_training_is_reproducible(digits):
    small = dataclasses.replace(digits, train=Subset(digits.train, range(256)))
    weights = []
    for _ in range(2):
        torch.manual_seed(1)
        model = build_model("resnet8", digits.num_classes, digits.in_channels, digits.image_size)
        train_float(model, small, TrainConfig(epochs=1, seed=3), progress=False)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
