"""The compiled network through the C runtime: qos-run (x86-64 native, aarch64 under qemu) and the
Python binding (qos_compile.runtime.model.Model) agree bit for bit for every OP, and with PyTorch
inference of the same model.pt (eval, APPROX, no gradients: ``QoSNet.forward`` computes the
device's float32 epilogue, ``nn.affine``, with BatchNorms folded where the exporter folds them),
on the digits test split and on random inputs: PyTorch = onnxruntime = qos-run x86-64 = qos-run
aarch64, bit for bit.

The compiled network is also bit-identical to onnxruntime running the exported model.onnx on any
x86-64 CPU (the compiler keeps float products from being contracted into FMAs, and the average
pool is exported as adds in one fixed order, so the float parts after the accumulators are the
same IEEE operations in the same order; tests/test_float_order.py checks that order directly).

"""
from __future__ import annotations

import os
import subprocess

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from qos_compile.errors import QosError  # noqa: E402
from test_compile import HAVE_ARM, arm, x86  # noqa: E402



def _qos_run(out, x: np.ndarray, op, tmp_path, prefix=(), env=None, tag="") -> np.ndarray:
    inp, res = tmp_path / f"in{tag}.bin", tmp_path / f"out{tag}_{op}.bin"
    np.ascontiguousarray(x).tofile(inp)
    proc = subprocess.run([*prefix, str(out / "qos-run"), str(out / "model.qosm"), "--op", str(op), "--input",
                           str(inp), "--output", str(res)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return np.fromfile(res, dtype=np.float32).reshape(len(x), -1)


def test_every_op_bit_exact_across_qos_run_binding_and_aarch64(tmp_path):
    from qos_compile.runtime.model import Model
    from qos_compile.targets import get_target

    a = x86()
    outs_x86 = [_qos_run(a.outs["x86_64"], a.x, op, tmp_path, tag="x") for op in range(3)]
    with Model(a.outs["x86_64"]) as m:
        assert m.operating_points == ["op0", "op1", "op2"]
        assert m.inputs[0].shape == a.x.shape and m.outputs[0].shape == (len(a.x), 10)
        for op in (2, 0, 1):                               # any order: select only swaps pointers
            m.select(op)
            assert np.array_equal(m.run(a.x), outs_x86[op]), f"binding != qos-run, OP {op}"
        m.select("op2")
        assert m.selected == 2 and np.array_equal(m.run(a.x.astype(np.float64)), outs_x86[2])
    for op, y in enumerate(outs_x86):
        t = a.torch_out[op]
        assert np.array_equal(y, t), (f"qos-run != PyTorch inference, OP {op}: {int(np.any(y != t, 1).sum())} "
                                      f"samples differ, by up to {float(np.max(np.abs(y - t)))}")
    # the OPs really differ (different circuits), and the exact OP classifies the digits
    assert not np.array_equal(outs_x86[0], outs_x86[1]) and not np.array_equal(outs_x86[1], outs_x86[2])
    assert np.mean(outs_x86[0].argmax(1) == a.y) > 0.8
    if not HAVE_ARM:
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64-static")
    b = arm()
    prefix = get_target("aarch64").run_prefix()
    for op in range(3):
        ya = _qos_run(b.outs["aarch64"], a.x, op, tmp_path, prefix=prefix, tag="a")
        assert np.array_equal(ya, outs_x86[op]), f"aarch64 (qemu) != x86-64, OP {op}"


def test_pytorch_inference_is_the_device_on_random_inputs(tmp_path):
    """model.pt loaded afresh: PyTorch inference = onnxruntime = qos-run x86-64 (= aarch64 under qemu)
    bit for bit at every OP on random inputs over 1.5x the data's range (clamped codes included)."""
    import torch

    from qos_compile.nn.fold import requant_map, residual_map
    from qos_compile.onnx import run_onnxruntime
    from qos_compile.qosmodel import load_qos_model
    from qos_compile.targets import get_target

    a = x86()
    lo, hi = float(a.x.min()), float(a.x.max())
    mid, half = (lo + hi) / 2, 0.75 * (hi - lo)
    x = np.random.default_rng(7).uniform(mid - half, mid + half, a.x.shape).astype(np.float32)
    qnet, _ = load_qos_model(a.model_pt)
    # contract v2: the stem and each block's conv1 -> bn1 -> relu -> conv2 requantize in integers,
    # and so do the residual adds: into the next block's conv1, and the last one's sum into fc's
    # codes, which the global pool averages in integers
    assert sorted(requant_map(qnet.net)) == ["conv1"] + [f"layer{i}.0.conv1" for i in (1, 2, 3)]
    assert residual_map(qnet.net) == {"layer1.0.conv2": ("layer2.0.conv1", "layer1.0.conv1"),
                                      "layer2.0.conv2": ("layer3.0.conv1", "layer2.0.conv1"),
                                      "layer3.0.conv2": ("fc", "layer3.0.conv1")}
    for op in range(qnet.num_ops):
        qnet.set_operating_point(op)
        with torch.no_grad():
            t = qnet(torch.from_numpy(x)).numpy()
        want = run_onnxruntime(a.outs["x86_64"] / "model.onnx", x, op, batch_size=64, threads=1)
        got = _qos_run(a.outs["x86_64"], x, op, tmp_path, tag="rand")
        assert np.array_equal(t, want), (op, int(np.any(t != want, 1).sum()), float(np.max(np.abs(t - want))))
        assert np.array_equal(got, want), (op, float(np.max(np.abs(got - want))))
        if HAVE_ARM:
            ya = _qos_run(arm().outs["aarch64"], x, op, tmp_path, prefix=get_target("aarch64").run_prefix(),
                          tag="rand_a")
            assert np.array_equal(ya, got), op


def test_epilogue_benchmark_compares_float_and_integer_epilogues(capsys, tmp_path):
    """``python -m qos_compile.bench.epilogue``: per OP, top-1 with the float epilogue of contract v1
    and with the integer one, on the model's test split; a bad file is one line and exit 2."""
    from qos_compile.bench.epilogue import compare, main

    data = ["--dataset", "digits", "--input-size", "16"]
    rep = compare(str(x86().model_pt), "digits", image_size=16)
    assert (rep["layers"], rep["integer_layers"], rep["output_layers"], len(rep["ops"])) == (8, 7, 1, 3)
    for r in rep["ops"]:
        assert 0 <= r["changed_prediction"] <= r["changed_output"] <= rep["samples"]
        assert abs(r["delta"]) <= 100.0 * r["changed_prediction"] / rep["samples"] + 1e-9
    assert main([str(x86().model_pt), *data]) == 0
    out = capsys.readouterr().out
    assert "7 of 8 approximate layers requantize in integers, 1 output layer(s) float32(q + B) * s" in out and out.count("\n| ") == 5
    bad = tmp_path / "nope.pt"
    bad.write_text("not a model")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("epilogue: error: ") and err.count("\n") == 1


def test_agreement_benchmark_reports_no_difference(capsys):
    """``python -m qos_compile.bench.agreement`` on the model.pt: host line, every OP, 0 outputs differ."""
    from qos_compile.bench.agreement import main

    assert main([str(x86().model_pt), "--samples", "40", "--random", "24", "--dataset", "digits",
                 "--input-size", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("host: ")
    rows = [ln.split("|")[1:-1] for ln in out.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    assert all(int(r[1]) == 64 and int(r[2]) == 0 and r[4].strip() == "100.00%" for r in rows), out


def test_qos_run_bit_exact_with_onnxruntime(tmp_path):
    """qos-run on x86-64 == onnxruntime on the exported model.onnx, every OP, whole test split."""
    import onnxruntime as ort

    a = x86()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(a.outs["x86_64"] / "model.onnx"), so, providers=["CPUExecutionProvider"])
    for op in range(3):
        want = np.concatenate([sess.run(None, {"input": a.x[i:i + 16], "operating_point": np.array(op, np.int64)})[0]
                               for i in range(0, len(a.x), 16)])
        got = _qos_run(a.outs["x86_64"], a.x, op, tmp_path, tag="ort")
        assert np.array_equal(got, want), (op, float(np.max(np.abs(got - want))))


def test_thread_count_does_not_change_results(tmp_path):
    a = x86()
    x = a.x[:64].copy()
    x = np.concatenate([x] * (-(-len(a.x) // len(x))))[:len(a.x)]
    one = _qos_run(a.outs["x86_64"], x, 1, tmp_path, env={"QOS_NUM_THREADS": "1"}, tag="t1")
    two = _qos_run(a.outs["x86_64"], x, 1, tmp_path, env={"QOS_NUM_THREADS": "2"}, tag="t2")
    assert np.array_equal(one, two)


def test_qos_run_info_and_bad_op():
    a = x86()
    out = a.outs["x86_64"]
    info = subprocess.run([str(out / "qos-run"), str(out / "model.qosm"), "--info"], capture_output=True, text=True)
    assert info.returncode == 0
    assert "operating points: 3" in info.stdout and "op2" in info.stdout and "input 0 input float32" in info.stdout
    bad = subprocess.run([str(out / "qos-run"), str(out / "model.qosm"), "--op", "turbo"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "no operating point 'turbo'" in bad.stderr


def test_manifest_naming_a_non_kernel_symbol_is_refused(tmp_path):
    """Issue #17: a manifest could name any registered system-lib symbol as a kernel, e.g. the
    library context <prefix>__tvm_ffi__library_ctx, and qos-run called that data as code (SIGSEGV).
    Kernel names now resolve only through the model's own kernel table, in qos-run and in
    libqos_model.so: such a manifest is refused when it is opened (exit 2, one line)."""
    import shutil

    from qos_compile.runtime import fuzzing as F
    from qos_compile.runtime.manifest import read_manifest
    from qos_compile.runtime.model import Model

    out = x86().outs["x86_64"]
    data = (out / "model.qosm").read_bytes()
    m = read_manifest(data)
    prefix = m.metadata_json()["kernel_prefix"]
    longest = max(range(len(m.kernels)), key=lambda k: len(m.kernels[k]))
    names = [f"{prefix}__tvm_ffi__library_ctx", "__tvm_ffi_main", "qos_linked_kernel_lookup", "main",
             f"__tvm_ffi_{min(m.kernels, key=len)}"]
    names = [n for n in names if len(n) <= len(m.kernels[longest])]     # rewritten in place over that name
    assert names[0].endswith("__tvm_ffi__library_ctx")
    for k, name in enumerate(names):
        bad = tmp_path / f"bad{k}"        # a fresh folder each time: never overwrite a loaded library
        bad.mkdir()
        (bad / "model.qosm").write_bytes(F.apply(data, [F.Mutation("string", "name", name, "KERNELS", longest)]))
        for args in (["--info"], ["--bench", "1"]):
            proc = subprocess.run([str(out / "qos-run"), str(bad / "model.qosm"), *args], capture_output=True,
                                  text=True, timeout=120)
            assert proc.returncode == 2, (name, proc.returncode, proc.stderr)
            assert f"kernel '{name}' not found: not one of the kernels this program was built with" in proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1
        for f in ("libqos_model.so", "report.json"):
            shutil.copy(out / f, bad / f)
        with pytest.raises(QosError, match="not one of the kernels"):
            Model(bad)


def test_qos_run_cli_numbers_on_a_compiled_model(tmp_path):
    """The compiled qos-run parses numbers strictly (the same main as the runtime tests' driver)."""
    out = x86().outs["x86_64"]
    run = [str(out / "qos-run"), str(out / "model.qosm")]
    for args, frag in ((["--bench", "1e3"], "bad --bench '1e3'"), (["--op", "4294967298"], "no operating point"),
                       (["--bench", str(2**61)], "bad --bench"), (["--switch-bench", "0"], "bad --switch-bench"),
                       (["--profile", "2000000000"], "bad --profile")):
        proc = subprocess.run(run + args, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and frag in proc.stderr, (args, proc.returncode, proc.stderr)
    proc = subprocess.run([str(out / "qos-run"), str(tmp_path / "missing.qosm")], capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot open" in proc.stderr


def test_model_errors(tmp_path):
    from qos_compile.runtime.model import Model

    a = x86()
    with pytest.raises(QosError, match="not a qos-compile output"):
        Model(tmp_path)
    with Model(a.outs["x86_64"]) as m:
        with pytest.raises(QosError, match="no operating point 'turbo'"):
            m.select("turbo")
        with pytest.raises(QosError, match="out of range"):
            m.select(3)
        with pytest.raises(QosError, match="must be float32"):
            m.run(a.x[:3])
        md = m.metadata
        assert md["tool"] == "qos-compile" and [o["name"] for o in md["ops"]] == ["op0", "op1", "op2"]
        assert m.report["target"]["name"] == "x86_64"
    if HAVE_ARM:
        with pytest.raises(QosError, match="compiled for aarch64"):
            Model(arm().outs["aarch64"])


def test_stream_switches_ops_mid_stream_and_benchmarks(tmp_path):
    """--op-sequence switches OP between the inputs of one stream (one process, qos_select between
    inferences): item i equals a separate run at OP seq[i]; --switch-bench and --bench report numbers."""
    a = x86()
    out = a.outs["x86_64"]
    per_op = [_qos_run(out, a.x, op, tmp_path, tag="s") for op in range(3)]
    stream, res = tmp_path / "stream.bin", tmp_path / "stream_out.bin"
    np.concatenate([a.x, a.x, a.x]).astype(np.float32).tofile(stream)
    proc = subprocess.run([str(out / "qos-run"), str(out / "model.qosm"), "--input", str(stream), "--op-sequence",
                           "2,0,op1", "--output", str(res)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    y = np.fromfile(res, dtype=np.float32).reshape(3, len(a.x), -1)
    for item, op in enumerate((2, 0, 1)):
        assert np.array_equal(y[item], per_op[op]), f"stream item {item} != OP {op}"
    sw = subprocess.run([str(out / "qos-run"), str(out / "model.qosm"), "--switch-bench", "100000"],
                        capture_output=True, text=True, timeout=60)
    assert sw.returncode == 0 and float(sw.stdout.split("qos_select: ")[1].split(" ns")[0]) > 0
    b = subprocess.run([str(out / "qos-run"), str(out / "model.qosm"), "--bench", "3"], capture_output=True,
                       text=True, timeout=600)
    assert b.returncode == 0 and b.stdout.count("bench op ") == 3, b.stdout + b.stderr
    bad = subprocess.run([str(out / "qos-run"), str(out / "model.qosm"), "--op-sequence", "0,7"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "bad --op-sequence" in bad.stderr


def test_profile_lists_every_plan_step_and_kernel_kinds():
    """--profile N times every plan step; the manifest names each layer's kernel variant by its
    registry name, the profile's steps carry it, and the x86-64 build uses the structure-aware
    kernels its CPU allows (rows with VBMI, else gather)."""
    from qos_compile.runtime.manifest import read_manifest
    from qos_compile.targets import host_target
    from qos_compile.tvm.variants import BY_NAME

    a = x86()
    out = a.outs["x86_64"]
    p = subprocess.run([str(out / "qos-run"), str(out / "model.qosm"), "--op", "1", "--profile", "5"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    m = read_manifest(out / "model.qosm")
    steps = [ln for ln in p.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert len(steps) == len(m.steps) and "OP 1" in p.stdout and "total" in p.stdout
    layers = m.metadata_json()["layers"]
    kinds = {layer["kernel"] for layer in layers if "kernel" in layer}
    conv = {layer["kernel"] for layer in layers if layer["kind"] == "conv"}
    assert kinds <= set(BY_NAME) | {"u8-lutgemm-gather"}, kinds   # registry names
    # rows or rows8 (the host's costs decide) with VBMI, else gather
    want = "u8-lutconv-avx512vbmi-rows" if "avx512vbmi" in host_target().features else "u8-lutconv-gather"
    assert conv and all(k.startswith(want) for k in conv), conv
    for kernel in conv:                           # the variant's PrimFuncs carry its name
        assert any(kernel.replace("-", "_") in ln for ln in steps), (kernel, steps)
    bad = subprocess.run([str(out / "qos-run"), str(out / "model.qosm"), "--profile", "-1"], capture_output=True,
                         text=True)
    assert bad.returncode == 2
