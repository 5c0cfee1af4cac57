"""The element-wise kernels after the accumulators (epilogues, quantizations): vectorized by
``plan._schedule_generic``, with a float -> integer conversion (``relax_import.float_to_int``)
and a rounding (``plan._round_half_even``) that stay vector code, and the same numbers as
onnxruntime's Round / Clip / Cast."""
from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper
from tvm import te

from qos_compile.tvm import plan
from qos_compile.tvm.relax_import import float_to_int


def _build(func):
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    return lib["main"]


def _quantize_func(n: int, dtype: str):
    """x (n,) float32 -> float_to_int(roundeven(x * s)) of ``dtype``, as the compiler emits it."""
    x = te.placeholder((n,), "float32", name="x")
    r = te.compute((n,), lambda i: tvm.tirx.call_llvm_pure_intrin("float32", "llvm.roundeven", x[i] * 1.0),
                   name="round_half_even")
    return te.create_prim_func([x, float_to_int(r, dtype)])


def test_elementwise_loops_are_vectorized():
    f = plan._schedule_generic(_quantize_func(4096, "int8"))
    assert "T.vectorized(16)" in f.script()
    odd = plan._schedule_generic(_quantize_func(4 * 1021, "int8"))          # 4084 = 4 x 1021: 4 lanes
    assert "T.vectorized(4)" in odd.script()
    prime = plan._schedule_generic(_quantize_func(4099, "int8"))            # no lane count divides it
    assert "T.vectorized" not in prime.script()


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "int32"])
def test_float_to_int_nan_is_zero_and_the_range_saturates(dtype):
    info = np.iinfo(dtype)
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, info.max + 10.0, info.min - 10.0, 2.5, -2.5, 3.5,
                        -0.5, 0.0, 127.0, -128.0], np.float32)
    n = 64
    x = np.zeros(n, np.float32)
    x[:len(special)] = special
    x[len(special):] = np.random.default_rng(0).uniform(-300, 300, n - len(special)).astype(np.float32)
    f = _build(plan._schedule_generic(_quantize_func(n, dtype)))
    out = tvm.runtime.tensor(np.zeros(n, dtype))
    f(tvm.runtime.tensor(x), out)
    r = np.where(np.isnan(x), 0.0, np.round(x)).astype(np.float64)   # np.round: half to even, like ONNX Round
    # saturated to the largest float32 inside the range (int32's end 2^31 - 1 is not a float32)
    hi = float(np.nextafter(np.float32(info.max), np.float32(0))) if float(np.float32(info.max)) > info.max \
        else float(info.max)
    want = np.clip(r, float(info.min), hi).astype(dtype)
    assert np.array_equal(out.numpy(), want), (x, out.numpy(), want)


def test_quantization_is_onnxruntime_bit_for_bit():
    """Mul, Round, Add, Clip, Cast as the exporter writes a layer's quantization, through the
    Relax import and the compiler's lowering: the same codes as onnxruntime on values around
    every rounding boundary."""
    from qos_compile.tvm.relax_import import from_onnx

    n = 4096
    nodes = [helper.make_node("Mul", ["x", "inv"], ["m"]), helper.make_node("Round", ["m"], ["r"]),
             helper.make_node("Add", ["r", "z"], ["a"]), helper.make_node("Clip", ["a", "lo", "hi"], ["c"]),
             helper.make_node("Cast", ["c"], ["y"], to=TensorProto.INT8)]
    inits = [helper.make_tensor(k, TensorProto.FLOAT, [], [v]) for k, v in
             (("inv", 1 / 0.0371), ("z", -3.0), ("lo", -128.0), ("hi", 127.0))]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("y", TensorProto.INT8, [n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    rng = np.random.default_rng(1)
    halves = (np.arange(-200, 200) + 0.5) * 0.0371                  # products near .5 boundaries
    x = np.concatenate([halves, rng.uniform(-8, 8, n - len(halves))]).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    lowered = plan.lower(from_onnx(model).mod, "x86_64")
    funcs = [gv for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1, funcs                                     # one fused kernel
    func = plan._schedule_generic(lowered[funcs[0]])
    assert "T.vectorized" in func.script() and "llvm.roundeven" in func.script()
    assert not re.search(r"T\.isnan|isfinite", func.script())         # the bit test, not isnan
    consts = []                                   # the constants the fusion passes to the kernel
    for block in lowered["main"].body.blocks:
        for b in block.bindings:
            if getattr(b.value, "op", None) is not None and str(b.value.op.name) == "relax.call_tir":
                consts = [a.value.numpy() for a in b.value.args[1].fields[1:]]
    f = _build(func.with_attr("global_symbol", "main"))
    out = tvm.runtime.tensor(np.zeros(n, np.int8))
    f(tvm.runtime.tensor(x), *[tvm.runtime.tensor(c) for c in consts], out)
    assert np.array_equal(out.numpy(), want)
