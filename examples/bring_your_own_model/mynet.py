"""Your model: an ordinary PyTorch CNN, nothing QoS-specific in it.

``build()`` is what ``qos-nets pipeline --model examples/bring_your_own_model/mynet.py:build``
calls (no arguments; it returns the float ``nn.Module``). ``run.py`` imports it too.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SmallCNN(nn.Module):
    """Two conv/BN/ReLU blocks, global average pool, one linear classifier."""

    def __init__(self, in_channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build() -> nn.Module:
    """The float model for 1-channel images and 10 classes (the digits)."""
    return SmallCNN(in_channels=1, classes=10)
