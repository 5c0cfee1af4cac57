"""TIR LUT kernels are bit-exact against qos_compile.reference on x86-64 and on aarch64 (qemu).

Every kernel is compiled once per target for the whole module:
* ``x86_64``: shared library through TVM's runtime (the Relax/host path),
* ``x86_64-static``: system-lib object + C shim + driver, statically linked, run natively,
* ``aarch64``: the same, cross-compiled and run under qemu-aarch64-static.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import zlib

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from qos_compile import multipliers  # noqa: E402
from qos_compile.errors import QosError  # noqa: E402
from qos_compile.multipliers import exact_table  # noqa: E402
from qos_compile.reference import approx_conv2d_acc, approx_gemm_acc  # noqa: E402
from qos_compile.targets import get_target, host_arch  # noqa: E402

tvm = pytest.importorskip("tvm")

from qos_compile.tvm.build import (build_kernels, read_tensor_file, run_on_target,  # noqa: E402
                                   write_tensor_file)
from qos_compile.tvm.kernels import (ConvSpec, DenseSpec, approx_conv2d, approx_conv2d_func,  # noqa: E402
                                     approx_dense_func, exact_conv2d_func)

HAVE_ARM = shutil.which("aarch64-linux-gnu-gcc") is not None and shutil.which("qemu-aarch64-static") is not None
X86 = host_arch() == "x86_64"

# name: (x shape, w shape, stride, padding, dilation, groups, pad code unsigned, pad code signed)
CONVS = {
    "s2_asym": ((2, 6, 9, 10), (5, 6, 3, 3), 2, (1, 0, 2, 1), 1, 1, 7, -5),
    "dil_groups": ((1, 8, 11, 12), (6, 4, 3, 2), (1, 2), (2, 1), (2, 1), 2, 200, 100),
    "depthwise": ((1, 8, 10, 10), (8, 1, 3, 3), 1, 1, 1, 8, 3, -128),
    "depthwise_x2": ((1, 4, 7, 9), (8, 1, 3, 3), 2, (0, 1, 1, 0), 1, 4, 255, 127),
    "pointwise": ((1, 16, 5, 7), (12, 16, 1, 1), 1, 0, 1, 1, 0, 0),
}
DENSES = {"d1": (1, 40, 10), "d5": (5, 33, 7)}
EXACT = ("s2_asym", "depthwise")


def _spec(case: str, signed: bool) -> ConvSpec:
    xs, ws, st, pad, dil, g, pu, ps = CONVS[case]
    return ConvSpec.make(xs, ws, st, pad, dil, g, ps if signed else pu, signed)


def _kernels(target: str) -> dict:
    ks = {}
    for sgn, tag in ((False, "u"), (True, "s")):
        for case in CONVS:
            ks[f"conv_{case}_{tag}"] = approx_conv2d_func(_spec(case, sgn), target)
        for case in EXACT:
            ks[f"exact_{case}_{tag}"] = exact_conv2d_func(_spec(case, sgn), target)
        for case, (n, k, o) in DENSES.items():
            ks[f"dense_{case}_{tag}"] = approx_dense_func(DenseSpec(n, k, o, sgn), target)
    for style in ("gather", "taps", "reg-tile"):      # every style, whatever the target's default
        ks[f"conv_{style.replace('-', '')}_s"] = approx_conv2d_func(_spec("dil_groups", True), target, style=style)
        ks[f"conv_{style.replace('-', '')}_u"] = approx_conv2d_func(_spec("depthwise_x2", False), target, style=style)
    ks["conv_naive_u"] = approx_conv2d_func(_spec("s2_asym", False), target, schedule=False)
    return ks


TARGETS = [
    pytest.param(("x86_64", False), id="x86_64", marks=pytest.mark.skipif(not X86, reason="x86-64 host")),
    pytest.param(("x86_64", True), id="x86_64-static", marks=pytest.mark.skipif(not X86, reason="x86-64 host")),
    pytest.param(("aarch64", True), id="aarch64-qemu",
                 marks=pytest.mark.skipif(not HAVE_ARM, reason="aarch64 cross toolchain / qemu missing")),
]


@pytest.fixture(scope="module", params=TARGETS)
def built(request, tmp_path_factory):
    target, system_lib = request.param
    return build_kernels(_kernels(target), target, system_lib=system_lib,
                         out_dir=tmp_path_factory.mktemp(f"k_{target}_{int(system_lib)}"))


def _random_table(rng: np.random.Generator) -> np.ndarray:
    # large enough to catch any truncation, small enough that 576 products stay in int32
    return rng.integers(-3_000_000, 3_000_000, (256, 256)).astype(np.int32)


def _circuits(signed: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7 if signed else 8)
    if signed:
        return {"mul8s_1KR6": multipliers.get("mul8s_1KR6").lut, "random": _random_table(rng)}
    return {"mul8u_1JFF": multipliers.get("mul8u_1JFF").lut, "mul8u_2AC": multipliers.get("mul8u_2AC").lut,
            "random": _random_table(rng)}


def _codes(rng, shape, signed):
    lo, hi = (-128, 128) if signed else (0, 256)
    a = rng.integers(lo, hi, shape).astype(np.int8 if signed else np.uint8)
    a.flat[:2] = (lo, hi - 1)                 # the extreme codes always occur
    return a


def test_asymmetric_circuit_is_really_asymmetric():
    lut = multipliers.get("mul8u_2AC").lut
    assert lut[0, :].any() and lut[:, 0].any() and (lut != lut.T).any()


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("case", list(CONVS))
def test_conv_bit_exact(built, case, signed):
    spec = _spec(case, signed)
    rng = np.random.default_rng(zlib.crc32(f"{case}{signed}".encode()))
    x, w = _codes(rng, spec.x_shape, signed), _codes(rng, spec.w_shape, signed)
    name = f"conv_{case}_{'s' if signed else 'u'}"
    for circuit, lut in _circuits(signed).items():
        want = approx_conv2d_acc(x, w, lut, spec.stride, spec.padding, spec.dilation, spec.groups,
                                 spec.pad_code, signed)
        got = run_on_target(built, name, x, w, lut, threads=2)
        assert got.dtype == np.int32 and got.shape == want.shape
        assert np.array_equal(got, want), f"{name} with {circuit} on {built.target.name}"


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("case", list(DENSES))
def test_dense_bit_exact(built, case, signed):
    n, k, o = DENSES[case]
    rng = np.random.default_rng(11)
    x, w = _codes(rng, (n, k), signed), _codes(rng, (o, k), signed)
    for circuit, lut in _circuits(signed).items():
        got = run_on_target(built, f"dense_{case}_{'s' if signed else 'u'}", x, w, lut)
        assert np.array_equal(got, approx_gemm_acc(x, w, lut, signed)), f"{case} {circuit}"


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("case", EXACT)
def test_exact_conv_matches_exact_table(built, case, signed):
    spec = _spec(case, signed)
    rng = np.random.default_rng(5)
    x, w = _codes(rng, spec.x_shape, signed), _codes(rng, spec.w_shape, signed)
    want = approx_conv2d_acc(x, w, exact_table(signed), spec.stride, spec.padding, spec.dilation, spec.groups,
                             spec.pad_code, signed)
    got = run_on_target(built, f"exact_{case}_{'s' if signed else 'u'}", x, w)
    assert np.array_equal(got, want)


def test_alternative_schedules_bit_exact(built):
    rng = np.random.default_rng(3)
    cases = [(f"conv_{st}_{t}", case, t == "s") for st in ("gather", "taps", "regtile")
             for t, case in (("s", "dil_groups"), ("u", "depthwise_x2"))]
    for name, case, signed in cases + [("conv_naive_u", "s2_asym", False)]:
        spec = _spec(case, signed)
        x, w = _codes(rng, spec.x_shape, signed), _codes(rng, spec.w_shape, signed)
        lut = _random_table(rng)
        want = approx_conv2d_acc(x, w, lut, spec.stride, spec.padding, spec.dilation, spec.groups,
                                 spec.pad_code, signed)
        assert np.array_equal(run_on_target(built, name, x, w, lut, threads=3), want), name


def test_run_checks_inputs(built):
    spec = _spec("pointwise", False)
    x = np.zeros(spec.x_shape, np.int8)                      # wrong dtype for an unsigned kernel
    w = np.zeros(spec.w_shape, np.uint8)
    with pytest.raises(QosError, match="must be uint8"):
        built.run("conv_pointwise_u", x, w, np.zeros((256, 256), np.int32))
    with pytest.raises(QosError, match="takes 3 inputs"):
        built.run("conv_pointwise_u", w)
    with pytest.raises(QosError, match="no kernel"):
        built.run("nope")


# ------------------------------------------------------------------ aarch64 specifics
@pytest.mark.skipif(not HAVE_ARM, reason="aarch64 cross toolchain / qemu missing")
@pytest.mark.parametrize("target", ["aarch64-cortex-a53", "aarch64-cortex-a72", "aarch64-cortex-a76"])
def test_arm_cpu_variants(target, tmp_path):
    spec = _spec("depthwise_x2", True)
    b = build_kernels({"conv": approx_conv2d_func(spec, target)}, target, out_dir=tmp_path)
    assert b.kind == "system-lib" and b.path.name == "kernels.o"
    rng = np.random.default_rng(1)
    x, w = _codes(rng, spec.x_shape, True), _codes(rng, spec.w_shape, True)
    lut = multipliers.get("mul8s_1KR6").lut
    want = approx_conv2d_acc(x, w, lut, spec.stride, spec.padding, spec.dilation, spec.groups, spec.pad_code, True)
    assert np.array_equal(b.run("conv", x, w, lut), want)


@pytest.mark.skipif(not HAVE_ARM, reason="aarch64 cross toolchain / qemu missing")
def test_driver_reports_kernel_errors(tmp_path):
    """The kernel's own argument check goes through the shim's TVMFFIErrorSetRaisedFromCStrParts."""
    spec = _spec("pointwise", False)
    b = build_kernels({"conv": approx_conv2d_func(spec, "aarch64")}, "aarch64", out_dir=tmp_path)
    exe = b.executable()
    listing = subprocess.run([*b.target.run_prefix(), str(exe), "-l"], capture_output=True, text=True)
    assert "__tvm_ffi_qos_conv" in listing.stdout.split()
    args = []
    for k, (shape, dt) in enumerate([((1, 16, 5, 6), np.uint8), (spec.w_shape, np.uint8),
                                     ((256, 256), np.int32), (spec.out_shape, np.int32)]):
        write_tensor_file(tmp_path / f"{k}.qt", np.zeros(shape, dt))
        args.append(f"{'out' if k == 3 else 'in'}:{tmp_path / f'{k}.qt'}")
    proc = subprocess.run([*b.target.run_prefix(), str(exe), "qos_conv", *args], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "shape[3]" in proc.stderr and "qos_conv(" in proc.stderr


def test_tensor_file_roundtrip(tmp_path):
    for a in (np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5, np.array([1, 255], np.uint8),
              np.zeros((0, 3), np.int8), np.float32(3.5) * np.ones(3, np.float32)):
        write_tensor_file(tmp_path / "t.qt", a)
        b = read_tensor_file(tmp_path / "t.qt")
        assert b.dtype == a.dtype and np.array_equal(a, b)


# ------------------------------------------------------------------ bad inputs
def test_unknown_target_is_a_qos_error():
    with pytest.raises(QosError, match="unknown target"):
        build_kernels({"k": approx_dense_func(DenseSpec(1, 4, 2))}, "sparc64")


def test_missing_cross_compiler_is_a_qos_error():
    t = dataclasses.replace(get_target("aarch64"), cc="aarch64-qos-missing-gcc")
    with pytest.raises(QosError, match="gcc-aarch64-linux-gnu"):
        build_kernels({"k": approx_dense_func(DenseSpec(1, 4, 2))}, t)


def test_bad_kernel_definitions():
    te = tvm.te
    x8 = te.placeholder((1, 4, 5, 5), "int8", name="x")
    wu = te.placeholder((4, 4, 3, 3), "uint8", name="w")
    lut = te.placeholder((256, 256), "int32", name="lut")
    with pytest.raises(QosError, match="both uint8"):
        approx_conv2d(x8, wu, lut)
    with pytest.raises(QosError, match="groups"):
        ConvSpec.make((1, 4, 5, 5), (4, 4, 3, 3), groups=2)
    with pytest.raises(QosError, match="pad code"):
        ConvSpec.make((1, 4, 5, 5), (4, 4, 3, 3), padding=1, pad_code=-1)
    with pytest.raises(QosError, match="empty"):
        ConvSpec.make((1, 4, 2, 2), (4, 4, 3, 3))
    with pytest.raises(QosError, match="lut"):
        approx_conv2d(x8, te.placeholder((4, 4, 3, 3), "int8", name="w"), te.placeholder((65536,), "int32"))
    with pytest.raises(QosError, match="C identifier"):
        build_kernels({"bad name": approx_dense_func(DenseSpec(1, 4, 2))}, "x86_64")
