"""Benchmark baselines (float torch, onnxruntime int8, TVM exact conv layers) and the timing helpers."""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from qos_compile.bench.timing import Timing, format_table, measure  # noqa: E402
from qos_compile.errors import QosError  # noqa: E402
from qos_compile.models import build_model  # noqa: E402


# ------------------------------------------------------------------ timing helpers
def test_timing_from_samples_quartiles():
    t = Timing.from_samples([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (t.median_ms, t.p25_ms, t.p75_ms, t.n, t.min_ms, t.max_ms) == (3.0, 2.0, 4.0, 5, 1.0, 5.0)
    assert t.iqr_ms == 2.0 and not t.emulated
    assert t.scaled(2).median_ms == 6.0
    with pytest.raises(QosError):
        Timing.from_samples([])


def test_measure_interleaves_round_robin():
    calls: list[str] = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    res = measure(fns, repeats=6, warmup=1)
    assert set(res) == set("abc") and all(t.n == 6 for t in res.values())
    timed = calls[3:]                                   # after one warm-up call each
    rounds = [timed[i:i + 3] for i in range(0, 18, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)     # every round runs every candidate once
    assert len({r[0] for r in rounds}) == 3                      # and the order rotates
    with pytest.raises(QosError):
        measure({}, 3)
    with pytest.raises(QosError):
        measure(fns, repeats=0)


def test_measure_sees_the_difference():
    x = np.random.default_rng(0).random((300, 300))
    res = measure({"small": lambda: x[:10, :10] @ x[:10, :10], "big": lambda: x @ x}, repeats=5, number=2)
    assert res["big"].median_ms > res["small"].median_ms > 0


def test_format_table_and_emulated_label():
    t = Timing.from_samples([1.0, 2.0, 3.0])
    md = format_table([{"kernel": "exact", "time": t, "ratio": 1.5}])
    lines = md.splitlines()
    assert lines[0] == "| kernel | time | ratio |" and lines[1] == "| --- | --- | --- |"
    assert lines[2] == "| exact | 2.000 (1.500-2.500) | 1.5 |" and "EMULATED" not in md
    em = format_table({"lut conv": Timing.from_samples([1.0], emulated=True)})
    assert "time (ms) EMULATED" in em and "not device latencies" in em and "emulated" in em
    assert "EMULATED" in format_table({"x": t}, emulated=True)
    assert "a\\|b" in format_table([{"n": "a|b"}])


# ------------------------------------------------------------------ baselines
@pytest.fixture(scope="module")
def resnet8():
    torch.manual_seed(0)
    net = build_model("resnet8", 10, in_channels=1, input_size=16).eval()
    gen = torch.Generator().manual_seed(1)
    calib = torch.rand(32, 1, 16, 16, generator=gen)
    x = torch.rand(32, 1, 16, 16, generator=gen)
    return net, calib, x


def test_baselines_end_to_end_resnet8(resnet8, tmp_path):
    from qos_compile.bench.baselines import measure_baselines, onnx_op_types, ort_predict

    net, calib, x = resnet8
    rep = measure_baselines(net, x, calib, tmp_path, repeats=3, threads=1, warmup=1)
    assert set(rep.timings) == {"float torch", "ort int8", "ort float", "tvm exact conv layers (sum)"}
    assert all(t.median_ms > 0 and t.n == 3 for t in rep.timings.values())
    ops = onnx_op_types(rep.int8_path)
    assert ops.get("QLinearConv", 0) == 7 and "Conv" not in ops          # every conv is an exact int8 conv
    assert rep.int8_path.with_name("model.int8.float.onnx").is_file()
    with torch.inference_mode():
        want = net(x).argmax(1).numpy()
    got = ort_predict(rep.int8_path, x).argmax(1)
    assert (got == want).mean() >= 0.8 and rep.top1_agreement >= 0.8
    md = format_table(rep.rows())
    assert "ort int8" in md and "tvm exact conv layers (sum)" in md


def test_ort_accuracy_and_qdq(resnet8, tmp_path):
    from qos_compile.bench.baselines import ort_accuracy, ort_int8_model, ort_latency, onnx_op_types

    net, calib, x = resnet8
    path = ort_int8_model(net, [calib[:16], calib[16:]], tmp_path / "q.onnx", fmt="qdq")
    ops = onnx_op_types(path)
    assert ops.get("QuantizeLinear", 0) >= 7 and ops.get("DequantizeLinear", 0) >= 7 and ops.get("Conv") == 7
    with torch.inference_mode():
        labels = net(x).argmax(1)
    acc = ort_accuracy(path, [(x[:16], labels[:16]), (x[16:], labels[16:])])
    assert acc >= 0.8                                   # "accuracy" against the float model's own labels
    assert ort_latency(path, x[:1], repeats=2, threads=1).n == 2
    with pytest.raises(QosError, match="unknown quantization format"):
        ort_int8_model(net, calib, tmp_path / "z.onnx", fmt="int4")


def test_tvm_exact_layer_times(resnet8):
    from qos_compile.bench.baselines import conv_layers, tvm_exact_layer_times

    net, _, _ = resnet8
    layers = conv_layers(net, (1, 1, 16, 16))
    assert [lay.name for lay in layers][:2] == ["conv1", "layer1.0.conv1"] and len(layers) == 7
    assert layers[3].spec.stride == (2, 2) and layers[3].spec.out_shape == (1, 32, 8, 8)
    res = tvm_exact_layer_times(layers, repeats=2, warmup=1)
    assert set(res.layers) == {lay.name for lay in layers}
    assert res.total.median_ms > 0 and res.sum_of_medians_ms > 0
    with pytest.raises(QosError, match="input_shape"):
        tvm_exact_layer_times(net)


def test_plain_float_replaces_approx_layers(resnet8):
    from qos_compile.bench.baselines import plain_float
    from qos_compile.nn.wrap import wrap_model

    net, _, x = resnet8
    qnet = wrap_model(net, ["mul8u_1JFF"])
    plain = plain_float(qnet)
    convs = [m for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(type(m) is torch.nn.Conv2d for m in convs)
    assert all(type(m) is torch.nn.Linear for m in plain.modules() if isinstance(m, torch.nn.Linear))
    assert torch.equal(convs[0].weight, net.conv1.weight)


# ------------------------------------------------------------------ onnxruntime as on an AVX2 CPU
def test_cpuid_mask_shows_a_child_an_avx2_cpu(tmp_path):
    """The preload makes CPUID trap and clears AVX-512 and AVX-VNNI: NumPy in the child sees
    AVX2 + FMA and neither, and onnxruntime runs there (its own CPUID dispatch picks AVX2 code)."""
    from qos_compile.bench import cpuid_mask
    from qos_compile.bench.kernels import _ort_int8_us_masked

    why = cpuid_mask.unavailable()
    if why:
        pytest.skip(why)
    lib = cpuid_mask.build(tmp_path)
    cpuid_mask.check(lib)
    seen = cpuid_mask.run_python(lib, cpuid_mask.PROBE + "; print(_f['FMA3'], _f.get('AVX512VNNI'))").split()
    assert seen[:3] == ["cpuid", "avx2", "-"] and seen[3] == "True" and seen[4] != "True", seen
    with pytest.raises(QosError, match="CPUID-masked child failed"):
        cpuid_mask.run_python(lib, "raise SystemExit('boom')")
    assert _ort_int8_us_masked(tmp_path, 3) > 0
