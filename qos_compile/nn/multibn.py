"""Per-operating-point BatchNorm: one registered BatchNorm2d per OP."""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

from ..errors import QosError


def op_index(op: object, num_ops: int) -> int:
    """``op`` as an operating-point index in 0..num_ops-1 (any integer type, not bool), else QosError."""
    try:
        if isinstance(op, bool):
            raise TypeError
        i = operator.index(op)  # type: ignore[arg-type]
    except TypeError:
        raise QosError(f"operating point must be an integer, got {op!r}") from None
    if not 0 <= i < num_ops:
        raise QosError(f"operating point {i} out of range 0..{num_ops - 1}")
    return i


class MultiBatchNorm2d(nn.Module):
    """``num_ops`` BatchNorm2d copies in ``bns`` (an nn.ModuleList, so the optimizer,
    ``.to()`` and ``state_dict`` see every OP's γ, β and running statistics); forward
    uses the active OP's copy (``op``)."""

    def __init__(self, num_features: int, num_ops: int = 1, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if int(num_ops) < 1:
            raise QosError(f"num_ops must be >= 1, got {num_ops}")
        self.num_features = num_features
        self.bns = nn.ModuleList([nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats,
                                                 device=device, dtype=dtype) for _ in range(int(num_ops))])
        self.op = 0

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, num_ops: int) -> "MultiBatchNorm2d":
        """Every OP starts as a copy of ``bn`` (parameters, running statistics, requires_grad)."""
        ref = bn.weight if bn.weight is not None else bn.running_mean
        new = cls(bn.num_features, num_ops, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        state = bn.state_dict()
        for copy in new.bns:
            copy.load_state_dict(state)
            for name, p in copy.named_parameters():
                p.requires_grad_(getattr(bn, name).requires_grad)
        new.train(bn.training)
        return new

    @property
    def num_ops(self) -> int:
        """Number of operating points."""
        return len(self.bns)

    def set_operating_point(self, op: int) -> None:
        """Select the BatchNorm copy of OP ``op``."""
        self.op = op_index(op, self.num_ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The active OP's BatchNorm2d applied to ``x``."""
        return self.bns[self.op](x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_ops={self.num_ops}, op={self.op}"
