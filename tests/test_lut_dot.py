"""The dot-product low-rank kernel (``tvm.lut_dot``): tiling, bit-exactness of every ISA
variant (x86 natively, ARM ``sdot`` under qemu) and whole models compiled with it."""
from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from qos_compile.errors import QosError  # noqa: E402
from qos_compile.multipliers import get  # noqa: E402
from qos_compile.targets import get_target, host_target  # noqa: E402
from qos_compile.tvm import kernels as K  # noqa: E402
from qos_compile.tvm import lut_dot as D  # noqa: E402
from qos_compile.tvm import lut_factors as F  # noqa: E402
from qos_compile.tvm.build import build_kernels  # noqa: E402

from test_lut_factors import _small_qnet, factor_cases  # noqa: E402
from test_lut_rows import CONVS, _case, _ref  # noqa: E402

HAVE_ARM = shutil.which("aarch64-linux-gnu-gcc") is not None and shutil.which("qemu-aarch64-static") is not None
HOST = host_target().features


def _isa_case(target: str, isa: str):
    """(target, isa) as a test parameter: x86 ISAs run natively, so the host must have them."""
    if target.startswith("aarch64"):
        return pytest.param(target, isa, marks=pytest.mark.skipif(not HAVE_ARM, reason="no aarch64 toolchain"))
    return pytest.param(target, isa, marks=pytest.mark.skipif(
        not D.DOT_ISAS[isa].requires <= HOST, reason=f"this CPU lacks {isa} (x86 kernels run natively)"))


ISAS = [_isa_case("x86_64", "avx512vnni"), _isa_case("x86_64-avxvnni", "avxvnni"), _isa_case("x86_64", "avx512bw"),
        _isa_case("x86_64-avx2", "avx2"), _isa_case("aarch64-cortex-a76", "neondot")]
#: CONVS plus the shapes that exercise full-width vectors and strided rows of ResNet-20
SHAPES = CONVS + [
    dict(x=(1, 8, 32, 32), w=(8, 8, 3, 3), stride=1, padding=1, dilation=1, groups=1),
    dict(x=(1, 8, 16, 16), w=(12, 8, 3, 3), stride=2, padding=1, dilation=1, groups=1),
]
#: (circuit, signed): 1 to 5 terms, int8, uint8 (the unsigned exact product: codes 0..255 as
#: factors, vpdpbusd with the weights unsigned) and int16 factors
CIRCUITS = [("master:mul8s_1KVA", True), ("mul8s_1KVB", True), ("mul8s_1KX2", True), ("mul8s_1KR6", True),
            ("mul8u_Y48", False), ("mul8u_125K", False), ("mul8u_1JFF", False)]


def test_layout_fits_the_registers_and_the_rows():
    for isa, d in D.DOT_ISAS.items():
        for cfg in SHAPES:
            spec = _case(cfg, True, 0)[0]
            lay = D.dot_layout(spec, isa, 5)
            assert lay.terms == 5 and lay.lanes in d.intrinsics
            assert lay.chunks == -(-(spec.c // spec.groups) * 5 // d.group)     # (channel, term) pairs in G
            assert lay.channels * lay.rows * lay.vectors <= max(d.accumulators, lay.channels)
            assert spec.ho % lay.rows == 0 and (spec.o // spec.groups) % lay.channels == 0
            assert lay.wo_pad >= spec.wo and lay.wo_pad % (lay.lanes * lay.vectors) == 0
            # the last vector of a row stays inside the staged columns of every tap
            assert lay.wph >= lay.wo_pad + (spec.kw - 1) * spec.dilation[1] // spec.stride[1]
    wide = K.ConvSpec.make((1, 4, 32, 32), (4, 4, 3, 3), padding=1)
    assert D.dot_layout(wide, "avx512bw", 3).lanes == 16 and D.dot_layout(wide, "avx2", 3).lanes == 8
    narrow = K.ConvSpec.make((1, 4, 8, 8), (4, 4, 3, 3), padding=1)
    assert D.dot_layout(narrow, "avx512bw", 3).lanes == 8            # no 16-lane vector on an 8-wide row
    with pytest.raises(QosError, match="no dot-product kernel"):
        D.dot_layout(wide, "sse9", 3)


def test_isa_by_features_and_factor_type():
    vnni = frozenset({"avx2", "avx512bw", "avx512vl", "avx512vnni"})
    assert D.dot_isa(vnni, "int8") == "avx512vnni" and D.dot_isa(vnni, "int16") == "avx512bw"
    assert D.dot_isa(frozenset({"avx512vnni"}), "int8") is None       # the narrow widths need avx512vl
    assert D.dot_isa(frozenset({"avx2"}), "int16") == "avx2"
    assert D.dot_isa(frozenset({"neon", "dotprod"}), "int8") == "neondot"      # feature dotprod: sdot
    assert D.dot_isa(frozenset({"neon", "dotprod"}), "int16") is None  # sdot multiplies bytes only
    assert D.dot_isa(vnni, "int32") is None and D.dot_isa(frozenset({"neon", "sse2"}), "int8") is None
    assert D.dot_isa(vnni, "uint8") == "avx512vnni"                   # weights as the unsigned operand
    laptop = frozenset({"avx2", "fma", "avx_vnni"})                   # AVX-VNNI without AVX-512
    assert D.dot_isa(laptop, "int8") == D.dot_isa(laptop, "uint8") == "avxvnni"
    assert D.dot_isa(laptop, "int16") == "avx2"
    assert D.dot_isa(frozenset({"avx2"}), "uint8") == "avx2"
    assert D.dot_isa(frozenset({"neon", "dotprod"}), "uint8") == "neondot"   # udot: unsigned bytes
    assert not D.needs_bias("neondot", "uint8") and D.DOT_ISAS["neondot"].intrinsic("uint8", 4).endswith("udot.v4i32.v16i8")
    assert D.DOT_ISAS["avx512vnni"].staging["uint8"] == ("int8", -128, True)
    w = np.array([[[[0, 255]]]], np.uint8)                             # one channel, two taps
    wt = np.arange(256, dtype=np.uint8)[None]                          # the exact product's weight factor
    assert D.dot_bias(w, wt, "avx512vnni", False).tolist() == [128 * 255]   # -(-128) * (0 + 255)
    assert D.dot_bias(w, wt.astype(np.int16), "avx512bw", False).tolist() == [0] and \
        not D.needs_bias("avx512bw", "int16")
    with pytest.raises(QosError, match="does not multiply int16"):
        D.dot_layout(K.ConvSpec.make((1, 4, 8, 8), (4, 4, 3, 3), padding=1), "neondot", 1, "int16")


@pytest.mark.parametrize("target,isa", ISAS)
def test_dot_kernel_bit_exact(target, isa):
    """Every conv shape x circuit whose factors the ISA multiplies, against the reference."""
    t = get_target(target)
    funcs, cases = {}, []
    for i, j, spec, x, w, lut, terms, dt, name in factor_cases(SHAPES, CIRCUITS):
        if D.dot_isa(D.DOT_ISAS[isa].requires, dt) != isa:
            continue
        lay, stages = D.dot_stage_funcs(spec, terms, dt, isa, t)
        funcs.update({f"c{i}_{j}_{st}": f for st, f in stages.items()})
        cases.append((f"c{i}_{j}_", spec, x, w, lut, lay, dt, name))
    assert len(cases) >= 3 * len(SHAPES)
    built = build_kernels(funcs, t, system_lib=True)
    for key, spec, x, w, lut, lay, dt, name in cases:
        wt, xt = F.layer_factors(lut, spec.signed, lay.terms, dt)
        got, _ = D.run_dot_conv(built, key, spec, x, w, wt, xt, isa)
        assert np.array_equal(got, _ref(spec, x, w, lut)), f"{target} {isa} {key} {name} {lay}"


def test_stage_checks_the_factor_rows():
    spec = K.ConvSpec.make((1, 4, 8, 8), (4, 4, 3, 3), padding=1, signed=True)
    lay = D.dot_layout(spec, "neondot", 3)
    from tvm import te

    x = te.placeholder(spec.x_shape, "int8", name="x")
    with pytest.raises(QosError, match="wants 3 activation factor terms, got 4"):
        D.dot_inputs(x, te.placeholder((4, 256), "int8", name="xt"), lay, spec)


def _compiled(target, tmp_path, lowering):
    from qos_compile.compiler import compile_qnet

    circuits = ["master:mul8s_1KV8", "master:mul8s_1KVA", "mul8s_1KVB", "mul8s_1KX2"]
    qnet = _small_qnet(circuits, lambda op, i: [0, 1 + i % 2, 3][op])
    lines = []
    res = compile_qnet(qnet, target, tmp_path / "out", lowering=lowering, progress=lines.append)
    return res, lines


@pytest.mark.skipif(not D.DOT_ISAS["avx512vnni"].requires <= HOST, reason="this CPU lacks avx512vnni")
def test_compiled_model_on_the_dot_kernel(tmp_path):
    """Signed circuits, 3 OPs, 5 int8 terms per layer: the dot kernel chosen on the x86 host,
    bit-exact with onnxruntime on every OP, per-OP factor tables of 5 terms (the kernel packs
    (channel, term) pairs, so no term group is padded)."""
    from qos_compile.runtime.manifest import read_manifest

    target = "x86_64"
    res, lines = _compiled(target, tmp_path, "auto")
    isa = D.dot_isa(get_target(target).features, "int8")
    assert any(f"conv kernels: s8-lutconv-{isa}-dot-t5 x7" in ln for ln in lines), lines
    report = json.loads((res.out_dir / "report.json").read_text())
    assert report["verification"]["ran"] and report["verification"]["bit_exact"], report["verification"]
    m = read_manifest(res.manifest)
    rows = 5
    shapes = {m.tensors[t].shape for s in m.slots if s.name.endswith((".wterms", ".xterms")) for t in s.tensors}
    assert shapes == {(rows, 256)}, shapes
    # vpdpbusd's activation offset comes back through a per-OP accumulator start, computed at compile time
    bias = [s for s in m.slots if s.name.endswith(".dotbias")]
    assert len(bias) == 7 and all(len(s.tensors) == 3 for s in bias)


@pytest.mark.skipif(not HAVE_ARM, reason="no aarch64 toolchain")
@pytest.mark.parametrize("target", ["aarch64-cortex-a76", "aarch64-cortex-a72"])
def test_arm_cost_choice_exact_masked_lowrank_ops(target, tmp_path):
    """OPs exact, masked and low-rank (3 int8 terms) in every layer, lowering auto: by the
    target files' estimated costs the A76 runs the sdot variant (its exact and masked OPs too,
    at T = 3), the A72 (no sdot) a non-gather one; bit-exact with onnxruntime under qemu."""
    from qos_compile.compiler import compile_qnet
    from qos_compile.runtime.manifest import read_manifest
    from qos_compile.tvm.lowering import choose_conv_lowering

    circuits = ["master:mul8s_1KV8", "mul8s_1KTY", "master:mul8s_1KVA"]
    qnet = _small_qnet(circuits, lambda op, i: op, "lenet5", 28)       # 2 convs: quick to build
    res = compile_qnet(qnet, target, tmp_path / "out", progress=lambda line: None)
    m = read_manifest(res.manifest)
    kernels = {la["kernel"] for la in m.metadata_json()["layers"] if la["kind"] == "conv"}
    t = get_target(target)
    auto = choose_conv_lowering([get(c).lut for c in circuits], True, t.features, taps=144, costs=t.kernel_costs)
    if t.has("dotprod"):
        assert kernels == {"s8-lutconv-neondot-dot-t3"}, kernels
    else:
        assert "s8-lutconv-gather" not in kernels and auto.describe() in kernels, kernels
    report = json.loads((res.out_dir / "report.json").read_text())
    assert report["verification"]["ran"] and report["verification"]["emulated"], report["verification"]
    assert report["verification"]["bit_exact"], report["verification"]
    shapes = {m.tensors[i].shape for s in m.slots if s.name.endswith((".wterms", ".xterms")) for i in s.tensors}
    assert shapes == ({(auto.slot_terms, 256)} if auto.kind == "lowrank" else set()), shapes   # the 3 factor terms


@pytest.mark.parametrize("isa,terms", [("avx512vnni", 1), ("avx512vnni", 3), ("avx2", 5), ("neondot", 2)])
def test_packed_weights_hold_every_channel_term_pair_once(isa, terms):
    """pack_weights: sub-lane e of chunk k is the factor of channel (kG+e)//T, term (kG+e)%T;
    the pairs past the last channel are 0."""
    g, bits = D.DOT_ISAS[isa].group, 32 // D.DOT_ISAS[isa].group
    rng = np.random.default_rng(terms)
    w = rng.integers(-128, 128, (6, 5, 3, 2)).astype(np.int8)
    lo, hi = (-128, 128) if g == 4 else (-2 ** 15, 2 ** 15)
    wterms = rng.integers(lo, hi, (terms, 256))
    packed = D.pack_weights(w, wterms, isa, True)
    k = -(-5 * terms // g)
    assert packed.shape == (6, k, 3, 2) and packed.dtype == np.int32
    lanes = (packed.view(np.uint32)[:, :, None] >> (bits * np.arange(g)).reshape(1, 1, g, 1, 1)) & ((1 << bits) - 1)
    lanes = np.where(lanes >= 1 << (bits - 1), lanes - (1 << bits), lanes).reshape(6, k * g, 3, 2)
    for o, c, t, u, v in np.ndindex(6, 5, terms, 3, 2):
        assert lanes[o, c * terms + t, u, v] == wterms[t, int(w[o, c, u, v]) + 128]
    assert not lanes[:, 5 * terms:].any()
