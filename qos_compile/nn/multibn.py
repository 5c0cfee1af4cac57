"""Per-operating-point BatchNorm: one registered BatchNorm1d/BatchNorm2d copy per OP."""
from __future__ import annotations

import operator
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import QosError
from .affine import bn_affine32


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


class MultiBatchNorm(nn.Module):
    """``num_ops`` copies of one BatchNorm class in ``bns`` (an nn.ModuleList, so the optimizer,
    ``.to()`` and ``state_dict`` see every OP's γ, β and running statistics, as ``bns.<op>.*``);
    forward uses the active OP's copy (``op``). Subclasses name the class in ``bn_class``."""

    #: the BatchNorm class every OP gets a copy of (set by the subclass)
    bn_class: ClassVar[type[_BatchNorm]]

    def __init__(self, num_features: int, num_ops: int = 1, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if getattr(type(self), "bn_class", None) is None:
            raise QosError("MultiBatchNorm is abstract: use MultiBatchNorm1d or MultiBatchNorm2d")
        if int(num_ops) < 1:
            raise QosError(f"num_ops must be >= 1, got {num_ops}")
        self.num_features = num_features
        self.bns = nn.ModuleList([self.bn_class(num_features, eps, momentum, affine, track_running_stats,
                                                device=device, dtype=dtype) for _ in range(int(num_ops))])
        self.op = 0

    @classmethod
    def from_bn(cls, bn: _BatchNorm, num_ops: int) -> "MultiBatchNorm":
        """Every OP starts as a copy of ``bn`` (parameters, running statistics, requires_grad)."""
        if not isinstance(bn, cls.bn_class):
            raise QosError(f"{cls.__name__}.from_bn needs an nn.{cls.bn_class.__name__}, got {type(bn).__name__}")
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
        """The active OP's BatchNorm applied to ``x``; in inference under an APPROX ``QoSNet`` the
        device's float32 affine (``nn.affine``), or nothing when the layer before folded it in."""
        if self.__dict__.get("_deploy"):
            if self.__dict__.pop("_folded_output", None) is x:
                return x
            a, b = bn_affine32(self.bns[self.op], type(self).__name__)
            shape = (1, -1) + (1,) * (x.ndim - 2)
            return x * a.to(x.device).view(shape) + b.to(x.device).view(shape)
        return self.bns[self.op](x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_ops={self.num_ops}, op={self.op}"


class MultiBatchNorm2d(MultiBatchNorm):
    """Per-OP ``nn.BatchNorm2d`` (inputs ``[N, C, H, W]``)."""

    bn_class = nn.BatchNorm2d


class MultiBatchNorm1d(MultiBatchNorm):
    """Per-OP ``nn.BatchNorm1d`` (inputs ``[N, C]`` or ``[N, C, L]``)."""

    bn_class = nn.BatchNorm1d


def multi_batchnorm(bn: _BatchNorm, num_ops: int) -> MultiBatchNorm:
    """The per-OP replacement of ``bn`` (an ``nn.BatchNorm1d`` or ``nn.BatchNorm2d``)."""
    for cls in (MultiBatchNorm2d, MultiBatchNorm1d):
        if isinstance(bn, cls.bn_class):
            return cls.from_bn(bn, num_ops)
    raise QosError(f"no per-OP BatchNorm for {type(bn).__name__} (BatchNorm1d and BatchNorm2d are supported)")
