"""LeNet-5 (LeCun et al. 1998) in its common modern form: ReLU and max pooling, no BatchNorm."""
from __future__ import annotations

import torch
from torch import nn


def lenet_feature_size(input_size: int, pad1: int) -> int:
    """Spatial size after conv5(pad1)-pool2-conv5-pool2 on a square input (may be <= 0 if too small)."""
    s = (input_size + 2 * pad1 - 4) // 2
    return (s - 4) // 2


class LeNet5(nn.Module):
    """conv5(6)-ReLU-maxpool2-conv5(16)-ReLU-maxpool2-fc120-ReLU-fc84-ReLU-fc(num_classes).

    ``pad1`` pads the first conv: 0 is the classic 32x32 network (16*5*5 features),
    2 the usual MNIST variant for 28x28 (also 16*5*5) and smaller inputs.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 32, pad1: int = 0) -> None:
        super().__init__()
        side = lenet_feature_size(input_size, pad1)
        if side < 1:
            raise ValueError(f"LeNet-5 needs a larger input than {input_size}x{input_size} (pad1={pad1})")
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=pad1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(self.relu4(self.fc2(self.relu3(self.fc1(x)))))
