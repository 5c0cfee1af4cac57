"""ONNX (with the ``ai.qosnets`` ops) -> TVM Relax.

The stock importer ``tvm.relax.frontend.onnx.from_onnx`` has no hook for custom ops and
ignores node domains; it looks every converter up through the module-level
``_get_convert_map()`` (docs/design.md, section 6.2). ``from_onnx`` here extends that
map, for the duration of one import (under a lock), with two converters:

* ``ApproxConv(X, W, LUT)`` (Conv attributes + ``pad_value``) -> the kernel variant the
  layer was given (``lowering.ConvLowering``; gather where none was), emitted by the
  variant's own ``emit`` (``variants.Variant.emit``): int32 accumulators;
* ``ApproxGemm(X, W, LUT)`` -> ``bb.call_te(kernels.approx_dense, ...)``.

Every other node goes through the stock converters. Graph inputs (the network input and,
in the exporter's *slots* variant, every per-OP tensor ``slot.<layer>.lut|scale|shift``)
stay parameters of ``main`` in graph-input order; initializers (weights, quantization
constants) become Relax constants, so ``FoldConstant`` can pre-compute weight-only
expressions (zero-point corrections) at compile time.
"""
from __future__ import annotations

import contextlib
import contextvars
import io
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as _frontend

from ..errors import QosError
from ..numerics import code_range
from . import kernels, variants
from .lowering import gather_lowering

__all__ = ["CUSTOM_DOMAIN", "CUSTOM_OPS", "ImportedModel", "from_onnx", "custom_converters"]

CUSTOM_DOMAIN = "ai.qosnets"
CUSTOM_OPS = ("ApproxConv", "ApproxGemm")
_STANDARD_DOMAINS = ("", "ai.onnx")
_LOCK = threading.RLock()
#: Per-layer lowerings of the import in progress: LUT slot name -> lowering.ConvLowering.
_LOWERINGS: contextvars.ContextVar[dict] = contextvars.ContextVar("qos_lowerings", default={})


def _static_shape(expr: Any, what: str) -> tuple[int, ...]:
    ty = expr.ty
    shape = getattr(ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None:
        raise QosError(f"{what}: shape must be static, got {ty}")
    try:
        return tuple(int(v) for v in values)
    except TypeError:
        raise QosError(f"{what}: shape must be static, got {ty}") from None


def _dtype(expr: Any) -> str:
    return str(expr.ty.dtype)


def _ints(attr: dict, key: str, default: tuple[int, ...], n: int, op: str) -> tuple[int, ...]:
    v = attr.get(key, default)
    t = tuple(int(x) for x in (v if isinstance(v, (tuple, list)) else (v,)))
    if len(t) != n:
        raise QosError(f"{op}: attribute {key} must have {n} values, got {t}")
    return t


def _check_operands(op: str, x: Any, w: Any, lut: Any, x_rank: int) -> None:
    if x is None or w is None or lut is None:
        raise QosError(f"{op} needs three inputs (X codes, W codes, LUT)")
    xs, ws, ls = (_static_shape(x, f"{op} X"), _static_shape(w, f"{op} W"), _static_shape(lut, f"{op} LUT"))
    if len(xs) != x_rank or len(ws) != x_rank:
        raise QosError(f"{op}: X and W must have rank {x_rank}, got {xs} and {ws}")
    if {_dtype(x), _dtype(w)} not in ({"uint8"}, {"int8"}):
        raise QosError(f"{op}: X and W must both be uint8 (unsigned circuits) or both int8 (signed), "
                       f"got {_dtype(x)} and {_dtype(w)}")
    if ls != (256, 256) or _dtype(lut) != "int32":
        raise QosError(f"{op}: LUT must be int32 (256, 256), got {_dtype(lut)} {ls}")


class ApproxConvConverter(_frontend.OnnxOpConverter):
    """``ai.qosnets::ApproxConv`` v1 -> the TIR LUT convolution (int32 accumulators, NCHW)."""

    @classmethod
    def _impl_v1(cls, bb: relax.BlockBuilder, inputs: Any, attr: dict, params: Any) -> relax.Expr:
        x, w, lut = inputs[0], inputs[1], inputs[2]
        _check_operands("ApproxConv", x, w, lut, 4)
        ws = _static_shape(w, "ApproxConv W")
        auto_pad = attr.get("auto_pad", b"NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        if auto_pad not in ("NOTSET", ""):
            raise QosError(f"ApproxConv: auto_pad={auto_pad!r} is not supported (the exporter writes explicit pads)")
        kshape = _ints(attr, "kernel_shape", ws[2:], 2, "ApproxConv")
        if kshape != ws[2:]:
            raise QosError(f"ApproxConv: kernel_shape {kshape} does not match W {ws}")
        signed = _dtype(x) == "int8"
        pad_code = int(attr.get("pad_value", 0))
        lo, hi = code_range(signed)
        if not lo <= pad_code <= hi:
            raise QosError(f"ApproxConv: pad_value {pad_code} is not a {_dtype(x)} code")
        conv = dict(stride=_ints(attr, "strides", (1, 1), 2, "ApproxConv"),
                    padding=_ints(attr, "pads", (0, 0, 0, 0), 4, "ApproxConv"),
                    dilation=_ints(attr, "dilations", (1, 1), 2, "ApproxConv"),
                    groups=int(attr.get("group", 1)), pad_code=pad_code, signed=signed)
        name = getattr(lut, "name", "") if isinstance(lut, relax.Var) else ""
        low = _LOWERINGS.get().get(name)
        is_const = type(w).__name__ in ("GenericConst", "Constant")
        if low is None or (low.variant.const_weights and not is_const):
            low = gather_lowering(signed)
        ops = variants.ConvOperands(x, w, lut, conv, _conv_spec(x, ws, conv), w.value.numpy() if is_const else None,
                                    lambda suffixes, what: _slot_inputs(name, params[0], suffixes, what))
        return low.variant.emit(bb, ops, low)


def _slot_inputs(lut_name: str, nodes: dict, suffixes: tuple[str, ...], what: str) -> list[Any]:
    """The per-OP graph inputs ``slot.<layer>.<suffix>`` a lowering of the layer reads."""
    base = lut_name[:-len(".lut")] if lut_name.endswith(".lut") else lut_name
    got = [nodes.get(f"{base}.{suffix}") for suffix in suffixes]
    if any(v is None for v in got):
        raise QosError(f"the {what} of {base} need the graph inputs " + " and ".join(f"{base}.{s}" for s in suffixes))
    return got


def _conv_spec(x: Any, w_shape: tuple[int, ...], conv: dict) -> kernels.ConvSpec:
    return kernels.ConvSpec.make(_static_shape(x, "ApproxConv X"), w_shape, conv["stride"], conv["padding"],
                                 conv["dilation"], conv["groups"], conv["pad_code"], conv["signed"])


class ApproxGemmConverter(_frontend.OnnxOpConverter):
    """``ai.qosnets::ApproxGemm`` v1 (X (N, K), W (O, K)) -> the TIR LUT dense (int32 (N, O))."""

    @classmethod
    def _impl_v1(cls, bb: relax.BlockBuilder, inputs: Any, attr: dict, params: Any) -> relax.Expr:
        x, w, lut = inputs[0], inputs[1], inputs[2]
        _check_operands("ApproxGemm", x, w, lut, 2)
        xs, ws = _static_shape(x, "ApproxGemm X"), _static_shape(w, "ApproxGemm W")
        if xs[1] != ws[1]:
            raise QosError(f"ApproxGemm: X {xs} and W {ws} disagree in K")
        signed = _dtype(x) == "int8"
        return bb.call_te(kernels.approx_dense, x, w, lut, signed=signed,
                          primfunc_name_hint=variants.dense_kernel_name(signed).replace("-", "_"))


def float_to_int(x: Any, dtype: str) -> Any:
    """TE: float tensor ``x`` -> integer ``dtype`` (at most 32 bits): NaN to 0, then saturated to
    the type's range and truncated. NaN is tested on the bits (exponent all ones, mantissa not
    zero): TVM's vectorizer turns ``isnan`` back into scalar code."""
    import numpy as np
    from tvm import te

    fdt = str(x.dtype)
    info = np.iinfo(dtype)
    # the range's ends as floats of x's type that convert exactly (int32's 2^31 - 1 is not a float32)
    ends = [np.array(v, fdt) for v in (info.min, info.max)]
    ends = [e if int(e) == v or abs(float(e)) < abs(v) else np.nextafter(e, np.array(0, fdt))
            for e, v in zip(ends, (info.min, info.max))]
    lo, hi = (tvm.tirx.const(float(e), fdt) for e in ends)
    bits = fdt.replace("float", "int")
    sign, inf = {"int32": (0x7FFFFFFF, 0x7F800000), "int16": (0x7FFF, 0x7C00),
                 "int64": (0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000)}[bits]

    def f(*i: Any) -> Any:
        v = x(*i)
        magnitude = tvm.tirx.bitwise_and(tvm.tirx.reinterpret(bits, v), tvm.tirx.const(sign, bits))
        nan = magnitude > tvm.tirx.const(inf, bits)
        clean = tvm.tirx.Select(nan, tvm.tirx.const(0.0, fdt), v)
        return tvm.tirx.max(tvm.tirx.min(clean, hi), lo).astype(dtype)

    return te.compute(x.shape, f, name="float_to_int")


class SaturatingCastConverter(_frontend.OnnxOpConverter):
    """ONNX ``Cast`` from a float to an integer type of at most 32 bits: ``float_to_int`` (NaN
    to 0, as the stock converter does, then saturated and truncated).

    The stock converter wraps out-of-range values modulo 2^bits through int64 compares and
    selects and tests ``isfinite``, which TVM's vectorizer turns back into scalar code (the
    activation quantization after every layer ran one element at a time). The exporter clips
    before every such Cast, so the values it produces convert the same either way; every
    other Cast goes to the stock converter."""

    @classmethod
    def _impl_v13(cls, bb: relax.BlockBuilder, inputs: Any, attr: dict, params: Any) -> relax.Expr:
        src = inputs[0]
        to = str(_frontend.get_type(attr["to"]))
        src_dtype = getattr(getattr(src, "ty", None), "dtype", None)
        if (not isinstance(src, (relax.ShapeExpr, tvm.ir.GenericConst)) and not tvm.ir.is_prim_expr(src)
                and src_dtype in ("float16", "float32", "float64")
                and to in ("int8", "uint8", "int16", "uint16", "int32")):
            return bb.call_te(float_to_int, src, to, primfunc_name_hint="float_to_int")
        return _STOCK_CAST._impl_v13(bb, inputs, attr, params)


_STOCK_CAST = _frontend.Cast


def custom_converters() -> dict[str, type]:
    """The converters this module adds to (or replaces in) the stock map (op type -> converter class)."""
    return {"ApproxConv": ApproxConvConverter, "ApproxGemm": ApproxGemmConverter, "Cast": SaturatingCastConverter}


@contextlib.contextmanager
def _extended_convert_map() -> Iterator[None]:
    """Temporarily make the stock importer see the ai.qosnets converters."""
    with _LOCK:
        original = _frontend._get_convert_map

        def extended() -> dict:
            table = dict(original())
            table.update(custom_converters())
            return table

        _frontend._get_convert_map = extended
        try:
            yield
        finally:
            _frontend._get_convert_map = original


@dataclass
class ImportedModel:
    """A Relax module with ``main(*inputs)``; ``input_names``/``output_names`` are the ONNX
    graph's (non-initializer inputs, in the order of main's parameters)."""

    mod: tvm.IRModule
    input_names: list[str]
    output_names: list[str]
    opset: int


def _check_domains(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        dom = node.domain or ""
        if dom == CUSTOM_DOMAIN:
            if node.op_type not in CUSTOM_OPS:
                raise QosError(f"unknown {CUSTOM_DOMAIN} operator {node.op_type!r} (node {node.name!r}); "
                               f"known: {', '.join(CUSTOM_OPS)}")
        elif dom not in _STANDARD_DOMAINS:
            raise QosError(f"node {node.name!r}: operator {dom}::{node.op_type} is not supported by the TVM importer")
        elif node.op_type in CUSTOM_OPS:
            raise QosError(f"node {node.name!r}: {node.op_type} must be in domain {CUSTOM_DOMAIN!r}")


def _discard_blocks(bb: relax.BlockBuilder) -> None:
    """Close what a failed import left open (else TVM warns when the builder is destroyed)."""
    try:
        bb._end_block()
        bb.end_scope()
    except Exception:  # noqa: BLE001 - nothing left to close
        pass


def from_onnx(model: "onnx.ModelProto | str | os.PathLike", shape_dict: dict[str, list[int]] | None = None,
              lowerings: "dict[str, Any] | None" = None) -> ImportedModel:
    """Import an ONNX model (a ModelProto or a path) into Relax.

    lowerings: ``{LUT graph input name: lowering.ConvLowering}`` picks each ApproxConv's
    kernel variant (``variants``); layers not named use the gather kernel, and so does a
    variant that needs constant weights where they are not. A low-rank layer reads its
    factors from the graph inputs ``slot.<layer>.wterms|xterms`` (``lut_factors``), which
    the model must have.

    QosError for an unsupported operator or a malformed ApproxConv/ApproxGemm.
    """
    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(str(Path(model)))
        except Exception as e:  # noqa: BLE001 - protobuf/IO errors
            raise QosError(f"cannot read ONNX model {model}: {e}") from None
    _check_domains(model)
    inits = {t.name for t in model.graph.initializer}
    input_names = [i.name for i in model.graph.input if i.name not in inits]
    output_names = [o.name for o in model.graph.output]
    opset = next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), 1)
    if model.ir_version < 3:
        raise QosError(f"ONNX IR version {model.ir_version} is too old (TVM needs >= 3)")
    importer = _frontend.ONNXGraphImporter(dict(shape_dict or {}), "float32", keep_params_in_input=False,
                                           sanitize=False)
    # the stock importer prints a line to stdout before re-raising a converter error
    token = _LOWERINGS.set(dict(lowerings or {}))
    with _extended_convert_map(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            mod = importer.from_onnx(model.graph, opset)
        except Exception as e:  # noqa: BLE001 - importer errors of every kind
            _discard_blocks(importer.bb)
            if isinstance(e, QosError):
                raise
            if isinstance(e, tvm.error.OpNotImplemented):
                raise QosError(f"TVM cannot import the ONNX model: {str(e).strip().splitlines()[-1]}") from None
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            raise QosError(f"TVM cannot import the ONNX model: {type(e).__name__}: "
                           f"{lines[-1] if lines else ''}") from None
        finally:
            _LOWERINGS.reset(token)
    params = [p.name for p in mod["main"].params]
    if params != input_names:
        raise QosError(f"the imported function's parameters {params} differ from the ONNX inputs {input_names}")
    return ImportedModel(mod=mod, input_names=input_names, output_names=output_names, opset=int(opset))
