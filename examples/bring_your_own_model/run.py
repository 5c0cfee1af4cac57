"""Bring your own model: a plain PyTorch CNN -> wrap_model -> short QAT -> per-OP approximate accuracy.

    .venv/bin/python examples/bring_your_own_model/run.py [--epochs 3]

Nothing here is specific to the model zoo: any nn.Module with Conv2d/Linear/BatchNorm2d layers works.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402


class SmallCNN(nn.Module):
    """Your model: nothing QoS-specific in it."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def train(model, x, y, epochs: int, lr: float) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = perm[i:i + 32]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    a = ap.parse_args()
    from qos_compile.data.digits import load_digits_splits
    from qos_compile.nn import wrap_model

    torch.manual_seed(0)
    torch.set_num_threads(2)
    splits = load_digits_splits(16, 0)
    xtr, ytr = splits.train.tensors
    xte, yte = splits.test.tensors

    model = SmallCNN()
    train(model, xtr, ytr, a.epochs, 3e-3)
    print(f"1. float training: top-1 {accuracy(model, xte, yte):.2f}%")

    # 2. wrap: Conv2d/Linear -> approximate layers, BatchNorm2d -> one BN per OP; 3 OPs over 3 circuits
    circuits = ["mul8u_1JFF", "mul8u_KEM", "mul8u_2AC"]            # exact, mild, aggressive
    qnet = wrap_model(model, circuits, num_ops=3, input_shape=(1, 16, 16))
    n = len(qnet.approx_layers())
    # OP0 exact everywhere; OP1 mild everywhere; OP2 aggressive on all but the first and last layer
    qnet.set_assignment([[0] * n, [1] * n, [0] + [2] * (n - 2) + [0]])
    print(f"2. wrapped: {n} approximate layers, {qnet.num_ops} OPs, circuits {circuits}")

    # 3. short QAT (8-bit fake quantization, exact products), then freeze the observers
    qnet.set_mode("quant")
    train(qnet, xtr, ytr, 1, 1e-3)
    qnet.freeze_observers(True)
    print(f"3. QAT: top-1 {accuracy(qnet, xte, yte):.2f}% (exact 8-bit products)")

    # 4. approximate evaluation: bit-exact emulation of each OP's circuits; switching is one call
    qnet.set_mode("approx")
    for op in range(qnet.num_ops):
        qnet.set_operating_point(op)
        used = sorted({circuits[i] for i in qnet.assignment()[op]})
        print(f"4. set_operating_point({op}): top-1 {accuracy(qnet, xte, yte):.2f}% with {', '.join(used)}")
    print("next: save it with qos_compile.qosmodel.save_qos_model('model.pt', qnet) and "
          "`qos-compile model.pt --target x86_64 -o out`, or let `qos-nets pipeline` search the circuits.")


if __name__ == "__main__":
    main()
