"""Small manifests for the runtime's tests, the fuzzer's seed corpus and demos.

``tiny_model()`` builds a two-layer approximate network for the C test kernels
(``runtime/tests/qos_test_kernels.c``) with a NumPy reference of every OP::

    x int8 (1,16) --lut_dot(w0, LUT slot of layer 0)--> acc0 int32 (1,8)
      --requant(scale0, shift0: per-OP slots)--> h int8 (1,8)
      --lut_dot(w1, LUT slot of layer 1)--> acc1 int32 (1,4)
      --scale(scale1, shift1: per-OP slots)--> y float32 (1,4)

The multiplier bank has three circuits: exact, "A with its 2 low bits cleared"
and exact plus a deterministic error pattern. OP 0 runs exact/exact, OP 1 the
two approximate ones (and other per-OP scale/shift), so the OPs give different
outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..multipliers import table as tables
from ..numerics import code_offset, table_codes
from .manifest import Arg, ManifestWriter, Role

TEST_KERNELS = ("qos_test_lut_dot", "qos_test_requant", "qos_test_scale")


def exact_table() -> np.ndarray:
    """The exact signed product table, int32 [A, B] (A = weight code)."""
    return tables.exact_table(True).astype(np.int32)


def truncated_table(bits: int = 2) -> np.ndarray:
    a = table_codes(True).astype(np.int32)
    at = (a >> bits) << bits
    return np.outer(at, a).astype(np.int32)


def noisy_table(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (exact_table() + rng.integers(-40, 41, size=(256, 256))).astype(np.int32)


@dataclass
class TinyModel:
    data: bytes                                   # the manifest
    ops: list[str]
    luts: list[np.ndarray]                        # bank tables
    assign: list[list[int]]                       # [op][layer] -> bank
    w0: np.ndarray
    w1: np.ndarray
    scale: list[list[np.ndarray]] = field(default_factory=list)   # [op][0/1]
    shift: list[list[np.ndarray]] = field(default_factory=list)

    input_shape = (1, 16)

    def reference(self, x: np.ndarray, op: int) -> np.ndarray:
        """What the C test kernels compute for OP ``op`` (float32 arithmetic as in C without FMA)."""
        x = np.asarray(x, dtype=np.int8).reshape(self.input_shape)
        l0, l1 = (self.luts[b] for b in self.assign[op])
        off = code_offset(True)
        acc0 = l0[self.w0.astype(np.int32) + off, x.astype(np.int32)[0][None, :] + off].sum(axis=1, dtype=np.int32)
        v = acc0.astype(np.float32) * self.scale[op][0]
        v = (v + self.shift[op][0]).astype(np.float32)
        h = np.clip(v, np.float32(-128), np.float32(127)).astype(np.int32).astype(np.int8)
        acc1 = l1[self.w1.astype(np.int32) + off, h.astype(np.int32)[None, :] + off].sum(axis=1, dtype=np.int32)
        y = acc1.astype(np.float32) * self.scale[op][1]
        y = (y + self.shift[op][1]).astype(np.float32)
        return y.reshape(1, -1)

    def random_input(self, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).integers(-128, 128, size=self.input_shape).astype(np.int8)


def tiny_model(seed: int = 0, kernel_prefix: str = "qos_test_", metadata: dict | None = None,
               lut_dtype=np.int32) -> TinyModel:
    rng = np.random.default_rng(seed)
    w0 = rng.integers(-128, 128, size=(8, 16)).astype(np.int8)
    w1 = rng.integers(-128, 128, size=(4, 8)).astype(np.int8)
    ops = ["exact", "approx"]
    luts = [exact_table(), truncated_table(2), noisy_table(seed + 1)]
    assign = [[0, 0], [1, 2]]
    scale = [[np.full(8, 1 / 2048, np.float32) * (1 + 0.1 * op), rng.uniform(0.5, 2, 4).astype(np.float32)]
             for op in range(2)]
    shift = [[rng.uniform(-3, 3, 8).astype(np.float32), rng.uniform(-10, 10, 4).astype(np.float32)]
             for _ in range(2)]

    w = ManifestWriter()
    for name in ops:
        w.add_op(name)
    banks = [w.add_bank_entry(n, t, power_mw=p, dtype=lut_dtype)
             for n, t, p in zip(["mul8s_exact", "mul8s_trunc2", "mul8s_noisy"], luts, [1.0, 0.7, float("nan")])]
    assert banks == [0, 1, 2]
    layers = [w.add_layer("fc0"), w.add_layer("fc1")]
    w.set_assignment(assign)
    tw0 = w.add_tensor("fc0.weight", w0)
    tw1 = w.add_tensor("fc1.weight", w1)
    lut0 = w.add_slot("fc0.lut", layer=layers[0])
    lut1 = w.add_slot("fc1.lut", layer=layers[1])
    s0 = w.add_per_op_tensor("fc0.scale", [scale[op][0] for op in range(2)])
    b0 = w.add_per_op_tensor("fc0.shift", [shift[op][0] for op in range(2)])
    s1 = w.add_per_op_tensor("fc1.scale", [scale[op][1] for op in range(2)])
    b1 = w.add_per_op_tensor("fc1.shift", [shift[op][1] for op in range(2)])
    x = w.add_input("x", np.int8, (1, 16), scale=0.05, zero_point=0)
    y = w.add_output("y", np.float32, (1, 4))
    acc0 = w.add_buffer("acc0", np.int32, (1, 8))
    h = w.add_buffer("h", np.int8, (1, 8))
    acc1 = w.add_buffer("acc1", np.int32, (1, 4))
    w.add_step(kernel_prefix + "lut_dot", [Arg.input(x), Arg.const(tw0), Arg.slot(lut0), Arg.buffer(acc0)])
    w.add_step(kernel_prefix + "requant", [Arg.buffer(acc0), Arg.slot(s0), Arg.slot(b0), Arg.buffer(h)])
    w.add_step(kernel_prefix + "lut_dot", [Arg.buffer(h), Arg.const(tw1), Arg.slot(lut1), Arg.buffer(acc1)])
    w.add_step(kernel_prefix + "scale", [Arg.buffer(acc1), Arg.slot(s1), Arg.slot(b1), Arg.output(y)])
    w.set_metadata(metadata if metadata is not None else
                   {"model": "tiny", "circuits": ["mul8s_exact", "mul8s_trunc2", "mul8s_noisy"], "ops": ops})
    return TinyModel(w.to_bytes(), ops, luts, assign, w0, w1, scale, shift)


def seed_manifests() -> dict[str, bytes]:
    """Small valid manifests covering every section (the fuzzer's seed corpus)."""
    out: dict[str, bytes] = {}

    w = ManifestWriter()                           # minimal: one OP, one step, I/O only
    w.add_op("only")
    i = w.add_input("in", np.uint8, (4,))
    o = w.add_output("out", np.uint8, (4,))
    w.add_step("copy", [Arg.input(i), Arg.output(o)])
    out["minimal.qosm"] = w.to_bytes()

    w = ManifestWriter()                           # per-OP slots, buffers, several dtypes, metadata
    rng = np.random.default_rng(3)
    for name in ("fast", "mid", "accurate"):
        w.add_op(name)
    t = w.add_tensor("w", rng.integers(-5, 5, (3, 5)).astype(np.int16))
    s = w.add_per_op_tensor("scale", [np.full(3, k, np.float32) for k in range(3)])
    c = w.add_tensor("c", np.arange(6, dtype=np.int32).reshape(2, 3), role=Role.OTHER)
    i = w.add_input("x", np.float32, (1, 5), scale=0.1, zero_point=3)
    i2 = w.add_input("x2", np.uint8, (2,))
    o = w.add_output("y", np.float32, (1, 3))
    b = w.add_buffer("tmp", np.int32, (1, 3))
    b2 = w.add_buffer("tmp2", np.int8, (7,), offset=0)     # overlapping reuse
    w.add_step("k0", [Arg.input(i), Arg.const(t), Arg.buffer(b), Arg.input(i2)])
    w.add_step("k1", [Arg.buffer(b), Arg.slot(s), Arg.const(c), Arg.buffer(b2), Arg.output(o)])
    w.set_metadata({"model": "seed", "note": "per-op slots"})
    out["slots.qosm"] = w.to_bytes()

    w = ManifestWriter()                           # a bank (int16 tables) and layer slots
    w.add_op("a")
    w.add_op("b")
    e = w.add_bank_entry("mul8s_exact", exact_table() // 2, dtype=np.int16, power_mw=0.5)
    n = w.add_bank_entry("mul8s_trunc2", truncated_table(2) // 2, dtype=np.int16)
    layer = w.add_layer("fc")
    w.set_assignment([[e], [n]])
    ls = w.add_slot("fc.lut", layer=layer)
    i = w.add_input("x", np.int8, (1, 2))
    o = w.add_output("y", np.int32, (1, 1))
    w.add_step("dot", [Arg.input(i), Arg.slot(ls), Arg.output(o)])
    out["bank.qosm"] = w.to_bytes()
    return out

