"""Model zoo in plain torch (no torchvision), constructible by registry name.

``build_model(name, num_classes, in_channels, input_size, **config)`` returns an
``nn.Module`` carrying ``model.qos_arch``: a plain dict with the registry name,
the three shape arguments and the *resolved* config (defaults filled in), so a
checkpoint can rebuild the same architecture with ``build_from_arch(arch)``.

Names: ``resnet8/14/20/32`` (CIFAR ResNets, option-A shortcuts), ``mobilenetv2``
(torchvision layout; config ``width_mult``, ``small_input``, ``dropout``,
``round_nearest``), ``lenet5`` (config ``pad1``: first-conv padding, default 0
for inputs >= 32 and 2 below).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

from ..errors import QosError
from .lenet import LeNet5, lenet_feature_size
from .mobilenetv2 import MobileNetV2
from .resnet_cifar import BasicBlock, CifarResNet, ShortcutA

ARCH_KEYS = ("name", "num_classes", "in_channels", "input_size")


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: a description, config defaults and a builder taking resolved arguments."""

    description: str
    defaults: Mapping[str, Any]
    build: Callable[..., nn.Module]
    resolve: Callable[[dict[str, Any], int], dict[str, Any]] = lambda config, input_size: config


def _resnet(depth: int) -> ModelSpec:
    return ModelSpec(
        description=f"CIFAR ResNet-{depth} ({(depth - 2) // 6} basic blocks per stage, option-A shortcuts)",
        defaults={},
        build=lambda num_classes, in_channels, input_size: CifarResNet(depth, num_classes, in_channels),
    )


def _check_mobilenet(config: dict[str, Any], input_size: int) -> dict[str, Any]:
    width, small = config["width_mult"], config["small_input"]
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise QosError(f"mobilenetv2: width_mult must be a positive number, got {width!r}")
    if not isinstance(small, bool):
        raise QosError(f"mobilenetv2: small_input must be true or false, got {small!r}")
    dropout = config["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise QosError(f"mobilenetv2: dropout must be in [0, 1), got {dropout!r}")
    rn = config["round_nearest"]
    if isinstance(rn, bool) or not isinstance(rn, int) or rn < 1:
        raise QosError(f"mobilenetv2: round_nearest must be a positive integer, got {rn!r}")
    return {"width_mult": float(width), "small_input": small, "dropout": float(dropout), "round_nearest": rn}


def _check_lenet(config: dict[str, Any], input_size: int) -> dict[str, Any]:
    pad1 = config["pad1"]
    if pad1 is None:
        pad1 = 0 if input_size >= 32 else 2
    if isinstance(pad1, bool) or not isinstance(pad1, int) or pad1 < 0:
        raise QosError(f"lenet5: pad1 must be a non-negative integer, got {pad1!r}")
    if lenet_feature_size(input_size, pad1) < 1:
        raise QosError(f"lenet5: input_size {input_size} is too small (pad1={pad1}); use 12 or more")
    return {"pad1": pad1}


MODELS: dict[str, ModelSpec] = {
    "resnet8": _resnet(8),
    "resnet14": _resnet(14),
    "resnet20": _resnet(20),
    "resnet32": _resnet(32),
    "mobilenetv2": ModelSpec(
        description="MobileNetV2, torchvision layout (features.0..18, classifier = Dropout + Linear)",
        defaults={"width_mult": 1.0, "small_input": False, "dropout": 0.2, "round_nearest": 8},
        build=lambda num_classes, in_channels, input_size, **c: MobileNetV2(num_classes, in_channels, **c),
        resolve=_check_mobilenet,
    ),
    "lenet5": ModelSpec(
        description="LeNet-5: conv5-pool-conv5-pool-fc120-fc84-fc (ReLU, max pooling)",
        defaults={"pad1": None},
        build=lambda num_classes, in_channels, input_size, **c: LeNet5(num_classes, in_channels, input_size, **c),
        resolve=_check_lenet,
    ),
}


def model_names() -> list[str]:
    """The registry names, in registry order."""
    return list(MODELS)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise QosError(f"{what} must be a positive integer, got {value!r}")
    return value


def build_model(name: str, num_classes: int, in_channels: int = 3, input_size: int = 32, **config: Any) -> nn.Module:
    """Build a registered model; ``model.qos_arch`` records name, shapes and the resolved config.

    Raises QosError for an unknown name (listing the valid ones), an unknown config
    key or a bad value.
    """
    spec = MODELS.get(str(name).strip().lower())
    if spec is None:
        raise QosError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    key = str(name).strip().lower()
    num_classes = _positive_int(num_classes, f"{key}: num_classes")
    in_channels = _positive_int(in_channels, f"{key}: in_channels")
    input_size = _positive_int(input_size, f"{key}: input_size")
    unknown = sorted(set(config) - set(spec.defaults))
    if unknown:
        allowed = ", ".join(spec.defaults) or "none"
        raise QosError(f"{key}: unknown config {', '.join(unknown)} (allowed: {allowed})")
    resolved = spec.resolve({**spec.defaults, **config}, input_size)
    model = spec.build(num_classes, in_channels, input_size, **resolved)
    model.qos_arch = {"name": key, "num_classes": num_classes, "in_channels": in_channels,
                      "input_size": input_size, **resolved}
    return model


def build_from_arch(arch: Mapping[str, Any]) -> nn.Module:
    """Rebuild a model from a ``qos_arch`` dict (as stored in a checkpoint)."""
    if not isinstance(arch, Mapping) or "name" not in arch or "num_classes" not in arch:
        raise QosError("architecture record must be a mapping with at least 'name' and 'num_classes'")
    config = {k: v for k, v in arch.items() if k not in ARCH_KEYS}
    return build_model(arch["name"], arch["num_classes"], arch.get("in_channels", 3), arch.get("input_size", 32),
                       **config)


__all__ = ["MODELS", "ModelSpec", "build_model", "build_from_arch", "model_names", "CifarResNet", "BasicBlock",
           "ShortcutA", "MobileNetV2", "LeNet5"]
