"""Average pooling in the device's order, so the emulation's pooled values are the device's.

A float average depends on the order of its additions. The exported graph (and so every
compiled backend) sums a window's taps in the fixed halving order of
``reference.ordered_sum``; PyTorch's own kernels use an order of their choosing. The modules
here compute exactly ``reference.avg_pool2d`` with torch ops (element-wise float32 adds, one
division), bit for bit, and stay differentiable for training. ``wrap_model`` swaps them in
for ``nn.AvgPool2d`` and ``nn.AdaptiveAvgPool2d``; the exporter sees them as those classes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import reference
from ..errors import QosError
from ..numerics import pair

__all__ = ["ordered_avg_pool2d", "OrderedAvgPool2d", "OrderedAdaptiveAvgPool2d", "ordered_pooling"]


def _ordered_sum(terms: list[torch.Tensor]) -> torch.Tensor:
    level = terms
    while len(level) > 1:
        half = (1 << (len(level) - 1).bit_length()) // 2
        level = [level[i] + level[i + half] if i + half < len(level) else level[i] for i in range(half)]
    return level[0]


def ordered_avg_pool2d(x: torch.Tensor, kernel: Any, stride: Any = None, padding: Any = 0, ceil_mode: bool = False,
                       count_include_pad: bool = True) -> torch.Tensor:
    """``reference.avg_pool2d`` in torch (any device; bit-exact with it in float32)."""
    if x.dim() != 4:
        raise QosError(f"average pooling wants (N, C, H, W), got shape {tuple(x.shape)}")
    kh, kw = pair(kernel, "kernel_size")
    sh, sw = pair(stride if stride not in (None, [], ()) else kernel, "stride")
    (ho, wo), (pt, pl, pb, pr), div = reference.pool_geometry(x.shape[2], x.shape[3], kernel, stride, padding,
                                                              ceil_mode, count_include_pad)
    xp = F.pad(x, (pl, pr, pt, pb)) if any((pt, pl, pb, pr)) else x
    taps = [xp[:, :, u:u + sh * (ho - 1) + 1:sh, v:v + sw * (wo - 1) + 1:sw] for u in range(kh) for v in range(kw)]
    if (ho, wo) == (1, 1) and len(taps) > 1:
        # global pooling: the same halving order on one flattened axis (log2(HW) adds, not HW slices)
        flat = xp[:, :, :kh, :kw].reshape(x.shape[0], x.shape[1], kh * kw)
        size = 1 << (kh * kw - 1).bit_length()
        flat = F.pad(flat, (0, size - kh * kw))
        while size > 1:
            size //= 2
            flat = flat[..., :size] + flat[..., size:2 * size]
        total = flat.reshape(x.shape[0], x.shape[1], 1, 1)
    else:
        total = _ordered_sum(taps)
    return total / torch.as_tensor(div, dtype=x.dtype, device=x.device)


def _tracing() -> bool:
    """True under TorchScript tracing / torch.onnx export (the float baselines), which want the
    plain op: shapes are then tensors, and ordering does not matter to a float baseline."""
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


class OrderedAvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` that sums in the device's order (``ordered_avg_pool2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.divisor_override is not None or _tracing():
            return super().forward(x)
        return ordered_avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                  self.count_include_pad)


class OrderedAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` that sums in the device's order where the exporter supports the
    size (global, or an input that is a multiple of the output); PyTorch's own otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _tracing():
            return super().forward(x)
        h, w = x.shape[-2:]
        size = self.output_size
        oh, ow = (size, size) if isinstance(size, int) else tuple(size)
        oh, ow = (h if oh is None else oh), (w if ow is None else ow)
        if x.dim() != 4 or h % oh or w % ow:
            return super().forward(x)
        k = (h // oh, w // ow)
        return ordered_avg_pool2d(x, k, k)


def ordered_pooling(module: nn.Module) -> nn.Module | None:
    """The ordered replacement of an average-pooling module (same settings), or None."""
    if type(module) is nn.AvgPool2d:
        new: nn.Module = OrderedAvgPool2d(module.kernel_size, module.stride, module.padding, module.ceil_mode,
                                          module.count_include_pad, module.divisor_override)
    elif type(module) is nn.AdaptiveAvgPool2d:
        new = OrderedAdaptiveAvgPool2d(module.output_size)
    else:
        return None
    new.train(module.training)
    return new
