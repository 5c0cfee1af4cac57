"""The low-rank lowering (``tvm.lut_factors``): factor tables, the kernel bit-exact on both
targets, its choice by kernel costs, and whole models compiled with it (per-OP factor slots)."""
from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from qos_compile.errors import QosError  # noqa: E402
from qos_compile.multipliers import get  # noqa: E402
from qos_compile.multipliers.library import bundled  # noqa: E402
from qos_compile.targets import get_target  # noqa: E402
from qos_compile.tvm import lut_factors as F  # noqa: E402
from qos_compile.tvm.build import build_kernels  # noqa: E402
from qos_compile.tvm.lut_dot import DOT_ISAS, dot_isa  # noqa: E402
from qos_compile.tvm.lowering import choose_conv_lowering  # noqa: E402

from test_lut_rows import CONVS, _case, _ref  # noqa: E402

HAVE_ARM = shutil.which("aarch64-linux-gnu-gcc") is not None and shutil.which("qemu-aarch64-static") is not None
TARGETS = ["x86_64", pytest.param("aarch64", marks=pytest.mark.skipif(not HAVE_ARM, reason="no aarch64 toolchain"))]
#: (circuit, signed): 1 to 5 terms, int8 / int16 factors, the exact product led by a code term or not
CIRCUITS = [("master:mul8s_1KVA", True), ("mul8s_1KX2", True), ("mul8s_1L2H", True), ("mul8s_1KR6", True),
            ("mul8u_Y48", False), ("mul8u_125K", False)]


def factor_cases(shapes, circuits):
    """(shape index, circuit index, spec, x, w, lut, terms, dtype, circuit) for every conv
    shape x circuit: random codes and the layer's low-rank factorisation."""
    for i, cfg in enumerate(shapes):
        for j, (name, signed) in enumerate(circuits):
            spec, x, w = _case(cfg, signed, seed=10 * i + j)
            lut = get(name).lut.astype(np.int32)
            terms, dt = F.layer_terms([lut], signed, spec.c // spec.groups * spec.kh * spec.kw)
            yield i, j, spec, x, w, lut, terms, dt, name


def test_factors_reproduce_every_table_they_claim():
    n = 0
    for m in bundled():
        f = F.circuit_factors(m.lut, m.signed)
        if f is None:
            continue
        n += 1
        assert 1 <= f.terms <= F.MAX_TERMS
        assert np.array_equal(f.wterms.T @ f.xterms, m.lut.astype(np.int64)), m.name
    assert n >= 20                                   # masked, exact and low-rank circuits
    assert F.circuit_factors(get("mul8u_ZDF").lut, False) is None        # general: error rank 19


def test_layer_terms_dtype_and_overflow():
    assert F.layer_terms([get("master:mul8s_1KVA").lut], True, 144) == (3, "int8")
    assert F.layer_terms([get("mul8s_1L2H").lut], True, 144) == (1, "int16")     # activation factor up to 256
    assert F.layer_terms([get("mul8u_Y48").lut], False, 144) == (2, "int16")     # unsigned codes
    mix = [get("master:mul8s_1KVA").lut, get("mul8s_1KX2").lut, get("master:mul8s_1KV8").lut]
    assert F.layer_terms(mix, True, 144) == (5, "int8")                           # the most terms of the layer
    assert F.layer_terms([get("mul8s_1KX2").lut, get("mul8u_ZDF").lut], True, 144) is None
    assert F.layer_terms([get("master:mul8s_1KVA").lut], True, 2**31 // 16384) is None   # int32 could overflow
    with pytest.raises(QosError, match="no factorisation"):
        F.layer_factors(get("mul8s_1KX2").lut, True, 3, "int8")
    wt, xt = F.layer_factors(get("master:mul8s_1KVA").lut, True, 5, "int8")     # padded with zero terms
    assert wt.shape == xt.shape == (5, 256) and wt.dtype == np.int8 and not wt[3:].any()


@pytest.mark.parametrize("target", TARGETS)
def test_factored_kernel_bit_exact(target):
    """Every conv shape x circuit against the reference (aarch64 under qemu)."""
    t = get_target(target)
    funcs, cases = {}, []
    for i, _, spec, x, w, lut, terms, dt, name in factor_cases(CONVS, CIRCUITS):
        key = f"c{i}_{int(spec.signed)}_{terms}_{dt}"
        funcs.setdefault(key, F.factored_conv2d_func(spec, terms, dt, t))
        cases.append((key, spec, x, w, lut, terms, dt, name))
    built = build_kernels(funcs, t, system_lib=True)
    for key, spec, x, w, lut, terms, dt, name in cases:
        wt, xt = F.layer_factors(lut, spec.signed, terms, dt)
        got = built.run(key, x, w, wt, xt)
        assert np.array_equal(got, _ref(spec, x, w, lut)), f"{target} {key} {name}"


def test_choice_follows_the_kernel_costs():
    vbmi = frozenset({"avx512f", "avx512vbmi"})                   # a byte permute, no multiply-add pairs
    vnni = frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512vbmi"})
    avx2, arm = frozenset({"avx2"}), frozenset({"neon", "dotprod"})
    lowrank, general = get("master:mul8s_1KVA").lut, get("mul8s_1KX2").lut
    one_term = get("mul8s_1L2H").lut                                # int16 factors
    # the TE low-rank kernel costs ~1 exact conv per term: 3 terms lose to rows, 1 term wins
    assert choose_conv_lowering([lowrank], True, vbmi, taps=144).kind == "rows"
    assert choose_conv_lowering([one_term], True, vbmi, taps=144).describe() == "s8-lutconv-lowrank-t1"
    # a multiply-add that sums 4 (vpdpbusd) or 2 (vpmaddwd) terms per lane beats both
    low = choose_conv_lowering([lowrank], True, vnni, taps=144)
    assert (low.describe(), low.slot_terms) == ("s8-lutconv-avx512vnni-dot-t3", 3)
    assert choose_conv_lowering([general], True, vnni, taps=144).describe() == "s8-lutconv-avx512vnni-dot-t5"
    assert choose_conv_lowering([one_term], True, vnni, taps=144).describe() == "s8-lutconv-avx512bw-dot-t1"
    cost = get_target("x86_64-avx2").kernel_costs
    low = choose_conv_lowering([general], True, avx2, ("lowrank", "gather"), taps=144, costs=cost)
    assert (low.describe(), low.slot_terms) == ("s8-lutconv-avx2-dot-t5", 5)
    # but 1KX2's residual takes 16 distinct columns: 1 vpshufb per 32 lookups, cheaper still
    assert choose_conv_lowering([general], True, avx2, taps=144, costs=cost).describe() == "s8-lutconv-avx2-rows8"
    # priced above the gather (the file's own gather price), the factor and rows kernels lose to it
    g = cost["gather"]
    dear = {**cost, "dot": 2.0 * g, "lowrank": g, "pshufb_rows": 2.0 * g, "pshufb_rows8": 100.0 * g}
    assert choose_conv_lowering([general], True, avx2, taps=144, costs=dear).kind == "gather"
    # ARM by its estimated costs: sdot for int8 factors, the exact circuit too (T = 1); int16 factors
    # have no sdot, forced they take the TE kernel
    a76 = get_target("aarch64-cortex-a76").kernel_costs
    assert choose_conv_lowering([lowrank], True, arm, taps=144, costs=a76).describe() == "s8-lutconv-neondot-dot-t3"
    exact = get("master:mul8s_1KV8").lut
    assert choose_conv_lowering([exact], True, arm, taps=144, costs=a76).describe() == "s8-lutconv-neondot-dot-t1"
    force = ("lowrank", "gather")
    assert choose_conv_lowering([one_term], True, arm, force, 144, a76).describe() == "s8-lutconv-lowrank-t1"
    forced = choose_conv_lowering([general], True, frozenset(), allow=force, taps=144)
    assert (forced.kind, forced.terms, forced.dtype, forced.isa) == ("lowrank", 5, "int8", None)
    assert choose_conv_lowering([general, get("mul8u_ZDF").lut], True, avx2, allow=force,
                                taps=144).kind == "gather"                             # one table does not factor
    assert choose_conv_lowering([lowrank], True, avx2, taps=10**8, allow=force).kind == "gather"


def _small_qnet(circuits, assign_of, arch="resnet8", size=16):
    from qos_compile.models import build_model
    from qos_compile.nn import wrap_model

    torch.manual_seed(0)
    qnet = wrap_model(build_model(arch, 10, 1, size), circuits, num_ops=3, input_shape=(1, size, size))
    n = len(qnet.approx_layers())
    qnet.set_assignment([[assign_of(op, i) for i in range(n)] for op in range(3)])
    qnet.set_mode("quant")
    qnet.train()
    with torch.no_grad():
        qnet(torch.rand(64, 1, size, size))
    qnet.eval()
    qnet.freeze_observers(True)
    qnet.set_mode("approx")
    return qnet


@pytest.mark.parametrize("target", TARGETS)
def test_compiled_model_with_low_rank_layers(target, tmp_path):
    """Three OPs with different circuits per layer: per-OP factor slots in the manifest, and
    the built qos-run bit-exact with onnxruntime on every OP."""
    import onnx
    from onnx import numpy_helper

    from qos_compile.compiler import compile_qnet
    from qos_compile.runtime.manifest import read_manifest

    circuits = ["mul8u_1JFF", "mul8u_Y48", "mul8u_27Y", "mul8u_125K"]
    qnet = _small_qnet(circuits, lambda op, i: [0, 1 + i % 2, 3][op])
    lines = []
    res = compile_qnet(qnet, target, tmp_path / "out", lowering="lowrank", progress=lines.append)
    isa = dot_isa(get_target(target).features, "int16")         # unsigned codes: int16 factors
    label = f"u8-lutconv-{isa}-dot-t5" if isa else "u8-lutconv-lowrank-t5"
    assert any(f"conv kernels: {label} x7" in ln for ln in lines), lines
    report = json.loads((res.out_dir / "report.json").read_text())
    assert report["verification"]["ran"] and report["verification"]["bit_exact"], report["verification"]
    m = read_manifest(res.manifest)
    names = {s.name for s in m.slots}
    conv_layers = [la["name"] for la in m.metadata_json()["layers"] if la["kernel"] == label]
    assert len(conv_layers) == 7
    # TE kernel: both factor tables; dot kernel: the activation factors and the weight factors
    # packed at compile time, (channel, term) pairs in chunks of G per int32
    suffixes = {"xterms", "dotw"} if isa else {"wterms", "xterms"}
    for layer in conv_layers:
        assert {f"slot.{layer}.{s}" for s in suffixes} <= names
    packed = {t for s in m.slots if s.name.endswith(".dotw") for t in s.tensors}
    w = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(res.out_dir / "model.onnx")).graph.initializer}
    if isa:                                     # (O, ceil(Cg * T / G), kh, kw) int32 per circuit
        g = DOT_ISAS[isa].group
        for s in m.slots:
            if s.name.endswith(".dotw"):
                o, cg, kh, kw = w[s.name[len("slot."):-len(".dotw")] + ".weight_codes"].shape
                assert {m.tensors[t].shape for t in s.tensors} == {(o, -(-cg * 5 // g), kh, kw)}, s.name
    # the factor tables are small and shared: per-OP data besides the packed weights (which
    # replace the weight codes in the manifest) stays a fraction of the weight codes
    other = sum(m.tensors[t].nbytes for s in m.slots if not s.name.endswith(".dotw") for t in set(s.tensors)
                if int(m.tensors[t].role) == 3)
    weights = sum(v.nbytes for k, v in w.items() if k.endswith(".weight_codes"))
    assert other / len(m.ops) < weights, (other, weights)
    assert bool(packed) == bool(isa)
