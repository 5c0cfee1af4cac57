"""The general (table) strategy on every device: the pure torch path is bit-exact with the C
kernel and the reference, and the ``--emulation auto|native|torch`` selection.

``QOS_TEST_DEVICE`` (default ``cpu``; ``scripts/gpu_check.sh`` sets ``cuda``) is the device the
torch path and every strategy run on here; the C kernel and the reference stay on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest
import torch

from qos_compile import reference
from qos_compile.cli import stages
from qos_compile.errors import QosError
from qos_compile.multipliers import bundled, get
from qos_compile.nn import functional as qf
from qos_compile.nn import kernels
from qos_compile.nn import emulation
from qos_compile.nn.emulation import (EMULATIONS, force_strategy, plan_for, set_emulation, table_backend,
                                      use_emulation)

CIRCUITS = list(bundled())
DEVICE = torch.device(os.environ.get("QOS_TEST_DEVICE", "cpu"))
NATIVE = kernels.load() is not None
needs_native = pytest.mark.skipif(not NATIVE, reason="no C compiler: the native kernel cannot be built")

# (x shape, w shape, conv kwargs, torch regime): small enough for the NumPy reference
SMALL = [
    ((2, 3, 6, 6), (5, 3, 3, 3), dict(padding=1), "rows"),                  # 72 positions, 5 outputs
    ((2, 4, 5, 5), (8, 1, 3, 3), dict(padding=(1, 0, 2, 1), groups=4), "gather"),  # depthwise x2
    ((1, 4, 5, 6), (6, 4, 3, 3), dict(padding=1, stride=2), "direct"),     # 9 positions
]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """One thread (tiny shapes), and no process-wide emulation setting leaking in or out."""
    monkeypatch.delenv(emulation.EMULATION_ENV, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _codes(rng: np.random.Generator, signed: bool, shape: tuple[int, ...]) -> np.ndarray:
    lo, hi = (-128, 127) if signed else (0, 255)
    return rng.integers(lo, hi + 1, shape).astype(np.int8 if signed else np.uint8)


def _on(a: np.ndarray, backend: str) -> torch.Tensor:
    """``a`` as a tensor where ``backend`` computes: the C kernel on the CPU, torch on DEVICE."""
    return torch.from_numpy(a).to(DEVICE if backend == "torch" else "cpu")


def _conv(x: np.ndarray, w: np.ndarray, lut, backend: str, strategy: str | None = "general", **kw) -> np.ndarray:
    with use_emulation(backend), force_strategy(strategy):
        return qf.approx_conv2d_acc(_on(x, backend), _on(w, backend), lut, **kw).cpu().numpy()


def _regime(xs, ws, kw) -> str:
    geo = qf.conv_geometry(xs, ws, kw.get("stride", 1), kw.get("padding", 0), 1, kw.get("groups", 1))
    og, p = ws[0] // geo.groups, xs[0] * geo.out_hw[0] * geo.out_hw[1]
    return "gather" if og <= qf._GATHER_OUTPUTS else "direct" if p < qf._DIRECT_POSITIONS else "rows"


def test_library_is_64_circuits_of_both_kinds():
    assert len(CIRCUITS) == 64 and {m.signed for m in CIRCUITS} == {False, True}
    assert [_regime(xs, ws, kw) for xs, ws, kw, _ in SMALL] == [r for *_, r in SMALL]


@pytest.mark.parametrize("m", CIRCUITS, ids=[m.name for m in CIRCUITS])
def test_torch_path_bit_exact_every_circuit(m):
    """Every bundled table through the table path both ways: torch == reference (small conv,
    depthwise conv, linear; every torch regime), torch == native on a bigger conv."""
    rng = _rng(m.name)
    for xs, ws, kw, _ in SMALL:
        x, w = _codes(rng, m.signed, xs), _codes(rng, m.signed, ws)
        pad = int(_codes(rng, m.signed, (1,))[0]) or 1  # a nonzero pad code
        want = reference.approx_conv2d_acc(x, w, m, pad_code=pad, **kw)
        got = _conv(x, w, m, "torch", pad_code=pad, **kw)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
        if NATIVE:
            np.testing.assert_array_equal(_conv(x, w, m, "native", pad_code=pad, **kw), want)
    x, w = _codes(rng, m.signed, (5, 37)), _codes(rng, m.signed, (3, 37))
    with use_emulation("torch"), force_strategy("general"):
        got = qf.approx_linear_acc(_on(x, "torch"), _on(w, "torch"), m).cpu().numpy()
    np.testing.assert_array_equal(got, reference.approx_gemm_acc(x, w, m))
    if NATIVE:  # bigger: 4 x 16 x 10 x 10 input, 24 outputs, 144 taps; and a 64-wide linear layer
        x, w = _codes(rng, m.signed, (4, 16, 10, 10)), _codes(rng, m.signed, (24, 16, 3, 3))
        np.testing.assert_array_equal(_conv(x, w, m, "torch", padding=1, pad_code=-3 if m.signed else 3),
                                      _conv(x, w, m, "native", padding=1, pad_code=-3 if m.signed else 3))
        x, w = _codes(rng, m.signed, (70, 64)), _codes(rng, m.signed, (10, 64))
        np.testing.assert_array_equal(_conv(x[:, :, None, None], w[:, :, None, None], m, "torch"),
                                      _conv(x[:, :, None, None], w[:, :, None, None], m, "native"))


@pytest.mark.parametrize("strategy", ["exact", "masked", "lowrank", "general"])
def test_every_strategy_on_the_test_device(strategy):
    """Each circuit's own strategy (no forcing) on DEVICE == the reference: conv with a nonzero pad
    code, depthwise, linear; two circuits of the strategy, signed and unsigned where both exist."""
    ms = [m for m in CIRCUITS if plan_for(m).strategy == strategy]
    picks = [next(m for m in ms if m.signed == s) for s in (False, True) if any(m.signed == s for m in ms)]
    assert picks, strategy
    for m in picks:
        rng = _rng("device", m.name)
        for xs, ws, kw, _ in SMALL:
            x, w = _codes(rng, m.signed, xs), _codes(rng, m.signed, ws)
            want = reference.approx_conv2d_acc(x, w, m, pad_code=1, **kw)
            np.testing.assert_array_equal(_conv(x, w, m, "torch", None, pad_code=1, **kw), want, err_msg=m.name)
        x, w = _codes(rng, m.signed, (5, 37)), _codes(rng, m.signed, (3, 37))
        with use_emulation("torch"):
            got = qf.approx_linear_acc(_on(x, "torch"), _on(w, "torch"), m).cpu().numpy()
        np.testing.assert_array_equal(got, reference.approx_gemm_acc(x, w, m), err_msg=m.name)


def _split_reference(x, w, table, signed, **kw) -> np.ndarray:
    """int64 accumulators of a table whose sums may leave int32: the reference on its low 16
    bits and on its high part, recombined."""
    t = table.astype(np.int64)
    lo, hi = t & 0xFFFF, t >> 16
    return (reference.approx_conv2d_acc(x, w, lo, signed=signed, **kw).astype(np.int64)
            + (reference.approx_conv2d_acc(x, w, hi, signed=signed, **kw).astype(np.int64) << 16))


@pytest.mark.parametrize("tiny", [False, True], ids=["default-blocks", "tiny-blocks"])
@pytest.mark.parametrize("bound", [2**10, 2**20, 2**30])
def test_blocks_and_wide_tables_bit_exact(monkeypatch, bound, tiny):
    """Every regime of ``table_conv``, with its default blocks (several groups per block) and
    with tiny row / chunk budgets (blocks of taps, outputs and positions); tables of +-2**20
    give float32 bags of 16 taps, +-2**30 float64 bags and int64 sums beyond int32."""
    if tiny:
        monkeypatch.setattr(qf, "_ROWS_BYTES", {"cpu": 8 * 256 * 4})  # 8 (tap, output) float32 rows per block
        monkeypatch.setattr(qf, "_CHUNK_BYTES", 4096)
    rng = np.random.default_rng(bound)
    table = rng.integers(-bound, bound, (256, 256)).astype(np.int32)
    lut = torch.from_numpy(table)
    cases = [((2, 6, 7, 7), (12, 3, 3, 3), dict(padding=1, groups=2), "rows"),  # 27 taps, 6 outputs per group
             ((2, 8, 6, 6), (12, 2, 3, 3), dict(padding=1, groups=4), "rows"),  # 3 outputs per group
             ((3, 40, 1, 1), (9, 40, 1, 1), dict(), "direct"),
             ((2, 4, 9, 9), (4, 2, 3, 3), dict(groups=2), "gather")]           # 2 outputs per group
    for xs, ws, kw, regime in cases:
        assert _regime(xs, ws, kw) == regime
        x, w = _codes(rng, False, xs), _codes(rng, False, ws)
        geo = qf.conv_geometry(xs, ws, 1, kw.get("padding", 0), 1, kw.get("groups", 1))
        x_idx, w_idx = torch.from_numpy(x), torch.from_numpy(w)
        got = qf.table_conv(x_idx, w_idx, lut, geo, 5)
        assert got.dtype == torch.int64
        np.testing.assert_array_equal(got.numpy(), _split_reference(x, w, table, False, pad_code=5, **kw))
        if NATIVE:
            g, (n, o) = geo.groups, (xs[0], ws[0])
            native = qf._native_gemm(qf._im2col(x_idx, geo, 5), w_idx.reshape(g, o // g, -1).contiguous(), lut, None)
            native = native.view(g, o // g, n, *geo.out_hw).permute(2, 0, 1, 3, 4).reshape(got.shape)
            np.testing.assert_array_equal(native.numpy(), got.numpy())


@pytest.mark.parametrize("backend", EMULATIONS)
def test_int32_overflow_same_on_every_path(backend):
    if backend == "native" and not NATIVE:
        pytest.skip("no C compiler")
    full = np.full((256, 256), 2**30, dtype=np.int32)
    x = np.ones((1, 2, 3, 3), dtype=np.uint8)
    with pytest.raises(QosError, match="accumulator overflows int32"):
        _conv(x, np.ones((1, 2, 3, 3), dtype=np.uint8), full, backend, signed=False)
    # K * max|t| beyond int32 but every sum within: +-2**30 by activation parity, which cancels
    # over each 2x2 window, plus small entries
    rng = _rng("parity")
    table = (np.where(np.arange(256)[None, :] % 2 == 0, 2**30, -(2**30)).repeat(256, 0)
             + rng.integers(0, 1000, (256, 256))).astype(np.int32)
    x = ((np.arange(2 * 4 * 4 * 4) % 2) + 2 * rng.integers(0, 128, 2 * 4 * 4 * 4)).astype(np.uint8).reshape(2, 4, 4, 4)
    w = _codes(rng, False, (6, 4, 2, 2))
    want = reference.approx_conv2d_acc(x, w, table, signed=False, stride=2)
    np.testing.assert_array_equal(_conv(x, w, table, backend, signed=False, stride=2), want)


def test_selection_logic(monkeypatch):
    assert emulation.emulation_backend() == "auto"
    assert table_backend("cuda") == table_backend(torch.device("meta")) == "torch"
    assert table_backend("cpu") == ("native" if NATIVE else "torch")
    with use_emulation("torch"):
        assert table_backend("cpu") == table_backend("cuda:1") == "torch"
    with use_emulation("native"):
        for dev in ("cuda", "cuda:0", "meta", "mps"):
            with pytest.raises(QosError, match=r"native.*CPU only.*auto or torch"):
                table_backend(dev)
        if NATIVE:
            assert table_backend("cpu") == "native"
    monkeypatch.setattr(kernels, "load", lambda portable=False: None)
    assert table_backend("cpu") == "torch"  # auto: the torch path without a compiler
    with use_emulation("native"), pytest.raises(QosError, match="cannot be built or loaded"):
        table_backend("cpu")
    with pytest.raises(QosError, match="unknown emulation"):
        set_emulation("cuda")
    with pytest.raises(QosError, match="unknown emulation"):
        with use_emulation("fast"):
            pass


def test_process_setting_and_thread_override(monkeypatch):
    set_emulation("torch")  # the fixture's monkeypatch.delenv restores the environment
    assert os.environ[emulation.EMULATION_ENV] == "torch"
    seen: list[str] = []
    with use_emulation("native"):
        assert emulation.emulation_backend() == "native"
        worker = threading.Thread(target=lambda: seen.append(emulation.emulation_backend()))
        worker.start()
        worker.join()
    assert seen == ["torch"] and emulation.emulation_backend() == "torch"  # the override is this thread's
    monkeypatch.setenv(emulation.EMULATION_ENV, "gpu")
    with pytest.raises(QosError, match="QOS_EMULATION"):
        emulation.emulation_backend()
    assert stages.EMULATION_CHOICES == EMULATIONS


def test_native_refused_for_tensors_off_the_cpu():
    """A layer's prepared weights on the meta device: refused before any computation."""
    m = get("mul8u_2NDH")
    plan = plan_for(m)
    w_idx = torch.zeros((4, 3, 3, 3), dtype=torch.uint8, device="meta")
    x_idx = torch.zeros((1, 3, 5, 5), dtype=torch.uint8, device="meta")
    geo = qf.conv_geometry(x_idx.shape, w_idx.shape, 1, 1, 1, 1)
    prep = qf.prepare_weights(w_idx, plan, 0, torch.zeros(4, dtype=torch.int64, device="meta"))
    with use_emulation("native"), pytest.raises(QosError, match="tensors are on meta"):
        qf.conv_prepared(x_idx, prep, geo)


def test_layers_identical_on_both_backends():
    """A wrapped network in APPROX mode on a general circuit: the same logits either way."""
    from qos_compile.models import build_model
    from qos_compile.nn import Mode, wrap_model

    torch.manual_seed(0)
    names = ["mul8u_2NDH", "mul8u_12N4"]
    assert all(plan_for(get(n)).strategy == "general" for n in names)
    q = wrap_model(build_model("resnet8", 10, 1, 8), [bundled().exact(False), *map(get, names)], num_ops=1,
                   input_shape=(1, 8, 8))
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    q.set_mode(Mode.QUANT)
    q.train()
    with torch.no_grad():
        q(x)
    q.eval()
    q.set_mode(Mode.APPROX)
    layers = len(q.approx_layers())
    for circuit in (1, 2):
        q.set_assignment([[circuit] * layers])
        with torch.no_grad():
            outs = {}
            for backend in ("torch", "native", "auto") if NATIVE else ("torch", "auto"):
                with use_emulation(backend):
                    outs[backend] = q(x)
        ref = outs["torch"]
        assert all(torch.equal(ref, out) for out in outs.values())


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """An untrained, calibrated 2-OP resnet8 for 8x8 digits whose OP1 runs a general-strategy circuit."""
    from qos_compile.models import build_model
    from qos_compile.nn import Mode, wrap_model
    from qos_compile.qosmodel import save_qos_model

    torch.manual_seed(0)
    general = get("mul8u_2NDH")
    assert plan_for(general).strategy == plan_for(general, max_terms=64).strategy == "general"
    q = wrap_model(build_model("resnet8", 10, 1, 8), [bundled().exact(False), general], num_ops=2,
                   input_shape=(1, 8, 8))
    layers = len(q.approx_layers())
    q.set_assignment([[0] * layers, [1] * layers])
    q.set_mode(Mode.QUANT)
    q.train()
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for op in range(2):
            q.set_operating_point(op)
            q(x)
    q.freeze_observers(True)
    q.set_mode(Mode.APPROX)
    q.set_operating_point(0)
    q.eval()
    path = tmp_path_factory.mktemp("emu") / "model.pt"
    save_qos_model(path, q, {"ops": [{"op": j} for j in range(2)],
                             "provenance": {"dataset": {"name": "digits", "image_size": 8, "max_samples": 96}}})
    return path


def _evals(path, *variants: tuple[str, ...]) -> list[dict]:
    """`qos-nets eval PATH --json` once per extra-argument tuple, as concurrent processes."""
    env = {**os.environ, "QOS_THREADS": "1"}
    env.pop(emulation.EMULATION_ENV, None)
    procs = [subprocess.Popen([sys.executable, "-m", "qos_compile.cli.nets", "eval", str(path), "--json", *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for extra in variants]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    return reports


def test_eval_cli_same_accuracy_with_torch_emulation(small_model):
    """`qos-nets eval --emulation torch` reports exactly the default's per-OP accuracy."""
    default, torch_rep = _evals(small_model, (), ("--emulation", "torch"))
    assert default["num_ops"] == 2 and default["samples"] > 0
    assert [o["circuits"] for o in default["ops"]][1] == ["mul8u_2NDH"]
    keys = ("op", "top1", "top5", "relative_power", "circuits")
    assert [[o[k] for k in keys] for o in torch_rep["ops"]] == [[o[k] for k in keys] for o in default["ops"]]
    assert default == torch_rep


def test_eval_cli_bad_emulation_is_one_line(small_model, monkeypatch, capsys):
    from qos_compile.cli.nets import main

    assert main(["eval", str(small_model), "--emulation", "gpu"]) == 2
    monkeypatch.setenv(emulation.EMULATION_ENV, "gpu")
    assert main(["eval", str(small_model)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "--emulation" in lines[0] and "QOS_EMULATION" in lines[1]
    assert all(line.startswith("qos-nets") and "error" in line for line in lines), lines
