"""The wheel works wherever it installs: built from a copy of the sources, installed into a fresh
venv, its ``qos-compile`` compiles a model for aarch64 and x86_64 from a folder outside the
checkout, and the built ``qos-run`` runs (x86_64 natively, aarch64 under qemu).

The fresh venv reuses this environment's installed packages (torch, TVM, onnx, ...) through a
``.pth`` file written after the wheel is installed, so nothing is downloaded and pip never sees
(or touches) the checkout's editable install. A ``.pth`` line only appends a folder to
``sys.path``; the ``.pth`` files inside that folder (the editable install's finder) are not run,
so ``qos_compile`` can only come from the wheel; the test asserts that it does.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
HAVE_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))
HAVE_ARM = shutil.which("aarch64-linux-gnu-gcc") is not None and shutil.which("qemu-aarch64-static") is not None
QEMU = ["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu"]
# Build outputs and environments in the checkout that the wheel must not depend on (nor copy).
_SKIP_TOP = {".git", ".venv", "build", "dist", ".pytest_cache", "out", "runs"}
_ENV_DROP = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "QOS_TARGETS_PATH", "QOS_RUNTIME_DIR")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_CC, reason="needs a C compiler"),
    pytest.mark.skipif(importlib.util.find_spec("setuptools") is None or importlib.util.find_spec("pip") is None,
                       reason="building the wheel needs pip and setuptools in the test environment"),
]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"$ {' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _copy_sources(dst: Path) -> Path:
    """A copy of the checkout without VCS data, environments and build outputs (pip builds in the tree)."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder).resolve() == ROOT
        return {n for n in names if (top and n in _SKIP_TOP) or n == "__pycache__" or n.endswith(".egg-info")}

    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)
    return dst


def _small_model(path: Path) -> np.ndarray:
    """A LeNet-5 on 12x12 inputs with two OPs (exact, one approximate multiplier); returns an input batch."""
    import torch

    from qos_compile.models import build_model
    from qos_compile.nn import wrap_model
    from qos_compile.qosmodel import save_qos_model

    torch.manual_seed(0)
    qnet = wrap_model(build_model("lenet5", 10, 1, 12), ["mul8u_1JFF", "mul8u_KEM"], num_ops=2)
    n = len(qnet.approx_layers())
    qnet.set_assignment([[0] * n, [1] * n])
    x = torch.rand(32, 1, 12, 12)
    qnet.set_mode("quant")
    qnet.train()
    with torch.no_grad():
        qnet(x)                     # calibrate the activation observers
    qnet.eval()
    qnet.freeze_observers(True)
    qnet.set_mode("approx")
    save_qos_model(path, qnet, {"note": "test_wheel"})
    return x[:1].numpy().astype(np.float32)


def _site_packages(python: Path, env: dict[str, str]) -> Path:
    out = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], python.parent, env)
    return Path(out.stdout.strip())


def test_wheel_installs_and_compiles_outside_the_checkout(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
    env["QOS_COMPILE_CACHE"] = str(tmp_path / "cache")     # build the runtime from the wheel's own sources
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    # ---- build the wheel from a copy of the sources (concurrent runs never share a build/ folder)
    src = _copy_sources(tmp_path / "src")
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, src],
         tmp_path, env)
    (wheel,) = wheels.glob("qos_compile-*.whl")

    # ---- a fresh venv: the wheel alone first, then this environment's packages appended to its path
    vdir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(vdir)
    python = vdir / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], tmp_path, env)
    site = _site_packages(python, env)
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_qos_test_environment.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    env["PATH"] = f"{vdir / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    work = tmp_path / "work"                     # a folder outside the checkout
    work.mkdir()
    assert ROOT not in work.resolve().parents
    probe = _run([python, "-c", (
        "import json, qos_compile, qos_compile.resources as r, qos_compile.runtime.build as b, "
        "qos_compile.tvm.build as t\n"
        "print(json.dumps({'package': qos_compile.__file__, 'targets': str(r.data_dir('targets')), "
        "'runtime': str(b.runtime_dir()), 'shim': str(t.SHIM_DIR)}))")], work, env)
    where = json.loads(probe.stdout.strip().splitlines()[-1])
    for what, path in where.items():
        assert Path(path).resolve().is_relative_to(vdir.resolve()), f"{what} comes from {path}, not the wheel"

    # ---- compile one small model for both targets with the installed CLI, from the work folder
    x = _small_model(work / "model.pt")
    x.tofile(work / "input.bin")
    targets = {"x86_64": []}
    if HAVE_ARM:
        targets["arm"] = QEMU
    outs = {}
    for target, prefix in targets.items():
        out = work / f"out-{target}"
        _run([vdir / "bin" / "qos-compile", "model.pt", "--target", target, "-o", out], work, env)
        report = json.loads((out / "report.json").read_text())
        assert report["verification"]["ran"] and report["verification"]["ok"], report["verification"]
        assert (out / "qos-run").is_file() and os.access(out / "qos-run", os.X_OK)
        result = work / f"result-{target}.bin"
        _run([*prefix, out / "qos-run", out / "model.qosm", "--op", "1", "--input", work / "input.bin",
              "--output", result], work, env)
        y = np.fromfile(result, dtype=np.float32)
        assert y.shape == (10,) and np.isfinite(y).all()
        outs[target] = y
    if "arm" in outs:    # the same model on two ISAs: bit for bit (the compiler keeps float ops unfused)
        assert np.array_equal(outs["arm"], outs["x86_64"])
