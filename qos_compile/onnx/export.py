"""QoSNet -> ONNX: the whole network for all operating points (docs/onnx_ops.md).

The converted model (``qnet.net``) is traced with ``torch.fx`` (ApproxConv2d,
ApproxLinear and MultiBatchNorm1d/2d are leaves), shapes are propagated once with a
float forward pass, and every fx node is mapped to ONNX nodes by hand with
``onnx.helper``. What may appear is ``nn.graph``'s allowlist (the one table of
supported modules, functions and methods), with Conv2d/Linear/BatchNorm replaced by
the layers ``wrap_model`` turns them into. Per approximate layer the graph computes

    codes = Cast(Clip(Round(x * (1/s_x)) + z_x, qmin, qmax))       (== PyTorch's codes)
    lut   = Gather(luts, Gather(assign_l, operating_point))         (or the input slot.<l>.lut)
    acc   = ai.qosnets.ApproxConv / ApproxGemm(codes, weight_codes, lut)      int32
    q     = acc - z_x*sum(w)[o] - z_w[o]*sum_rf(x - z_x)                       int32, exact
    y     = Cast(q, float) * scale[op, o] + shift[op, o]

``scale``/``shift`` fold dequantization, the layer's per-OP bias and, when a
MultiBatchNorm2d (after a conv) or MultiBatchNorm1d (after a linear layer on [N, K])
directly follows the layer, that OP's BatchNorm (eval statistics).
"""
from __future__ import annotations

import json
import operator
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..atomic import write_bytes
from ..errors import QosError
from ..nn.layers import ApproxConv2d, ApproxLinear
from ..nn.pooling import OrderedAdaptiveAvgPool2d, OrderedAvgPool2d
from ..nn.graph import FUNCTIONS, METHODS, MODULES, function_name, source_line
from ..nn.affine import (Requant, accumulator_bound, bn_affine32, layer_affine, layer_outputs, layer_requant,
                         layer_requant_add)
from ..nn.fold import LeafTracer, RequantLink, ResidualLink, fold_target, integer_links, output_layers
from ..nn.multibn import MultiBatchNorm, MultiBatchNorm1d, MultiBatchNorm2d
from ..nn.quant import Mode
from ..nn.wrap import QoSNet
from ..numerics import INT32_MAX, conv_pads, pair
from .. import reference
from . import ops

__all__ = ["export_onnx", "OnnxExport", "LayerExport", "DEFAULT_OPSET", "FORMAT_NAME", "FORMAT_VERSION"]

DEFAULT_OPSET = 18
FORMAT_NAME = "qos-compile.onnx"
FORMAT_VERSION = 1
INPUT_NAME = "input"
OP_INPUT_NAME = "operating_point"
OUTPUT_NAME = "output"
_TRACE_BATCH = 2  # batch used for shape propagation (tells the batch axis from size-1 axes)


@dataclass(frozen=True)
class LayerExport:
    """One approximate layer as exported.

    ``attrs``: the ApproxConv attributes (empty for ApproxGemm); ``x_scale``/``x_zero_point``:
    activation quantization; ``w_scale``/``w_zero_point``: weight quantization, shape ()
    per tensor or (O,) per channel; ``folded_bn``: name of the MultiBatchNorm1d/2d folded
    into ``scale``/``shift`` (None if none); ``assign``: bank index per OP; shapes are per
    sample (no batch axis); ``terms``: products per accumulator (K); ``requantizes_into``: the
    layer whose input codes this layer's integer epilogue writes (None: float epilogue);
    ``residual``: that epilogue is an integer residual add (``nn.fold.ResidualLink``);
    ``output``: the network's output, ``float32(q + B) * s`` (``reference.output_values``).
    """

    name: str
    kind: str
    attrs: dict[str, Any]
    x_scale: float
    x_zero_point: int
    w_scale: np.ndarray
    w_zero_point: np.ndarray
    signed: bool
    folded_bn: str | None
    assign: tuple[int, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    terms: int
    requantizes_into: str | None = None
    residual: bool = False
    output: bool = False


@dataclass
class OnnxExport:
    """Result of ``export_onnx``.

    ``model``: the ModelProto; ``path``: where it was written (None if not written);
    ``slots``: slots variant only, ``{input name: [value for OP 0, OP 1, ...]}`` for every
    per-OP graph input (``slot.<name>.lut|scale|shift``), empty otherwise; ``layers``: the
    approximate layers in ``QoSNet.approx_layers()`` order; ``num_ops``; ``slotted``;
    ``debug``: whether ``<layer>.codes``/``<layer>.acc`` are extra graph outputs.
    """

    model: onnx.ModelProto
    path: Path | None
    slots: dict[str, list[np.ndarray]]
    layers: list[LayerExport]
    num_ops: int
    slotted: bool = False
    debug: bool = False
    input_shape: tuple[int, ...] = ()
    circuits: list[str] = field(default_factory=list)

    def slot_feed(self, op: int) -> dict[str, np.ndarray]:
        """The slot inputs of operating point ``op`` (slots variant), ready for a session's feed."""
        if not self.slotted:
            raise QosError("this export has no slots (export with slots=True)")
        if isinstance(op, bool) or not isinstance(op, (int, np.integer)) or not 0 <= int(op) < self.num_ops:
            raise QosError(f"operating point {op!r} out of range 0..{self.num_ops - 1}")
        return {name: values[int(op)] for name, values in self.slots.items()}


# --- graph builder ----------------------------------------------------------------------------

class _Graph:
    """Nodes, initializers and names of the graph under construction."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._tensor_names: set[str] = set()
        self._node_names: set[str] = set()
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    def fresh(self, name: str) -> str:
        """``name``, or ``name_2``, ``name_3``... if taken (tensor namespace)."""
        out, k = name, 1
        while out in self._tensor_names:
            k += 1
            out = f"{name}_{k}"
        self._tensor_names.add(out)
        return out

    def init(self, name: str, value: np.ndarray) -> str:
        name = self.fresh(name)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def const(self, value: Any, dtype: Any) -> str:
        """A shared small constant initializer (deduplicated by value)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.tobytes(), arr.shape)
        if key not in self._consts:
            if arr.size <= 4:
                text = "_".join("end" if v == 2**63 - 1 else str(v) for v in arr.reshape(-1).tolist())
            else:
                text = f"{arr.size}values_{zlib.crc32(arr.tobytes()):08x}"
            self._consts[key] = self.init(f"const.{arr.dtype.name}.{text}".replace("-", "m"), arr)
        return self._consts[key]

    def node(self, op: str, inputs: Sequence[str], name: str, out: str | None = None, domain: str | None = None,
             **attrs: Any) -> str:
        nname, k = name, 1
        while nname in self._node_names:
            k += 1
            nname = f"{name}_{k}"
        self._node_names.add(nname)
        oname = self.fresh(out or nname)
        self.nodes.append(helper.make_node(op, list(inputs), [oname], name=nname, domain=domain, **attrs))
        return oname


def _vi(name: str, elem: int, shape: Sequence[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def _batched(shape: Sequence[int]) -> list[Any]:
    return ["batch", *[int(v) for v in shape[1:]]]


# --- tracing ----------------------------------------------------------------------------------

def _type_name(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    mod = cls.__module__ or ""
    if mod.startswith("torch.nn.modules") or mod.startswith("torch.ao.nn"):
        return f"nn.{cls.__name__}"
    return f"{mod}.{cls.__qualname__}" if mod and mod != "builtins" else cls.__qualname__


def _scope(node: fx.Node) -> str:
    """Qualified name (inside ``qnet.net``) of the module a node belongs to ('' at top level)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    for key, value in reversed(list(stack.items())):
        qual = value[0] if isinstance(value, tuple) else key
        return str(qual)
    return ""


def _where(node: fx.Node) -> str:
    s = _scope(node)
    return f"net.{s}" if s else "net"


#: nn.graph's module allowlist as the converted network holds it: wrap_model replaces these
#: float layers by the approximate layers / per-OP BatchNorms (plain BatchNorm exports too)
_CONVERTED: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: ApproxConv2d, nn.Linear: ApproxLinear,
                                                      nn.BatchNorm2d: MultiBatchNorm2d,
                                                      nn.BatchNorm1d: MultiBatchNorm1d,
                                                      nn.AvgPool2d: OrderedAvgPool2d,
                                                      nn.AdaptiveAvgPool2d: OrderedAdaptiveAvgPool2d}
_MODULES: frozenset[type[nn.Module]] = frozenset(
    {_CONVERTED.get(cls, cls) for cls, _ in MODULES.values()}
    | {nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d})   # plain ones export too
_FUNCTIONS: frozenset[Any] = frozenset(FUNCTIONS.values())
_METHODS: frozenset[str] = frozenset(METHODS)
_BINARY = {operator.add: "Add", torch.add: "Add", operator.iadd: "Add", operator.sub: "Sub", torch.sub: "Sub",
           operator.mul: "Mul", torch.mul: "Mul", operator.imul: "Mul", operator.truediv: "Div", torch.div: "Div"}
_UNARY = {F.relu: "Relu", torch.relu: "Relu", torch.sigmoid: "Sigmoid", torch.tanh: "Tanh", F.sigmoid: "Sigmoid",
          F.tanh: "Tanh"}


def _check_supported(gm: fx.GraphModule) -> None:
    """QosError naming the first module / function / method outside the allowlist, and the user's line."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        line = source_line(node)
        if node.op == "call_module":
            mod = modules[str(node.target)]
            if type(mod) not in _MODULES:  # exact types, as nn.graph.capture checks them
                raise QosError(f"unsupported layer {_type_name(mod)} at net.{node.target}{line}")
        elif node.op == "call_function" and node.target not in _FUNCTIONS:
            raise QosError(f"unsupported function {function_name(node.target)} at {_where(node)}{line}")
        elif node.op == "call_method" and node.target not in _METHODS:
            raise QosError(f"unsupported method Tensor.{node.target} at {_where(node)}{line}")


def _trace(qnet: QoSNet, input_shape: tuple[int, ...]) -> fx.GraphModule:
    try:
        graph = LeafTracer().trace(qnet.net)
    except QosError:
        raise
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds (TraceError, TypeError, ...)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QosError(f"cannot trace the model for ONNX export ({type(exc).__name__}: {msg})") from None
    gm = fx.GraphModule(qnet.net, graph)
    _check_supported(gm)
    # shape propagation with a float forward pass: eval mode, FLOAT numerics (touches no observer)
    modes = {m: m.mode for m in qnet.net.modules() if isinstance(m, (ApproxConv2d, ApproxLinear))}
    training = {m: m.training for m in qnet.net.modules()}
    try:
        for m in modes:
            m.set_mode(Mode.FLOAT)
        qnet.net.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros((_TRACE_BATCH, *input_shape)))
    except QosError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise QosError(f"the model does not run on input shape {tuple(input_shape)} ({type(exc).__name__}: "
                       f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    finally:
        for m, mode in modes.items():
            m.set_mode(mode)
        for m, flag in training.items():
            m.train(flag)
    return gm


def _shape(node: Any) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        raise QosError(f"no tensor shape known for {getattr(node, 'name', node)!r} (not a single tensor)")
    return tuple(int(v) for v in meta.shape)


# --- numerics of approximate layers --------------------------------------------------------------

@dataclass
class _Ctx:
    qnet: QoSNet
    g: _Graph
    slots: bool
    debug: bool
    quantize: str
    opset: int
    num_ops: int
    op_input: str | None
    slot_values: dict[str, list[np.ndarray]]
    layers: list[LayerExport]
    luts_name: str | None = None
    #: input codes of a layer, written by the integer epilogue of the layer before it
    codes_in: dict[str, str] = field(default_factory=dict)


def _per_op(ctx: _Ctx, name: str, kind: str, values: list[np.ndarray], node_name: str) -> str:
    """A per-OP tensor: the input ``slot.<name>.<kind>`` (slots) or ``Gather(stacked, operating_point)``."""
    if ctx.slots:
        input_name = ctx.g.fresh(f"slot.{name}.{kind}")
        elem = helper.np_dtype_to_tensor_dtype(values[0].dtype)
        ctx.g.inputs.append(_vi(input_name, elem, values[0].shape))
        ctx.slot_values[input_name] = [np.ascontiguousarray(v) for v in values]
        return input_name
    stacked = ctx.g.init(f"{name}.{kind}_per_op", np.stack(values))
    return ctx.g.node("Gather", [stacked, ctx.op_input], node_name, out=f"{name}.{kind}", axis=0)


def _emit_quantize(ctx: _Ctx, name: str, x: str, layer: ApproxConv2d | ApproxLinear) -> tuple[str, float, int]:
    g, qc = ctx.g, layer.qconfig
    s_x, z_x = layer.act_qparams()
    z = int(z_x)
    code_type = TensorProto.INT8 if qc.signed else TensorProto.UINT8
    if ctx.quantize == "QuantizeLinear":
        zp = g.init(f"{name}.x_zero_point", np.array(z, np.int8 if qc.signed else np.uint8))
        sc = g.init(f"{name}.x_scale", np.array(float(s_x), np.float32))
        codes = g.node("QuantizeLinear", [x, sc, zp], f"{name}/quantize", out=f"{name}.codes")
        return codes, float(s_x), z
    # PyTorch's formula: clamp(round(x * (1/s)) + z) with the float32 reciprocal, half to even
    inv = (1.0 / s_x).to(torch.float32).reshape(()).numpy()
    inv_name = g.init(f"{name}.x_inv_scale", np.array(inv, np.float32))
    t = g.node("Mul", [x, inv_name], f"{name}/quantize/mul")
    t = g.node("Round", [t], f"{name}/quantize/round")
    t = g.node("Add", [t, g.init(f"{name}.x_zero_point", np.array(float(z), np.float32))],
               f"{name}/quantize/add_zero_point")
    t = g.node("Clip", [t, g.const(qc.qmin, np.float32), g.const(qc.qmax, np.float32)], f"{name}/quantize/clip")
    codes = g.node("Cast", [t], f"{name}/quantize/cast", out=f"{name}.codes", to=code_type)
    return codes, float(s_x), z


def _emit_approx(ctx: _Ctx, node: fx.Node, layer: ApproxConv2d | ApproxLinear, x: str,
                 bn: tuple[str, MultiBatchNorm] | None, link: RequantLink | None = None,
                 consumer: ApproxConv2d | ApproxLinear | None = None, residual: ResidualLink | None = None,
                 output: bool = False) -> str:
    """The layer's codes, ApproxConv/ApproxGemm and exact zero-point corrections, then its epilogue:
    float (``nn.affine``), integer into ``consumer`` (``link``), none for a ``residual`` add,
    which ``_emit_requant_add`` rescales (the int32 ``q`` is returned), or, for the network's
    ``output``, ``float32(q + B) * s`` (``nn.affine.layer_outputs``; the float one where it
    cannot be represented)."""
    g, qnet = ctx.g, ctx.qnet
    name = str(node.target)
    where = f"net.{name}"
    qc = layer.qconfig
    if layer.bank is not qnet.bank:
        raise QosError(f"layer {where} uses another multiplier bank than the QoSNet")
    if not bool(layer.act_observed):
        raise QosError(f"layer {where} has no calibrated activation range: run calibration forward passes "
                       "(e.g. QUANT mode, train()) before exporting")
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    conv = isinstance(layer, ApproxConv2d)
    if not conv and len(in_shape) != 2:
        raise QosError(f"layer {where}: ApproxLinear export needs a 2-D input (N, K), got rank {len(in_shape)}")
    if name in ctx.codes_in:          # written by the integer epilogue of the layer before
        codes = ctx.codes_in.pop(name)
        s_x_t, z_x_t = layer.act_qparams()
        s_x, z_x = float(s_x_t), int(z_x_t)
    else:
        codes, s_x, z_x = _emit_quantize(ctx, name, x, layer)

    # weights: the layer's own codes, scale and zero point
    w_codes_t, s_w_t, z_w_t = layer.weight_codes()
    w_codes = w_codes_t.detach().cpu().numpy()
    s_w = s_w_t.detach().float().cpu().numpy()
    z_w = z_w_t.detach().cpu().numpy().astype(np.int64)
    out_ch = w_codes.shape[0]
    w_name = g.init(f"{name}.weight_codes", w_codes)

    assign = tuple(int(v) for v in layer.assign.detach().cpu().tolist())
    if len(assign) != ctx.num_ops:
        raise QosError(f"layer {where} has {len(assign)} assignment entries for {ctx.num_ops} operating points")
    luts = qnet.bank.luts.detach().cpu().numpy().astype(np.int32)
    if ctx.slots:
        lut = _per_op(ctx, name, "lut", [luts[a] for a in assign], f"{name}/lut")
    else:
        assign_name = g.init(f"{name}.assign", np.array(assign, np.int64))
        idx = g.node("Gather", [assign_name, ctx.op_input], f"{name}/lut_index", out=f"{name}.lut_index", axis=0)
        lut = g.node("Gather", [ctx.luts_name, idx], f"{name}/lut", out=f"{name}.lut", axis=0)

    if conv:
        kh, kw = layer.kernel_size
        groups = int(layer.groups)
        attrs = {"kernel_shape": [int(kh), int(kw)], "strides": [int(v) for v in layer.stride],
                 "pads": [int(v) for v in layer.pads()], "dilations": [int(v) for v in layer.dilation],
                 "group": groups, "pad_value": z_x}
        acc = g.node(ops.APPROX_CONV, [codes, w_name, lut], f"{name}/ApproxConv", out=f"{name}.acc",
                     domain=ops.DOMAIN, **attrs)
        bshape: tuple[int, ...] = (1, out_ch, 1, 1)
        terms = int(np.prod(w_codes.shape[1:]))
    else:
        attrs, groups = {}, 1
        acc = g.node(ops.APPROX_GEMM, [codes, w_name, lut], f"{name}/ApproxGemm", out=f"{name}.acc",
                     domain=ops.DOMAIN)
        bshape = (1, out_ch)
        terms = int(w_codes.shape[1])

    # exact zero-point correction in int32: acc - z_x*sum(w) - z_w*sum_rf(x - z_x)
    w_int = w_codes.astype(np.int64).reshape(out_ch, -1)
    if accumulator_bound(layer) > INT32_MAX:
        raise QosError(f"layer {where}: {terms} products per output may overflow the int32 accumulator")
    sum_w = w_int.sum(1)
    q = acc
    zw_term = bool(np.any(z_w != 0))
    if z_x != 0 and np.any(sum_w != 0):
        corr = g.init(f"{name}.zx_sum_w", (z_x * sum_w).astype(np.int32).reshape(bshape))
        q = g.node("Sub", [q, corr], f"{name}/zero_point/sub_zx_sum_w", out=None if zw_term else f"{name}.q")
    if zw_term:
        z_w_vec = np.broadcast_to(z_w, (out_ch,)).astype(np.int32)
        xc = g.node("Cast", [codes], f"{name}/zero_point/codes_int", to=TensorProto.INT32)
        if z_x != 0:
            xc = g.node("Sub", [xc, g.const(z_x, np.int32)], f"{name}/zero_point/center")
        og = out_ch // groups
        if conv:
            sx = _window_sum(g, name, xc, in_shape, out_shape, groups, attrs)       # [N, G, Ho, Wo]
        else:
            sx = g.node("ReduceSum", [xc, g.const([1], np.int64)], f"{name}/zero_point/row_sum", keepdims=1)
        if conv and groups > 1 and og > 1:   # each group's window sum times its og channels' z_w
            zw = g.init(f"{name}.w_zero_point", z_w_vec.reshape(1, groups, og, 1, 1))
            sx = g.node("Unsqueeze", [sx, g.const([2], np.int64)], f"{name}/zero_point/per_group")
            t = g.node("Mul", [sx, zw], f"{name}/zero_point/zw_sum_x_grouped")
            t = g.node("Reshape", [t, g.const([0, *out_shape[1:]], np.int64)], f"{name}/zero_point/zw_sum_x")
        else:
            zw = g.init(f"{name}.w_zero_point", z_w_vec.reshape(bshape))
            t = g.node("Mul", [sx, zw], f"{name}/zero_point/zw_sum_x")
        q = g.node("Sub", [q, t], f"{name}/zero_point/sub_zw_sum_x", out=f"{name}.q")

    outs = layer_outputs(layer, None if bn is None else bn[1], f"net.{bn[0]}" if bn is not None else where) \
        if output and residual is None and link is None else None
    if ctx.debug:
        g.outputs.append(_vi(codes, TensorProto.INT8 if qc.signed else TensorProto.UINT8, _batched(in_shape)))
        g.outputs.append(_vi(acc, TensorProto.INT32, _batched(out_shape)))
    ctx.layers.append(LayerExport(
        name=name, kind="conv" if conv else "linear", attrs=attrs, x_scale=s_x, x_zero_point=z_x,
        w_scale=s_w.copy(), w_zero_point=z_w.copy(), signed=bool(qc.signed),
        folded_bn=None if bn is None else bn[0], assign=assign, input_shape=in_shape[1:],
        output_shape=out_shape[1:], terms=terms,
        requantizes_into=residual.link.consumer if residual is not None else None if link is None else link.consumer,
        residual=residual is not None, output=outs is not None))
    if residual is not None:
        return q
    if link is not None and consumer is not None:
        return _emit_requant(ctx, name, layer, q, bn, link, consumer, bshape)

    if outs is not None:             # the network's output: one float32 multiply of q + B
        out_bias = _per_op(ctx, name, "out_bias", [o.B.reshape(bshape[1:]) for o in outs], f"{name}/out_bias")
        out_scale = _per_op(ctx, name, "out_scale", [o.s.reshape(bshape[1:]) for o in outs], f"{name}/out_scale")
        y = g.node("Add", [q, out_bias], f"{name}/output/add_bias")
        y = g.node("Cast", [y], f"{name}/output/to_float", to=TensorProto.FLOAT)
        return g.node("Mul", [y, out_scale], f"{name}/output/scale",
                      out=f"{name}.out" if bn is None else f"{bn[0]}.out")

    # one per-OP affine (nn.affine, which the emulation computes too): dequantization, per-OP
    # bias and (if folded) the per-OP BatchNorm
    scales, shifts = [], []
    for op in range(ctx.num_ops):
        bias = layer.bias_per_op[op] if layer.bias_per_op is not None else None
        scale, shift = layer_affine(s_x, s_w_t, bias, out_ch, None if bn is None else bn[1].bns[op], f"net.{bn[0]}"
                                    if bn is not None else where)
        scales.append(scale.numpy().reshape(bshape[1:]))
        shifts.append(shift.numpy().reshape(bshape[1:]))
    sc = _per_op(ctx, name, "scale", scales, f"{name}/scale")
    sh = _per_op(ctx, name, "shift", shifts, f"{name}/shift")
    y = g.node("Cast", [q], f"{name}/to_float", to=TensorProto.FLOAT)
    y = g.node("Mul", [y, sc], f"{name}/affine/mul")
    return g.node("Add", [y, sh], f"{name}/affine/add", out=f"{name}.out" if bn is None else f"{bn[0]}.out")


#: ``B + 2**_RQ_BIAS_BITS`` keeps ``q*M + B`` non-negative, so an unsigned shift floors it
#: (ONNX's BitShift takes unsigned types only); ``|q*M + B| < 2**reference.REQUANT_BITS``.
_RQ_BIAS_BITS = reference.REQUANT_BITS + 1


def _emit_requant(ctx: _Ctx, name: str, layer: ApproxConv2d | ApproxLinear, q: str,
                  bn: tuple[str, MultiBatchNorm] | None, link: RequantLink, consumer: ApproxConv2d | ApproxLinear,
                  bshape: tuple[int, ...]) -> str:
    """The integer epilogue (``reference.requantize``) from ``q`` to ``link.consumer``'s input codes:
    ``Clip((q*M + B + 2**62) >> n + (z - 2**(62-n)), lo, hi)`` in int64, per-OP M/B/n/z."""
    g, where = ctx.g, f"layer net.{name}"
    rqs = []
    for op in range(ctx.num_ops):
        bias = layer.bias_per_op[op] if layer.bias_per_op is not None else None
        rqs.append(layer_requant(layer, consumer, link.clamp, bias, None if bn is None else bn[1].bns[op], where))
    shape = bshape[1:]
    mult = _per_op(ctx, name, "rq_mult", [r.M.astype(np.int32).reshape(shape) for r in rqs], f"{name}/rq_mult")
    t = g.node("Cast", [q], f"{name}/requant/q64", to=TensorProto.INT64)
    t = g.node("Mul", [t, g.node("Cast", [mult], f"{name}/requant/mult64", to=TensorProto.INT64)],
               f"{name}/requant/mul")
    return _emit_requant_tail(ctx, name, t, rqs, shape, link, consumer)


def _emit_requant_add(ctx: _Ctx, name: str, layer: ApproxConv2d, q: str, skip: str,
                      bn: tuple[str, MultiBatchNorm] | None, res: ResidualLink, consumer: ApproxConv2d,
                      skip_of: ApproxConv2d, out_ch: int) -> str:
    """The integer residual add (``reference.requantize_add``) of conv ``q`` and the skip's
    dequantized codes ``skip`` into ``res.link.consumer``'s codes: ``d = Round(skip * (1/s))``
    (exact: the values lie on the code grid), then ``q*M + d*Ms`` and ``_emit_requant``'s tail."""
    g, where = ctx.g, f"layer net.{name}"
    ras = []
    for op in range(ctx.num_ops):
        bias = layer.bias_per_op[op] if layer.bias_per_op is not None else None
        ras.append(layer_requant_add(layer, consumer, res.link.clamp, skip_of, bias,
                                     None if bn is None else bn[1].bns[op], where))
    shape = (out_ch, 1, 1)
    inv = np.array(np.float32(1.0) / np.float32(ras[0].s_skip), np.float32)
    d = g.node("Mul", [skip, g.init(f"{name}.skip_inv_scale", inv)], f"{name}/requant_add/skip_scale")
    d = g.node("Round", [d], f"{name}/requant_add/skip_round")
    # to int32 first: a float -> int64 Cast is the importer's stock, scalar one (16 us a layer
    # on ResNet-20); the codes lie within +-255
    d = g.node("Cast", [d], f"{name}/requant_add/skip_codes32", to=TensorProto.INT32)
    d = g.node("Cast", [d], f"{name}/requant_add/skip_codes", to=TensorProto.INT64)
    mult = _per_op(ctx, name, "rq_mult", [r.rq.M.astype(np.int32).reshape(shape) for r in ras], f"{name}/rq_mult")
    skip_mult = _per_op(ctx, name, "rq_skip_mult", [r.Ms.reshape(shape) for r in ras], f"{name}/rq_skip_mult")
    t = g.node("Cast", [q], f"{name}/requant/q64", to=TensorProto.INT64)
    t = g.node("Mul", [t, g.node("Cast", [mult], f"{name}/requant/mult64", to=TensorProto.INT64)],
               f"{name}/requant/mul")
    t = g.node("Add", [t, g.node("Mul", [d, skip_mult], f"{name}/requant_add/skip_mul")],
               f"{name}/requant_add/add")
    return _emit_requant_tail(ctx, name, t, [r.rq for r in ras], shape, res.link, consumer)


def _emit_requant_tail(ctx: _Ctx, name: str, t: str, rqs: list[Requant], shape: tuple[int, ...],
                       link: RequantLink, consumer: ApproxConv2d | ApproxLinear) -> str:
    """From the int64 products ``t`` on: ``+ B``, the floor shift, ``+ z``, the clamp and the cast to
    the consumer's codes (per-OP B/n/z), which the consumer reads (``_Ctx.codes_in``)."""
    g, where = ctx.g, f"layer net.{name}"
    z, lo, hi = rqs[0].zero_point, rqs[0].lo, rqs[0].hi
    if any((r.zero_point, r.lo, r.hi) != (z, lo, hi) for r in rqs):
        raise QosError(f"{where}: the next layer's zero point or clamp differs between operating points")
    offset = _per_op(ctx, name, "rq_offset", [(r.B + (1 << _RQ_BIAS_BITS)).reshape(shape) for r in rqs],
                     f"{name}/rq_offset")
    shift = _per_op(ctx, name, "rq_shift", [r.n.astype(np.int32).reshape(shape) for r in rqs], f"{name}/rq_shift")
    zero = _per_op(ctx, name, "rq_zero", [(z - (np.int64(1) << (_RQ_BIAS_BITS - r.n))).reshape(shape)
                                          for r in rqs], f"{name}/rq_zero")
    t = g.node("Add", [t, offset], f"{name}/requant/add_offset")
    t = g.node("Cast", [t], f"{name}/requant/to_unsigned", to=TensorProto.UINT64)
    t = g.node("BitShift", [t, g.node("Cast", [shift], f"{name}/requant/shift64", to=TensorProto.UINT64)],
               f"{name}/requant/shift", direction="RIGHT")
    t = g.node("Cast", [t], f"{name}/requant/to_signed", to=TensorProto.INT64)
    t = g.node("Add", [t, zero], f"{name}/requant/add_zero_point")
    t = g.node("Clip", [t, g.const(lo, np.int64), g.const(hi, np.int64)], f"{name}/requant/clip")
    if link.pool is not None:            # a global average pool of the codes, then the flatten
        t = _emit_mean_codes(g, name, t, _shape(link.pool.args[0]), lo)
    code_type = TensorProto.INT8 if consumer.qconfig.signed else TensorProto.UINT8
    codes = g.node("Cast", [t], f"{name}/requant/cast", out=f"{link.consumer}.codes", to=code_type)
    ctx.codes_in[link.consumer] = codes
    return codes


def _emit_mean_codes(g: _Graph, name: str, t: str, shape: tuple[int, ...], lo: int) -> str:
    """``reference.mean_codes`` of the int64 codes ``t`` [N, C, H, W] (at least ``lo``) -> [N, C]:
    ReduceSum over H and W, ``+ count//2 - lo*count``, Div by ``count`` (the numerator is not
    negative, so ONNX's truncating integer Div floors), ``+ lo``."""
    count = int(shape[2]) * int(shape[3])
    t = g.node("ReduceSum", [t, g.const([2, 3], np.int64)], f"{name}/mean_codes/sum", keepdims=0)
    t = g.node("Add", [t, g.const(count // 2 - lo * count, np.int64)], f"{name}/mean_codes/round")
    t = g.node("Div", [t, g.const(count, np.int64)], f"{name}/mean_codes/divide")
    return g.node("Add", [t, g.const(lo, np.int64)], f"{name}/mean_codes/add_lo")


def _dequantize(g: _Graph, name: str, codes: str, consumer: ApproxConv2d | ApproxLinear) -> str:
    """``float32(code - z) * s`` of ``consumer``'s input codes, as the emulation passes them on: the
    value other readers of an integer epilogue's output get."""
    s, z = consumer.act_qparams()
    t = g.node("Cast", [codes], f"{name}/dequantize/int", to=TensorProto.INT32)
    if int(z) != 0:
        t = g.node("Sub", [t, g.const(int(z), np.int32)], f"{name}/dequantize/center")
    t = g.node("Cast", [t], f"{name}/dequantize/float", to=TensorProto.FLOAT)
    return g.node("Mul", [t, g.init(f"{name}.dequant_scale", np.array(float(s), np.float32))],
                  f"{name}/dequantize/scale")


def _window_sum(g: _Graph, name: str, xc: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...], groups: int,
                attrs: dict[str, Any]) -> str:
    """``Σ_rf(x − z_x)`` of a conv layer in int32: the centred codes ``xc`` [N, C, H, W] summed over
    each group's channels (ReduceSum), zero-padded, one strided Slice per window tap, the taps
    added up (Add, then a ReduceSum that materialises the sum); [N, G, Ho, Wo] (G = 1 without
    groups). Integer adds are exact in any order. Not a
    float Conv + Cast: TVM guards that Cast against NaN/inf, and the guarded expression fused
    into a depthwise layer's epilogue took TVM half a minute per kernel to build."""
    c, h, w = in_shape[1:]
    cg = c // groups
    ho, wo = out_shape[2:]
    x = xc
    if groups == 1 and c > 1:
        x = g.node("ReduceSum", [x, g.const([1], np.int64)], f"{name}/zero_point/channel_sum", keepdims=1)
    elif groups > 1 and cg > 1:
        x = g.node("Reshape", [x, g.const([0, groups, cg, h, w], np.int64)], f"{name}/zero_point/groups")
        x = g.node("ReduceSum", [x, g.const([2], np.int64)], f"{name}/zero_point/channel_sum", keepdims=0)
    pt, pl, pb, pr = attrs["pads"]
    if any((pt, pl, pb, pr)):
        x = g.node("Pad", [x, g.const([0, 0, pt, pl, 0, 0, pb, pr], np.int64), g.const(0, np.int32)],
                   f"{name}/zero_point/pad")
    (kh, kw), (sh, sw), (dh, dw) = attrs["kernel_shape"], attrs["strides"], attrs["dilations"]
    if (kh, kw, sh, sw) == (1, 1, 1, 1):
        return x
    taps = [g.node("Slice", [x, g.const([u * dh, v * dw], np.int64),
                             g.const([u * dh + sh * (ho - 1) + 1, v * dw + sw * (wo - 1) + 1], np.int64),
                             g.const([2, 3], np.int64), g.const([sh, sw], np.int64)], f"{name}/zero_point/tap")
            for u in range(kh) for v in range(kw)]
    if len(taps) == 1:
        return taps[0]
    # the taps added, then one ReduceSum over a new axis of length 1: a reduction, which the
    # compilers materialise once per position, where a bare tree of adds is inlined into every
    # consumer (recomputed for each output channel, and a following mean's every term). Not a
    # Concat of the taps: TVM computes that as a chain of selects per element.
    x = taps[0]
    for t in taps[1:]:
        x = g.node("Add", [x, t], f"{name}/zero_point/add_tap")
    x = g.node("Unsqueeze", [x, g.const([2], np.int64)], f"{name}/zero_point/tap_axis")
    return g.node("ReduceSum", [x, g.const([2], np.int64)], f"{name}/zero_point/window_sum", keepdims=0)


def _emit_multibn(ctx: _Ctx, name: str, x: str, bn: MultiBatchNorm, rank: int) -> str:
    """A standalone per-OP BatchNorm as ``x * scale[op] + shift[op]`` (channels on axis 1, any rank)."""
    shape = (bn.num_features,) + (1,) * (rank - 2)
    scales, shifts = [], []
    for op in range(ctx.num_ops):
        a, b = bn_affine32(bn.bns[op], f"net.{name}")
        scales.append(a.numpy().reshape(shape))
        shifts.append(b.numpy().reshape(shape))
    if bn.num_ops != ctx.num_ops:
        raise QosError(f"{type(bn).__name__} at net.{name} has {bn.num_ops} OPs, the QoSNet {ctx.num_ops}")
    sc = _per_op(ctx, name, "scale", scales, f"{name}/scale")
    sh = _per_op(ctx, name, "shift", shifts, f"{name}/shift")
    y = ctx.g.node("Mul", [x, sc], f"{name}/affine/mul")
    return ctx.g.node("Add", [y, sh], f"{name}/affine/add", out=f"{name}.out")


def _hardswish(g: _Graph, x: str, name: str) -> str:
    """``x * clamp(x + 3, 0, 6) / 6`` as Add, Clip, Mul, Div in PyTorch's order (its CPU kernel
    rounds exactly these four steps), not ONNX HardSwish (``x * max(0, min(1, x/6 + 1/2))``)."""
    t = g.node("Add", [x, g.const(3.0, np.float32)], f"{name}/add")
    t = g.node("Clip", [t, g.const(0.0, np.float32), g.const(6.0, np.float32)], f"{name}/clip")
    t = g.node("Mul", [x, t], f"{name}/mul")
    return g.node("Div", [t, g.const(6.0, np.float32)], name)


def _silu(g: _Graph, x: str, name: str) -> str:
    """``x * sigmoid(x)`` (a transcendental op: not bit-exact across runtimes)."""
    return g.node("Mul", [x, g.node("Sigmoid", [x], f"{name}/sigmoid")], name)


# --- float ops ----------------------------------------------------------------------------------

class _Emitter:
    """Maps fx nodes to ONNX nodes."""

    def __init__(self, ctx: _Ctx, gm: fx.GraphModule) -> None:
        self.ctx, self.gm, self.g = ctx, gm, ctx.g
        self.env: dict[fx.Node, Any] = {}
        self.skip: set[fx.Node] = set()
        self.modules = dict(gm.named_modules())
        # the integer epilogues the emulation computes (nn.fold.integer_links, on the same graph)
        self.direct, self.residual = integer_links(gm.graph, self.modules)
        self.outputs = output_layers(gm.graph, self.modules)
        self.adds: dict[fx.Node, tuple[str, Any]] = {}    # residual add node -> (conv name, its state)

    # values ---------------------------------------------------------------------------------
    def val(self, a: Any, where: str) -> str:
        if isinstance(a, fx.Node):
            v = self.env.get(a)
            if not isinstance(v, str):
                raise QosError(f"unsupported use of a non-tensor value {a.name!r} at {where}")
            return v
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            raise QosError(f"unsupported constant argument {a!r} at {where}")
        return self.g.const(float(a), np.float32)

    # entry ----------------------------------------------------------------------------------
    def run(self) -> str:
        out: str | None = None
        if sum(1 for n in self.gm.graph.nodes if n.op == "placeholder") != 1:
            raise QosError("the model's forward must take exactly one input tensor for ONNX export")
        for node in self.gm.graph.nodes:
            if node in self.skip:
                continue
            if node.op == "placeholder":
                self.env[node] = INPUT_NAME
            elif node.op == "output":
                res = node.args[0]
                if not isinstance(res, fx.Node):
                    raise QosError("the model must return one tensor (got a tuple or a structure)")
                out = self.val(res, "net (output)")
            elif node.op == "call_module":
                self.env[node] = self.module(node)
            elif node.op == "call_function":
                self.env[node] = self.function(node, node.target, list(node.args), dict(node.kwargs))
            elif node.op == "call_method":
                self.env[node] = self.method(node)
            elif node.op == "get_attr":
                self.env[node] = self.get_attr(node)
            else:  # pragma: no cover - fx has no other kinds
                raise QosError(f"unsupported fx node kind {node.op} at {_where(node)}")
        if out is None:
            raise QosError("the model has no output")
        return out

    def get_attr(self, node: fx.Node) -> str:
        obj: Any = self.gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, torch.Tensor) or not obj.is_floating_point():
            raise QosError(f"unsupported attribute {node.target} at {_where(node)} (not a float tensor)")
        return self.g.init(str(node.target), obj.detach().float().cpu().numpy())

    # modules --------------------------------------------------------------------------------
    def module(self, node: fx.Node) -> str:
        name = str(node.target)
        mod = self.modules[name]
        where = f"net.{name}"
        g = self.g
        if isinstance(mod, (ApproxConv2d, ApproxLinear)):
            if any(layer.name == name for layer in self.ctx.layers):
                raise QosError(f"layer {where} is called more than once in the forward pass; export needs "
                               "one call per approximate layer")
            if node.kwargs or len(node.args) != 1:
                raise QosError(f"unsupported call of {_type_name(mod)} at {where} (one tensor argument expected)")
            x = self.val(node.args[0], where)
            bn = self._following_bn(node)
            link = self._requant_link(node, bn)
            res = self.residual.get(name) if link is None and (bn is not None or
                                                                fold_target(node, self.modules) is None) else None
            consumer = None if link is None else self.modules[link.consumer]
            y = _emit_approx(self.ctx, node, mod, x, bn, link, consumer, res,   # type: ignore[arg-type]
                             output=name in self.outputs)
            if res is not None:          # q (int32) until the add (_residual_add)
                self.adds[res.add] = (name, (mod, bn, res, y))
                absorbed = [res.operand] if res.operand is not node else []
            else:
                absorbed = list(link.between) if link is not None else [next(iter(node.users))] if bn is not None else []
            for n in absorbed:           # the folded BatchNorm, and the activation the codes' clamp holds
                self.env[n] = y
                self.skip.add(n)
            if link is not None:
                self._publish(link, link.between[-1] if link.between else node, y)
            return self.env.get(node, y)   # the dequantized codes where the layer itself has other readers
        args = [self.val(a, where) for a in node.args]
        if node.kwargs:
            raise QosError(f"unsupported keyword arguments in the call of {_type_name(mod)} at {where}")
        if len(args) != 1:
            raise QosError(f"unsupported call of {_type_name(mod)} at {where} ({len(args)} arguments)")
        x = args[0]
        rank = len(_shape(node.args[0]))
        if isinstance(mod, MultiBatchNorm):
            return _emit_multibn(self.ctx, name, x, mod, rank)
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            a, b = bn_affine32(mod, where)
            shape = (-1,) + (1,) * (rank - 2)
            y = g.node("Mul", [x, g.init(f"{name}.scale", a.numpy().reshape(shape))], f"{name}/mul")
            return g.node("Add", [y, g.init(f"{name}.shift", b.numpy().reshape(shape))], f"{name}/add",
                          out=f"{name}.out")
        if isinstance(mod, nn.ReLU):
            return g.node("Relu", [x], name)
        if isinstance(mod, nn.ReLU6):
            return g.node("Clip", [x, g.const(0.0, np.float32), g.const(6.0, np.float32)], name)
        if isinstance(mod, nn.Hardtanh):
            return g.node("Clip", [x, g.const(mod.min_val, np.float32), g.const(mod.max_val, np.float32)], name)
        if isinstance(mod, nn.LeakyReLU):
            return g.node("LeakyRelu", [x], name, alpha=float(mod.negative_slope))
        if isinstance(mod, nn.Sigmoid):
            return g.node("Sigmoid", [x], name)
        if isinstance(mod, nn.Hardswish):
            return _hardswish(g, x, name)
        if isinstance(mod, nn.SiLU):
            return _silu(g, x, name)
        if isinstance(mod, nn.Upsample):
            return self.upsample(node, x, mod.size, mod.scale_factor, mod.mode, mod.align_corners,
                                 mod.recompute_scale_factor, False, name, where)
        if isinstance(mod, nn.Tanh):
            return g.node("Tanh", [x], name)
        if isinstance(mod, nn.Softmax):
            dim = mod.dim if mod.dim is not None else rank - 1
            return g.node("Softmax", [x], name, axis=int(dim) % rank)
        if isinstance(mod, (nn.Identity, nn.Dropout, nn.Dropout2d)):
            return x
        if isinstance(mod, nn.Flatten):
            return self.reshape_like(node, x, name)
        if isinstance(mod, nn.MaxPool2d):
            if mod.return_indices:
                raise QosError(f"unsupported layer nn.MaxPool2d(return_indices=True) at {where}")
            stride = mod.stride if mod.stride is not None else mod.kernel_size
            return g.node("MaxPool", [x], name, kernel_shape=pair(mod.kernel_size, "kernel_size"),
                          strides=pair(stride, "stride"), pads=conv_pads(mod.padding),
                          dilations=pair(mod.dilation, "dilation"), ceil_mode=int(mod.ceil_mode))
        if isinstance(mod, nn.AvgPool2d):
            return self.avg_pool(node, name, x, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                                 mod.count_include_pad, mod.divisor_override, where)
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            return self.adaptive_avg(node, x, mod.output_size, name, where)
        raise QosError(f"unsupported layer {_type_name(mod)} at {where}")

    def _publish(self, link: RequantLink, last: fx.Node, codes: str) -> None:
        """Where an integer epilogue's output ``last`` has readers besides ``link.consumer`` (which
        reads ``codes``), they get the dequantized codes, as in the emulation."""
        if any(u.target != link.consumer or u.op != "call_module" for u in last.users):
            self.env[last] = _dequantize(self.g, f"{link.consumer}.input", codes, self.modules[link.consumer])

    def _residual_add(self, node: fx.Node) -> str:
        """The integer residual add of a conv recorded in ``self.adds`` (``_emit_requant_add``),
        the activation after it absorbed into the codes' clamp."""
        name, (layer, bn, res, q) = self.adds.pop(node)
        skip = self.val(res.skip, _where(node))
        consumer = self.modules[res.link.consumer]
        codes = _emit_requant_add(self.ctx, name, layer, q, skip, bn, res, consumer,
                                  self.modules[res.skip_codes_of], int(layer.weight.shape[0]))
        for n in res.link.between[1:]:
            self.env[n] = codes
            self.skip.add(n)
        self._publish(res.link, res.link.between[-1], codes)
        return self.env.get(node, codes)     # the dequantized sum where the add itself has other readers

    def _following_bn(self, node: fx.Node) -> tuple[str, MultiBatchNorm] | None:
        """The per-OP BatchNorm to fold into approximate layer ``node``: the node's only user, and
        normalising its channels (MultiBatchNorm2d after a conv, MultiBatchNorm1d after a linear
        layer's [N, O] output; BatchNorm1d on [N, C, L] normalises another axis and stays apart)."""
        target = fold_target(node, self.modules)
        if target is None or len(_shape(node)) != (4 if isinstance(self.modules[str(node.target)], ApproxConv2d) else 2):
            return None
        mod = self.modules[target]
        assert isinstance(mod, MultiBatchNorm)
        if mod.num_ops != self.ctx.num_ops:
            raise QosError(f"{type(mod).__name__} at net.{target} has {mod.num_ops} OPs, the QoSNet {self.ctx.num_ops}")
        return target, mod

    def _requant_link(self, node: fx.Node, bn: tuple[str, MultiBatchNorm] | None) -> RequantLink | None:
        """``fold.requant_target`` of approximate layer ``node``, where the exporter folds as the
        emulation does (a BatchNorm after the layer must be the folded one) and a linear layer's
        input and output are ``[N, K]``."""
        link = self.direct.get(str(node.target))
        if link is None:
            return None
        layer = self.modules[str(node.target)]
        if fold_target(node, self.modules) is not None and bn is None:
            return None
        if isinstance(layer, ApproxLinear) and len(_shape(node)) != 2:
            return None
        return link

    def ordered_sum(self, terms: list[str], name: str) -> str:
        """``reference.ordered_sum`` of same-shape tensors as Add nodes (the fixed halving order)."""
        level, depth = list(terms), 0
        while len(level) > 1:
            half = (1 << (len(level) - 1).bit_length()) // 2
            depth += 1
            level = [self.g.node("Add", [level[i], level[i + half]], f"{name}/sum{depth}")
                     if i + half < len(level) else level[i] for i in range(half)]
        return level[0]

    def avg_pool(self, node: fx.Node, name: str, x: str, kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
                 count_include_pad: bool, divisor_override: Any, where: str) -> str:
        """Average pooling as ``reference.avg_pool2d`` computes it: zero Pad, one strided Slice per
        window tap (row-major), ``ordered_sum``, Div by the per-position divisor. Not ONNX
        AveragePool: onnxruntime's kernel sums in an order of its own (see reference.py)."""
        if divisor_override is not None:
            raise QosError(f"unsupported avg_pool2d(divisor_override=...) at {where}")
        in_shape = _shape(node.args[0] if node.args else node.kwargs.get("input"))
        if len(in_shape) != 4:
            raise QosError(f"unsupported average pooling of a rank-{len(in_shape)} tensor at {where}")
        h, w = in_shape[2], in_shape[3]
        try:
            (ho, wo), pads, div = reference.pool_geometry(h, w, kernel, stride, padding, bool(ceil_mode),
                                                          bool(count_include_pad))
        except QosError as e:
            raise QosError(f"{e} at {where}") from None
        kh, kw = pair(kernel, "kernel_size")
        sh, sw = pair(stride if stride not in (None, [], ()) else kernel, "stride")
        g = self.g
        if any(pads):
            pt, pl, pb, pr = pads
            x = g.node("Pad", [x, g.const([0, 0, pt, pl, 0, 0, pb, pr], np.int64), g.const(0.0, np.float32)],
                       f"{name}/pad")
        taps = [g.node("Slice", [x, g.const([u, v], np.int64),
                                 g.const([u + sh * (ho - 1) + 1, v + sw * (wo - 1) + 1], np.int64),
                                 g.const([2, 3], np.int64), g.const([sh, sw], np.int64)], f"{name}/tap")
                for u in range(kh) for v in range(kw)]
        total = self.ordered_sum(taps, name)
        divisor = g.const(div[0, 0], np.float32) if np.all(div == div[0, 0]) else g.init(f"{name}.divisor", div)
        return g.node("Div", [total, divisor], name)

    def global_mean(self, x: str, in_shape: Sequence[int], dims: Sequence[int], keepdim: bool, name: str) -> str:
        """``reference.mean`` over non-batch ``dims``: Transpose them last (if needed), Reshape to one
        axis, zero-Pad it to a power of two, halve it with Slice + Add, Div by the count."""
        g = self.g
        rank = len(in_shape)
        dims = sorted({int(d) % rank for d in dims})
        keep = [d for d in range(rank) if d not in dims]
        if keep + dims != list(range(rank)):
            x = g.node("Transpose", [x], f"{name}/transpose", perm=keep + dims)
        count = int(np.prod([in_shape[d] for d in dims]))
        x = g.node("Reshape", [x, g.const([0, *[in_shape[d] for d in keep[1:]], count], np.int64)],
                   f"{name}/flatten")
        size = 1 << (count - 1).bit_length()
        axis = len(keep)
        if size > count:
            pads = [0] * (2 * (axis + 1))
            pads[-1] = size - count
            x = g.node("Pad", [x, g.const(pads, np.int64), g.const(0.0, np.float32)], f"{name}/pad")
        depth = 0
        while size > 1:
            size //= 2
            depth += 1
            lo = g.node("Slice", [x, g.const([0], np.int64), g.const([size], np.int64), g.const([axis], np.int64)],
                        f"{name}/low{depth}")
            hi = g.node("Slice", [x, g.const([size], np.int64), g.const([2 * size], np.int64),
                                  g.const([axis], np.int64)], f"{name}/high{depth}")
            x = g.node("Add", [lo, hi], f"{name}/sum{depth}")
        out_shape = [1 if d in dims else in_shape[d] for d in range(rank)] if keepdim else [in_shape[d] for d in keep]
        x = g.node("Reshape", [x, g.const([0, *out_shape[1:]], np.int64)], f"{name}/shape")
        return g.node("Div", [x, g.const(float(count), np.float32)], name)

    def adaptive_avg(self, node: fx.Node, x: str, output_size: Any, name: str, where: str) -> str:
        in_shape = _shape(node.args[0])
        h, w = in_shape[-2:]
        # not numerics.pair: an adaptive output size may leave an axis as None (keep the input's)
        oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        oh, ow = (h if oh is None else oh), (w if ow is None else ow)
        if (oh, ow) == (1, 1):
            return self.global_mean(x, in_shape, [len(in_shape) - 2, len(in_shape) - 1], True, name)
        if h % oh or w % ow:
            raise QosError(f"unsupported adaptive average pooling {h}x{w} -> {oh}x{ow} at {where} "
                           "(input size must be a multiple of the output size)")
        k = [h // oh, w // ow]
        return self.avg_pool(node, name, x, k, k, 0, False, True, None, where)

    def upsample(self, node: fx.Node, x: str, size: Any, scale_factor: Any, mode: Any, align_corners: Any,
                 recompute_scale_factor: Any, antialias: Any, name: str, where: str) -> str:
        """Nearest upsampling by integer factors as pure data movement, exact on every backend:
        Unsqueeze to ``[N, C, H, 1, W, 1]``, Expand by ``[kh, kw]``, Reshape to ``[N, C, H·kh, W·kw]``
        (not ONNX Resize, whose index arithmetic is each runtime's own). Other modes and
        non-integer factors are refused."""
        if mode != "nearest" or antialias or align_corners:
            raise QosError(f"unsupported upsampling mode={mode!r} at {where} (only mode='nearest' by an integer "
                           "factor is supported)")
        if isinstance(scale_factor, fx.Node) or isinstance(scale_factor, (tuple, list)) and any(
                isinstance(v, fx.Node) for v in scale_factor):
            raise QosError(f"unsupported data-dependent upsampling scale factor at {where}")
        in_shape, out_shape = _shape(node.args[0] if node.args else node.kwargs.get("input")), _shape(node)
        if len(in_shape) != 4:
            raise QosError(f"unsupported upsampling of a rank-{len(in_shape)} tensor at {where} (only [N, C, H, W])")
        (h, w), (ho, wo) = in_shape[2:], out_shape[2:]
        if ho % h or wo % w:
            raise QosError(f"unsupported nearest upsampling {h}x{w} -> {ho}x{wo} at {where} (only integer factors)")
        kh, kw = ho // h, wo // w
        # torch computes nearest source indices in float (index * (1/scale)); make sure they are
        # exactly dst // k for these sizes by running torch itself on an index grid
        grid = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)
        if scale_factor is not None:
            got = F.interpolate(grid, scale_factor=scale_factor, mode="nearest",
                                recompute_scale_factor=recompute_scale_factor)
        else:
            got = F.interpolate(grid, size=(ho, wo), mode="nearest")
        want = grid.repeat_interleave(kh, 2).repeat_interleave(kw, 3)
        if got.shape != want.shape or not torch.equal(got, want):
            raise QosError(f"unsupported nearest upsampling {h}x{w} -> {ho}x{wo} at {where} (torch's source "
                           "indices are not a plain repetition for this scale factor)")
        if (kh, kw) == (1, 1):
            return x
        g = self.g
        t = g.node("Unsqueeze", [x, g.const([3, 5], np.int64)], f"{name}/unsqueeze")
        t = g.node("Expand", [t, g.const([1, 1, 1, kh, 1, kw], np.int64)], f"{name}/expand")
        return g.node("Reshape", [t, g.const([0, in_shape[1], ho, wo], np.int64)], name)

    def unsqueeze(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any], name: str, where: str) -> str:
        """``torch.unsqueeze(x, dim)`` / ``x.unsqueeze(dim)`` as Unsqueeze."""
        p = self._bind(["input", "dim"], args, kwargs, {}, where)
        if not isinstance(p.get("dim"), int) or isinstance(p["dim"], bool):
            raise QosError(f"unsupported unsqueeze at {where} (dim must be a constant integer)")
        axis = int(p["dim"]) % len(_shape(node))
        if axis == 0:
            raise QosError(f"unsupported unsqueeze of the batch axis at {where}")
        return self.g.node("Unsqueeze", [self.val(p["input"], where), self.g.const([axis], np.int64)], name)

    def mean(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any], name: str, where: str) -> str:
        """``x.mean(dims, keepdim)`` / ``torch.mean``: ``reference.mean`` (not over the batch axis)."""
        p = self._bind(["input", "dim", "keepdim"], args, kwargs, {"dim": None, "keepdim": False}, where)
        if p["dim"] is None:
            raise QosError(f"unsupported mean over all axes at {where}")
        src = p["input"]
        rank = len(_shape(src))
        dims = [int(d) % rank for d in ([p["dim"]] if isinstance(p["dim"], int) else p["dim"])]
        if 0 in dims:
            raise QosError(f"unsupported mean over the batch axis at {where}")
        return self.global_mean(self.val(src, where), _shape(src), dims, bool(p["keepdim"]), name)

    def reshape_like(self, node: fx.Node, x: str, name: str) -> str:
        """Reshape to the propagated output shape, keeping the (symbolic) batch axis."""
        src = node.args[0] if node.args else node.kwargs.get("input")
        in_shape, out_shape = _shape(src), _shape(node)
        if not out_shape or out_shape[0] != _TRACE_BATCH or in_shape[0] != _TRACE_BATCH:
            raise QosError(f"unsupported reshape across the batch axis at {_where(node)} ({in_shape} -> "
                           f"{out_shape})")
        if in_shape == out_shape:
            return x
        target = self.g.const([0, *out_shape[1:]], np.int64)
        return self.g.node("Reshape", [x, target], name)

    # functions ------------------------------------------------------------------------------
    def function(self, node: fx.Node, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
        if node in self.adds:
            return self._residual_add(node)
        where = _where(node)
        name = f"{_scope(node)}/{node.name}" if _scope(node) else node.name
        g = self.g
        binary, unary = _BINARY, _UNARY
        if fn in binary:
            if kwargs.get("alpha", 1) != 1 or kwargs.get("rounding_mode") is not None or len(args) != 2:
                raise QosError(f"unsupported call of {function_name(fn)} at {where}")
            if not any(isinstance(a, fx.Node) for a in args):
                raise QosError(f"unsupported constant expression at {where}")
            return g.node(binary[fn], [self.val(args[0], where), self.val(args[1], where)], name)
        if fn in unary:
            # in-place or not computes the same value (torch.fx records inplace=False too)
            kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
            if kwargs or len(args) != 1 and not (len(args) == 2 and isinstance(args[1], bool)):
                raise QosError(f"unsupported call of {function_name(fn)} at {where}")
            return g.node(unary[fn], [self.val(args[0], where)], name)
        if fn in (F.relu6, F.hardtanh):
            lo, hi = (0.0, 6.0) if fn is F.relu6 else (kwargs.get("min_val", args[1] if len(args) > 1 else -1.0),
                                                       kwargs.get("max_val", args[2] if len(args) > 2 else 1.0))
            return g.node("Clip", [self.val(args[0], where), g.const(lo, np.float32), g.const(hi, np.float32)], name)
        if fn in (F.hardswish, F.silu):
            if {k for k in kwargs if k != "inplace"} or len(args) != 1 and not (len(args) == 2 and
                                                                             isinstance(args[1], bool)):
                raise QosError(f"unsupported call of {function_name(fn)} at {where}")
            x = self.val(args[0], where)
            return _hardswish(g, x, name) if fn is F.hardswish else _silu(g, x, name)
        if fn is F.interpolate:
            p = self._bind(["input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                            "antialias"], args, kwargs, {"size": None, "scale_factor": None, "mode": "nearest",
                                                         "align_corners": None, "recompute_scale_factor": None,
                                                         "antialias": False}, where)
            return self.upsample(node, self.val(p["input"], where), p["size"], p["scale_factor"], p["mode"],
                                 p["align_corners"], p["recompute_scale_factor"], p["antialias"], name, where)
        if fn in (F.dropout, F.dropout2d):
            return self.val(args[0], where)
        if fn in (torch.flatten, torch.reshape):
            return self.reshape_like(node, self.val(args[0], where), name)
        if fn is torch.mean:
            return self.mean(node, args, kwargs, name, where)
        if fn is torch.unsqueeze:
            return self.unsqueeze(node, args, kwargs, name, where)
        if fn is F.adaptive_avg_pool2d:
            size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
            return self.adaptive_avg(node, self.val(args[0], where), size, name, where)
        if fn is F.avg_pool2d:
            p = self._bind(["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                            "divisor_override"], args, kwargs, {"stride": None, "padding": 0, "ceil_mode": False,
                                                                 "count_include_pad": True,
                                                                 "divisor_override": None}, where)
            return self.avg_pool(node, name, self.val(p["input"], where), p["kernel_size"], p["stride"], p["padding"],
                                 p["ceil_mode"], p["count_include_pad"], p["divisor_override"], where)
        if fn is F.max_pool2d:
            p = self._bind(["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"],
                           args, kwargs, {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
                                          "return_indices": False}, where)
            if p["return_indices"]:
                raise QosError(f"unsupported max_pool2d(return_indices=True) at {where}")
            stride = p["stride"] if p["stride"] not in (None, []) else p["kernel_size"]
            return g.node("MaxPool", [self.val(p["input"], where)], name,
                          kernel_shape=pair(p["kernel_size"], "kernel_size"), strides=pair(stride, "stride"),
                          pads=conv_pads(p["padding"]), dilations=pair(p["dilation"], "dilation"),
                          ceil_mode=int(bool(p["ceil_mode"])))
        if fn is F.pad:
            return self.pad(node, args, kwargs, name, where)
        if fn is operator.getitem:
            return self.getitem(node, args, name, where)
        if fn in (torch.cat, torch.concat):
            tensors = args[0] if args else kwargs["tensors"]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            rank = len(_shape(node))
            return g.node("Concat", [self.val(t, where) for t in tensors], name, axis=int(dim) % rank)
        raise QosError(f"unsupported function {function_name(fn)} at {where}")

    @staticmethod
    def _bind(names: list[str], args: list[Any], kwargs: dict[str, Any], defaults: dict[str, Any],
              where: str) -> dict[str, Any]:
        out = dict(defaults)
        out.update(dict(zip(names, args)))
        for k, v in kwargs.items():
            if k not in names:
                raise QosError(f"unsupported argument {k!r} at {where}")
            out[k] = v
        return out

    def pad(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any], name: str, where: str) -> str:
        p = self._bind(["input", "pad", "mode", "value"], args, kwargs, {"mode": "constant", "value": None}, where)
        if p["mode"] != "constant":
            raise QosError(f"unsupported F.pad(mode={p['mode']!r}) at {where}")
        rank = len(_shape(p["input"]))
        pads = [int(v) for v in p["pad"]]
        begin, end = [0] * rank, [0] * rank
        for i in range(len(pads) // 2):
            dim = rank - 1 - i
            begin[dim], end[dim] = pads[2 * i], pads[2 * i + 1]
        value = 0.0 if p["value"] is None else float(p["value"])
        return self.g.node("Pad", [self.val(p["input"], where), self.g.const(begin + end, np.int64),
                                   self.g.const(value, np.float32)], name, mode="constant")

    def getitem(self, node: fx.Node, args: list[Any], name: str, where: str) -> str:
        src, index = args
        if not isinstance(src, fx.Node) or not isinstance(self.env.get(src), str):
            raise QosError(f"unsupported indexing at {where} (only tensors can be sliced)")
        rank = len(_shape(src))
        items = list(index) if isinstance(index, tuple) else [index]
        if sum(1 for it in items if it is Ellipsis) > 1:
            raise QosError(f"unsupported indexing at {where}")
        if Ellipsis in items:
            k = items.index(Ellipsis)
            fill = rank - (len(items) - 1 - sum(1 for it in items if it is None))
            items = items[:k] + [slice(None)] * fill + items[k + 1:]
        x = self.val(src, where)
        starts, ends, axes, steps, squeeze, unsqueeze = [], [], [], [], [], []
        dim = 0
        for it in items:
            if it is None:
                unsqueeze.append(dim + len(unsqueeze) - len(squeeze))
                continue
            if isinstance(it, slice):
                if any(isinstance(v, fx.Node) for v in (it.start, it.stop, it.step)):
                    raise QosError(f"unsupported data-dependent slice at {where}")
                step = 1 if it.step is None else int(it.step)
                if step < 1:
                    raise QosError(f"unsupported slice step {step} at {where}")
                if it != slice(None) and not (it.start in (None, 0) and it.stop is None and step == 1):
                    starts.append(0 if it.start is None else int(it.start))
                    ends.append(2**63 - 1 if it.stop is None else int(it.stop))
                    axes.append(dim)
                    steps.append(step)
            elif isinstance(it, int) and not isinstance(it, bool):
                starts.append(int(it))
                ends.append(int(it) + 1 if it != -1 else 2**63 - 1)
                axes.append(dim)
                steps.append(1)
                squeeze.append(dim)
            else:
                raise QosError(f"unsupported index {it!r} at {where}")
            dim += 1
        g = self.g
        if axes:
            x = g.node("Slice", [x, g.const(starts, np.int64), g.const(ends, np.int64), g.const(axes, np.int64),
                                 g.const(steps, np.int64)], name)
        if squeeze:
            x = g.node("Squeeze", [x, g.const(squeeze, np.int64)], f"{name}/squeeze")
        if unsqueeze:
            x = g.node("Unsqueeze", [x, g.const(unsqueeze, np.int64)], f"{name}/unsqueeze")
        return x

    # methods --------------------------------------------------------------------------------
    def method(self, node: fx.Node) -> Any:
        where = _where(node)
        meth = str(node.target)
        name = f"{_scope(node)}/{node.name}" if _scope(node) else node.name
        args, kwargs = list(node.args), dict(node.kwargs)
        if meth == "size":
            if all(u.op == "call_method" and u.target in ("view", "reshape") for u in node.users):
                return None  # shapes come from shape propagation
            raise QosError(f"unsupported use of Tensor.size at {where}")
        if meth in ("view", "reshape", "flatten"):
            return self.reshape_like(node, self.val(args[0], where), name)
        if meth in ("contiguous", "clone"):
            return self.val(args[0], where)
        table = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "add": torch.add, "mul": torch.mul,
                 "sub": torch.sub, "div": torch.div, "relu_": F.relu, "add_": torch.add, "mul_": torch.mul}
        if meth in table:
            return self.function(node, table[meth], args, kwargs)
        if meth == "mean":
            return self.mean(node, args, kwargs, name, where)
        if meth == "unsqueeze":
            return self.unsqueeze(node, args, kwargs, name, where)
        raise QosError(f"unsupported method Tensor.{meth} at {where}")


# --- public API ---------------------------------------------------------------------------------

def _resolve_input_shape(qnet: QoSNet, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is None:
        arch = getattr(qnet.net, "qos_arch", None)
        if isinstance(arch, dict) and "in_channels" in arch and "input_size" in arch:
            input_shape = (int(arch["in_channels"]), int(arch["input_size"]), int(arch["input_size"]))
        elif getattr(qnet, "input_shape", None) is not None:
            input_shape = qnet.input_shape   # given to wrap_model, or seen by the first forward pass
        else:
            first = qnet.approx_layers()[0].module
            if (first.input_shape is not None and len(first.input_shape) == (3 if isinstance(first, ApproxConv2d)
                                                                              else 1)):
                input_shape = first.input_shape
    if input_shape is None:
        raise QosError("input shape unknown: pass input_shape=(C, H, W) (or (F,) for a network on [N, F])")
    shape = tuple(int(v) for v in input_shape)
    if len(shape) < 1 or len(shape) > 5 or any(v < 1 for v in shape):
        raise QosError(f"input_shape must be 1 to 5 positive sizes per sample, e.g. (3, 32, 48) or (64,), "
                       f"got {input_shape!r}")
    return shape


def _metadata(qnet: QoSNet, ex: OnnxExport, variant: str, extra: dict[str, Any] | None) -> dict[str, str]:
    bank = qnet.bank
    meta: dict[str, Any] = {
        "qos.format": FORMAT_NAME,
        "qos.format_version": FORMAT_VERSION,
        "qos.variant": variant,
        "qos.num_ops": qnet.num_ops,
        "qos.circuits": list(bank.names),
        "qos.circuit_sha256": list(bank.sha256),
        "qos.signed": bool(bank.signed),
        "qos.per_channel": bool(qnet.qconfig.per_channel),
        "qos.assignment": qnet.assignment(),
        "qos.layers": [info.name for info in qnet.approx_layers()],   # the assignment's column order
        "qos.input_shape": list(ex.input_shape),
        "qos.port_order": "lut[weight_index, activation_index]",
    }
    arch = getattr(qnet.net, "qos_arch", None)
    if isinstance(arch, dict):
        meta["qos.arch"] = arch
    for key, value in (extra or {}).items():
        meta[key if key.startswith("qos.") else f"qos.{key}"] = value
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def export_onnx(qnet: QoSNet, path: str | Path | None = None, *, input_shape: Sequence[int] | None = None,
                slots: bool = False, opset: int = DEFAULT_OPSET, debug: bool = False,
                quantize: str = "exact", metadata: dict[str, Any] | None = None) -> OnnxExport:
    """Export a calibrated QoSNet with every operating point to ONNX (docs/onnx_ops.md).

    ``input_shape``: per-sample input, (C, H, W) (any H, W) or (F,) for a network on [N, F];
    default from the model zoo's ``qos_arch``, else ``qnet.input_shape`` (``wrap_model``'s, or
    the first forward pass's).
    ``slots=False``: inputs ``input`` and ``operating_point`` (int64 scalar), per-OP tensors
    stacked and gathered. ``slots=True``: no ``operating_point``; every per-OP tensor is a
    graph input ``slot.<layer>.lut|scale|shift`` (values in ``OnnxExport.slots``).
    ``debug``: also output every layer's input codes ``<layer>.codes`` and int32
    accumulators ``<layer>.acc``. ``quantize``: ``"exact"`` (Mul by the float32 reciprocal,
    Round, Add, Clip, Cast: PyTorch's codes bit for bit) or ``"QuantizeLinear"`` (the
    standard op, which divides by the scale and can differ by one code at rounding ties).
    ``metadata``: extra ``metadata_props`` (e.g. ``{"normalization": {"mean": ..., "std": ...}}``).
    The file is written atomically (temporary file + rename). Layers must have observed
    activations (calibration); the model must be traceable by torch.fx.
    """
    if not isinstance(qnet, QoSNet):
        raise QosError(f"export_onnx needs a QoSNet (from wrap_model or load_qos_model), got {type(qnet).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not ops.MIN_OPSET <= opset <= 21:
        raise QosError(f"opset must be an integer in {ops.MIN_OPSET}..21, got {opset!r}")
    if quantize not in ("exact", "QuantizeLinear"):
        raise QosError(f"quantize must be 'exact' or 'QuantizeLinear', got {quantize!r}")
    shape = _resolve_input_shape(qnet, input_shape)
    gm = _trace(qnet, shape)

    g = _Graph()
    g.fresh(INPUT_NAME)
    g.inputs.append(_vi(INPUT_NAME, TensorProto.FLOAT, ["batch", *shape]))
    op_input = None
    if not slots:
        op_input = g.fresh(OP_INPUT_NAME)
        g.inputs.append(_vi(op_input, TensorProto.INT64, []))
    ctx = _Ctx(qnet=qnet, g=g, slots=bool(slots), debug=bool(debug), quantize=quantize, opset=opset,
               num_ops=qnet.num_ops, op_input=op_input, slot_values={}, layers=[])
    if not slots:
        ctx.luts_name = g.init("luts", qnet.bank.luts.detach().cpu().numpy().astype(np.int32))
    out = _Emitter(ctx, gm).run()
    # the network output under a fixed name
    out_shape = _shape(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    g.nodes.append(helper.make_node("Identity", [out], [OUTPUT_NAME], name="output"))
    g.outputs.insert(0, _vi(OUTPUT_NAME, TensorProto.FLOAT, _batched(out_shape)))

    order = {info.name: i for i, info in enumerate(qnet.approx_layers())}
    ctx.layers.sort(key=lambda layer: order.get(layer.name, len(order)))
    if len(ctx.layers) != len(order):
        missing = sorted(set(order) - {layer.name for layer in ctx.layers})
        raise QosError(f"approximate layers not reached by the traced forward: {', '.join(missing)}")

    variant = "slots" if slots else "operating_point"
    graph = helper.make_graph(g.nodes, "qosnet", g.inputs, g.outputs, g.inits)
    model = helper.make_model(graph, opset_imports=ops.opset_imports(opset), functions=ops.function_protos(opset),
                              producer_name="qos-compile", producer_version=str(FORMAT_VERSION))
    model.ir_version = ops.ir_version_for(opset)
    result = OnnxExport(model=model, path=None, slots=ctx.slot_values, layers=ctx.layers, num_ops=qnet.num_ops,
                        slotted=bool(slots), debug=bool(debug), input_shape=shape, circuits=list(qnet.bank.names))
    meta = _metadata(qnet, result, variant, metadata)
    onnx.helper.set_model_props(model, meta)
    model.doc_string = (
        f"QoS-Net exported by qos-compile ({variant} variant): {qnet.num_ops} operating point(s), "
        f"{len(ctx.layers)} approximate layer(s), {'signed' if qnet.bank.signed else 'unsigned'} circuits "
        f"{', '.join(qnet.bank.names)}. Custom ops {ops.DOMAIN} v{ops.DOMAIN_VERSION} (ApproxConv, ApproxGemm) are "
        "defined by model-local functions. See metadata_props qos.* and docs/onnx_ops.md.")
    if path is not None:
        result.path = Path(path)
        result.path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(result.path, model.SerializeToString())
    return result
