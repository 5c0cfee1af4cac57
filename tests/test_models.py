"""Model zoo: shapes, exact parameter counts, torchvision layout, registry and rebuild-by-arch."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qos_compile.errors import QosError
from qos_compile.models import MODELS, ShortcutA, build_from_arch, build_model, model_names


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bn_stats(model: nn.Module) -> tuple[int, int]:
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    return sum(p.numel() for m in bns for p in m.parameters()), sum(m.num_features for m in bns)


@torch.no_grad()
def out_shape(model: nn.Module, c: int, s: int, n: int = 2) -> tuple[int, ...]:
    model.eval()
    return tuple(model(torch.randn(n, c, s, s)).shape)


def test_registry_names():
    assert model_names() == ["resnet8", "resnet14", "resnet20", "resnet32", "mobilenetv2", "lenet5"]
    assert set(MODELS) == set(model_names())


@pytest.mark.parametrize("name", ["resnet8", "resnet14", "resnet20", "resnet32"])
@pytest.mark.parametrize("c, s", [(1, 16), (3, 32), (1, 8)])
def test_resnet_shapes(name, c, s):
    assert out_shape(build_model(name, 10, in_channels=c, input_size=s), c, s) == (2, 10)


@pytest.mark.parametrize("c, s, small, classes", [(3, 64, False, 200), (3, 32, True, 10), (1, 16, True, 10),
                                                  (3, 32, False, 100)])
def test_mobilenet_shapes(c, s, small, classes):
    m = build_model("mobilenetv2", classes, in_channels=c, input_size=s, small_input=small)
    assert out_shape(m, c, s) == (2, classes)


@torch.no_grad()
def test_mobilenet_downsampling():
    big = build_model("mobilenetv2", 10, input_size=64).eval()
    assert big.features(torch.zeros(1, 3, 64, 64)).shape == (1, 1280, 2, 2)     # stride 32
    small = build_model("mobilenetv2", 10, input_size=32, small_input=True).eval()
    assert small.features(torch.zeros(1, 3, 32, 32)).shape == (1, 1280, 4, 4)  # stride 8
    assert small.features[0][0].stride == (1, 1) and big.features[0][0].stride == (2, 2)


@pytest.mark.parametrize("c, s", [(1, 16), (1, 28), (3, 32), (1, 12)])
def test_lenet_shapes(c, s):
    assert out_shape(build_model("lenet5", 10, in_channels=c, input_size=s), c, s) == (2, 10)


def test_lenet_classic_sizes():
    # classic LeNet-5: 32x32 unpadded and 28x28 with pad 2 both reach 16*5*5 features
    assert build_model("lenet5", 10, 1, 32).fc1.in_features == 400
    assert build_model("lenet5", 10, 1, 28).fc1.in_features == 400
    assert n_params(build_model("lenet5", 10, 1, 32)) == 61706
    with pytest.raises(QosError, match="too small"):
        build_model("lenet5", 10, 1, 8)


def test_resnet_parameter_counts():
    # option A has parameter-free shortcuts; 272,474 would be option B (2 projection convs 16->32, 32->64
    # = 2,560 weights, plus their BatchNorms = 192: 269,722 + 2,752).
    counts = {name: n_params(build_model(name, 10)) for name in ("resnet8", "resnet14", "resnet20", "resnet32")}
    assert counts == {"resnet8": 75290, "resnet14": 172506, "resnet20": 269722, "resnet32": 464154}
    m = build_model("resnet20", 10)
    assert sum(isinstance(x, nn.Conv2d) for x in m.modules()) == 19
    assert sum(isinstance(x, nn.Linear) for x in m.modules()) == 1
    assert all(n_params(b.shortcut) == 0 for b in m.modules() if hasattr(b, "shortcut"))


def test_shortcut_a_is_subsample_and_zero_pad():
    x = torch.randn(2, 16, 8, 8)
    y = ShortcutA(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


def test_mobilenet_torchvision_parameter_counts():
    m = build_model("mobilenetv2", 200, input_size=64)
    assert n_params(m) == 2_480_072
    assert bn_stats(m) == (34_112, 17_056)
    assert n_params(build_model("mobilenetv2", 1000)) == 3_504_872  # torchvision's mobilenet_v2()


def test_mobilenet_layout():
    m = build_model("mobilenetv2", 200)
    assert len(m.features) == 19
    keys = list(m.state_dict())
    assert keys[0] == "features.0.0.weight" and "features.18.1.running_var" in keys
    assert "features.1.conv.0.0.weight" in keys and "features.1.conv.1.weight" in keys   # t=1 block
    assert "features.2.conv.0.0.weight" in keys and "features.2.conv.3.weight" in keys   # expanded block
    assert keys[-2:] == ["classifier.1.weight", "classifier.1.bias"]
    assert isinstance(m.classifier[0], nn.Dropout) and m.classifier[1].in_features == 1280
    assert m.features[2].conv[1][0].groups == 96   # depthwise 3x3 on 16*6 channels
    half = build_model("mobilenetv2", 10, width_mult=0.5)
    assert half.features[0][0].out_channels == 16 and half.classifier[1].in_features == 1280
    assert all(c.out_channels % 8 == 0 for c in half.modules() if isinstance(c, nn.Conv2d))


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_conv_before_bn_has_no_bias(name):
    m = build_model(name, 10)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert convs and all(c.bias is None for c in convs)


def test_qos_arch_and_rebuild():
    m = build_model("mobilenetv2", 200, in_channels=3, input_size=64, width_mult=0.75)
    assert m.qos_arch == {"name": "mobilenetv2", "num_classes": 200, "in_channels": 3, "input_size": 64,
                          "width_mult": 0.75, "small_input": False, "dropout": 0.2, "round_nearest": 8}
    r = build_from_arch(dict(m.qos_arch))
    r.load_state_dict(m.state_dict())   # strict: same keys and shapes
    assert r.qos_arch == m.qos_arch
    lenet = build_model("lenet5", 10, in_channels=1, input_size=16)
    assert lenet.qos_arch["pad1"] == 2
    build_from_arch(lenet.qos_arch).load_state_dict(lenet.state_dict())
    res = build_model("ResNet20", 10, in_channels=1, input_size=16)
    assert res.qos_arch == {"name": "resnet20", "num_classes": 10, "in_channels": 1, "input_size": 16}


def test_trains_one_step():
    m = build_model("resnet8", 10, in_channels=1, input_size=16)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(m(torch.randn(4, 1, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("call, match", [
    (lambda: build_model("resnet18", 10), "valid names: resnet8, resnet14, resnet20, resnet32, mobilenetv2, lenet5"),
    (lambda: build_model("resnet20", 10, width_mult=1.0), "unknown config width_mult"),
    (lambda: build_model("mobilenetv2", 10, widthmult=1.0), "unknown config"),
    (lambda: build_model("mobilenetv2", 10, width_mult=0), "width_mult"),
    (lambda: build_model("mobilenetv2", 10, small_input="yes"), "small_input"),
    (lambda: build_model("resnet20", 0), "num_classes"),
    (lambda: build_model("resnet20", 10, in_channels=2.5), "in_channels"),
    (lambda: build_from_arch({"num_classes": 10}), "name"),
])
def test_errors(call, match):
    with pytest.raises(QosError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
