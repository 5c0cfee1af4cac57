"""Operand tracing (method step 4, first half): the integer operands each approximate layer sees.

On a batch of training samples (128 by default) the QoSNet runs in QUANT mode (exact
integer products, eval mode, observers untouched), and a forward pre-hook on every
approximate layer records, with the layer's own quantization parameters:

* im2col receptive-field rows ``X`` of activation codes (fan-in ``K``), padding filled
  with the activation zero-point code (the code of real 0, as the hardware feeds it),
  one set of rows per group for grouped/depthwise convolutions (a row of group g only
  meets group g's weights); a seeded subsample of at most ``max_rows`` rows per group
  is kept (the prediction draws 512 of them);
* the weight codes ``W`` as (G, O/G, K) and the zero points (activation: one code;
  weights: one code, or one per output channel with ``QuantConfig.per_channel``);
* ``s_l``, the population std of the layer's exact integer outputs
  ``(X − z_x)·(W − z_w)ᵀ`` over *all* traced positions and output channels (computed
  by an exact float64 convolution, not from the subsample);
* the input codes of the first ``measure_samples`` samples, so that a Monte-Carlo
  check can run the whole layer with a circuit (``measure_layer_error``).

Codes are kept as int16 (unsigned 0..255 or signed −128..127, never cast through int8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import QosError
from ..multipliers import Multiplier
from ..nn import ApproxConv2d, ApproxLinear, Mode, QoSNet
from ..nn.functional import approx_conv2d_acc, approx_linear_acc

__all__ = ["LayerTrace", "trace_layers", "trace_samples", "measure_layer_error", "exact_accumulators"]


@dataclass
class LayerTrace:
    """Traced operands of one approximate layer (see module doc)."""

    name: str
    kind: str                      # "conv" or "linear"
    macs: int                      # multiply-accumulates per sample
    groups: int
    out_channels: int
    fan_in: int                    # K: (C_in/groups)·kh·kw, or in_features
    rows: np.ndarray               # (G, R, K) int16 activation codes, padding = x_zero_point
    weights: np.ndarray            # (G, O/G, K) int16 weight codes
    x_zero_point: int
    w_zero_point: np.ndarray       # () per tensor or (O,) per channel, int64
    spread: float                  # s_l over all traced outputs
    positions: int                 # traced output positions per output channel (rows per group)
    signed: bool
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    sample_codes: torch.Tensor | None = None   # (N, C, H, W) or (N, K) codes of the first samples
    weight_codes: torch.Tensor | None = None   # weight codes in the layer's own shape
    _exact_acc: torch.Tensor | None = field(default=None, repr=False)

    def all_rows(self) -> np.ndarray:
        """Every kept row of every group, (G·R, K): the prediction's rows (any fan-in row works)."""
        return self.rows.reshape(-1, self.fan_in)

    def all_weights(self) -> np.ndarray:
        """All weight codes as (O, K)."""
        return self.weights.reshape(-1, self.fan_in)

    def group_w_zero_point(self, g: int) -> Any:
        """The weight zero point(s) of group ``g``'s output channels."""
        if self.w_zero_point.ndim == 0:
            return int(self.w_zero_point)
        og = self.out_channels // self.groups
        return self.w_zero_point[g * og:(g + 1) * og]

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts (no arrays)."""
        return {"layer": self.name, "kind": self.kind, "macs": self.macs, "groups": self.groups,
                "fan_in": self.fan_in, "out_channels": self.out_channels, "rows_kept": int(self.rows.shape[1]),
                "positions": self.positions, "x_zero_point": self.x_zero_point,
                "w_zero_point": self.w_zero_point.tolist(), "spread": self.spread}


class _Welford:
    """Chan's pairwise (count, mean, M2) merge, exact enough for huge integer outputs."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, y: torch.Tensor) -> None:
        c = y.numel()
        if c == 0:
            return
        mu = float(y.mean())
        m2c = float(((y - mu) ** 2).sum())
        delta = mu - self.mean
        tot = self.count + c
        self.mean += delta * c / tot
        self.m2 += m2c + delta * delta * self.count * c / tot
        self.count = tot

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0


class _Recorder:
    """Forward pre-hook state of one layer."""

    def __init__(self, name: str, layer: ApproxConv2d | ApproxLinear, n_total: int, max_rows: int,
                 measure_samples: int, gen: torch.Generator) -> None:
        self.name, self.layer = name, layer
        self.n_total, self.max_rows, self.measure_samples, self.gen = n_total, max_rows, measure_samples, gen
        self.rows: list[torch.Tensor] = []
        self.samples: list[torch.Tensor] = []
        self.n_samples_kept = 0
        self.stats = _Welford()
        self.positions = 0
        self.wcodes: torch.Tensor | None = None
        self.zx: int | None = None
        self.zw: torch.Tensor | None = None

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.wcodes is None:
            codes, _, zw = self.layer.weight_codes()
            self.wcodes = codes.detach().cpu()
            self.zw = zw.detach().cpu().to(torch.int64)
        assert self.zw is not None
        return self.wcodes, self.zw

    def __call__(self, module: Any, inputs: tuple[Any, ...]) -> None:
        x = inputs[0]
        codes, _, z = self.layer.quantize_input(x)
        codes = codes.detach().cpu()
        zx = int(z)
        if self.zx is not None and zx != self.zx:
            raise QosError(f"{self.name}: activation zero point changed during tracing (observers not frozen?)")
        self.zx = zx
        wcodes, zw = self._weights()
        n = codes.shape[0]
        if self.n_samples_kept < self.measure_samples:
            take = min(n, self.measure_samples - self.n_samples_kept)
            self.samples.append(codes[:take].clone())
            self.n_samples_kept += take
        if isinstance(self.layer, ApproxConv2d):
            rows, y = self._conv(codes, wcodes, zx, zw, n)
        else:
            rows, y = self._linear(codes, wcodes, zx, zw, n)
        self.stats.add(y)
        self.rows.append(rows)

    def _keep(self, total: int, n: int) -> torch.Tensor:
        """Sorted indices of the rows of this batch to keep (in proportion to its share of all samples)."""
        keep = min(total, max(1, math.ceil(self.max_rows * n / self.n_total)))
        return torch.randperm(total, generator=self.gen)[:keep].sort().values

    def _conv(self, codes: torch.Tensor, wcodes: torch.Tensor, zx: int, zw: torch.Tensor,
              n: int) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layer
        assert isinstance(layer, ApproxConv2d)
        pt, pl, pb, pr = layer.pads()
        xi = codes.to(torch.int16)
        xp = F.pad(xi, (pl, pr, pt, pb), value=zx) if any((pt, pl, pb, pr)) else xi
        c = xp.shape[1]
        g = layer.groups
        (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
        # strided view of every receptive field (no copy), then gather only the kept positions
        view = xp.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]
        ho, wo = view.shape[2], view.shape[3]
        self.positions += n * ho * wo
        idx = self._keep(n * ho * wo, n)
        ni, rem = idx // (ho * wo), idx % (ho * wo)
        patches = view[ni, :, rem // wo, rem % wo]                     # (R, C, kh, kw)
        rows = patches.reshape(-1, g, (c // g) * kh * kw).permute(1, 0, 2).contiguous()  # (G, R, K)
        # exact integer outputs (float64 holds them exactly): centred operands, padding = 0 after centring
        wc = wcodes.to(torch.float64) - (zw.to(torch.float64).view(-1, 1, 1, 1) if zw.ndim else float(zw))
        y = F.conv2d(xp.to(torch.float64) - zx, wc, None, layer.stride, 0, layer.dilation, g)
        return rows, y

    def _linear(self, codes: torch.Tensor, wcodes: torch.Tensor, zx: int, zw: torch.Tensor,
                n: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = wcodes.shape[1]
        rows = codes.reshape(-1, k).to(torch.int16)
        wc = wcodes.to(torch.float64) - (zw.to(torch.float64).view(-1, 1) if zw.ndim else float(zw))
        y = (rows.to(torch.float64) - zx) @ wc.T
        self.positions += rows.shape[0]
        return rows[self._keep(rows.shape[0], n)].unsqueeze(0), y

    def result(self, macs: int, signed: bool) -> LayerTrace:
        if not self.rows:
            raise QosError(f"layer {self.name} was not reached during tracing")
        layer = self.layer
        wcodes, zw = self._weights()
        rows = torch.cat(self.rows, dim=1).numpy()
        g = layer.groups if isinstance(layer, ApproxConv2d) else 1
        o = wcodes.shape[0]
        w = wcodes.to(torch.int16).reshape(g, o // g, -1).numpy()
        conv = isinstance(layer, ApproxConv2d)
        return LayerTrace(
            name=self.name, kind="conv" if conv else "linear", macs=macs, groups=g, out_channels=o,
            fan_in=int(w.shape[2]), rows=rows, weights=w, x_zero_point=int(self.zx),  # type: ignore[arg-type]
            w_zero_point=zw.numpy().astype(np.int64), spread=self.stats.std, positions=self.positions,
            signed=layer.qconfig.signed,
            stride=tuple(layer.stride) if conv else (1, 1),  # type: ignore[arg-type]
            pads=layer.pads() if conv else (0, 0, 0, 0),  # type: ignore[union-attr]
            dilation=tuple(layer.dilation) if conv else (1, 1),  # type: ignore[arg-type]
            sample_codes=torch.cat(self.samples) if self.samples else None,
            weight_codes=wcodes,
        )


def trace_samples(dataset: Any, n: int = 128, seed: int = 0) -> torch.Tensor:
    """``n`` inputs drawn (seeded, without replacement) from ``dataset`` (items ``(x, y)``)."""
    total = len(dataset)
    if total == 0:
        raise QosError("cannot trace on an empty data set")
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    x, _ = dataset[idx]
    return x


@torch.no_grad()
def trace_layers(qnet: QoSNet, samples: torch.Tensor, batch_size: int = 16, max_rows: int = 4096,
                 measure_samples: int = 16, seed: int = 0) -> list[LayerTrace]:
    """Trace every approximate layer of ``qnet`` on ``samples`` (see module doc).

    The model runs in QUANT mode and eval mode (restored afterwards), in batches of
    ``batch_size`` samples; ``max_rows``: rows kept per group (seeded subsample).
    """
    if samples.ndim < 2 or samples.shape[0] < 1:
        raise QosError("tracing needs a non-empty batch of inputs")
    infos = qnet.approx_layers()
    gen = torch.Generator().manual_seed(seed)
    recorders = [_Recorder(i.name, i.module, samples.shape[0], max_rows, measure_samples, gen)  # type: ignore[arg-type]
                 for i in infos]
    handles = [i.module.register_forward_pre_hook(r) for i, r in zip(infos, recorders)]
    mode, training = qnet.mode, qnet.training
    device = next(iter(qnet.parameters())).device  # the hooks bring the codes back to the CPU
    qnet.eval()
    qnet.set_mode(Mode.QUANT)
    try:
        for s in range(0, samples.shape[0], batch_size):
            qnet(samples[s:s + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        qnet.set_mode(mode)
        qnet.train(training)
    infos = qnet.approx_layers()
    return [r.result(int(i.macs), qnet.qconfig.signed) for r, i in zip(recorders, infos)]  # type: ignore[arg-type]


def exact_accumulators(trace: LayerTrace, exact: Multiplier) -> torch.Tensor:
    """Exact int32 accumulators of the layer on its stored sample codes (cached)."""
    if trace._exact_acc is None:
        trace._exact_acc = _accumulators(trace, exact)
    return trace._exact_acc


def _accumulators(trace: LayerTrace, mult: Multiplier) -> torch.Tensor:
    if trace.sample_codes is None or trace.weight_codes is None:
        raise QosError(f"layer {trace.name}: no stored sample codes to measure on")
    if mult.signed != trace.signed:
        raise QosError(f"circuit {mult.name} has the wrong signedness for layer {trace.name}")
    if trace.kind == "conv":
        return approx_conv2d_acc(trace.sample_codes, trace.weight_codes, mult, trace.stride, trace.pads,
                                 trace.dilation, trace.groups, pad_code=trace.x_zero_point)
    x = trace.sample_codes.reshape(-1, trace.fan_in)
    return approx_linear_acc(x, trace.weight_codes, mult)


def measure_layer_error(trace: LayerTrace, mult: Multiplier, exact: Multiplier) -> float:
    """Monte-Carlo check: run the whole layer on its stored sample codes with ``mult`` (the
    bit-exact emulation) and with the exact circuit; the population std of the difference
    of the integer accumulators (the error at the neuron output, accumulator units)."""
    err = _accumulators(trace, mult).to(torch.int64) - exact_accumulators(trace, exact).to(torch.int64)
    return float(err.to(torch.float64).std(unbiased=False)) if err.numel() > 1 else 0.0
