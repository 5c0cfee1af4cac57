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

Where the layer's output goes straight on to another approximate layer (``fold.requant_target``:
through at most its folded BatchNorm, one ReLU/ReLU6/Hardtanh and pass-through modules), the
epilogue is integer-only instead (numerics contract v2, ``layer_requant``): the next layer's
codes are ``reference.requantize(q, M, B, n, z, lo, hi)``, with ``(M, B, n)`` from
``reference.requant_params`` of ``m = scale / s_next`` and ``b = shift / s_next`` in float64
and the activation as the clamp bounds ``[lo, hi]``.

The exporter and the emulation both read these functions, so the PyTorch accuracy of an OP
is the device's bit for bit (except where a network uses sigmoid/tanh/SiLU: every runtime
has its own ``exp``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .. import reference
from ..errors import QosError
from .quant import quantize


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


def layer_affine64(s_x: torch.Tensor | float, s_w: torch.Tensor, bias: torch.Tensor | None, out_channels: int,
                   bn: _BatchNorm | None = None, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), float64 CPU vectors of ``out_channels``: dequantization ``s_x * s_w``, the
    layer's bias row of this OP and (if folded) this OP's BatchNorm."""
    deq = float(s_x) * torch.as_tensor(s_w).detach().double().cpu().reshape(-1).expand(out_channels)
    scale = deq.clone()
    shift = bias.detach().double().cpu().reshape(-1).clone() if bias is not None else torch.zeros(
        out_channels, dtype=torch.float64)
    if bn is not None:
        a, b = bn_affine(bn, where)
        scale, shift = scale * a, shift * a + b
    return scale, shift


def layer_affine(s_x: torch.Tensor | float, s_w: torch.Tensor, bias: torch.Tensor | None, out_channels: int,
                 bn: _BatchNorm | None = None, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """``layer_affine64`` rounded once to float32: the float epilogue's (scale, shift)."""
    scale, shift = layer_affine64(s_x, s_w, bias, out_channels, bn, where)
    return scale.float(), shift.float()


def accumulator_bound(layer: Any) -> int:
    """A bound on ``|q|``, the zero-point-corrected accumulator of approximate ``layer`` at any OP:
    ``max|lut| * K + 255 * max_o sum|w| + 255 * 255 * K`` over the circuits it is assigned
    (``K`` products per output). The exporter refuses a layer whose bound passes int32."""
    w_codes, _, _ = layer.weight_codes()
    w = w_codes.detach().cpu().to(torch.int64).reshape(w_codes.shape[0], -1)
    terms = int(w.shape[1])
    used = sorted({int(a) for a in layer.assign.detach().cpu().tolist()})
    lut_max = int(layer.bank.luts.detach().cpu()[used].to(torch.int64).abs().max())
    return lut_max * terms + 255 * int(w.abs().sum(1).max()) + 255 * 255 * terms


@dataclass(frozen=True)
class Requant:
    """A layer's integer epilogue at one OP (``reference.requantize``): per-channel int64 ``M``,
    ``B``, ``n``; the next layer's zero point and the clamp bounds, all in its codes."""

    M: np.ndarray
    B: np.ndarray
    n: np.ndarray
    zero_point: int
    lo: int
    hi: int


def layer_requant(layer: Any, consumer: Any, clamp: tuple[float | None, float | None], bias: torch.Tensor | None,
                  bn: _BatchNorm | None, where: str) -> Requant:
    """The integer epilogue of ``layer`` feeding ``consumer``'s input codes at the current weights
    and observers: this OP's bias row and folded BatchNorm (``bn``), ``clamp`` the activation's
    float bounds in between (``fold.requant_target``). QosError when it cannot be represented."""
    s_x, _ = layer.act_qparams()
    s_w, _ = layer.weight_qparams()
    scale, shift = layer_affine64(s_x, s_w, bias, layer.weight.shape[0], bn, where)
    s_c, z_c = consumer.act_qparams()
    s_next = float(s_c)
    M, B, n = reference.requant_params((scale / s_next).numpy(), (shift / s_next).numpy(),
                                       accumulator_bound(layer), where)
    lo, hi = _clamp_codes(consumer, clamp, where)
    return Requant(M, B, n, int(z_c), lo, hi)


def _clamp_codes(consumer: Any, clamp: tuple[float | None, float | None], where: str) -> tuple[int, int]:
    """The activation's float bounds as ``consumer``'s codes, quantized with its own formula."""
    s_c, z_c = consumer.act_qparams()
    qc = consumer.qconfig

    def code(v: float) -> int:
        return int(quantize(torch.tensor(float(v), dtype=torch.float32), s_c, z_c, qc))

    lo = qc.qmin if clamp[0] is None else max(qc.qmin, code(clamp[0]))
    hi = qc.qmax if clamp[1] is None else min(qc.qmax, code(clamp[1]))
    if lo > hi:
        raise QosError(f"{where}: the activation's range [{clamp[0]}, {clamp[1]}] leaves no code of the next layer")
    return lo, hi


@dataclass(frozen=True)
class RequantAdd:
    """A residual add's integer rescale at one OP (``reference.requantize_add``): the layer's part
    ``rq`` (its ``M``, ``B``, ``n``, the consumer's zero point and clamp), the skip's per-channel
    multiplier ``Ms`` and the skip codes' scale ``s_skip`` (float32), from which ``d`` is read."""

    rq: Requant
    Ms: np.ndarray
    s_skip: float


def layer_requant_add(layer: Any, consumer: Any, clamp: tuple[float | None, float | None], skip_of: Any,
                      bias: torch.Tensor | None, bn: _BatchNorm | None, where: str) -> RequantAdd:
    """The integer residual add after conv ``layer`` (this OP's bias and folded BatchNorm ``bn``)
    with a skip connection holding ``skip_of``'s input codes, into ``consumer``'s codes through
    the activation ``clamp`` (``fold.ResidualLink``). QosError when it cannot be represented."""
    s_x, _ = layer.act_qparams()
    s_w, _ = layer.weight_qparams()
    scale, shift = layer_affine64(s_x, s_w, bias, layer.weight.shape[0], bn, where)
    s_next = float(consumer.act_qparams()[0])
    s_skip = float(skip_of.act_qparams()[0])
    M, Ms, B, n = reference.requant_add_params((scale / s_next).numpy(), (shift / s_next).numpy(), s_skip / s_next,
                                               accumulator_bound(layer), 255, where)
    lo, hi = _clamp_codes(consumer, clamp, where)
    return RequantAdd(Requant(M, B, n, int(consumer.act_qparams()[1]), lo, hi), Ms, s_skip)


def skip_codes_torch(skip: torch.Tensor, s_skip: float) -> torch.Tensor:
    """The centred codes ``d`` (int64) of a skip connection's dequantized values ``float32(d) * s``:
    within 2**-22 of integers for |d| <= 255, so rounding recovers them exactly."""
    return torch.round(skip.double() / s_skip).to(torch.int64)


def requantize_add_torch(q: torch.Tensor, d: torch.Tensor, ra: RequantAdd) -> torch.Tensor:
    """``reference.requantize_add`` in torch (int64 codes, channels on axis 1) for exact integer
    ``q`` of any dtype and int64 ``d``."""
    rq = ra.rq
    shape = (1, -1) + (1,) * (max(q.ndim, d.ndim) - 2)
    dev = q.device
    M, Ms, B, n = (torch.from_numpy(v).to(dev).view(shape) for v in (rq.M, ra.Ms, rq.B, rq.n))
    t = (q.to(torch.int64) * M + d.to(dev) * Ms + B) >> n
    return torch.clamp(t + rq.zero_point, rq.lo, rq.hi)


def requantize_torch(q: torch.Tensor, rq: Requant) -> torch.Tensor:
    """``reference.requantize`` in torch (int64 codes, channels on axis 1) for exact integer ``q``
    of any dtype (the emulation's float64 accumulators)."""
    shape = (1, -1) + (1,) * (q.ndim - 2)
    dev = q.device
    M, B, n = (torch.from_numpy(v).to(dev).view(shape) for v in (rq.M, rq.B, rq.n))
    t = (q.to(torch.int64) * M + B) >> n             # arithmetic shift on int64: floor division by 2**n
    return torch.clamp(t + rq.zero_point, rq.lo, rq.hi)


def mean_codes_torch(x: torch.Tensor, s: torch.Tensor, z: int, keepdim: bool = True) -> torch.Tensor:
    """``reference.mean_codes`` of the dequantized codes ``x = float32(code - z) * s`` [N, C, H, W]
    (rounding recovers the codes exactly), passed on dequantized ([N, C, 1, 1], or [N, C]
    without ``keepdim``) as the integer epilogues pass their codes on."""
    codes = torch.round(x.double() / float(s)).to(torch.int64) + int(z)
    count = int(x.shape[2] * x.shape[3])
    mean = torch.div(codes.sum(dim=(2, 3), keepdim=keepdim) + count // 2, count, rounding_mode="floor")
    return ((mean - int(z)).to(torch.float32) * s.to(x.device)).contiguous()


@dataclass(frozen=True)
class OutputAffine:
    """One OP's integer output epilogue of a network output layer (``reference.output_params``)."""

    B: np.ndarray                 # int32 per channel, added to the accumulator
    s: np.ndarray                 # float32 per channel, the one multiply


def layer_outputs(layer: Any, bn: Any, where: str) -> list[OutputAffine] | None:
    """``reference.output_params`` of an output layer at every OP (its per-OP bias and, if folded,
    BatchNorm ``bn``), or None if some OP's cannot be represented: then the layer keeps the float
    epilogue at every OP (export and emulation decide alike)."""
    s_x, _ = layer.act_qparams()
    s_w, _ = layer.weight_qparams()
    out_ch = int(layer.weight.shape[0])
    bound = accumulator_bound(layer)
    outs = []
    for op in range(int(layer.num_ops)):
        bias = layer.bias_per_op[op] if layer.bias_per_op is not None else None
        scale, shift = layer_affine64(s_x, s_w, bias, out_ch, None if bn is None else bn.bns[op], where)
        r = reference.output_params(scale.numpy(), shift.numpy(), bound)
        if r is None:
            return None
        outs.append(OutputAffine(*r))
    return outs


def output_torch(q: torch.Tensor, oa: OutputAffine) -> torch.Tensor:
    """``reference.output_values`` in torch for exact integer ``q`` of any dtype (channels on axis 1)."""
    shape = (1, -1) + (1,) * (q.ndim - 2)
    dev = q.device
    t = q.to(torch.int64) + torch.from_numpy(oa.B.astype(np.int64)).to(dev).view(shape)
    return (t.to(torch.float32) * torch.from_numpy(oa.s).to(dev).view(shape)).contiguous()
