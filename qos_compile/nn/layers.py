"""Approximate conv/linear layers: quantization, approximate products, AGN noise, per-OP biases.

Observers (documented choice): in training mode they update on every forward in every
mode, FLOAT included, so that a QAT schedule can run float epochs while the ranges
settle; in eval mode they never change, except that a layer which has never observed
anything takes its first input's range (so a freshly wrapped model can be evaluated).
``freeze_observers()`` stops all updates. Activation ranges are moving-average min-max
(``act_momentum``), weight ranges min-max of the current weights (per tensor or per
output channel); both ranges always include 0.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QosError
from . import kernels
from .emulation import EmulationPlan, forced_strategy
from .functional import (ConvGeometry, PreparedWeights, conv_geometry, conv_prepared, linear_geometry,
                         prepare_weights)
from .affine import (layer_affine, layer_outputs, layer_requant, layer_requant_add, output_torch, requantize_add_torch,
                     requantize_torch, skip_codes_torch)
from .multibn import op_index
from .quant import Mode, QuantConfig, as_mode, code_dtype, fake_quant, qparams, quantize

if TYPE_CHECKING:
    from .bank import MultiplierBank


class _ApproxMixin:
    """State and numerics shared by ApproxConv2d and ApproxLinear (mixed into nn.Module)."""

    weight: nn.Parameter
    bias_per_op: nn.Parameter | None
    sigma: nn.Parameter
    assign: torch.Tensor
    act_range: torch.Tensor
    act_observed: torch.Tensor
    weight_min: torch.Tensor
    weight_max: torch.Tensor
    weight_observed: torch.Tensor
    observers_frozen: torch.Tensor
    training: bool

    def _setup(self, qconfig: QuantConfig | None, num_ops: int, out_features: int, sigma_init: float) -> None:
        if int(num_ops) < 1:
            raise QosError(f"num_ops must be >= 1, got {num_ops}")
        mod: nn.Module = self  # type: ignore[assignment]
        dev = self.weight.device
        self.qconfig = qconfig or QuantConfig()
        self.num_ops = int(num_ops)
        self.mode = Mode.FLOAT
        self.op = 0
        self.input_shape: tuple[int, ...] | None = None
        self.__dict__["_bank"] = None  # not a submodule: the QoSNet owns the bank
        mod.register_buffer("assign", torch.zeros(self.num_ops, dtype=torch.int64, device=dev))
        mod.register_buffer("act_range", torch.zeros(2, device=dev))
        mod.register_buffer("act_observed", torch.tensor(False, device=dev))
        wshape = (out_features,) if self.qconfig.per_channel else ()
        mod.register_buffer("weight_min", torch.zeros(wshape, device=dev))
        mod.register_buffer("weight_max", torch.zeros(wshape, device=dev))
        mod.register_buffer("weight_observed", torch.tensor(False, device=dev))
        mod.register_buffer("observers_frozen", torch.tensor(False, device=dev))
        self.sigma = nn.Parameter(torch.tensor(float(sigma_init), device=dev))
        bias = mod._parameters.get("bias")
        if bias is not None:
            rows = bias.detach().clone().unsqueeze(0).repeat(self.num_ops, 1)
            self.bias_per_op = nn.Parameter(rows, requires_grad=bias.requires_grad)
        else:
            mod.register_parameter("bias_per_op", None)
        # the active OP's row of bias_per_op replaces it; None avoids counting a bias twice
        mod.register_parameter("bias", None)

    # --- configuration -------------------------------------------------------------------
    @property
    def bank(self) -> "MultiplierBank | None":
        """The MultiplierBank that ``assign`` indexes (set by QoSNet or ``attach_bank``)."""
        return self.__dict__.get("_bank")

    def attach_bank(self, bank: "MultiplierBank") -> None:
        """Use ``bank`` for APPROX mode (its signedness must match the quantization)."""
        if bank.signed != self.qconfig.signed:
            raise QosError("the bank's signedness differs from the layer's quantization (QuantConfig.signed)")
        self.__dict__["_bank"] = bank

    def set_mode(self, mode: Mode | str) -> None:
        """Switch numerics (FLOAT, QUANT, APPROX, NOISE)."""
        self.mode = as_mode(mode)

    def set_operating_point(self, op: int) -> None:
        """Select which OP's multiplier and bias row the layer uses."""
        self.op = op_index(op, self.num_ops)

    def freeze_observers(self, frozen: bool = True) -> None:
        """Stop (or resume) observer updates."""
        self.observers_frozen.fill_(bool(frozen))

    def _copy_parameters(self, layer: nn.Module) -> None:
        """Take ``layer``'s weight, its bias for every OP, requires_grad flags and training mode."""
        with torch.no_grad():
            self.weight.copy_(layer.weight)
            if layer.bias is not None:
                self.bias_per_op.copy_(layer.bias.detach().unsqueeze(0).expand_as(self.bias_per_op))
                self.bias_per_op.requires_grad_(layer.bias.requires_grad)
        self.weight.requires_grad_(layer.weight.requires_grad)
        self.train(layer.training)

    def current_bias(self) -> torch.Tensor | None:
        """The active OP's bias row (None for a layer without bias)."""
        return None if self.bias_per_op is None else self.bias_per_op[self.op]

    # --- observers and quantization parameters -------------------------------------------
    def _weight_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight.detach()
        if self.qconfig.per_channel:
            return torch.aminmax(w.flatten(1), dim=1)
        return torch.aminmax(w)

    def _observe(self, x: torch.Tensor) -> None:
        """Update (training) or initialise (first use) the observers; see the module doc."""
        update = self.training and not bool(self.observers_frozen)
        if update or not bool(self.act_observed):
            lo, hi = torch.aminmax(x.detach().float())
            new = torch.stack([lo, hi])
            if bool(self.act_observed):
                self.act_range.add_(self.qconfig.act_momentum * (new - self.act_range))
            else:
                self.act_range.copy_(new)
                self.act_observed.fill_(True)
        if update or not bool(self.weight_observed):
            lo, hi = self._weight_range()
            # write only on change: unchanged (e.g. frozen) weights keep the cached weight codes valid
            same = torch.equal(lo, self.weight_min) and torch.equal(hi, self.weight_max)
            if not (bool(self.weight_observed) and same):
                self.weight_min.copy_(lo)
                self.weight_max.copy_(hi)
                self.weight_observed.fill_(True)

    def act_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Activation (scale, zero point): float32 and int64 scalars."""
        if not bool(self.act_observed):
            raise QosError("activation range not observed yet: run a forward pass first")
        return qparams(self.act_range[0], self.act_range[1], self.qconfig)

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight (scale, zero point): shape () per tensor or (out,) per channel."""
        if not bool(self.weight_observed):
            lo, hi = self._weight_range()
            return qparams(lo, hi, self.qconfig)
        return qparams(self.weight_min, self.weight_max, self.qconfig)

    def _axis(self) -> int | None:
        return 0 if self.qconfig.per_channel else None

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer activation codes of ``x`` (uint8, or int8 for signed), scale, zero point."""
        s, z = self.act_qparams()
        return quantize(x, s, z, self.qconfig).to(code_dtype(self.qconfig)), s, z

    def weight_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer weight codes (weight's shape, uint8/int8), scale, zero point."""
        s, z = self.weight_qparams()
        return quantize(self.weight, s, z, self.qconfig, self._axis()).to(code_dtype(self.qconfig)), s, z

    # --- forward ---------------------------------------------------------------------------
    def _float_product(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _approx_product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _input_indices(self, x: torch.Tensor, s: torch.Tensor,
                       z: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """Activation table indices (uint8) and their range, by the C kernel when possible."""
        qc = self.qconfig
        if x.device.type == "cpu" and x.dtype == torch.float32:
            # the float32 reciprocal, exactly as torch's fake quantization uses it
            found = kernels.quantize_indices(x.detach(), float((1.0 / s).item()), int(z), qc.qmin, qc.qmax,
                                             qc.offset)
            if found is not None:
                return found[0], (found[1], found[2])
        return (quantize(x, s, z, qc) + qc.offset).to(torch.uint8), None

    def _prepared_weights(self, plan: EmulationPlan, pad_idx: int, s_w: torch.Tensor,
                          z_w: torch.Tensor) -> PreparedWeights:
        """Weight codes and their derived operands, cached until the weights, their observer,
        the circuit or the pad code change (in-place updates bump the tensors' versions)."""
        w = self.weight
        key = (w.data_ptr(), w._version, self.weight_min._version, self.weight_max._version,
               self.weight_observed._version, plan.sha256, plan.signed, pad_idx, forced_strategy())
        cached = self.__dict__.get("_wcache")
        if cached is not None and cached[0] == key:
            return cached[1]
        w4 = w.detach()
        w4 = w4.view(w4.shape[0], -1, 1, 1) if w4.ndim == 2 else w4
        qc = self.qconfig
        w_idx = (quantize(w4, s_w, z_w, qc, self._axis()) + qc.offset).to(torch.uint8)
        prep = prepare_weights(w_idx, plan, pad_idx, z_w.expand(w4.shape[0]))
        self.__dict__["_wcache"] = (key, prep)
        return prep

    def _approx_output(self, x4: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
        """s_x * s_w * (zero-point-corrected approximate accumulator) for 4-D input ``x4``."""
        bank = self.bank
        if bank is None:
            raise QosError("APPROX mode needs a multiplier bank: wrap the model or call attach_bank()")
        index = int(self.assign[self.op])
        if not 0 <= index < len(bank):
            raise QosError(f"assigned multiplier {index} is not in the bank (size {len(bank)})")
        plan = bank.plan(index)
        s_x, z_x = self.act_qparams()
        s_w, z_w = self.weight_qparams()
        x_idx, x_range = self._input_indices(x4, s_x, z_x)
        prep = self._prepared_weights(plan, int(z_x) + self.qconfig.offset, s_w, z_w)
        deploy = self.__dict__.get("_deploy")
        requant = deploy is not None and deploy.requant is not None and (
            not isinstance(self, nn.Linear) or len(self.input_shape or ()) == 1)
        residual = deploy is not None and deploy.residual is not None
        output, bn = None, None
        if deploy is not None and deploy.output and not (requant or residual):
            bn = deploy.bn if not isinstance(self, nn.Linear) or len(self.input_shape or ()) == 1 else None
            outs = layer_outputs(self, bn, f"net.{deploy.bn_name or deploy.name}")
            output = None if outs is None else outs[self.op]
        q = conv_prepared(x_idx, prep, geo, exact=requant or residual or output is not None,
                          x_range=x_range)      # exact: float64 integers
        if output is not None:          # the network's output: float32(q + B) * s (nn.affine)
            deploy.folded = bn is not None
            return output_torch(q, output)
        if requant:
            return self._requantized_output(q, deploy)
        if residual:                    # the residual add rescales it (residual_output)
            deploy.folded = deploy.bn is not None
            return q
        if deploy is not None:
            return self._deployed_output(q, s_x, s_w, deploy)
        scale = s_x * s_w
        # some strategies leave a permuted memory layout; a user's forward may .view() the output
        return (q * (scale.view(1, -1, 1, 1) if scale.ndim else scale)).contiguous()

    def _deployed_output(self, q: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor, deploy: Any) -> torch.Tensor:
        """Inference under ``QoSNet``: the device's epilogue ``float32(q) * scale + shift``
        (``nn.affine``), this OP's bias and, where the exporter folds one in (``deploy.bn``), this
        OP's BatchNorm; a BatchNorm1d after a linear layer folds only on a 2-D ``[N, O]`` output."""
        bn = deploy.bn
        if isinstance(self, nn.Linear) and len(self.input_shape or ()) != 1:
            bn = None
        scale, shift = layer_affine(s_x, s_w, self.current_bias(), q.shape[1],
                                    None if bn is None else bn.bns[bn.op], f"net.{deploy.bn_name}")
        deploy.folded = bn is not None
        shape = (1, -1, 1, 1)
        return (q * scale.to(q.device).view(shape) + shift.to(q.device).view(shape)).contiguous()

    def _requantized_output(self, q: torch.Tensor, deploy: Any) -> torch.Tensor:
        """Inference under ``QoSNet`` where this layer feeds ``deploy.requant``'s layer directly:
        the integer epilogue (``nn.affine.layer_requant``) gives that layer's input codes, passed
        on dequantized, ``float32(code - z) * s``, which its own quantization maps back to exactly
        these codes (and which the activation in between leaves unchanged: the codes are clamped
        to its range)."""
        consumer, clamp = deploy.requant
        bn = deploy.bn
        rq = layer_requant(self, consumer, clamp, self.current_bias(), None if bn is None else bn.bns[bn.op],
                           f"layer net.{deploy.name}")
        deploy.folded = bn is not None
        codes = requantize_torch(q, rq)
        s_c, _ = consumer.act_qparams()
        return ((codes - rq.zero_point).to(torch.float32) * s_c.to(q.device)).contiguous()

    def residual_output(self, q: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Inference under ``QoSNet`` where this conv's output meets a skip connection
        (``fold.ResidualLink``): the integer rescale of both (``nn.affine.layer_requant_add``) from
        this layer's exact accumulator ``q`` and the skip's dequantized codes gives the next
        layer's input codes, passed on dequantized as ``_requantized_output`` does."""
        deploy = self.__dict__["_deploy"]
        consumer, clamp, skip_of = deploy.residual
        bn = deploy.bn
        ra = layer_requant_add(self, consumer, clamp, skip_of, self.current_bias(),
                               None if bn is None else bn.bns[bn.op], f"layer net.{deploy.name}")
        codes = requantize_add_torch(q, skip_codes_torch(skip, ra.s_skip), ra)
        s_c, _ = consumer.act_qparams()
        return ((codes - ra.rq.zero_point).to(torch.float32) * s_c.to(q.device)).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer in its current mode at its current operating point (see Mode)."""
        self.input_shape = tuple(x.shape[1:])
        mode = self.mode
        if mode == Mode.FLOAT:
            if self.training and not bool(self.observers_frozen):
                self._observe(x)
            return self._float_product(x, self.weight, self.current_bias())
        self._observe(x)
        bias = self.current_bias()
        if mode == Mode.APPROX and self.__dict__.get("_deploy") is not None:
            deploy = self.__dict__["_deploy"]
            y = self._approx_product(x)           # epilogue, bias and folded BatchNorm included
            if deploy.folded:
                deploy.bn.__dict__["_folded_output"] = y   # the BatchNorm passes exactly this tensor on
            return y
        if mode == Mode.APPROX:
            y = self._approx_product(x)
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                # straight-through: the value is approximate, the gradient QUANT's
                yq = self._quant_product(x, None)
                y = yq + (y - yq).detach()
            return y if bias is None else y + bias.view(self._bias_shape())
        y = self._quant_product(x, bias)
        if mode == Mode.NOISE and self.training:
            y = y + torch.randn_like(y) * y.std() * self.sigma
        return y

    def _quant_product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer on fake-quantized input and weights (exact integer product, STE gradients)."""
        qc = self.qconfig
        s_x, z_x = self.act_qparams()
        s_w, z_w = self.weight_qparams()
        xq = fake_quant(x, s_x, z_x, qc)
        wq = fake_quant(self.weight, s_w, z_w, qc, self._axis())
        return self._float_product(xq, wq, bias)

    def _bias_shape(self) -> tuple[int, ...]:
        raise NotImplementedError


class ApproxConv2d(_ApproxMixin, nn.Conv2d):
    """nn.Conv2d that can run quantized, through an approximate multiplier, or with AGN.

    Extra state: ``assign`` (num_ops,) bank indices per OP, observer buffers, ``sigma``
    (AGN scale, learnable), ``bias_per_op`` (num_ops, out) when the conv has a bias
    (``bias`` itself stays None). ``mode`` and ``op`` select the numerics and the OP.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: Any = None, dtype: Any = None, *,
                 qconfig: QuantConfig | None = None, num_ops: int = 1, sigma_init: float = 0.01) -> None:
        if padding_mode != "zeros":
            raise QosError(f"approximate convolutions support padding_mode='zeros' only, got {padding_mode!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._setup(qconfig, num_ops, out_channels, sigma_init)

    @classmethod
    def from_float(cls, layer: nn.Conv2d, qconfig: QuantConfig | None = None, num_ops: int = 1,
                   sigma_init: float = 0.01) -> "ApproxConv2d":
        """An ApproxConv2d with ``layer``'s hyper-parameters, weights and (every OP's) bias."""
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                  layer.weight.device, layer.weight.dtype, qconfig=qconfig, num_ops=num_ops, sigma_init=sigma_init)
        new._copy_parameters(layer)
        return new

    def pads(self) -> tuple[int, int, int, int]:
        """Padding as (top, left, bottom, right); string paddings resolved like torch."""
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return 0, 0, 0, 0
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            return total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2
        return self.padding[0], self.padding[1], self.padding[0], self.padding[1]

    def macs(self, input_shape: Sequence[int] | None = None) -> int:
        """Multiply-accumulates per sample for an input (C, H, W) (or (N, C, H, W));
        default: the last input seen. ``kh*kw*H_out*W_out*(C_in/groups)*C_out``."""
        shape = tuple(input_shape) if input_shape is not None else self.input_shape
        if shape is None:
            raise QosError("input shape unknown: run a forward pass or pass input_shape")
        h, w = shape[-2:]
        pt, pl, pb, pr = self.pads()
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
        return kh * kw * ho * wo * (self.in_channels // self.groups) * self.out_channels

    def _float_product(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def _approx_product(self, x: torch.Tensor) -> torch.Tensor:
        geo = conv_geometry(x.shape, self.weight.shape, self.stride, self.pads(), self.dilation, self.groups)
        return self._approx_output(x, geo)

    def _bias_shape(self) -> tuple[int, ...]:
        return (1, -1, 1, 1)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", per_op_bias={self.bias_per_op is not None}, num_ops={self.num_ops}, "
                f"mode={self.mode.value}, op={self.op}")


class ApproxLinear(_ApproxMixin, nn.Linear):
    """nn.Linear counterpart of ApproxConv2d (same extra state and modes); input (*, in)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None,
                 dtype: Any = None, *, qconfig: QuantConfig | None = None, num_ops: int = 1,
                 sigma_init: float = 0.01) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._setup(qconfig, num_ops, out_features, sigma_init)

    @classmethod
    def from_float(cls, layer: nn.Linear, qconfig: QuantConfig | None = None, num_ops: int = 1,
                   sigma_init: float = 0.01) -> "ApproxLinear":
        """An ApproxLinear with ``layer``'s weights and (every OP's) bias."""
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, layer.weight.device,
                  layer.weight.dtype, qconfig=qconfig, num_ops=num_ops, sigma_init=sigma_init)
        new._copy_parameters(layer)
        return new

    def macs(self, input_shape: Sequence[int] | None = None) -> int:
        """Multiply-accumulates per sample: ``in*out`` times any extra leading dims of (*, in)."""
        shape = tuple(input_shape) if input_shape is not None else self.input_shape
        if shape is None:
            raise QosError("input shape unknown: run a forward pass or pass input_shape")
        return math.prod(shape[:-1]) * self.in_features * self.out_features

    def _float_product(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, bias)

    def _approx_product(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = self._approx_output(x2[:, :, None, None], linear_geometry())
        return y.view(*x.shape[:-1], self.out_features)

    def _bias_shape(self) -> tuple[int, ...]:
        return (-1,)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", per_op_bias={self.bias_per_op is not None}, num_ops={self.num_ops}, "
                f"mode={self.mode.value}, op={self.op}")
