"""ai.qosnets ApproxConv / ApproxGemm: the function bodies in stock onnxruntime vs the reference."""
from __future__ import annotations

import zlib

import numpy as np
import onnx
import pytest

from qos_compile.multipliers import Multiplier, bundled, get
from qos_compile.onnx import check_model, ops
from qos_compile.reference import approx_conv2d_acc, approx_gemm_acc

ort = pytest.importorskip("onnxruntime")


def _random_table(seed: int) -> np.ndarray:
    """An arbitrary (asymmetric, signed-valued, large) int32 table."""
    return np.random.default_rng(seed).integers(-(2**20), 2**20, (256, 256)).astype(np.int32)


CIRCUITS = {
    "exact_u": lambda: get("mul8u_1JFF"),
    "asym_u": lambda: get("mul8u_12N4"),  # lut != lut.T: catches swapped ports
    "signed": lambda: get("mul8s_1L2H"),
    "exact_s": lambda: bundled().exact(True),
    "random_u": lambda: Multiplier(name="rand_u", signed=False, lut=_random_table(1)),
    "random_s": lambda: Multiplier(name="rand_s", signed=True, lut=_random_table(2)),
}

# (N, C, H, W), (O, Cg, kh, kw), strides, pads [t, l, b, r], dilations, group
CONV_CASES = {
    "3x3_same": ((2, 3, 7, 8), (5, 3, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    "stride2": ((2, 4, 9, 9), (6, 4, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    "dilation": ((1, 3, 9, 10), (4, 3, 3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1),
    "groups": ((2, 4, 6, 6), (6, 2, 3, 2), (1, 2), (0, 1, 2, 0), (1, 1), 2),
    "depthwise": ((2, 6, 7, 7), (6, 1, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 6),
    "asym_pads": ((1, 2, 5, 6), (3, 2, 2, 3), (1, 1), (2, 0, 1, 3), (1, 2), 1),
    "pointwise": ((3, 8, 4, 4), (5, 8, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
}


def _session(model: onnx.ModelProto):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _codes(rng: np.random.Generator, shape, signed: bool) -> np.ndarray:
    lo, hi = (-128, 127) if signed else (0, 255)
    return rng.integers(lo, hi + 1, shape).astype(np.int8 if signed else np.uint8)


@pytest.mark.parametrize("circuit", sorted(CIRCUITS))
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_approx_conv_matches_reference(circuit: str, case: str):
    mult = CIRCUITS[circuit]()
    xs, ws, strides, pads, dil, group = CONV_CASES[case]
    rng = np.random.default_rng(zlib.crc32(f"{circuit}/{case}".encode()))
    x, w = _codes(rng, xs, mult.signed), _codes(rng, ws, mult.signed)
    # a non-zero pad code (the activation zero point), negative for signed codes
    pad_value = int(_codes(rng, (), mult.signed)) if case != "pointwise" else 0
    if mult.signed and case == "3x3_same":
        pad_value = -77
    model = ops.single_node_model("ApproxConv", xs, ws, mult.signed, kernel_shape=list(ws[2:]),
                                  strides=list(strides), pads=list(pads), dilations=list(dil), group=group,
                                  pad_value=pad_value)
    check_model(model)
    y = _session(model).run(None, {"X": x, "W": w, "LUT": mult.lut})[0]
    ref = approx_conv2d_acc(x, w, mult, strides, pads, dil, group, pad_value)
    assert y.dtype == np.int32 and y.shape == ref.shape
    np.testing.assert_array_equal(y, ref)


def test_port_order_and_padding_are_observable():
    """The checks above would notice swapped ports or zero padding."""
    mult = get("mul8u_12N4")
    rng = np.random.default_rng(0)
    x, w = _codes(rng, (1, 2, 5, 5), False), _codes(rng, (3, 2, 3, 3), False)
    model = ops.single_node_model("ApproxConv", x.shape, w.shape, False, kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                  pad_value=131)
    y = _session(model).run(None, {"X": x, "W": w, "LUT": mult.lut})[0]
    np.testing.assert_array_equal(y, approx_conv2d_acc(x, w, mult, 1, 1, pad_code=131))
    assert not np.array_equal(y, approx_conv2d_acc(x, w, mult.lut.T.copy(), 1, 1, pad_code=131, signed=False))
    assert not np.array_equal(y, approx_conv2d_acc(x, w, mult, 1, 1, pad_code=0))


def test_conv_attribute_defaults():
    """Omitted attributes take Conv's defaults (strides/dilations 1, no padding, group 1, pad_value 0)."""
    mult = CIRCUITS["random_u"]()
    rng = np.random.default_rng(3)
    x, w = _codes(rng, (2, 3, 6, 5), False), _codes(rng, (4, 3, 3, 2), False)
    model = ops.single_node_model("ApproxConv", x.shape, w.shape, False)
    check_model(model)
    y = _session(model).run(None, {"X": x, "W": w, "LUT": mult.lut})[0]
    np.testing.assert_array_equal(y, approx_conv2d_acc(x, w, mult))


@pytest.mark.parametrize("circuit", sorted(CIRCUITS))
@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 9, 3), (7, 50, 12)])
def test_approx_gemm_matches_reference(circuit: str, shape):
    mult = CIRCUITS[circuit]()
    n, k, o = shape
    rng = np.random.default_rng(n * 100 + k)
    x, w = _codes(rng, (n, k), mult.signed), _codes(rng, (o, k), mult.signed)
    model = ops.single_node_model("ApproxGemm", x.shape, w.shape, mult.signed)
    check_model(model)
    y = _session(model).run(None, {"X": x, "W": w, "LUT": mult.lut})[0]
    ref = approx_gemm_acc(x, w, mult)
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, ref)


def test_extreme_codes_and_batch_is_symbolic():
    """Codes at both ends of the range (index 0 and 255) and two batch sizes through one model."""
    for signed in (False, True):
        mult = CIRCUITS["random_s" if signed else "random_u"]()
        lo, hi = (-128, 127) if signed else (0, 255)
        dt = np.int8 if signed else np.uint8
        model = ops.single_node_model("ApproxConv", (1, 2, 4, 4), (2, 2, 3, 3), signed, kernel_shape=[3, 3],
                                      pads=[1, 1, 1, 1], pad_value=hi)
        sess = _session(model)
        w = np.array([lo, hi] * 18, dt).reshape(2, 2, 3, 3)
        for n in (1, 3):
            x = np.full((n, 2, 4, 4), lo, dt)
            x[:, 1] = hi
            y = sess.run(None, {"X": x, "W": w, "LUT": mult.lut})[0]
            np.testing.assert_array_equal(y, approx_conv2d_acc(x, w, mult, 1, 1, pad_code=hi))


def test_newer_opset_and_function_structure():
    mult = get("mul8u_12N4")
    rng = np.random.default_rng(5)
    x, w = _codes(rng, (1, 3, 5, 5), False), _codes(rng, (2, 3, 3, 3), False)
    model = ops.single_node_model("ApproxConv", x.shape, w.shape, False, opset=21, kernel_shape=[3, 3],
                                  strides=[2, 1], pads=[1, 0, 0, 1], pad_value=9)
    check_model(model)
    y = _session(model).run(None, {"X": x, "W": w, "LUT": mult.lut})[0]
    np.testing.assert_array_equal(y, approx_conv2d_acc(x, w, mult, (2, 1), (1, 0, 0, 1), pad_code=9))
    # the bodies use standard ops only, and the conv body is generic through attribute references
    for fn in ops.function_protos():
        assert fn.domain == "ai.qosnets" and all(n.domain in ("", "ai.onnx") for n in fn.node)
    conv = ops.approx_conv_function()
    refs = {a.ref_attr_name for n in conv.node for a in n.attribute if a.ref_attr_name}
    assert refs == {"strides", "pads", "dilations", "group", "pad_value"}
    assert {a.name for a in conv.attribute_proto} == {"strides", "pads", "dilations", "group", "pad_value"}


def test_op_schemas_register():
    assert {s.name for s in ops.op_schemas()} == {"ApproxConv", "ApproxGemm"}
    assert ops.register_schemas() and ops.register_schemas()  # idempotent
    schema = onnx.defs.get_schema("ApproxConv", 1, "ai.qosnets")
    assert {"strides", "pads", "dilations", "group", "pad_value", "kernel_shape"} <= set(schema.attributes)
    check_model(ops.single_node_model("ApproxGemm", (2, 4), (3, 4), True))
