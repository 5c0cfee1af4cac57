"""The float epilogue of an approximate layer, exactly as every backend computes it.

After the exact zero-point-corrected int32 accumulator ``q`` of a conv/linear layer comes one
per-channel affine, the same IEEE float32 operations in the PyTorch emulation (inference:
eval mode without gradients), onnxruntime, and the TVM kernels of ``qos-run``:

    y = float32(q) * scale[op] + shift[op]          (one multiply, then one add)

``scale``/``shift`` are computed once in float64 and rounded to float32: ``scale = s_x * s_w
* a`` and ``shift = bias * a + b``, where ``(a, b)`` is the eval affine of the per-OP
BatchNorm folded into the layer (``a = gamma / sqrt(var + eps)``, ``b = beta - mean * a``) or
``(1, 0)``. A BatchNorm folds into the layer when it is the layer's only user, takes the
layer's output as its only argument and normalises its channels (``MultiBatchNorm2d`` after
a conv, ``MultiBatchNorm1d`` after a linear layer's ``[N, O]`` output; ``fold_target``). Any
other BatchNorm is its own affine, ``y = x * float32(a) + float32(b)``.

The exporter and the emulation both read these functions, so the PyTorch accuracy of an OP
is the device's bit for bit (except where a network uses sigmoid/tanh/SiLU: every runtime
has its own ``exp``).
"""
from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import QosError


def bn_affine(bn: _BatchNorm, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), float64 CPU, with ``bn(y) = a*y + b`` per channel (eval statistics)."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise QosError(f"BatchNorm at {where} has no running statistics (track_running_stats=False); "
                       "only eval-mode BatchNorm can be exported")
    mean = bn.running_mean.detach().double().cpu()
    var = bn.running_var.detach().double().cpu()
    gamma = bn.weight.detach().double().cpu() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double().cpu() if bn.bias is not None else torch.zeros_like(mean)
    a = gamma / torch.sqrt(var + float(bn.eps))
    return a, beta - mean * a


def bn_affine32(bn: _BatchNorm, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A standalone BatchNorm's (a, b) as the float32 vectors every backend multiplies and adds."""
    a, b = bn_affine(bn, where)
    return a.float(), b.float()


def layer_affine(s_x: torch.Tensor | float, s_w: torch.Tensor, bias: torch.Tensor | None, out_channels: int,
                 bn: _BatchNorm | None = None, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), float32 CPU vectors of ``out_channels``: dequantization ``s_x * s_w``, the
    layer's bias row of this OP and (if folded) this OP's BatchNorm, combined in float64."""
    deq = float(s_x) * torch.as_tensor(s_w).detach().double().cpu().reshape(-1).expand(out_channels)
    scale = deq.clone()
    shift = bias.detach().double().cpu().reshape(-1).clone() if bias is not None else torch.zeros(
        out_channels, dtype=torch.float64)
    if bn is not None:
        a, b = bn_affine(bn, where)
        scale, shift = scale * a, shift * a + b
    return scale.float(), shift.float()
