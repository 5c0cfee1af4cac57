"""8-bit affine quantization: modes, configuration, observers' arithmetic and fake quantization.

Codes are ``clamp(round(x * (1/s)) + z, qmin, qmax)`` with round-half-to-even in float32,
the exact formula of torch's fused fake-quantization kernels, so QUANT mode (fused
kernels, straight-through gradients) and APPROX mode (integer codes) see the same codes.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from ..errors import QosError
from ..numerics import code_offset, code_range

_EPS = float(torch.finfo(torch.float32).eps)


class Mode(str, enum.Enum):
    """How approximate layers compute.

    FLOAT: plain float layer. QUANT: 8-bit fake quantization, exact integer product.
    APPROX: the layer's assigned multiplier table for the current operating point
    (straight-through gradient of QUANT). NOISE: QUANT plus, in training mode only,
    additive Gaussian noise ``eps * std(y) * sigma`` (eval: same as QUANT).
    """

    FLOAT = "float"
    QUANT = "quant"
    APPROX = "approx"
    NOISE = "noise"


def as_mode(mode: Mode | str) -> Mode:
    """``mode`` as a Mode; QosError on an unknown name."""
    try:
        return Mode(mode)
    except ValueError:
        raise QosError(f"unknown mode {mode!r}; use one of {', '.join(m.value for m in Mode)}") from None


@dataclass(frozen=True)
class QuantConfig:
    """8-bit quantization settings of approximate layers.

    ``signed``: codes -128..127 (signed circuits) instead of 0..255; ``per_channel``: one
    weight scale/zero point per output channel instead of one per tensor; ``act_momentum``:
    averaging constant of the activation range observer (moving-average min-max).
    """

    signed: bool = False
    per_channel: bool = False
    act_momentum: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 < self.act_momentum <= 1.0:
            raise QosError(f"act_momentum must be in (0, 1], got {self.act_momentum}")

    @property
    def qmin(self) -> int:
        """Smallest code."""
        return code_range(self.signed)[0]

    @property
    def qmax(self) -> int:
        """Largest code."""
        return code_range(self.signed)[1]

    @property
    def offset(self) -> int:
        """Table index of code 0 (128 for signed codes)."""
        return code_offset(self.signed)


def qparams(lo: torch.Tensor, hi: torch.Tensor, qcfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine (scale float32, zero point int64) for a range, widened to include 0.

    Including 0 makes real zero exactly representable (it is the zero-point code), which
    padding and ReLU outputs rely on.
    """
    lo = torch.clamp(lo.detach().float(), max=0.0)
    hi = torch.clamp(hi.detach().float(), min=0.0)
    scale = torch.clamp((hi - lo) / float(qcfg.qmax - qcfg.qmin), min=_EPS)
    zero = torch.clamp(qcfg.qmin - torch.round(lo / scale), qcfg.qmin, qcfg.qmax).to(torch.int64)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qcfg: QuantConfig,
             axis: int | None = None) -> torch.Tensor:
    """Integer codes of ``x`` as a float tensor (no gradient); ``axis``: per-channel axis."""
    inv = 1.0 / scale
    z = zero.to(torch.float32)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        inv, z = inv.view(shape), z.view(shape)
    return torch.clamp(torch.round(x.detach() * inv) + z, qcfg.qmin, qcfg.qmax)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qcfg: QuantConfig,
               axis: int | None = None) -> torch.Tensor:
    """``(codes - z) * s`` with a straight-through gradient (zero outside the clamping range)."""
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), zero.reshape(1).to(torch.int32),
                                                     qcfg.qmin, qcfg.qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero.to(torch.int32), axis, qcfg.qmin, qcfg.qmax)


def code_dtype(qcfg: QuantConfig) -> torch.dtype:
    """Natural integer dtype of the codes (int8 signed, uint8 unsigned)."""
    return torch.int8 if qcfg.signed else torch.uint8
