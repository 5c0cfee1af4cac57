"""`qos-compile`: a small QoS network (ResNet-8, 16x16 digits, 3 OPs, different circuits per OP)
compiled for x86_64 and aarch64 through the real CLI; the exported ONNX; TVM's accumulators per
ApproxConv/ApproxGemm against qos_compile.reference (x86_64 natively, aarch64 under qemu); every
bad input (exit 2, one line, OUT untouched).

The network is trained for two quick epochs so that its predictions have real margins (the
whole-network comparisons live in test_qos_run.py, which reuses ``artefacts()`` from here).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from qos_compile.errors import QosError  # noqa: E402

HAVE_ARM = shutil.which("aarch64-linux-gnu-gcc") is not None and shutil.which("qemu-aarch64-static") is not None
CIRCUITS = ["mul8u_1JFF", "mul8u_KEM", "mul8u_125K", "mul8u_ZDF", "mul8u_2AC"]   # 1JFF = exact
META_POWER = (1.0, 0.95, 0.85)
STAGES = ("load", "export", "check", "relax", "plan", "kernels", "manifest", "link", "verify", "report")


# --------------------------------------------------------------------------- shared artefacts
@dataclass
class Artefacts:
    root: Path
    model_pt: Path
    x: np.ndarray                 # digits test split, float32 (N, 1, 16, 16)
    y: np.ndarray                 # labels
    torch_out: list[np.ndarray]   # PyTorch APPROX emulation, per OP
    outs: dict[str, Path]         # target -> qos-compile output folder
    logs: dict[str, str]          # target -> the CLI's stdout


def _train_qnet():
    from qos_compile.data.digits import load_digits_splits
    from qos_compile.models import build_model
    from qos_compile.nn import wrap_model

    torch.manual_seed(0)
    splits = load_digits_splits(16, 0)
    xtr, ytr = splits.train.tensors
    xte, yte = splits.test.tensors
    model = build_model("resnet8", 10, 1, 16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):
        model.train()
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 32):
            idx = perm[i:i + 32]
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    qnet = wrap_model(model, CIRCUITS, num_ops=3)
    n = len(qnet.approx_layers())
    # OP0 exact everywhere; OP1 and OP2 alternate two circuits each (different circuits per OP)
    qnet.set_assignment([[0] * n, [1 if i % 2 else 2 for i in range(n)], [3 if i % 2 else 4 for i in range(n)]])
    qnet.set_mode("quant")
    qnet.train()
    with torch.no_grad():
        for i in range(0, 512, 128):
            qnet(xtr[i:i + 128])
    qnet.eval()
    qnet.freeze_observers(True)
    qnet.set_mode("approx")
    return qnet, xte, yte


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run `qos-compile` in this process; (exit status, stdout, stderr)."""
    from qos_compile.cli.compile import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@functools.lru_cache(maxsize=None)
def _base() -> Artefacts:
    from qos_compile.qosmodel import save_qos_model

    root = Path(tempfile.mkdtemp(prefix="qos_compile_test_"))
    atexit.register(shutil.rmtree, root, True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # on a busy 2-core machine, 2 OpenMP threads ran this 10x slower
    try:
        qnet, xte, yte = _train_qnet()
        torch_out = []
        with torch.no_grad():
            for op in range(qnet.num_ops):
                qnet.set_operating_point(op)
                torch_out.append(qnet(xte).numpy())
        qnet.set_operating_point(0)
        # per-OP results as the pipeline writes them (the report takes power/accuracy from here)
        ops_meta = [{"op": j, "relative_power": META_POWER[j],
                     "bn_only": {"test": {"top1": 100.0 * float(np.mean(torch_out[j].argmax(1) == yte.numpy()))}}}
                    for j in range(qnet.num_ops)]
        model_pt = root / "model.pt"
        save_qos_model(model_pt, qnet, {"note": "test_compile", "ops": ops_meta})
    finally:
        torch.set_num_threads(threads)
    return Artefacts(root, model_pt, xte.numpy().astype(np.float32), yte.numpy(), torch_out, {}, {})


def artefacts(*targets: str) -> Artefacts:
    """The trained model.pt and its compiled outputs for ``targets`` (each compiled once per session,
    batch = the digits test split)."""
    a = _base()
    for t in targets:
        if t not in a.outs:
            out = a.root / f"out-{t}"
            rc, stdout, stderr = run_cli([str(a.model_pt), "--target", t, "-o", str(out), "--batch", str(len(a.x)),
                                          "--threads", "2"])
            assert rc == 0, stderr
            a.outs[t], a.logs[t] = out, stdout
    return a


def x86() -> Artefacts:
    return artefacts("x86_64")


def arm() -> Artefacts:
    if not HAVE_ARM:
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64-static")
    return artefacts("aarch64")


# --------------------------------------------------------------------------- compile outputs
@pytest.mark.parametrize("target", ["x86_64", "aarch64"])
def test_outputs_report_and_progress(target):
    a = x86() if target == "x86_64" else arm()
    out = a.outs[target]
    names = {p.name for p in out.iterdir()}
    want = {"model.onnx", "kernels.o", "model.qosm", "qos-run", "report.json"}
    want |= {"libqos_model.so"} if target == "x86_64" else set()
    assert names == want, names
    assert os.access(out / "qos-run", os.X_OK)
    report = json.loads((out / "report.json").read_text())
    assert report["tool"] == "qos-compile" and report["target"]["name"] == target
    for name, size in report["artefacts"].items():
        assert (out / name).stat().st_size == size, name
    # progress: one line per stage, each with its time
    lines = [ln for ln in a.logs[target].splitlines() if ln.startswith("[")]
    assert [ln.split("]")[1].split()[0] for ln in lines] == list(STAGES)
    assert all(ln.rstrip().endswith(" s)") for ln in lines)
    assert set(STAGES) <= set(report["times_s"])
    # manifest breakdown, per-OP overhead, circuits, power, table hashes
    from qos_compile.runtime.manifest import read_manifest

    m = read_manifest(out / "model.qosm")
    sizes = report["manifest"]
    assert sizes["file"] == (out / "model.qosm").stat().st_size
    assert sizes == {**sizes, **m.size_breakdown()}
    print("SIZES", sizes)
    # an extra OP costs less than what the OPs share (weights, tables, plan). Not less than the
    # weights alone: a table-row layer's per-OP planes are a table's size, its weights 1 byte each
    assert 0 < sizes["per_extra_op_bytes"] < sizes["weights"] + sizes["tables"] + sizes["plan"]
    assert 0 < sizes["per_extra_op_percent_of_weights"] and 0 < sizes["per_extra_op_percent_of_file"] < 50
    ops = report["operating_points"]
    assert [o["name"] for o in ops] == m.ops == ["op0", "op1", "op2"]
    assert ops[0]["distinct_circuits"] == ["mul8u_1JFF"]
    assert ops[1]["distinct_circuits"] == ["mul8u_125K", "mul8u_KEM"]
    assert ops[2]["distinct_circuits"] == ["mul8u_2AC", "mul8u_ZDF"]
    assert [o["relative_power"] for o in ops] == list(META_POWER)          # from the checkpoint meta
    assert all(o["relative_power_source"] == "checkpoint" for o in ops)
    assert ops[0]["relative_power_model"] == pytest.approx(1.0)             # the MAC-weighted power model
    assert 0 < ops[2]["relative_power_model"] < ops[1]["relative_power_model"] < 1
    assert ops[0]["accuracy"] == pytest.approx(100.0 * np.mean(a.torch_out[0].argmax(1) == a.y))
    assert report["tables"] == {b.name: b.sha256 for b in m.bank}
    assert len(m.bank) == 5 and len(m.layers) == 8
    # the plan: every LUT layer is one fused kernel step reading its table through a layer slot
    assert {s.layer for s in m.slots if s.layer is not None} == set(range(8))
    assert report["plan"]["arena_bytes"] < report["plan"]["arena_bytes_without_reuse"]
    assert report["options"]["threads"] == 2 and m.metadata_json()["threads"] == 2
    v = report["verification"]
    assert v["ran"] and v["ok"] and v["bit_exact"] and v["emulated"] == (target != "x86_64")


def test_exported_onnx_checker_and_onnxruntime():
    import onnxruntime as ort

    a = x86()
    model = onnx.load(str(a.outs["x86_64"] / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain for o in model.opset_import} >= {"", "ai.qosnets"}
    assert {n.op_type for n in model.graph.node if n.domain == "ai.qosnets"} == {"ApproxConv", "ApproxGemm"}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for op in range(3):
        y = sess.run(None, {"input": a.x[:8], "operating_point": np.array(op, np.int64)})[0]
        assert y.shape == (8, 10) and np.isfinite(y).all()
        assert (y.argmax(1) == a.torch_out[op][:8].argmax(1)).all()


# --------------------------------------------------------------------------- accumulators per layer
def _layer_graph(model: onnx.ModelProto, batch: int = 1) -> tuple[onnx.ModelProto, dict]:
    """A graph with every ApproxConv/ApproxGemm node of ``model`` (same attributes and weight codes), each
    fed by its own input X_<k> and one shared LUT input; outputs: the accumulators."""
    from onnx import TensorProto, helper

    from qos_compile.onnx import ops

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {vi.name: [d.dim_value or batch for d in vi.type.tensor_type.shape.dim]
              for vi in list(inferred.graph.value_info) + list(inferred.graph.input)}
    inits = {t.name: t for t in model.graph.initializer}
    nodes, inputs, outputs, used_inits, info = [], [], [], [], {}
    lut = helper.make_tensor_value_info("lut", TensorProto.INT32, [256, 256])
    for k, node in enumerate(n for n in model.graph.node if n.domain == "ai.qosnets"):
        x_name, w_name = node.input[0], node.input[1]
        xs = shapes[x_name]
        xs[0] = batch
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inits[w_name].data_type)
        inputs.append(helper.make_tensor_value_info(f"x{k}", inits[w_name].data_type, xs))
        used_inits.append(inits[w_name])
        new = helper.make_node(node.op_type, [f"x{k}", w_name, "lut"], [f"acc{k}"], name=f"n{k}", domain=node.domain)
        new.attribute.extend(node.attribute)
        nodes.append(new)
        outputs.append(helper.make_tensor_value_info(f"acc{k}", TensorProto.INT32, None))
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        info[k] = dict(op=node.op_type, x_shape=xs, w=onnx.numpy_helper.to_array(inits[w_name]), attrs=attrs,
                       dtype=dtype)
    graph = helper.make_graph(nodes, "layers", inputs + [lut], outputs, used_inits)
    m = helper.make_model(graph, opset_imports=ops.opset_imports(18), functions=ops.function_protos(18))
    m.ir_version = model.ir_version
    return m, info


def _reference(info: dict, x: np.ndarray, lut: np.ndarray) -> np.ndarray:
    from qos_compile.reference import approx_conv2d_acc, approx_gemm_acc

    if info["op"] == "ApproxGemm":
        return approx_gemm_acc(x, info["w"], lut, signed=False)
    at = info["attrs"]
    return approx_conv2d_acc(x, info["w"], lut, stride=at["strides"], padding=at["pads"], dilation=at["dilations"],
                             groups=at["group"], pad_code=at["pad_value"], signed=False)


@pytest.mark.parametrize("target", ["x86_64", "aarch64"])
def test_layer_accumulators_equal_reference(target, tmp_path):
    """ApproxConv/ApproxGemm through relax_import -> plan -> one system-lib object, run on the target
    (aarch64 under qemu, with the kernel driver of qos_compile.tvm.build) == qos_compile.reference ==
    onnxruntime, for several circuits."""
    if target == "aarch64" and not HAVE_ARM:
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64-static")
    import onnxruntime as ort

    from qos_compile.multipliers import get
    from qos_compile.runtime.manifest import ArgKind
    from qos_compile.tvm import plan as P
    from qos_compile.tvm.relax_import import from_onnx

    a = _base()
    from qos_compile.qosmodel import load_qos_model
    from qos_compile.onnx.export import export_onnx

    qnet, _ = load_qos_model(a.model_pt)
    graph, info = _layer_graph(export_onnx(qnet, None, slots=True).model)
    imported = from_onnx(graph)
    plan = P.compile_plan(imported.mod, target, imported.input_names)
    assert len(plan.steps) == len(info) == 8
    built = P.build_objects(plan.kernels, plan.n_outputs, target, tmp_path, prefix="acc_")
    rng = np.random.default_rng(1)
    xs = {f"x{k}": rng.integers(0, 256, inf["x_shape"], dtype=np.uint8) for k, inf in info.items()}
    # x codes that include every extreme and the pad code neighbourhood
    for k, inf in info.items():
        xs[f"x{k}"].reshape(-1)[:3] = [0, 255, inf["attrs"].get("pad_value", 0)]
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    for circuit in ("mul8u_1JFF", "mul8u_2AC", "mul8u_DM1"):
        lut = get(circuit).lut.astype(np.int32)
        feed = {**xs, "lut": lut}
        ort_out = dict(zip([o.name for o in graph.graph.output], sess.run(None, feed)))
        for step in plan.steps:
            args = []
            for arg in step.args:
                if arg.kind == ArgKind.INPUT:
                    args.append(feed[plan.inputs[arg.index].name])
                elif arg.kind == ArgKind.CONST:
                    args.append(plan.consts[arg.index][1])
                elif arg.kind == ArgKind.OUTPUT:
                    k = arg.index
            got = built.built.run(step.kernel, *args)
            want = _reference(info[k], xs[f"x{k}"], lut)
            assert got.dtype == np.int32 and np.array_equal(got, want), (circuit, k, target)
            assert np.array_equal(ort_out[f"acc{k}"], want), (circuit, k, "onnxruntime")


# --------------------------------------------------------------------------- plan extraction
def test_plan_memory_reuse_and_arg_kinds():
    """Liveness-based arena reuse never overlaps two live buffers; slots/inputs/consts map to their kinds."""
    from qos_compile.qosmodel import load_qos_model
    from qos_compile.onnx.export import export_onnx
    from qos_compile.runtime.manifest import ArgKind
    from qos_compile.tvm import plan as P
    from qos_compile.tvm.relax_import import from_onnx

    qnet, _ = load_qos_model(_base().model_pt)
    ex = export_onnx(qnet, None, slots=True)
    imported = from_onnx(ex.model, shape_dict={"input": [2, 1, 16, 16]})
    plan = P.extract_plan(P.lower(imported.mod, "x86_64"), imported.input_names)
    P.check_plan_memory(plan)
    assert [s.name for s in plan.slots] == [n for n in imported.input_names if n.startswith("slot.")]
    assert set(ex.slots) == {s.name for s in plan.slots}
    assert [i.name for i in plan.inputs] == ["input"] and plan.outputs[0].shape == (2, 10)
    kinds = {a.kind for s in plan.steps for a in s.args}
    assert kinds == set(ArgKind)
    assert sum(a.kind == ArgKind.OUTPUT for s in plan.steps for a in s.args) == 1
    assert plan.arena_bytes < plan.unshared_bytes
    # every LUT slot is read by exactly one kernel; every buffer is written before it is read
    lut_slots = {i for i, s in enumerate(plan.slots) if s.name.endswith(".lut")}
    reads = [a.index for s in plan.steps for a in s.args if a.kind == ArgKind.SLOT and a.index in lut_slots]
    assert sorted(reads) == sorted(lut_slots)
    written = set()
    for s in plan.steps:
        n_in = len(s.args) - plan.n_outputs[s.kernel]
        for arg in s.args[:n_in]:
            assert arg.kind != ArgKind.BUFFER or arg.index in written
        written |= {arg.index for arg in s.args[n_in:] if arg.kind == ArgKind.BUFFER}
    no_reuse = P.extract_plan(P.lower(imported.mod, "x86_64"), imported.input_names, reuse_memory=False)
    assert no_reuse.arena_bytes == plan.unshared_bytes


def test_importer_rejects_malformed_custom_ops():
    from onnx import TensorProto, helper

    from qos_compile.tvm.relax_import import from_onnx

    def model(x_type, lut_shape=(256, 256), domain="ai.qosnets", op="ApproxConv"):
        nodes = [helper.make_node(op, ["x", "w", "lut"], ["y"], domain=domain, kernel_shape=[1, 1])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_type, [1, 2, 3, 3]),
                                           helper.make_tensor_value_info("w", TensorProto.UINT8, [4, 2, 1, 1]),
                                           helper.make_tensor_value_info("lut", TensorProto.INT32, list(lut_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, None)])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(domain, 1)])

    from_onnx(model(TensorProto.UINT8))
    with pytest.raises(QosError, match="must both be uint8"):
        from_onnx(model(TensorProto.INT8))
    with pytest.raises(QosError, match="LUT must be int32"):
        from_onnx(model(TensorProto.UINT8, lut_shape=(16, 16)))
    with pytest.raises(QosError, match="not supported"):
        from_onnx(model(TensorProto.UINT8, domain="com.example"))
    with pytest.raises(QosError, match="unknown ai.qosnets operator"):
        from_onnx(model(TensorProto.UINT8, op="ApproxPool"))


# --------------------------------------------------------------------------- bad inputs
def _snapshot(path: Path) -> dict:
    if not path.exists():
        return {}
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def _expect_error(argv: list[str], out: Path, match: str) -> str:
    before = _snapshot(out)
    siblings = set(out.parent.iterdir()) if out.parent.exists() else set()
    rc, stdout, stderr = run_cli(argv)
    assert rc == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qos-compile: error: "), stderr
    assert match in lines[0], lines[0]
    assert _snapshot(out) == before                      # OUT untouched
    if out.parent.exists():
        assert set(out.parent.iterdir()) == siblings      # no temporary folder left behind
    return lines[0]


@pytest.fixture
def previous_output(tmp_path) -> Path:
    """A folder that looks like a previous qos-compile output (must survive failed compiles)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"tool": "qos-compile"}))
    (out / "model.qosm").write_bytes(b"old manifest")
    return out


def test_unknown_target_lists_valid_ones(previous_output):
    line = _expect_error([str(_base().model_pt), "--target", "sparc64", "-o", str(previous_output)],
                         previous_output, "unknown target 'sparc64'")
    for name in ("x86_64", "aarch64", "arm"):
        assert name in line


def test_missing_cross_compiler_names_the_package(tmp_path, monkeypatch, previous_output):
    tdir = tmp_path / "targets"
    tdir.mkdir()
    (tdir / "riscv-test.toml").write_text(
        'name = "riscv-test"\narch = "riscv64"\ndescription = "test board"\npackage = "gcc-riscv64-linux-gnu"\n'
        'features = []\n[tvm]\nkind = "llvm"\nmtriple = "riscv64-linux-gnu"\n'
        '[toolchain]\ncc = "riscv64-no-such-gcc"\n')
    monkeypatch.setenv("QOS_TARGETS_PATH", str(tdir))
    _expect_error([str(_base().model_pt), "--target", "riscv-test", "-o", str(previous_output)], previous_output,
                  "install the Debian package gcc-riscv64-linux-gnu")
    _expect_error([str(_base().model_pt), "--target", "aarch64", "--cross-compiler", "/no/such/aarch64-gcc",
                   "-o", str(previous_output)], previous_output, "gcc-aarch64-linux-gnu")


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "not-qos", "float-model", "missing"])
def test_bad_model_file(kind, tmp_path, previous_output):
    path = tmp_path / "bad.pt"
    if kind == "corrupt":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        data = _base().model_pt.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not-qos":
        torch.save({"weight": torch.zeros(3)}, path)
    elif kind == "float-model":
        from qos_compile.models import build_model
        from qos_compile.qosmodel import save_float_model

        save_float_model(path, build_model("resnet8", 10, 1, 16))
    _expect_error([str(path), "--target", "x86_64", "-o", str(previous_output)], previous_output, "bad.pt")


def test_unsupported_layer_is_refused_up_front_and_by_the_compiler(monkeypatch, previous_output):
    """A layer outside the allowlist (nn.graph): wrap_model refuses it up front, naming the layer, where it
    is and the user's source line; wrapped with strict=False (emulation only), qos-compile stops with the
    exporter's QosError naming the same, one line, OUT untouched."""
    import inspect

    from torch import nn

    import qos_compile.qosmodel as qm
    from qos_compile.nn import wrap_model

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.act = nn.Softplus()

        def forward(self, x):
            return self.act(self.conv(x)).flatten(1)

    where = (f"net.act (test_compile.py:{inspect.getsourcelines(Odd.forward)[1] + 1}: "
             "return self.act(self.conv(x)).flatten(1))")
    with pytest.raises(QosError) as up_front:
        wrap_model(Odd(), ["mul8u_1JFF"], num_ops=1)
    assert str(up_front.value) == f"unsupported layer nn.Softplus at {where}"
    odd = Odd()
    odd.qos_arch = {"name": "odd", "num_classes": 256, "in_channels": 1, "input_size": 8}
    qnet = wrap_model(odd, ["mul8u_1JFF"], num_ops=1, input_shape=(1, 8, 8), strict=False)
    assert qnet.architecture is None
    qnet.set_mode("approx")
    qnet.eval()
    monkeypatch.setattr(qm, "load_qos_model", lambda path: (qnet, {}))
    line = _expect_error([str(_base().model_pt), "--target", "x86_64", "-o", str(previous_output)], previous_output,
                         "unsupported layer nn.Softplus at net.act")
    with pytest.raises(QosError) as exc:
        from qos_compile.onnx.export import export_onnx

        export_onnx(qnet, None, input_shape=(1, 8, 8))
    assert str(exc.value) == f"unsupported layer nn.Softplus at {where}"
    assert " ".join(str(exc.value).split()) in line


def test_out_that_is_not_a_previous_output(tmp_path):
    model = str(_base().model_pt)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    _expect_error([model, "--target", "x86_64", "-o", str(foreign)], foreign, "not a previous qos-compile output")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    _expect_error([model, "--target", "x86_64", "-o", str(a_file)], a_file, "not a folder")
    _expect_error([model, "--target", "x86_64", "-o", str(tmp_path / "no" / "such" / "dir")],
                  tmp_path / "no" / "such" / "dir", "does not exist")


def test_failure_late_in_the_build_leaves_out_untouched(monkeypatch, previous_output):
    """A stage failing after files were written: OUT keeps the previous output, no temporary folder stays."""
    from qos_compile.tvm import plan as P

    def boom(*args, **kwargs):
        raise QosError("simulated planning failure")

    monkeypatch.setattr(P, "compile_plan", boom)
    _expect_error([str(_base().model_pt), "--target", "x86_64", "-o", str(previous_output)], previous_output,
                  "simulated planning failure")


def test_list_targets_and_usage():
    rc, stdout, _ = run_cli(["--list-targets"])
    assert rc == 0 and "x86_64" in stdout and "aarch64 (arm" in stdout
    rc, _, stderr = run_cli([])
    assert rc == 2 and "no model given" in stderr


def test_replacing_a_previous_output(tmp_path):
    """compile_qnet into a previous output replaces it atomically (the old files are gone)."""
    from qos_compile.compiler import _check_output_dir, _finalize

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"tool": "qos-compile"}))
    (out / "model.qosm").write_bytes(b"old")
    (out / "qos-run").write_bytes(b"old")
    _check_output_dir(out)                                   # accepted: a previous output
    new = tmp_path / ".out.tmp-x"
    new.mkdir()
    (new / "model.qosm").write_bytes(b"new")
    _finalize(new, out)
    assert sorted(p.name for p in out.iterdir()) == ["model.qosm"] and (out / "model.qosm").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _check_output_dir(empty)                                 # an empty folder is fine too


@pytest.mark.parametrize("which", [".out.probe-", ".out.tmp-"])
def test_a_signal_right_after_a_temporary_folder_is_made_removes_it(tmp_path, monkeypatch, which):
    """A SIGINT/SIGTERM handler raises at the first bytecode after the folder's mkdir returns
    (the run of the CLI under load left ``.out.tmp-*`` behind when tempfile.mkdtemp made it):
    simulated here by a mkdir that raises KeyboardInterrupt once the folder exists."""
    from qos_compile import compiler as C

    real = os.mkdir

    def mkdir_then_interrupt(path, mode=0o777, **kw):
        real(path, mode, **kw)
        if Path(path).name.startswith(which):
            raise KeyboardInterrupt
    monkeypatch.setattr(C.os, "mkdir", mkdir_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        C.compile_model(_base().model_pt, "x86_64", tmp_path / "out")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_a_signal_right_after_an_atomic_writes_temporary_file_is_made_removes_it(tmp_path, monkeypatch):
    """The same for ``atomic.atomic_path``: the temporary file is made by name inside the try
    that removes it; the old file is kept."""
    from qos_compile import atomic

    (tmp_path / "f.bin").write_bytes(b"old")
    real = os.open

    def open_then_interrupt(path, flags, mode=0o777, **kw):
        fd = real(path, flags, mode, **kw)
        if Path(path).name.startswith(".f.bin."):
            os.close(fd)
            raise KeyboardInterrupt
        return fd
    monkeypatch.setattr(atomic.os, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_bytes(tmp_path / "f.bin", b"new")
    monkeypatch.undo()
    assert [q.name for q in tmp_path.iterdir()] == ["f.bin"] and (tmp_path / "f.bin").read_bytes() == b"old"
    atomic.write_bytes(tmp_path / "f.bin", b"new")
    assert [q.name for q in tmp_path.iterdir()] == ["f.bin"] and (tmp_path / "f.bin").read_bytes() == b"new"


@pytest.mark.parametrize("extra", ["notes.txt", "folder", "link", "model.qosm-folder"])
def test_previous_output_with_anything_else_is_not_ours(tmp_path, extra):
    """Replacing OUT needs exactly qos-compile's artefacts: one more file, a folder or a link
    (even under an artefact's name) and OUT is the user's, refused before and at replacement."""
    from qos_compile.compiler import _check_output_dir, _finalize

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"tool": "qos-compile"}))
    if extra == "model.qosm-folder":
        (out / "model.qosm").mkdir()
        (out / "model.qosm" / "keep").write_text("mine")
    else:
        (out / "model.qosm").write_bytes(b"old")
        if extra == "notes.txt":
            (out / "notes.txt").write_text("mine")
        elif extra == "folder":
            (out / "kernels.o").mkdir()
        else:
            (out / "qos-run").symlink_to(tmp_path / "elsewhere")
    before = _snapshot(out)
    with pytest.raises(QosError, match="not a previous qos-compile output"):
        _check_output_dir(out)
    new = tmp_path / ".out.tmp-x"
    new.mkdir()
    (new / "model.qosm").write_bytes(b"new")
    with pytest.raises(QosError, match="changed while compiling"):
        _finalize(new, out)
    assert _snapshot(out) == before


def _tiny_qnet():
    """A small calibrated QoSNet (conv + BN + ReLU + linear on 1x8x8, 2 OPs): compiles in seconds."""
    from torch import nn

    from qos_compile.nn import wrap_model

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))

    torch.manual_seed(0)
    net = Tiny()
    net.qos_arch = {"name": "tiny", "num_classes": 3, "in_channels": 1, "input_size": 8}
    qnet = wrap_model(net, ["mul8u_1JFF", "mul8u_2AC"], num_ops=2, input_shape=(1, 8, 8))
    n = len(qnet.approx_layers())
    qnet.set_assignment([[0] * n, [1] * n])
    qnet.set_mode("quant")
    qnet.train()
    with torch.no_grad():
        qnet(torch.rand(32, 1, 8, 8))
    qnet.eval()
    qnet.freeze_observers(True)
    qnet.set_mode("approx")
    return qnet


def _dummy_model_pt(tmp_path: Path) -> Path:
    """A model.pt path for tests that replace the checkpoint loader (kept outside the OUT parent)."""
    d = tmp_path / "in"
    d.mkdir(exist_ok=True)
    (d / "model.pt").write_bytes(b"replaced by a monkeypatched load_qos_model")
    return d / "model.pt"


def test_out_created_while_compiling_is_left_alone(monkeypatch, tmp_path):
    """The race: OUT does not exist at the start; while the compile runs, the user creates it with
    a file. qos-compile must not replace (delete) it: exit 2, one line, the file intact, no
    temporary folder left."""
    import qos_compile.qosmodel as qm
    from qos_compile.tvm import plan as P

    qnet = _tiny_qnet()
    monkeypatch.setattr(qm, "load_qos_model", lambda path: (qnet, {}))
    out = tmp_path / "out"
    real_link = P.link_qos_run

    def link_and_race(*args, **kwargs):
        out.mkdir()
        (out / "thesis.tex").write_text("three years of work")
        return real_link(*args, **kwargs)

    monkeypatch.setattr(P, "link_qos_run", link_and_race)
    rc, stdout, stderr = run_cli([str(_dummy_model_pt(tmp_path)), "--target", "x86_64", "-o", str(out)])
    assert rc == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "changed while compiling" in lines[0] and "nothing was replaced" in lines[0], stderr
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "three years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_unwritable_output_parent_is_one_line(tmp_path):
    for bad in ("/proc/x", "/proc/self/no/such"):
        rc, stdout, stderr = run_cli([str(_dummy_model_pt(tmp_path)), "--target", "x86_64", "-o", bad])
        lines = stderr.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("qos-compile: error: "), (bad, stderr)
        assert "cannot create output folder" in lines[0] and "Traceback" not in stderr
        assert not os.path.exists(bad)


def test_failed_verification_is_an_error_unless_kept(monkeypatch, tmp_path):
    """A verification outside tolerance (qos-run against an onnxruntime reference shifted by 10) is
    an error: exit 2, one line, nothing written; with --keep-mismatch OUT is written and report.json
    records it. (Non-finite outputs are refused earlier, by the check stage.)"""
    import qos_compile.compiler as C
    import qos_compile.qosmodel as qm

    qnet = _tiny_qnet()
    monkeypatch.setattr(qm, "load_qos_model", lambda path: (qnet, {}))
    real = C._check_onnx
    monkeypatch.setattr(C, "_check_onnx", lambda *a: (lambda refs, d: ([r + 10.0 for r in refs], d))(*real(*a)))
    out, model = tmp_path / "out", _dummy_model_pt(tmp_path)
    line = _expect_error([str(model), "--target", "x86_64", "-o", str(out)], out, "verification failed")
    assert "--keep-mismatch" in line and "OP 0" in line and not out.exists()
    rc, stdout, stderr = run_cli([str(model), "--target", "x86_64", "-o", str(out), "--keep-mismatch"])
    assert rc == 0, stderr
    assert "MISMATCH" in stdout
    report = json.loads((out / "report.json").read_text())
    v = report["verification"]
    assert v["ran"] and not v["ok"] and v["kept_mismatch"] is True
    assert report["options"]["keep_mismatch"] is True


def _compile_subprocess(model: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qos_compile.cli.compile", str(model), "--target", "x86_64",
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TVM_NUM_THREADS": "1"})


@pytest.mark.parametrize("sig, after, delay, word, code", [
    (signal.SIGTERM, "] load", 0.0, "terminated", 143),
    (signal.SIGINT, "] plan", 0.3, "interrupted", 130),       # lands in the TVM kernel build
])
def test_signal_removes_the_temporary_folder(tmp_path, sig, after, delay, word, code):
    """SIGTERM (and Ctrl-C during TVM's kernel build) end qos-compile with one line and its status,
    no temporary folder left and OUT not created."""
    out = tmp_path / "out"
    p = _compile_subprocess(_base().model_pt, out)
    seen = []
    try:
        for line in p.stdout:
            seen.append(line)
            if after in line:
                time.sleep(delay)
                p.send_signal(sig)
                break
        rest, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert any(after in ln for ln in seen), "".join(seen) + (err or "")
    assert p.returncode == code, (p.returncode, err)
    assert err.strip().splitlines() == [f"qos-compile: {word}"], err
    assert not out.exists()
    assert [q.name for q in tmp_path.iterdir()] == [], list(tmp_path.iterdir())
