"""`qos-nets bench OUT`: a tiny QoS checkpoint (ResNet-8 on 16x16 digits, 3 OPs, one circuit per OP,
a few training steps) compiled for x86_64 and aarch64; the JSON has every OP with accuracy, power,
latency and switch cost; aarch64 is labelled emulated; baselines are ratios; PNGs exist; the
loopback RPC path; bad inputs exit 2 with one line; the digits example runs end to end with --fast.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

from qos_compile.bench.host import host_info, host_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HAVE_ARM = shutil.which("aarch64-linux-gnu-gcc") is not None and shutil.which("qemu-aarch64-static") is not None


def nets(*argv: str) -> tuple[int, str, str]:
    from qos_compile.cli.nets import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """model.pt (with the dataset recorded) + compiled outputs per target, batch 8."""
    from qos_compile.cli.compile import main as qos_compile
    from qos_compile.data.digits import load_digits_splits
    from qos_compile.models import build_model
    from qos_compile.nn import wrap_model
    from qos_compile.qosmodel import save_qos_model

    root = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        xtr, ytr = load_digits_splits(16, 0).train.tensors
        model = build_model("resnet8", 10, 1, 16)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for i in range(0, 320, 32):
            loss = torch.nn.functional.cross_entropy(model(xtr[i:i + 32]), ytr[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
        qnet = wrap_model(model, ["mul8u_1JFF", "mul8u_KEM", "mul8u_2AC"], num_ops=3)
        n = len(qnet.approx_layers())
        qnet.set_assignment([[0] * n, [1] * n, [2] * n])
        qnet.set_mode("quant")
        qnet.train()
        with torch.no_grad():
            qnet(xtr[:256])
        qnet.eval()
        qnet.freeze_observers(True)
        qnet.set_mode("approx")
        save_qos_model(root / "model.pt", qnet,
                       {"provenance": {"dataset": {"name": "digits", "image_size": 16, "split_seed": 0}}})
    finally:
        torch.set_num_threads(threads)
    outs = {}
    for t in ("x86_64", "arm") if HAVE_ARM else ("x86_64",):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert qos_compile([str(root / "model.pt"), "--target", t, "-o", str(root / t), "--batch", "8"]) == 0
        outs[t] = root / t
    return root, outs


def _check(res: dict, emulated: bool) -> None:
    assert res["emulated"] is emulated
    assert len(res["ops"]) == 3
    for r in res["ops"]:
        for k in ("top1", "top5", "relative_power", "savings_pct", "circuits", "latency", "latency_ratio_vs_op0"):
            assert r[k] is not None, k
        assert 0 <= r["top1"] <= 100 and r["latency"]["median_ms"] > 0
        assert r["latency"]["emulated"] is emulated
    assert res["ops"][0]["relative_power"] == pytest.approx(1.0)
    assert res["ops"][2]["savings_pct"] > 0
    assert "switch_cost" in res
    names = {b["baseline"] for b in res["baselines"]}
    assert {"float torch", "ort int8 (QLinearConv)", "tvm exact conv layers (sum)"} <= names
    assert res["baseline_info"]["ort_int8_op_types"].get("QLinearConv", 0) > 0


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


def test_host_line_names_the_cpu_and_its_isa():
    """The first line of every benchmark: the CPU model from /proc/cpuinfo and the ISA extensions
    kernel selection reads (VNNI under one spelling), nothing else."""
    from qos_compile.targets import X86_FEATURES

    h, flags = host_info(), _cpu_flags()
    model = next((ln.partition(":")[2].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "")
    assert model in h["cpu"] and h["cores"] == os.cpu_count()
    want = {f.replace("avx512_vnni", "avx512vnni") for f in flags & set(X86_FEATURES)}
    assert set(h["isa"]) >= want and "avx512_vnni" not in h["isa"]
    line = host_line()
    assert line.startswith("host: ") and all(f in line for f in want)


def test_bench_x86(tiny, tmp_path):
    from qos_compile.bench import cpuid_mask

    _, outs = tiny
    masked = cpuid_mask.unavailable() is None            # onnxruntime's AVX2 code as well, where CPUID traps
    rc, out, err = nets("bench", str(outs["x86_64"]), "--repeats", "2", "--samples", "40", "--json",
                        str(tmp_path / "r.json"), "--plot", str(tmp_path / "p"), "--markdown", str(tmp_path / "r.md"),
                        *(["--ort-isa", "avx2"] if masked else []))
    assert rc == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    _check(res, False)
    alone = [b for b in res["baselines"] if "AVX2 code (CPUID masked" in b["baseline"]]
    assert len(alone) == int(masked) and all(b["latency"]["median_ms"] > 0 for b in alone)
    assert res["samples"] == 40
    assert res["switch_cost"]["ns_per_select"] > 0 and not res["switch_cost"]["emulated"]
    for b in res["baselines"]:
        assert set(b["ratio_to_ops"]) == {"op0", "op1", "op2"} and all(v > 0 for v in b["ratio_to_ops"].values())
    for p in ("p_accuracy.png", "p_latency.png"):
        assert (tmp_path / p).stat().st_size > 1000
    assert "| OP2 |" in out and "qos_select cost" in out
    # the CPU model and its ISA come with every benchmark
    assert res["host"]["arch"] == "x86_64" and res["host"]["cpu"]
    assert host_line(res["host"]) in out and ("avx2" in res["host"]["isa"]) == ("avx2" in _cpu_flags())
    assert (tmp_path / "r.md").read_text().strip() == out.strip()
    assert "accuracy OP0" in err and "timing" in err     # progress lines


@pytest.mark.skipif(not HAVE_ARM, reason="aarch64 cross compiler or qemu-aarch64-static missing")
def test_bench_aarch64_is_labelled_emulated(tiny, tmp_path):
    _, outs = tiny
    rc, out, err = nets("bench", str(outs["arm"]), "--repeats", "2", "--samples", "16", "--json",
                        str(tmp_path / "r.json"), "--plot", str(tmp_path / "p"))
    assert rc == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    _check(res, True)
    assert res["emulator"] and res["switch_cost"]["ns_per_select"] > 0 and res["switch_cost"]["emulated"]
    assert all(b["ratio_to_ops"] is None for b in res["baselines"])    # native vs emulated: no ratio
    assert "EMULATED" in out and out.count("emulated") >= 3
    for p in ("p_accuracy.png", "p_latency.png"):
        assert (tmp_path / p).is_file()


def test_bench_rpc_loopback(tiny, tmp_path):
    from qos_compile.bench.rpc import start_local_tracker_and_server

    _, outs = tiny
    with start_local_tracker_and_server("qos-bench-test", lifetime_s=240) as rpc:
        rc, out, err = nets("bench", str(outs["x86_64"]), "--repeats", "2", "--samples", "8", "--no-baselines",
                            "--rpc-tracker", rpc.tracker, "--rpc-key", rpc.key, "--json", str(tmp_path / "r.json"))
    assert rc == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["rpc"]["sum_of_medians_ms"] > 0 and res["rpc"]["layers"] > 0
    row = [b for b in res["baselines"] if "RPC" in b["baseline"]]
    assert row and row[0]["ratio_to_ops"]["op0"] > 0


def _one_line(rc: int, err: str) -> str:
    assert rc == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_bench_bad_inputs(tiny, tmp_path):
    _, outs = tiny
    assert "no such folder" in _one_line(*nets("bench", str(tmp_path / "missing"))[::2])
    (tmp_path / "empty").mkdir()
    assert "not a qos-compile output" in _one_line(*nets("bench", str(tmp_path / "empty"))[::2])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.qosm").write_bytes(b"x")
    (bad / "report.json").write_text("{not json")
    assert "report" in _one_line(*nets("bench", str(bad))[::2])
    # unreachable tracker: a port nobody listens on
    line = _one_line(*nets("bench", str(outs["x86_64"]), "--rpc-tracker", "127.0.0.1:9", "--rpc-key", "k")[::2])
    assert "qos-nets: error" in line
    assert "together" in _one_line(*nets("bench", str(outs["x86_64"]), "--rpc-tracker", "127.0.0.1:9")[::2])
    assert "repeats" in _one_line(*nets("bench", str(outs["x86_64"]), "--repeats", "0")[::2])
    line = _one_line(*nets("bench", str(outs["x86_64"]), "--ort-isa", "avx2", "--no-baselines")[::2])
    assert "--ort-isa avx2" in line


@pytest.mark.skipif(not HAVE_ARM, reason="aarch64 cross compiler or qemu-aarch64-static missing")
def test_digits_example_fast(tmp_path):
    env = {**os.environ, "TVM_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, str(ROOT / "examples/digits_end_to_end/run.py"), "--fast", "--out",
                        str(tmp_path / "d")], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:] + p.stdout[-2000:]
    for i in range(1, 5):
        assert f"[{i}/4]" in p.stdout
    assert "== summary" in p.stdout and "OP2:" in p.stdout
    res = json.loads((tmp_path / "d/bench.json").read_text())
    assert res["emulated"] and res["stream"]["switches"] >= 1
    assert (tmp_path / "d/bench_latency.png").is_file()
