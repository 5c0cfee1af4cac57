"""Turn a float model into a QoS-Net: approximate layers, per-OP BatchNorm, a multiplier bank."""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..errors import QosError
from ..multipliers import Multiplier, bundled
from ..multipliers import get as get_multiplier
from .bank import MultiplierBank
from .affine import mean_codes_torch
from .fold import LeafTracer, ResidualLink, fold_map, integer_links, output_layers, pool_keeps_dims
from .graph import capture
from .pooling import ordered_pooling
from .layers import ApproxConv2d, ApproxLinear
from .multibn import MultiBatchNorm, multi_batchnorm, op_index
from .quant import Mode, QuantConfig, as_mode

ApproxLayer = ApproxConv2d | ApproxLinear


@dataclass(frozen=True)
class LayerInfo:
    """One approximate layer: dotted name inside the converted model, module, kind
    ("conv"/"linear") and multiply-accumulates per sample (None until the layer has seen
    an input, or ``input_shape`` was given to ``wrap_model``)."""

    name: str
    module: nn.Module
    kind: str
    macs: int | None


def approx_layers(model: nn.Module) -> list[LayerInfo]:
    """The approximate layers of a QoSNet or of a converted module, in ``named_modules`` order."""
    net = model.net if isinstance(model, QoSNet) else model
    out = []
    for name, mod in net.named_modules():
        if isinstance(mod, (ApproxConv2d, ApproxLinear)):
            macs = mod.macs() if mod.input_shape is not None else None
            out.append(LayerInfo(name, mod, "conv" if isinstance(mod, ApproxConv2d) else "linear", macs))
    return out


def _convert(module: nn.Module, qconfig: QuantConfig, num_ops: int, sigma_init: float) -> nn.Module:
    """The replacement of one module (converted itself, or its children converted in place)."""
    if isinstance(module, (ApproxConv2d, ApproxLinear, MultiBatchNorm)):
        raise QosError("the model is already converted to approximate layers")
    if isinstance(module, nn.Conv2d):
        return ApproxConv2d.from_float(module, qconfig, num_ops, sigma_init)
    if isinstance(module, nn.Linear):
        return ApproxLinear.from_float(module, qconfig, num_ops, sigma_init)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return multi_batchnorm(module, num_ops)
    if isinstance(module, nn.MultiheadAttention):
        return module  # reads its projection weights directly, never calls their forward
    pool = ordered_pooling(module)
    if pool is not None:
        return pool   # sums in the exported graph's order, so pooled values match the device
    for name, child in list(module.named_children()):
        new = _convert(child, qconfig, num_ops, sigma_init)
        if new is not child:
            setattr(module, name, new)
    return module


def _as_multipliers(multipliers: Iterable[Multiplier | str] | None, qconfig: QuantConfig | None) -> list[Multiplier]:
    if multipliers is None:
        return [bundled().exact(qconfig.signed if qconfig is not None else False)]
    if isinstance(multipliers, (str, Multiplier)):
        raise QosError("multipliers must be a list of circuits (or names)")
    return [get_multiplier(m) if isinstance(m, str) else m for m in multipliers]


@dataclass
class _Deploy:
    """An approximate layer's part in one inference pass (``QoSNet.forward``): the BatchNorm the
    exporter folds into it (None: none), whether this pass folded it, and the approximate layer
    whose input codes its integer epilogue writes, with the activation's clamp (None: float
    epilogue; ``fold.requant_target``)."""

    bn: MultiBatchNorm | None
    bn_name: str
    folded: bool = False
    requant: tuple[nn.Module, tuple[float | None, float | None]] | None = None
    name: str = ""
    residual: tuple[nn.Module, tuple[float | None, float | None], nn.Module] | None = None
    output: bool = False          # the network's output: reference.output_values' epilogue


class _IntegerGraph(fx.Interpreter):
    """Runs the traced network with its integer residual adds (``fold.ResidualLink``): each such
    add takes the conv's exact accumulator and the skip's dequantized codes
    (``ApproxConv2d.residual_output``), and its integer global average pools
    (``fold.RequantLink.pool``: the codes averaged in integers, ``nn.affine.mean_codes_torch``);
    every other node runs as in the network's own forward."""

    def __init__(self, gm: fx.GraphModule, adds: dict[str, tuple[Any, str, str]], pools: dict[str, Any]) -> None:
        super().__init__(gm)
        self.adds = adds          # by node name: a deep copy of the network copies the graph anew
        self.pools = pools        # pool node name -> the linear layer whose codes it averages
        self.nodes = {n.name: n for n in gm.graph.nodes}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.adds:
            layer, operand, skip = self.adds[n.name]
            return layer.residual_output(self.env[self.nodes[operand]], self.env[self.nodes[skip]])
        if n.name in self.pools:
            s, z = self.pools[n.name].act_qparams()
            return mean_codes_torch(self.env[n.args[0]], s, int(z), pool_keeps_dims(n))
        return super().run_node(n)


#: False inside ``float_epilogues()``: every layer keeps the float epilogue (for comparisons).
_INTEGER_EPILOGUES = [True]


class float_epilogues:
    """Context manager: inference keeps contract v1's float epilogue after every layer instead of
    the integer requantization between directly connected layers (what the device computed
    before contract v2; ``bench.epilogue`` compares the two)."""

    def __enter__(self) -> "float_epilogues":
        _INTEGER_EPILOGUES.append(False)
        return self

    def __exit__(self, *exc: object) -> None:
        _INTEGER_EPILOGUES.pop()


class QoSNet(nn.Module):
    """A converted model (``net``), its MultiplierBank (``bank``) and the per-OP assignment.

    ``state_dict`` holds everything per OP: every BatchNorm copy, every bias row, the
    ``assign`` buffers, observers, AGN sigmas and the bank (tables + names/SHA-256).
    """

    def __init__(self, net: nn.Module, bank: MultiplierBank, num_ops: int, qconfig: QuantConfig,
                 architecture: dict[str, Any] | None = None, input_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        self.net = net
        self.bank = bank
        self.num_ops = num_ops
        self.qconfig = qconfig
        #: the float network's architecture record (``nn.graph.capture``), taken before
        #: conversion; None when ``wrap_model(strict=False)`` met an op outside the allowlist
        self.architecture = architecture
        #: per-sample input shape, e.g. (3, 32, 32), when known
        self.input_shape = tuple(int(v) for v in input_shape) if input_shape is not None else None
        self._op = 0
        self._mode = Mode.FLOAT
        for info in approx_layers(self):
            info.module.attach_bank(bank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the converted model (the first input's per-sample shape becomes ``input_shape``
        when it was not given).

        Inference in APPROX mode (eval mode, no gradients recorded) computes what the compiled
        model computes, bit for bit: every approximate layer's epilogue, and every BatchNorm, as
        the float32 affine of ``nn.affine``, with BatchNorms folded into the layer before them
        where the exporter folds them (``nn.fold``), and the integer requantization of
        ``nn.affine.layer_requant`` where a layer feeds the next one directly. Training, and eval passes that record
        gradients, keep the training numerics (float BatchNorm after the layer).
        """
        if self.input_shape is None and isinstance(x, torch.Tensor):
            self.input_shape = tuple(int(v) for v in x.shape[1:])
        if self.training or self._mode != Mode.APPROX or torch.is_grad_enabled():
            return self.net(x)
        folds = self._folds()
        if folds is None:
            return self.net(x)
        modules = dict(self.net.named_modules())
        approx = [m for m in modules.values() if isinstance(m, (ApproxConv2d, ApproxLinear))]
        # integer epilogues where every layer emulates the device (a value is on a code grid only
        # where its producer requantized it)
        integer = _INTEGER_EPILOGUES[-1] and all(m.mode == Mode.APPROX for m in approx)
        links: dict[str, Any] = self.__dict__["_requant_links"] if integer else {}
        residual: dict[str, ResidualLink] = self.__dict__["_residual_links"] if integer else {}
        outputs: set[str] = self.__dict__["_output_layers"] if integer else set()
        adds: dict[str, tuple[Any, str, str]] = {}
        pools: dict[str, Any] = {}
        try:
            for name, mod in modules.items():
                if isinstance(mod, (ApproxConv2d, ApproxLinear)) and mod.mode == Mode.APPROX:
                    bn_name = folds.get(name, "")
                    link, res = links.get(name), residual.get(name)
                    deploy = _Deploy(modules[bn_name] if bn_name else None, bn_name, name=name, output=name in outputs)
                    if link is not None:
                        deploy.requant = (modules[link.consumer], link.clamp)
                    elif res is not None:
                        deploy.residual = (modules[res.link.consumer], res.link.clamp, modules[res.skip_codes_of])
                        adds[res.add.name] = (mod, res.operand.name, res.skip.name)
                        link = res.link
                    if link is not None and link.pool is not None:
                        pools[link.pool.name] = modules[link.consumer]
                    mod.__dict__["_deploy"] = deploy
                elif isinstance(mod, MultiBatchNorm):
                    mod.__dict__["_deploy"] = True
            if adds or pools:
                return _IntegerGraph(self.__dict__["_traced"], adds, pools).run(x)
            return self.net(x)
        finally:
            for mod in modules.values():
                mod.__dict__.pop("_deploy", None)
                mod.__dict__.pop("_folded_output", None)

    def _folds(self) -> dict[str, str] | None:
        """``nn.fold.fold_map`` of the network, traced once (None: it does not trace with torch.fx,
        and so does not export either)."""
        if "_fold_map" not in self.__dict__:
            try:
                self.__dict__["_fold_map"] = fold_map(self.net)
                graph = LeafTracer().trace(self.net)
                direct, residual = integer_links(graph, dict(self.net.named_modules()))
                self.__dict__["_requant_links"], self.__dict__["_residual_links"] = direct, residual
                self.__dict__["_output_layers"] = output_layers(graph, dict(self.net.named_modules()))
                # the traced network, sharing this one's modules, for the integer adds and pools
                self.__dict__["_traced"] = fx.GraphModule(self.net, graph)
            except Exception:  # noqa: BLE001 - fx raises many kinds; such a network keeps torch numerics
                self.__dict__["_fold_map"] = None
        return self.__dict__["_fold_map"]

    def approx_layers(self) -> list[LayerInfo]:
        """Approximate layers in assignment order (see ``approx_layers``)."""
        return approx_layers(self)

    def _layers(self) -> list[ApproxLayer]:
        return [info.module for info in approx_layers(self)]  # type: ignore[misc]

    # --- modes and operating points ----------------------------------------------------
    @property
    def mode(self) -> Mode:
        """The numerics last set with ``set_mode``."""
        return self._mode

    def set_mode(self, mode: Mode | str) -> None:
        """Set FLOAT / QUANT / APPROX / NOISE on every approximate layer."""
        m = as_mode(mode)
        for layer in self._layers():
            layer.set_mode(m)
        self._mode = m

    @property
    def operating_point(self) -> int:
        """The active operating point."""
        return self._op

    def set_operating_point(self, op: int) -> None:
        """Select OP ``op`` in every approximate layer and every per-OP BatchNorm."""
        op = op_index(op, self.num_ops)
        for mod in self.net.modules():
            if isinstance(mod, (ApproxConv2d, ApproxLinear, MultiBatchNorm)):
                mod.set_operating_point(op)
        self._op = op

    # --- assignment ----------------------------------------------------------------------
    def set_assignment(self, assign: Sequence[Sequence[int | str]]) -> None:
        """``assign[op][layer]`` = bank index (or circuit name) of every layer for every OP,
        layers in ``approx_layers()`` order."""
        layers = self._layers()
        if isinstance(assign, (str, bytes)) or len(assign) != self.num_ops:
            raise QosError(f"assignment must list {self.num_ops} operating point(s)")
        table = []
        for op, row in enumerate(assign):
            if isinstance(row, (str, bytes)) or len(row) != len(layers):
                raise QosError(f"assignment of OP {op} must list {len(layers)} layer(s)")
            idx = []
            for entry in row:
                if isinstance(entry, str):
                    idx.append(self.bank.index(entry))
                    continue
                try:
                    if isinstance(entry, bool):
                        raise TypeError
                    i = operator.index(entry)
                except TypeError:
                    raise QosError(f"assignment entries must be bank indices or names, got {entry!r}") from None
                if not 0 <= i < len(self.bank):
                    raise QosError(f"assignment index {i} out of range 0..{len(self.bank) - 1} (OP {op})")
                idx.append(i)
            table.append(idx)
        for j, layer in enumerate(layers):
            layer.assign.copy_(torch.tensor([table[op][j] for op in range(self.num_ops)], dtype=torch.int64))

    def assignment(self) -> list[list[int]]:
        """``assign[op][layer]`` as bank indices."""
        layers = self._layers()
        return [[int(layer.assign[op]) for layer in layers] for op in range(self.num_ops)]

    # --- training helpers ----------------------------------------------------------------
    def freeze_observers(self, frozen: bool = True) -> None:
        """Stop (or resume) every observer's updates."""
        for layer in self._layers():
            layer.freeze_observers(frozen)

    def sigmas(self) -> list[nn.Parameter]:
        """The AGN noise scales, one per approximate layer, in layer order."""
        return [layer.sigma for layer in self._layers()]

    def extra_repr(self) -> str:
        return f"num_ops={self.num_ops}, mode={self._mode.value}, op={self._op}"


def wrap_model(model: nn.Module, multipliers: Iterable[Multiplier | str] | None = None, num_ops: int = 1,
               qconfig: QuantConfig | None = None, *, input_shape: Sequence[int] | None = None,
               sigma_init: float = 0.01, strict: bool = True) -> QoSNet:
    """Convert ``model`` in place (Conv2d -> ApproxConv2d, Linear -> ApproxLinear, BatchNorm2d ->
    MultiBatchNorm2d, BatchNorm1d -> MultiBatchNorm1d) and wrap it with its MultiplierBank.

    ``multipliers``: circuits (or bundled names) of one signedness, which sets
    ``QuantConfig.signed``; default: the exact circuit of the qconfig's signedness.
    Every layer starts on bank entry 0 for every OP, in FLOAT mode, at OP 0.
    ``input_shape`` (per sample, e.g. (3, 32, 32)): run one float forward pass (eval,
    no grad; observers untouched) so layer MAC counts are known at once; otherwise they
    are recorded on the first forward. ``sigma_init``: initial AGN sigma of every layer.
    ``strict``: the network must use only the allowlisted ops (``nn.graph``: what the exporter
    and ``model.pt`` support); QosError naming the first other op and the line that calls it.
    ``strict=False`` allows any network for emulation only (no architecture record: it cannot
    be saved or compiled).
    """
    if not isinstance(num_ops, int) or isinstance(num_ops, bool) or num_ops < 1:
        raise QosError(f"num_ops must be a positive integer, got {num_ops!r}")
    bank = MultiplierBank(_as_multipliers(multipliers, qconfig))
    qcfg = dataclasses.replace(qconfig or QuantConfig(), signed=bank.signed)
    try:
        architecture: dict[str, Any] | None = capture(model)
    except QosError:
        if strict:
            raise
        architecture = None
    net = _convert(model, qcfg, num_ops, sigma_init)
    qnet = QoSNet(net, bank, num_ops, qcfg, architecture, input_shape)
    if not qnet.approx_layers():
        raise QosError("the model has no Conv2d or Linear layer to approximate")
    if input_shape is not None:
        was_training = qnet.training
        qnet.eval()
        with torch.no_grad():
            qnet(torch.zeros((1, *input_shape)))
        qnet.train(was_training)
    return qnet
