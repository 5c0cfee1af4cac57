"""Structure-aware lowering and the byte-permute table-row kernels: bit-exact on both targets."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from qos_compile.errors import QosError
from qos_compile.multipliers import get
from qos_compile.multipliers.library import bundled
from qos_compile.multipliers.structure import fits_rows8, is_masked, residual_column_classes
from qos_compile.multipliers.table import exact_table
from qos_compile.nn.emulation import plan_for
from qos_compile.reference import approx_conv2d_acc
from qos_compile.targets import get_target, host_target
from qos_compile.tvm import kernels as K
from qos_compile.tvm import lut_rows
from qos_compile.tvm.build import build_kernels
from qos_compile.tvm.lowering import LOWERINGS, choose_conv_lowering, lowering_allow

HOST = host_target().features
HAS_VBMI = "avx512vbmi" in HOST
#: (target, ISA) pairs whose rows kernels run here: NEON under qemu always, VBMI and AVX2 natively
#: when present (every supported x86-64 CI machine has AVX2).
ISA_TARGETS = [pytest.param("aarch64", "neon", id="aarch64-neon"),
               pytest.param("x86_64", "avx512vbmi", id="x86_64-vbmi",
                            marks=pytest.mark.skipif(not HAS_VBMI, reason="this CPU has no AVX-512 VBMI")),
               pytest.param("x86_64-avx2", "avx2", id="x86_64-avx2",
                            marks=pytest.mark.skipif("avx2" not in HOST, reason="this CPU has no AVX2"))]

# shapes that exercise every index path: stride, dilation, asymmetric pads, groups, depthwise,
# positions not a multiple of the vector, K above one 256-weight chunk, batch > 1
CONVS = [
    dict(x=(1, 5, 9, 7), w=(6, 5, 3, 3), stride=1, padding=(1, 0, 2, 1), dilation=1, groups=1),
    dict(x=(2, 4, 11, 11), w=(8, 2, 3, 3), stride=2, padding=1, dilation=2, groups=2),
    dict(x=(1, 6, 8, 8), w=(6, 1, 3, 3), stride=1, padding=1, dilation=1, groups=6),
    dict(x=(1, 40, 6, 6), w=(3, 40, 3, 3), stride=1, padding=1, dilation=1, groups=1),     # K = 360
    # fewer positions than channels: lanes on output channels (a partial last tile), K above
    # one chunk, batch > 1; planes of as many entries as distinct weights (``codes``): one
    # 64-byte permute, two, three, all 256
    dict(x=(1, 20, 3, 3), w=(70, 20, 3, 3), stride=1, padding=1, dilation=1, groups=1, codes=50),
    dict(x=(2, 30, 3, 3), w=(40, 30, 3, 3), stride=2, padding=1, dilation=1, groups=1, codes=100),  # K = 270
    dict(x=(1, 16, 2, 2), w=(33, 16, 3, 3), stride=1, padding=1, dilation=1, groups=1, codes=170),
    dict(x=(1, 16, 2, 2), w=(33, 16, 3, 3), stride=1, padding=1, dilation=1, groups=1),
]


def _case(cfg: dict, signed: bool, seed: int):
    rng = np.random.default_rng(seed)
    lo, hi, dt = (-128, 128, np.int8) if signed else (0, 256, np.uint8)
    x = rng.integers(lo, hi, cfg["x"]).astype(dt)
    w = rng.integers(lo, hi, cfg["w"]).astype(dt)
    if "codes" in cfg:                          # exactly that many distinct weight codes
        pool = rng.permutation(np.arange(lo, hi))[:cfg["codes"]]
        w = np.concatenate([pool, rng.choice(pool, w.size - len(pool))]).reshape(w.shape).astype(dt)
    pad_code = int(rng.integers(lo, hi))
    spec = K.ConvSpec.make(cfg["x"], cfg["w"], cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"],
                           pad_code, signed)
    return spec, x, w


def _ref(spec, x, w, lut):
    return approx_conv2d_acc(x, w, lut, stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
                             groups=spec.groups, pad_code=spec.pad_code, signed=spec.signed)


def _byte_rows(signed: bool, seed: int) -> np.ndarray:
    """The exact product plus a random byte per entry, each row shifted by its own offset: the
    widest residual rows8 takes (a span of 255 in every row)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (256, 256))
    noise[:, 0], noise[:, 1] = 0, 255
    return exact_table(signed) + noise + rng.integers(-5000, 5000, (256, 1))


@pytest.mark.parametrize("target,isa", ISA_TARGETS)
def test_rows_kernel_bit_exact(target, isa):
    """Every conv shape, signed and unsigned, both variants: rows (random full-range tables and real
    circuits) and rows8 (the residual part: real circuits whose residual fits a byte per row and
    random tables at its limit; and real circuits looked up by residual column class)."""
    rng = np.random.default_rng(3)
    tables = {(False, False): [get("mul8u_2NDH").lut, rng.integers(0, 65536, (256, 256))],
              (True, False): [get("mul8s_1KX2").lut, rng.integers(-32768, 32768, (256, 256))],
              (False, True): [get("mul8u_DG8").lut, get("mul8u_GTR").lut, _byte_rows(False, 1)],
              (True, True): [get("mul8s_1KX2").lut, get("mul8s_1KVB").lut, _byte_rows(True, 2)],
              # rows8 looking up residual column classes: 53 for DG8 + C67 together, 16 for 1KX2
              (False, "classes"): [get("mul8u_DG8").lut, get("mul8u_C67").lut],
              (True, "classes"): [get("mul8s_1KX2").lut]}
    assert not fits_rows8([get("mul8u_2NDH").lut], False)
    funcs, cases = {}, []
    for i, cfg in enumerate(CONVS):
        for (signed, residual), luts in tables.items():
            spec, x, w = _case(cfg, signed, i)
            bias = 0
            if residual:
                assert fits_rows8(luts, signed)
                if residual is True:                       # the random table sits at the limit: a span of 256
                    assert not fits_rows8([luts[-1] + np.eye(256, dtype=np.int64)], signed)
            else:
                bias = lut_rows.fits_rows(luts)
                assert bias == (32768 if signed else 0)
            classes = residual_column_classes(luts, signed) if residual == "classes" else ()
            layout, stages = lut_rows.rows_stage_funcs(spec, w, isa, bias, bool(residual), classes)
            assert (layout.classes is not None) == (residual == "classes")
            if layout.classes is not None:
                assert layout.activations == (53 if not signed else 16) and (layout.by_channel or layout.entries < 256)
            if layout.classes is None:                             # the last shapes put lanes on channels
                assert layout.by_channel == (i >= 4), (i, isa)
            assert len(layout.codes) == cfg.get("codes", len(layout.codes))
            if layout.classes is None or layout.by_channel:   # planes as wide as the rows (or classes)
                assert (layout.entries < 256) == ("codes" in cfg), (i, isa)
            tag = f"c{i}{'s' if signed else 'u'}{'r' if residual else ''}{'c' if residual == 'classes' else ''}_"
            funcs.update({tag + k: f for k, f in stages.items()})
            cases.append((tag, spec, x, w, layout, luts, bias))
    built = build_kernels(funcs, get_target(target), system_lib=True)
    for tag, spec, x, w, layout, luts, bias in cases:
        exact = _ref(spec, x, w, exact_table(spec.signed)) if layout.residual else 0
        for lut in luts:
            got, _ = lut_rows.run_rows_conv(built, tag, layout, x, lut.astype(np.int32), spec, bias, threads=2)
            np.testing.assert_array_equal(got + exact, _ref(spec, x, w, lut), err_msg=tag)


@pytest.mark.parametrize("target", ["x86_64", "aarch64"])
def test_masked_kernel_bit_exact(target):
    """Exact conv on lut[w, code 1] equals the table conv for every masked signed circuit."""
    names = [m for m in bundled() if m.signed and plan_for(m).strategy in ("masked", "exact")]
    assert len(names) >= 4          # 1KR8, 1KTY, 1KR3 and the exact circuit
    funcs, cases = {}, []
    for i, cfg in enumerate(CONVS[:3]):
        spec, x, w = _case(cfg, True, i)
        funcs[f"m{i}"] = K.masked_conv2d_func(spec, target)
        cases.append((f"m{i}", spec, x, w))
    built = build_kernels(funcs, get_target(target), system_lib=True)
    for name, spec, x, w in cases:
        for circuit in names:
            lut = circuit.lut.astype(np.int32)
            np.testing.assert_array_equal(built.run(name, x, w, lut), _ref(spec, x, w, lut),
                                          err_msg=f"{name} {circuit.name}")


def test_is_masked_agrees_with_the_emulation_strategies():
    for m in bundled():
        strategy = plan_for(m).strategy
        expect = strategy in ("masked", "exact")
        assert is_masked(m.lut, m.signed) == expect, m.name


def test_lowering_choice_per_layer():
    # (no avx2 / avx512bw: their multiply-add would take the low-rank tables, lut_dot)
    vbmi, neon, plain = frozenset({"avx512f", "avx512vbmi"}), frozenset({"neon"}), frozenset({"sse2"})
    arm = get_target("aarch64").kernel_costs          # ESTIMATED (llvm-mca): rows8 < gather < rows
    masked = [get("mul8s_1KTY").lut, get("mul8s_1KR3").lut, get("master:mul8s_1KV8").lut]
    general = get("mul8s_1KX2").lut
    # cost decides, masked layers too: they are one int8 factor term, and the x86 defaults price
    # the TE low-rank kernel (1.05) below the masked one (1.12); on ARM's estimate masked is cheaper
    assert choose_conv_lowering(masked, True, plain).describe() == "s8-lutconv-lowrank-t1"
    assert choose_conv_lowering(masked, True, plain, costs={"masked": 1.0}).describe() == "s8-lutconv-masked"
    assert choose_conv_lowering(masked, True, neon, costs=arm).describe() == "s8-lutconv-masked"
    assert choose_conv_lowering(masked, True, plain, allow=("masked", "gather")).kind == "masked"
    low = choose_conv_lowering(masked + [general], True, vbmi)                 # one OP is not masked
    assert (low.kind, low.isa) == ("rows", "avx512vbmi")
    assert low.bias == -min(int(t.min()) for t in masked + [general])          # smallest bias that fits
    # cheapest by its costs: 1KX2's residual fits a byte per row, its 16 column classes one tbl step
    assert choose_conv_lowering([general], True, neon, costs=arm).describe() == "s8-lutconv-neon-rows8"
    assert choose_conv_lowering([general, get("mul8s_1KR6").lut], True, neon, costs=arm).kind == "gather"
    assert choose_conv_lowering([general], True, neon, allow=("rows", "gather"), costs=arm).describe() == \
        "s8-lutconv-neon-rows8"
    assert choose_conv_lowering([general], True, plain, allow=("rows", "gather")).kind == "gather"   # no permute
    wide = np.full((256, 256), 70000, np.int64)                                # does not fit 16 bits
    assert choose_conv_lowering([wide], False, vbmi, allow=("rows", "gather")).kind == "gather"
    assert choose_conv_lowering([wide], False, vbmi).describe() == "u8-lutconv-lowrank-t1"   # a constant: rank 1
    assert choose_conv_lowering(masked, True, vbmi, allow=("rows", "gather")).kind == "rows"
    with pytest.raises(QosError, match="none of the lowerings"):
        choose_conv_lowering([general], True, plain, allow=("rows",))
    with pytest.raises(QosError, match="unknown lowering"):
        choose_conv_lowering([general], True, plain, allow=("fast",))
    # a registry name forces that variant (gather where it does not fit)
    assert lowering_allow("s8-lutconv-neon-rows") == ("s8-lutconv-neon-rows", "gather")
    assert lowering_allow("rows") == ("rows", "gather") and lowering_allow("auto") == LOWERINGS
    assert choose_conv_lowering([general], True, neon, lowering_allow("s8-lutconv-neon-rows"), costs=arm).kind == "rows"
    assert choose_conv_lowering(masked, True, vbmi, lowering_allow("s8-lutconv-lowrank-t3")).kind == "gather"
    with pytest.raises(QosError, match="unknown kernel variant 's8-lutconv-fast'"):
        lowering_allow("s8-lutconv-fast")
    from qos_compile.cli.compile import build_parser          # the CLI takes families and registry names

    for choice in ("auto", "rows", "s8-lutconv-neon-rows", "u8-lutconv-gather"):
        assert build_parser().parse_args(["m.pt", "--lowering", choice]).lowering == choice
    with pytest.raises(SystemExit):
        build_parser().parse_args(["m.pt", "--lowering", "s8-lutconv-fast"])


def test_rows8_choice_prices_the_exact_part():
    """rows8 fits where every row of the residual spans at most 255; its price is its own cost,
    scaled by its residual's column classes, plus the cheapest exact kernel's; the 16-bit rows
    and gather kernels stay where it does not fit."""
    vbmi, avx2 = frozenset({"avx512f", "avx512bw", "avx512vbmi"}), frozenset({"avx2"})
    dg8, gtr, ndh = get("mul8u_DG8").lut, get("mul8u_GTR").lut, get("mul8u_2NDH").lut
    low = choose_conv_lowering([dg8, gtr], False, vbmi, costs={"rows8": 0.1})
    assert low.describe() == "u8-lutconv-avx512vbmi-rows8" and low.exact is not None
    share = lut_rows.lookup_share("avx512vbmi", residual_column_classes([dg8, gtr], False))
    assert 0.9 < share < 1.0                                # DG8 + GTR: 152 classes, 3 of 4 steps
    assert low.exact.kind in ("masked", "lowrank") and low.cost == pytest.approx(0.1 * share + low.exact.cost)
    # few classes make the AVX2 residual far cheaper: DG8's 29 take 2 of 16 sub-tables
    assert lut_rows.lookup_share("avx2", residual_column_classes([dg8], False)) < 0.25
    assert lut_rows.lookup_share("avx2", ()) == 1.0
    assert choose_conv_lowering([dg8, ndh], False, vbmi, costs={"rows8": 0.1}).describe() != \
        "u8-lutconv-avx512vbmi-rows8"                                       # 2NDH needs 16 bits
    assert choose_conv_lowering([dg8], False, avx2, allow=("rows",), costs={"pshufb_rows8": 0.1}).describe() == \
        "u8-lutconv-avx2-rows8"
    assert choose_conv_lowering([ndh], False, avx2, allow=("rows",)).describe() == "u8-lutconv-avx2-rows"
    assert choose_conv_lowering([ndh], False, frozenset({"sse2"}), allow=lowering_allow("rows")).kind == "gather"


HAVE_ARM = shutil.which("aarch64-linux-gnu-gcc") is not None and shutil.which("qemu-aarch64-static") is not None
NO_ARM = pytest.mark.skipif(not HAVE_ARM, reason="needs aarch64-linux-gnu-gcc and qemu-aarch64-static")


@pytest.mark.parametrize("target,variant,lowering", [
    pytest.param("x86_64-avx2", "u8-lutconv-avx2-rows8", "forced",
                 marks=pytest.mark.skipif("avx2" not in HOST, reason="no AVX2")),
    pytest.param("x86_64", "u8-lutconv-avx512vbmi-rows8", "forced",
                 marks=pytest.mark.skipif(not HAS_VBMI, reason="no VBMI")),
    # on ARM the estimated costs choose it over gather by themselves (A76: with sdot, A72: without)
    pytest.param("aarch64-cortex-a76", "u8-lutconv-neon-rows8", "auto", marks=NO_ARM),
    pytest.param("aarch64-cortex-a72", "u8-lutconv-neon-rows8", "auto", marks=NO_ARM)])
def test_compiled_model_on_the_rows8_kernel(target, variant, lowering, tmp_path):
    """Three OPs of unsigned circuits that do not factor (DG8, GTR, 2P7): the rows8 kernel compiled
    into the model, the per-OP row minima in the manifest, bit-exact with onnxruntime on every OP
    (aarch64 under qemu)."""
    import json
    import sys
    from pathlib import Path

    from qos_compile.compiler import compile_qnet
    from qos_compile.runtime.manifest import read_manifest

    sys.path.insert(0, str(Path(__file__).parent))
    from test_lut_factors import _small_qnet

    circuits = ["mul8u_DG8", "mul8u_GTR", "mul8u_2P7"]
    qnet = _small_qnet(circuits, lambda op, i: op, "lenet5", 28)          # 2 convs: quick to build
    lines: list[str] = []
    res = compile_qnet(qnet, target, tmp_path / "out", lowering=variant if lowering == "forced" else "auto",
                       progress=lines.append)
    assert any(f"conv kernels: {variant} x2" in ln for ln in lines), lines
    report = json.loads((res.out_dir / "report.json").read_text())
    assert report["verification"]["ran"] and report["verification"]["bit_exact"], report["verification"]
    m = read_manifest(res.manifest)
    mins = [s for s in m.slots if s.name.endswith(".rowmin")]
    assert len(mins) == 2
    for s in mins:
        per_op = [m.tensor_data(t) for t in s.tensors]
        assert len(per_op) == 3 and len({v.tobytes() for v in per_op}) == 3         # one per circuit
