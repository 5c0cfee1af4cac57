"""The ``ai.qosnets`` operator set (version 1): ApproxConv and ApproxGemm.

Both ops take integer operand codes and a multiplier table and return int32
accumulators ``acc = sum_k lut[w_k + off, x_k + off]`` (port A = weight = row,
port B = activation = column, ``off`` = 128 for int8 codes and 0 for uint8 codes),
exactly ``qos_compile.reference``. The specification is docs/onnx_ops.md.

Every model that uses them carries model-local ``FunctionProto`` definitions
(``function_protos``) made only of standard ONNX ops (opset >= 18), so stock
onnxruntime runs it without any custom-op library. The bodies are generic: the
geometry comes from attribute references (``ref_attr_name``) and from the operand
shapes, the code offset from the operand type, so one function serves every node.

How a body computes the accumulator exactly (integers only, no float arithmetic):

* offset: ``CastLike(int32 128, X)`` is 128 for uint8 and -128 for int8 (ONNX Cast
  between integer types keeps the low bits), so ``off = -min(that, 0)``;
  operand indices are ``Cast(code, int32) + off``.
* ApproxConv: pad the activation indices with ``pad_value + off`` (``Pad`` on axes
  2, 3 with the Conv-order ``pads``), then extract all patches with two ``Gather``s
  whose index grids are ``u*dilation + i*stride`` (built with ``Range``), giving
  [N, C, kh, Ho, kw, Wo]; reshape + transpose to [N, G, 1, Ho*Wo, Cg*kh*kw]; weight
  indices reshape to [1, G, O/G, 1, Cg*kh*kw]; ``w_idx*256 + x_idx`` indexes the
  flattened table (``GatherElements`` on 1-D tensors), ``ReduceSum`` over the last
  (kernel) axis gives int32 accumulators.
* ApproxGemm: ``w_idx[None]*256 + x_idx[:, None]`` -> lookup -> ``ReduceSum``.

Memory of a body is O(N * O * K * Ho * Wo) int32 (the gathered table values before
the sum): fine for verification, not a fast kernel (compilers replace the op).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, FunctionProto, NodeProto, TensorProto, helper, numpy_helper

DOMAIN = "ai.qosnets"
DOMAIN_VERSION = 1
MIN_OPSET = 18  # Pad with an ``axes`` input
APPROX_CONV = "ApproxConv"
APPROX_GEMM = "ApproxGemm"

#: attribute defaults of ApproxConv (Conv's, plus pad_value 0); the exporter always writes them all
CONV_ATTR_DEFAULTS: dict[str, object] = {
    "strides": [1, 1],
    "pads": [0, 0, 0, 0],
    "dilations": [1, 1],
    "group": 1,
    "pad_value": 0,
}


def _const(name: str, value: np.ndarray) -> NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def _const_ref(out: str, kind: str, ref: str) -> NodeProto:
    """``Constant`` whose value is the calling node's attribute ``ref``."""
    node = helper.make_node("Constant", [], [out])
    attr_type = AttributeProto.INTS if kind == "value_ints" else AttributeProto.INT
    node.attribute.append(helper.make_attribute_ref(kind, attr_type, ref_attr_name=ref))
    return node


def _offset_nodes() -> list[NodeProto]:
    """``neg_off`` (int32 scalar): 0 for uint8 operands, -128 for int8 operands."""
    return [
        _const("c128", np.array(128, np.int32)),
        helper.make_node("CastLike", ["c128", "X"], ["c128_x"]),  # 128 (uint8) or -128 (int8)
        helper.make_node("Cast", ["c128_x"], ["c128_i"], to=TensorProto.INT32),
        _const("zero_i", np.array(0, np.int32)),
        helper.make_node("Min", ["c128_i", "zero_i"], ["neg_off"]),
        helper.make_node("Cast", ["X"], ["x_i"], to=TensorProto.INT32),
        helper.make_node("Sub", ["x_i", "neg_off"], ["x_idx"]),
        helper.make_node("Cast", ["W"], ["w_i"], to=TensorProto.INT32),
        helper.make_node("Sub", ["w_i", "neg_off"], ["w_idx"]),
        _const("lut_shape", np.array([-1], np.int64)),
        helper.make_node("Reshape", ["LUT", "lut_shape"], ["lut_flat"]),
        _const("c256", np.array(256, np.int32)),
    ]


def _lookup_sum(idx: str, out: str) -> list[NodeProto]:
    """``out = ReduceSum(lut_flat[idx], last axis)``: the lookup runs on flattened 1-D tensors
    (GatherElements on rank 1 is onnxruntime's fastest per-element gather)."""
    return [
        helper.make_node("Shape", [idx], ["idx_shape"]),
        helper.make_node("Reshape", [idx, "lut_shape"], ["idx_flat"]),
        helper.make_node("GatherElements", ["lut_flat", "idx_flat"], ["terms_flat"], axis=0),
        helper.make_node("Reshape", ["terms_flat", "idx_shape"], ["terms"]),
        _const("last_axis", np.array([-1], np.int64)),
        helper.make_node("ReduceSum", ["terms", "last_axis"], [out], keepdims=0),
    ]


def _axis_grid(axis: int) -> list[NodeProto]:
    """Index grid ``[k, out]`` = ``u * dilation + i * stride`` for spatial axis 0 (H) or 1 (W)."""
    a = "hw"[axis]
    return [
        helper.make_node("Gather", ["ks", f"ax{a}"], [f"k{a}"], axis=0),
        helper.make_node("Gather", ["out_hw", f"ax{a}"], [f"o{a}"], axis=0),
        helper.make_node("Gather", ["st", f"ax{a}"], [f"s{a}"], axis=0),
        helper.make_node("Gather", ["dl", f"ax{a}"], [f"d{a}"], axis=0),
        helper.make_node("Range", ["zero64", f"k{a}", "one64"], [f"ru{a}"]),
        helper.make_node("Mul", [f"ru{a}", f"d{a}"], [f"tap{a}"]),
        helper.make_node("Range", ["zero64", f"o{a}", "one64"], [f"ri{a}"]),
        helper.make_node("Mul", [f"ri{a}", f"s{a}"], [f"pos{a}"]),
        helper.make_node("Unsqueeze", [f"tap{a}", "ax1"], [f"tap{a}_col"]),
        helper.make_node("Unsqueeze", [f"pos{a}", "ax0"], [f"pos{a}_row"]),
        helper.make_node("Add", [f"tap{a}_col", f"pos{a}_row"], [f"grid{a}"]),
    ]


def approx_conv_function(opset: int = MIN_OPSET) -> FunctionProto:
    """The model-local function defining ``ai.qosnets.ApproxConv`` with standard ops."""
    nodes = _offset_nodes()
    nodes += [
        _const("zero64", np.array(0, np.int64)),
        _const("one64", np.array(1, np.int64)),
        _const("ax0", np.array([0], np.int64)),
        _const("ax1", np.array([1], np.int64)),
        _const("axh", np.array(0, np.int64)),
        _const("axw", np.array(1, np.int64)),
        _const("axes_hw", np.array([2, 3], np.int64)),
        # geometry from the attributes and W's shape
        _const_ref("pads", "value_ints", "pads"),
        _const_ref("st", "value_ints", "strides"),
        _const_ref("dl", "value_ints", "dilations"),
        _const_ref("grp", "value_int", "group"),
        _const_ref("pad_code", "value_int", "pad_value"),
        helper.make_node("Shape", ["W"], ["ks"], start=2),  # [kh, kw]
        helper.make_node("Cast", ["pad_code"], ["pad_code_i"], to=TensorProto.INT32),
        helper.make_node("Sub", ["pad_code_i", "neg_off"], ["pad_idx"]),
        helper.make_node("Pad", ["x_idx", "pads", "pad_idx", "axes_hw"], ["xp"], mode="constant"),
        helper.make_node("Shape", ["xp"], ["hw"], start=2),  # padded [Hp, Wp]
        # out = (hw - (dl * (ks - 1) + 1)) / st + 1
        helper.make_node("Sub", ["ks", "one64"], ["ks_m1"]),
        helper.make_node("Mul", ["dl", "ks_m1"], ["span_m1"]),
        helper.make_node("Add", ["span_m1", "one64"], ["span"]),
        helper.make_node("Sub", ["hw", "span"], ["room"]),
        helper.make_node("Div", ["room", "st"], ["steps"]),
        helper.make_node("Add", ["steps", "one64"], ["out_hw"]),
    ]
    nodes += _axis_grid(0) + _axis_grid(1)
    nodes += [
        # patches [N, C, kh, Ho, Wp] -> [N, C, kh, Ho, kw, Wo]
        helper.make_node("Gather", ["xp", "gridh"], ["rows"], axis=2),
        helper.make_node("Gather", ["rows", "gridw"], ["patches"], axis=4),
        # -> [N, G, Cg, kh, Ho, kw, Wo] -> [N, G, Ho, Wo, Cg, kh, kw] -> [N, G, 1, P, K]
        helper.make_node("Unsqueeze", ["grp", "ax0"], ["grp1"]),
        _const("keep", np.array([0], np.int64)),
        _const("minus1", np.array([-1], np.int64)),
        helper.make_node("Shape", ["patches"], ["tail_dims"], start=2),
        helper.make_node("Concat", ["keep", "grp1", "minus1", "tail_dims"], ["split_shape"], axis=0),
        helper.make_node("Reshape", ["patches", "split_shape"], ["patches_g"]),
        helper.make_node("Transpose", ["patches_g"], ["patches_t"], perm=[0, 1, 4, 6, 2, 3, 5]),
        helper.make_node("ReduceProd", ["out_hw"], ["npos"], keepdims=1),  # [1] = Ho*Wo
        helper.make_node("Concat", ["keep", "grp1", "npos", "minus1"], ["xcol_shape"], axis=0),
        helper.make_node("Reshape", ["patches_t", "xcol_shape"], ["xcol4"]),  # [N, G, P, K]
        _const("ax2", np.array([2], np.int64)),
        helper.make_node("Unsqueeze", ["xcol4", "ax2"], ["xcol"]),  # [N, G, 1, P, K]
        # weights [O, Cg, kh, kw] -> [1, G, O/G, 1, K], times 256
        helper.make_node("Concat", ["grp1", "minus1"], ["wg_shape0"], axis=0),
        helper.make_node("Shape", ["W"], ["w_k_dims"], start=1),
        helper.make_node("ReduceProd", ["w_k_dims"], ["kdim"], keepdims=1),
        helper.make_node("Concat", ["wg_shape0", "kdim"], ["wg_shape"], axis=0),
        helper.make_node("Reshape", ["w_idx", "wg_shape"], ["wg"]),  # [G, Og, K]
        _const("ax03", np.array([0, 3], np.int64)),
        helper.make_node("Unsqueeze", ["wg", "ax03"], ["wg5"]),
        helper.make_node("Mul", ["wg5", "c256"], ["row_base"]),
        helper.make_node("Add", ["row_base", "xcol"], ["flat_idx"]),  # [N, G, Og, P, K]
    ] + _lookup_sum("flat_idx", "acc4") + [  # [N, G, Og, P]
        helper.make_node("Concat", ["keep", "minus1", "out_hw"], ["y_shape"], axis=0),
        helper.make_node("Reshape", ["acc4", "y_shape"], ["Y"]),  # [N, O, Ho, Wo]
    ]
    defaults = [helper.make_attribute(k, v) for k, v in CONV_ATTR_DEFAULTS.items()]
    return helper.make_function(
        DOMAIN, APPROX_CONV, ["X", "W", "LUT"], ["Y"], nodes,
        [helper.make_opsetid("", opset)],
        attributes=["kernel_shape"], attribute_protos=defaults,
        doc_string=("Approximate 2-D convolution accumulators: Y[n,o,i,j] = sum over o's group, kernel taps "
                    "of LUT[w + off, x_padded + off] (int32); off = 128 for int8 codes, 0 for uint8. "
                    "Conv attributes; pad_value is the activation code fed at padded positions."))


def approx_gemm_function(opset: int = MIN_OPSET) -> FunctionProto:
    """The model-local function defining ``ai.qosnets.ApproxGemm`` with standard ops."""
    nodes = _offset_nodes()
    nodes += [
        _const("ax0", np.array([0], np.int64)),
        _const("ax1", np.array([1], np.int64)),
        helper.make_node("Unsqueeze", ["w_idx", "ax0"], ["w3"]),  # [1, O, K]
        helper.make_node("Mul", ["w3", "c256"], ["row_base"]),
        helper.make_node("Unsqueeze", ["x_idx", "ax1"], ["x3"]),  # [N, 1, K]
        helper.make_node("Add", ["row_base", "x3"], ["flat_idx"]),  # [N, O, K]
    ] + _lookup_sum("flat_idx", "Y")  # [N, O]
    return helper.make_function(
        DOMAIN, APPROX_GEMM, ["X", "W", "LUT"], ["Y"], nodes, [helper.make_opsetid("", opset)],
        doc_string="Approximate GEMM accumulators: Y[n,o] = sum_k LUT[W[o,k] + off, X[n,k] + off] (int32).")


def function_protos(opset: int = MIN_OPSET) -> list[FunctionProto]:
    """Both model-local function definitions, for ``ModelProto.functions``."""
    return [approx_conv_function(opset), approx_gemm_function(opset)]


def approx_conv_node(x: str, w: str, lut: str, y: str, *, name: str, kernel_shape, strides, pads, dilations,
                     group: int, pad_value: int) -> NodeProto:
    """An ``ai.qosnets.ApproxConv`` node with every attribute written explicitly."""
    return helper.make_node(APPROX_CONV, [x, w, lut], [y], name=name, domain=DOMAIN,
                            kernel_shape=[int(v) for v in kernel_shape], strides=[int(v) for v in strides],
                            pads=[int(v) for v in pads], dilations=[int(v) for v in dilations], group=int(group),
                            pad_value=int(pad_value))


def approx_gemm_node(x: str, w: str, lut: str, y: str, *, name: str) -> NodeProto:
    """An ``ai.qosnets.ApproxGemm`` node."""
    return helper.make_node(APPROX_GEMM, [x, w, lut], [y], name=name, domain=DOMAIN)


def ir_version_for(opset: int) -> int:
    """The IR version paired with an opset (>= 9: functions with attribute defaults)."""
    return 9 if opset <= 19 else 10 if opset <= 21 else 11


def opset_imports(opset: int) -> list[onnx.OperatorSetIdProto]:
    """The model's opset imports: the standard domain and ``ai.qosnets`` v1."""
    return [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]


# --- op schemas (for tools that want to validate nodes without the functions) -------------------

def op_schemas() -> list[onnx.defs.OpSchema]:
    """``OpSchema`` objects describing both ops (types, attributes) for ``onnx.defs.register_schema``."""
    from onnx.defs import OpSchema

    codes = ["tensor(uint8)", "tensor(int8)"]
    conv = OpSchema(
        APPROX_CONV, DOMAIN, DOMAIN_VERSION,
        doc="Approximate convolution accumulators through a multiplier table (see docs/onnx_ops.md).",
        inputs=[OpSchema.FormalParameter("X", "T", "activation codes [N, C, H, W]"),
                OpSchema.FormalParameter("W", "T", "weight codes [O, C/group, kh, kw]"),
                OpSchema.FormalParameter("LUT", "tensor(int32)", "multiplier table [256, 256], row = weight")],
        outputs=[OpSchema.FormalParameter("Y", "tensor(int32)", "accumulators [N, O, Ho, Wo]")],
        type_constraints=[("T", codes, "8-bit codes: uint8 (unsigned circuits) or int8 (signed)")],
        attributes=[
            OpSchema.Attribute("kernel_shape", OpSchema.AttrType.INTS, "[kh, kw]; must equal W.shape[2:]",
                               required=False),
            OpSchema.Attribute("strides", helper.make_attribute("strides", [1, 1]), "[sh, sw]"),
            OpSchema.Attribute("pads", helper.make_attribute("pads", [0, 0, 0, 0]), "[top, left, bottom, right]"),
            OpSchema.Attribute("dilations", helper.make_attribute("dilations", [1, 1]), "[dh, dw]"),
            OpSchema.Attribute("group", helper.make_attribute("group", 1), "groups"),
            OpSchema.Attribute("pad_value", helper.make_attribute("pad_value", 0),
                               "activation code at padded positions (the zero point)"),
        ],
    )
    gemm = OpSchema(
        APPROX_GEMM, DOMAIN, DOMAIN_VERSION,
        doc="Approximate GEMM accumulators through a multiplier table (see docs/onnx_ops.md).",
        inputs=[OpSchema.FormalParameter("X", "T", "activation codes [N, K]"),
                OpSchema.FormalParameter("W", "T", "weight codes [O, K] (nn.Linear layout)"),
                OpSchema.FormalParameter("LUT", "tensor(int32)", "multiplier table [256, 256], row = weight")],
        outputs=[OpSchema.FormalParameter("Y", "tensor(int32)", "accumulators [N, O]")],
        type_constraints=[("T", codes, "8-bit codes: uint8 (unsigned circuits) or int8 (signed)")],
    )
    return [conv, gemm]


def register_schemas() -> bool:
    """Register the op schemas with onnx's Python-side registry (idempotent); False if onnx
    cannot. Not needed to check or run exported models (their functions define the ops)."""
    try:
        for schema in op_schemas():
            try:
                onnx.defs.get_schema(schema.name, DOMAIN_VERSION, DOMAIN)
                continue
            except onnx.defs.SchemaError:
                onnx.defs.register_schema(schema)
    except (AttributeError, TypeError):  # pragma: no cover - older onnx
        return False
    return True


def single_node_model(op_type: str, x_shape: Any, w_shape: Any, signed: bool, *, opset: int = MIN_OPSET,
                      **attrs: Any) -> onnx.ModelProto:
    """A model with one ``ai.qosnets`` node and its function bodies: inputs ``X`` (batch axis
    symbolic), ``W`` and ``LUT``, output ``Y`` int32. ``attrs``: the node's attributes
    (ApproxConv; omitted ones take their defaults). For op tests and kernel comparisons."""
    code = TensorProto.INT8 if signed else TensorProto.UINT8
    if op_type == APPROX_CONV:
        node = helper.make_node(APPROX_CONV, ["X", "W", "LUT"], ["Y"], name="approx_conv", domain=DOMAIN,
                                **{k: v for k, v in attrs.items()})
        y_shape: list[Any] = ["N", int(w_shape[0]), "Ho", "Wo"]
    elif op_type == APPROX_GEMM:
        if attrs:
            raise ValueError("ApproxGemm has no attributes")
        node = helper.make_node(APPROX_GEMM, ["X", "W", "LUT"], ["Y"], name="approx_gemm", domain=DOMAIN)
        y_shape = ["N", int(w_shape[0])]
    else:
        raise ValueError(f"unknown op {op_type!r}")
    graph = helper.make_graph(
        [node], op_type.lower(),
        [helper.make_tensor_value_info("X", code, ["N", *[int(v) for v in x_shape[1:]]]),
         helper.make_tensor_value_info("W", code, [int(v) for v in w_shape]),
         helper.make_tensor_value_info("LUT", TensorProto.INT32, [256, 256])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, y_shape)])
    model = helper.make_model(graph, opset_imports=opset_imports(opset), functions=function_protos(opset),
                              producer_name="qos-compile")
    model.ir_version = ir_version_for(opset)
    return model
