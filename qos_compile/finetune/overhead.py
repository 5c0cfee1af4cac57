"""Parameter overhead of per-OP copies (method section "Headline results": 2.75%)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn import ApproxConv2d, ApproxLinear, MultiBatchNorm, QoSNet
from ..search.power import param_overhead

__all__ = ["ParamCounts", "count_params", "overhead_report"]


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of ONE operating point's model: ``total`` (every parameter once, AGN σ's
    excluded), ``bn_affine`` (BatchNorm γ and β) and ``bias`` (conv/linear biases).
    Running statistics are buffers and never counted."""

    total: int
    bn_affine: int
    bias: int


def count_params(model: nn.Module) -> ParamCounts:
    """Counts of a plain model, or of a QoSNet/converted model counting one OP's copy only
    (``bns[0]`` of every MultiBatchNorm, one row of every ``bias_per_op``)."""
    net = model.net if isinstance(model, QoSNet) else model
    skip: set[int] = set()
    for mod in net.modules():
        if isinstance(mod, MultiBatchNorm):
            for extra in list(mod.bns)[1:]:
                skip.update(id(p) for p in extra.parameters())
    total = bn = bias = 0
    for mod in net.modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in skip:
                continue
            if isinstance(mod, (ApproxConv2d, ApproxLinear)):
                if name == "sigma":
                    continue
                if name == "bias_per_op":
                    bias += p.shape[1]
                    total += p.shape[1]
                    continue
            elif isinstance(mod, (nn.Conv2d, nn.Linear, nn.Conv1d)) and name == "bias":
                bias += p.numel()
            elif isinstance(mod, _BatchNorm):
                bn += p.numel()
            total += p.numel()
    return ParamCounts(total, bn, bias)


def overhead_report(model: nn.Module, num_ops: int) -> dict[str, Any]:
    """Extra parameters of ``num_ops`` OPs over one model, both ways:

    * ``bn_affine_pct``: BatchNorm γ/β copies only (the paper's definition; 2.75 % for
      MobileNetV2/TinyImageNet with 3 OPs);
    * ``bn_affine_and_bias_pct``: also the per-OP conv/linear biases this implementation
      keeps (what it really stores per OP).
    """
    c = count_params(model)
    return {
        "num_ops": num_ops,
        "params": asdict(c),
        "bn_affine_pct": param_overhead(c.total, c.bn_affine, 0, num_ops),
        "bn_affine_and_bias_pct": param_overhead(c.total, c.bn_affine, c.bias, num_ops),
        "extra_params_bn_affine": (num_ops - 1) * c.bn_affine,
        "extra_params_bn_affine_and_bias": (num_ops - 1) * (c.bn_affine + c.bias),
    }
