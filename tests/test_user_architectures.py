"""A user's own networks, not from the model zoo, end to end, along the chain a user runs: wrap_model
with a few circuits and 2-3 operating points (different circuits per OP), brief calibration,
``save_qos_model`` to a model.pt, then, in fresh processes where the user's classes (this module)
cannot be imported,

* ``load_qos_model(model.pt)`` and the PyTorch APPROX emulation at every OP: bit for bit what the
  user's network computes in this process (the network rebuilt from data is the user's);
* the ``qos-compile`` command (its console script's entry point, in the same process) for x86-64
  (verifying against onnxruntime; report.json) and, when the cross compiler and qemu are installed,
  for aarch64 (``--no-verify``: the test runs qos-run under qemu itself),

then ``qos-run`` at every OP against

* onnxruntime on the compiled output's ``model.onnx``: bit for bit, except for the network with
  sigmoid/SiLU (each runtime has its own ``exp``), which is held to the PyTorch tolerance below;
* PyTorch inference (APPROX, eval, no gradients) in this process and in the fresh one: bit for
  bit (it computes the device's float32 epilogue, docs/design.md section 3.6), except for the
  network with sigmoid/SiLU, held to a tolerance (every logit within 2 % of the OP's largest
  |logit|; top-1 agreement >= 99.9 % on samples that are not ties at the measured resolution,
  >= 99 % on all);
* qos-run on aarch64 (under qemu): bit for bit with x86-64 (and so with PyTorch).

The eight networks are written here with plain ``F.relu``/``torch.cat``/... spellings and cover
depthwise and grouped/dilated convolutions, 5x5 with padding 0, non-square inputs and pools,
concatenation, squeeze-and-excitation (sigmoid, broadcast multiply, hardswish, SiLU), biases
with and without BatchNorm, an MLP with per-OP BatchNorm1d on [N, F] inputs and residual
1x1 projections with nearest upsampling (signed circuits, per-channel weights; the digits
model of tests/test_compile.py is the unsigned residual network). Each is built, saved and compiled once per session, the
steps after save_qos_model in one fresh process per network, which runs while the next is trained.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from qos_compile.nn import Mode, MultiBatchNorm, MultiBatchNorm1d, QoSNet, QuantConfig, wrap_model  # noqa: E402
from qos_compile.qosmodel import save_qos_model  # noqa: E402
from test_compile import HAVE_ARM  # noqa: E402
from test_model_schema import finish, fresh_python  # noqa: E402

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow      # eight networks compiled (x86-64, and aarch64 when available)
TARGETS = ("x86_64", "aarch64") if HAVE_ARM else ("x86_64",)

TOP1_MIN = 0.999          # samples that are not ties at the measured resolution
TOP1_MIN_ALL = 0.99       # all samples
REL_TOL = 0.02
BATCH = 32                # compiled batch; qos-run streams EVAL_SAMPLES / BATCH inputs in one process
EVAL_SAMPLES = 256
UNSIGNED = ["mul8u_1JFF", "mul8u_1446", "mul8u_27Y", "mul8u_Y48", "mul8u_JQQ"]   # 1JFF = exact
SIGNED = ["mul8s_1KVB", "mul8s_1KX2", "mul8s_1L2H", "mul8s_1KR6"]


# --------------------------------------------------------------------------- the networks
class DepthwiseSeparable(nn.Module):
    """MobileNet-v1 style: 3x3 stem, twice depthwise 3x3 stride 2 + pointwise 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw1, self.bn1 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.pw1, self.bn2 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.dw2, self.bn3 = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw2, self.bn4 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.dw1(x)))
        x = F.relu6(self.bn2(self.pw1(x)))
        x = F.relu(self.bn3(self.dw2(x)))
        x = F.relu(self.bn4(self.pw2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class GroupedDilated(nn.Module):
    """A conv with bias followed by BatchNorm, a grouped dilated 5x5 and a grouped 5x5, both padding 0."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8)
        self.g1, self.bn1 = nn.Conv2d(8, 16, 5, dilation=2, padding=0, groups=4, bias=False), nn.BatchNorm2d(16)
        self.g2, self.bn2 = nn.Conv2d(16, 16, 5, padding=0, groups=2, bias=False), nn.BatchNorm2d(16)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.stem(x)))        # 16x16
        x = self.bn1(self.g1(x)).relu()              # 16 - 2*4 = 8x8
        x = F.hardtanh(self.bn2(self.g2(x)), 0.0, 4.0)   # 4x4
        return self.fc(self.pool(x).flatten(1))


class NonSquarePools(nn.Module):
    """12x16 input, non-square kernels/strides, max, average (count_include_pad=False) and adaptive pools."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(1, 8, (3, 5), padding=(1, 2), bias=False), nn.BatchNorm2d(8)
        self.pool1 = nn.MaxPool2d(2)
        self.c2, self.bn2 = nn.Conv2d(8, 16, 3, stride=(1, 2), padding=1, bias=False), nn.BatchNorm2d(16)
        self.pool2 = nn.AvgPool2d(2)
        self.c3, self.bn3 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.gap = nn.AdaptiveAvgPool2d((1, 2))
        self.flat = nn.Flatten()
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.bn1(self.c1(x))))          # 6x8
        x = self.pool2(F.relu(self.bn2(self.c2(x))))          # 6x4 -> 3x2
        x = F.relu(self.bn3(self.c3(x)))
        x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return self.fc(self.flat(self.gap(x)))


class DenseConcat(nn.Module):
    """DenseNet style: pre-activation BatchNorm (standalone, per OP), torch.cat growth, 1x1 transition."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bns = nn.ModuleList([nn.BatchNorm2d(8), nn.BatchNorm2d(12)])
        self.convs = nn.ModuleList([nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.Conv2d(12, 4, 3, padding=1,
                                                                                          bias=False)])
        self.trans_bn, self.trans = nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1, bias=False)
        self.bn3, self.conv3 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.final_bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for bn, conv in zip(self.bns, self.convs):
            x = torch.cat([x, conv(F.relu(bn(x)))], 1)
        x = F.avg_pool2d(self.trans(F.relu(self.trans_bn(x))), 2)     # 16 -> 8 channels, 8x8
        x = torch.cat((x, self.conv3(F.relu(self.bn3(x)))), dim=1)
        x = F.relu(self.final_bn(x))
        return self.fc(x.mean((2, 3)))


class SqueezeExcite(nn.Module):
    """Hardswish activations, a squeeze-and-excitation block (sigmoid gate, y * s with s [N, C, 1, 1]), SiLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.hs = nn.Hardswish()
        self.dw, self.bn1 = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.se1, self.se2 = nn.Linear(16, 4), nn.Linear(4, 16)
        self.pw, self.bn2 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.silu = nn.SiLU()
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hs(self.bn0(self.stem(x)))
        y = F.hardswish(self.bn1(self.dw(x)))                          # 8x8
        s = F.adaptive_avg_pool2d(y, 1).flatten(1)
        s = torch.sigmoid(self.se2(F.relu(self.se1(s))))
        y = y * s.view(-1, 16, 1, 1)
        y = self.silu(self.bn2(self.pw(y)))
        y = F.avg_pool2d(y, 2)
        return self.fc(y.mean((2, 3)))


class BiasNoBatchNorm(nn.Module):
    """LeNet style: every layer has a bias and no BatchNorm; Tensor-method spellings; dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 5, padding=2)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.c1(x).relu(), 2)                          # 8x8
        x = torch.relu(self.c2(x))                                      # 4x4
        x = x.view(x.size(0), -1)
        return self.fc2(self.drop(F.relu(self.fc1(x))))


class MlpBatchNorm1d(nn.Module):
    """An MLP on [N, 64] with per-OP BatchNorm1d after a linear layer without and with bias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(64, 16, bias=False), nn.BatchNorm1d(16)
        self.fc2, self.bn2 = nn.Linear(16, 16), nn.BatchNorm1d(16)
        self.fc3 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.dropout(F.relu6(self.bn2(self.fc2(x))), 0.1, self.training)
        return self.fc3(x)


class ResidualUpsample(nn.Module):
    """A residual block with a strided 1x1 projection, nearest upsampling (F.interpolate and nn.Upsample)
    merged with a lateral 1x1 projection (FPN style)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.a1, self.bn1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.a2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.proj, self.bnp = nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16)
        self.lateral, self.bnl = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.up = nn.Upsample(size=(16, 16), mode="nearest")
        self.head, self.bnh = nn.Conv2d(16, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.bn0(self.stem(x)))                                        # 8x8
        y = F.relu(self.bn2(self.a2(F.relu(self.bn1(self.a1(s))))) + self.bnp(self.proj(s)))   # 4x4
        z = F.relu(F.interpolate(y, scale_factor=2, mode="nearest") + self.bnl(self.lateral(s)))   # 8x8
        z = F.relu(self.bnh(self.head(self.up(z))))                               # 16x16 -> 8x8
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


@dataclass(frozen=True)
class Spec:
    make: Callable[[], nn.Module]
    circuits: list[str]
    num_ops: int
    data: str = "image"               # "image" 1x16x16, "nonsquare" 1x12x16, "vector" 64
    transcendental: bool = False      # sigmoid / SiLU: onnxruntime vs qos-run within tolerance
    qconfig: QuantConfig | None = None


ARCHS: dict[str, Spec] = {
    "depthwise_separable": Spec(DepthwiseSeparable, UNSIGNED, 3),
    "grouped_dilated_5x5": Spec(GroupedDilated, UNSIGNED, 3),
    "nonsquare_pools": Spec(NonSquarePools, UNSIGNED[:3], 2, data="nonsquare"),
    "dense_concat": Spec(DenseConcat, UNSIGNED, 3),
    "squeeze_excite": Spec(SqueezeExcite, UNSIGNED, 3, transcendental=True),
    "bias_no_bn": Spec(BiasNoBatchNorm, SIGNED, 2, qconfig=QuantConfig(per_channel=True)),
    "mlp_batchnorm1d": Spec(MlpBatchNorm1d, SIGNED, 3, data="vector", qconfig=QuantConfig(per_channel=True)),
    "residual_upsample": Spec(ResidualUpsample, SIGNED, 3, qconfig=QuantConfig(per_channel=True)),
}


# --------------------------------------------------------------------------- building (once per arch)
@dataclass
class Built:
    qnet: QoSNet
    x: np.ndarray                          # EVAL_SAMPLES inputs, float32
    torch_out: list[np.ndarray]            # PyTorch APPROX emulation per OP (this process)
    model_pt: Path                         # save_qos_model(qnet)
    cli: dict[str, list[str]]              # target -> the qos-compile command line (after "qos-compile")
    proc: subprocess.Popen                 # the fresh process (below), until chained() has waited for it
    # filled by chained(), from that process:
    fresh_out: np.ndarray | None = None    # [OP, sample, logit]: load_qos_model's emulation
    rebuilt: str = ""                      # "rebuilt: <type of the loaded qnet.net> <OPs>"
    outs: dict[str, Path] = field(default_factory=dict)        # target -> qos-compile's output folder
    reports: dict[str, dict] = field(default_factory=dict)     # target -> its report.json
    failed: dict[str, str] = field(default_factory=dict)       # target (or "fresh") -> why it failed


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from qos_compile.data.digits import load_digits_splits

    splits = load_digits_splits(16, 0)
    xtr, ytr = splits.train.tensors
    xte, _ = splits.test.tensors
    return xtr, ytr, xte


def _inputs(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "nonsquare":
        return x[:, :, 2:14, :].contiguous()
    if kind == "vector":
        return F.avg_pool2d(x, 2).flatten(1)
    return x


def _assign(qnet: QoSNet) -> None:
    """OP 0 on circuit 0 everywhere; every later OP alternates two circuits of its own."""
    n, m = len(qnet.approx_layers()), len(qnet.bank)
    rows = [[0] * n]
    for op in range(1, qnet.num_ops):
        a, b = (2 * op - 1) % m, (2 * op) % m
        rows.append([a if i % 2 else b for i in range(n)])
    qnet.set_assignment(rows)


def _calibrate(qnet: QoSNet, x: torch.Tensor) -> None:
    """Observers from QUANT-mode training passes; each OP's BatchNorm statistics re-estimated in APPROX
    mode and perturbed a little per OP (as per-OP fine-tuning would leave them); eval + APPROX."""
    qnet.set_mode(Mode.QUANT)
    qnet.train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in range(0, len(x), 128):
            qnet(x[i:i + 128])
        qnet.freeze_observers()
        qnet.set_mode(Mode.APPROX)
        bns = [m for m in qnet.modules() if isinstance(m, MultiBatchNorm)]
        for op in range(qnet.num_ops):
            qnet.set_operating_point(op)
            for m in bns:
                m.bns[op].reset_running_stats()
                m.bns[op].momentum = None              # cumulative average over these passes
            for i in range(0, len(x), 128):
                qnet(x[i:i + 128])
            for m in bns:
                m.bns[op].momentum = 0.1
                m.bns[op].weight.mul_(1 + 0.05 * torch.randn(m.num_features, generator=gen))
                m.bns[op].bias.add_(0.02 * torch.randn(m.num_features, generator=gen))
    qnet.eval()
    qnet.set_operating_point(0)


@functools.lru_cache(maxsize=None)
def built(name: str) -> Built:
    """Train the float network briefly (real logit margins), wrap, assign, calibrate, emulate, save
    model.pt and start its fresh process (``chained`` waits for it)."""
    spec = ARCHS[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # many tiny ops: one thread is faster on a shared 2-core machine
    try:
        xtr, ytr, xte = _digits()
        xtr, xte = _inputs(xtr, spec.data), _inputs(xte, spec.data)
        torch.manual_seed(0)
        model = spec.make()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.train()
        gen = torch.Generator().manual_seed(0)
        for _ in range(60):
            idx = torch.randint(0, len(xtr), (64,), generator=gen)
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        qnet = wrap_model(model, spec.circuits, num_ops=spec.num_ops, qconfig=spec.qconfig,
                          input_shape=tuple(xtr.shape[1:]))
        _assign(qnet)
        _calibrate(qnet, xtr[:512])
        x = torch.cat([xte, xtr[:EVAL_SAMPLES]])[:EVAL_SAMPLES]
        torch_out = []
        with torch.no_grad():
            for op in range(qnet.num_ops):
                qnet.set_operating_point(op)
                torch_out.append(qnet(x).numpy())
        qnet.set_operating_point(0)
    finally:
        torch.set_num_threads(threads)
    folder = _ROOT / name
    folder.mkdir()
    save_qos_model(folder / "model.pt", qnet)
    np.save(folder / "x.npy", x.numpy().astype(np.float32))
    cli = {t: ["model.pt", "--target", t, "-o", t, "--batch", str(BATCH), "--threads", "2",
               # aarch64: the test runs qos-run under qemu itself, the compiler's own check would repeat it
               *(["--no-verify"] if t != "x86_64" else [])] for t in TARGETS}
    for other in list(_IN_FLIGHT):      # one fresh process at a time, next to the next network's training
        _wait_chain(other)
    # one fresh process for every step after save_qos_model (its start and imports, several seconds,
    # once per network), one thread (a compile is serial work; it runs next to the next training)
    with open(folder / "fresh.log", "w") as log:
        proc = fresh_python(_FRESH_CHAIN, "x.npy", "fresh.npy", json.dumps(cli), cwd=folder, stdout=log,
                            stderr=subprocess.STDOUT, env_update={"QOS_THREADS": "1", "TVM_NUM_THREADS": "1"},
                            forbid=[__name__, "test_compile", "test_model_schema"])
    b = Built(qnet, x.numpy().astype(np.float32), torch_out, folder / "model.pt", cli, proc)
    _IN_FLIGHT.append(b)
    return b


def chained(name: str) -> Built:
    """built(name) once its fresh process has loaded model.pt, emulated it and run qos-compile."""
    b = built(name)
    _wait_chain(b)
    assert "fresh" not in b.failed, b.failed["fresh"]
    return b


def _wait_chain(b: Built) -> None:
    """Wait for b's fresh process; record its outputs, or why a step failed (for the tests that need it)."""
    if b not in _IN_FLIGHT:
        return
    _IN_FLIGHT.remove(b)
    code = finish(b.proc, timeout=900)[0]
    folder = b.model_pt.parent
    log = (folder / "fresh.log").read_text()
    lines = log.splitlines()
    rebuilt = [ln for ln in lines if ln.startswith("rebuilt: ")]
    if not rebuilt or not (folder / "fresh.npy").exists():
        b.failed["fresh"] = f"{folder.name}: the fresh process failed (exit {code}): {log[-3000:]}"
        return
    b.fresh_out, b.rebuilt = np.load(folder / "fresh.npy"), rebuilt[0]
    for target in TARGETS:
        if code == 0 and f"qos-compile {target}: exit 0" in lines:
            b.outs[target] = folder / target
            b.reports[target] = json.loads((folder / target / "report.json").read_text())
        else:       # the tests of this target fail with it (the log ends with qos-compile's one-line error)
            b.failed[target] = f"qos-compile {' '.join(b.cli[target])} failed in {folder}: {log[-3000:]}"


_ROOT = Path(tempfile.mkdtemp(prefix="qos_user_arch_"))
atexit.register(shutil.rmtree, _ROOT, True)
_IN_FLIGHT: list[Built] = []     # at most one: its fresh process runs while the next network is built


@atexit.register
def _stop_in_flight() -> None:   # registered after the rmtree: runs before it
    for b in _IN_FLIGHT:
        b.proc.kill()
        b.proc.wait()


# Run in FOLDER (holding model.pt) by a fresh interpreter where this module and its classes cannot be
# imported: load_qos_model and the PyTorch APPROX emulation at every OP as built() runs it here (one
# thread), then the qos-compile command (the console script's own entry point) for each target.
_FRESH_CHAIN = """
    import json, sys
    from importlib.metadata import entry_points
    import numpy as np, torch
    torch.set_num_threads(1)
    from qos_compile.qosmodel import load_qos_model
    inputs, outputs, cli = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    qnet, meta = load_qos_model("model.pt")
    x = torch.from_numpy(np.load(inputs))
    outs = []
    with torch.no_grad():
        for op in range(qnet.num_ops):
            qnet.set_operating_point(op)
            outs.append(qnet(x).numpy())
    np.save(outputs, np.stack(outs))
    print("rebuilt:", type(qnet.net).__name__, qnet.num_ops, flush=True)
    from qos_compile.cli.compile import main
    assert entry_points(group="console_scripts")["qos-compile"].load() is main
    for target, argv in cli.items():
        code = main(argv)
        print(f"qos-compile {target}: exit {code}", flush=True)
"""


def _compile(b: Built, name: str, target: str) -> Path:
    """qos-compile's output folder of ``name`` for ``target`` (b from chained())."""
    assert target not in b.failed, b.failed[target]
    return b.outs[target]


def _qos_run(out: Path, x: np.ndarray, op: int, prefix: tuple[str, ...] = ()) -> np.ndarray:
    """qos-run at ``op`` over ``x`` streamed as len(x) / BATCH inputs of the compiled batch."""
    inp, res = out / f"_in_{op}.bin", out / f"_out_{op}.bin"
    np.ascontiguousarray(x).tofile(inp)
    proc = subprocess.run([*prefix, str(out / "qos-run"), str(out / "model.qosm"), "--op", str(op), "--input",
                           str(inp), "--output", str(res)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return np.fromfile(res, dtype=np.float32).reshape(len(x), -1)


@functools.lru_cache(maxsize=None)
def x86_outputs(name: str) -> tuple[np.ndarray, ...]:
    b = chained(name)
    _compile(b, name, "x86_64")
    return tuple(_qos_run(b.outs["x86_64"], b.x, op) for op in range(b.qnet.num_ops))


def _assert_close(y: np.ndarray, t: np.ndarray, what: str) -> None:
    """test_qos_run.py's tolerance: every logit within REL_TOL of the largest |logit|, top-1 agreement."""
    agree = y.argmax(1) == t.argmax(1)
    top2 = np.sort(t, 1)[:, -2:]
    tie = (top2[:, 1] - top2[:, 0]) <= 2 * np.max(np.abs(y - t), 1)
    assert float(np.mean(agree[~tie])) >= TOP1_MIN, (what, np.nonzero(~agree & ~tie)[0])
    assert float(np.mean(agree)) >= TOP1_MIN_ALL, (what, float(np.mean(agree)))
    assert np.max(np.abs(y - t)) <= REL_TOL * np.max(np.abs(t)), (what, float(np.max(np.abs(y - t))))


NAMES = list(ARCHS)


# --------------------------------------------------------------------------- tests
def test_eight_architectures_outside_the_zoo():
    import qos_compile.models as zoo

    assert len(ARCHS) == 8
    zoo_classes = {v.__name__ for v in vars(zoo).values() if isinstance(v, type)}
    assert not zoo_classes & {spec.make.__name__ for spec in ARCHS.values()}
    assert not set(zoo.model_names()) & set(ARCHS)


@pytest.mark.parametrize("name", NAMES)
def test_wrapped_per_op_layers(name):
    """Every Conv2d/Linear became approximate and every BatchNorm (1d too) one copy per OP, saved as bns.<op>."""
    b = built(name)
    net, n_ops = b.qnet, b.qnet.num_ops
    assert net.architecture is not None
    copies = {id(c) for m in net.modules() if isinstance(m, MultiBatchNorm) for c in m.bns}
    float_left = [n for n, m in net.net.named_modules()
                  if type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d) and id(m) not in copies]
    assert not float_left
    keys = net.state_dict().keys()
    for mname, mod in net.net.named_modules():
        if isinstance(mod, MultiBatchNorm):
            assert len(mod.bns) == n_ops
            assert all(f"net.{mname}.bns.{op}.running_mean" in keys for op in range(n_ops))
    if name == "mlp_batchnorm1d":
        assert isinstance(net.net.bn1, MultiBatchNorm1d) and isinstance(net.net.bn2, MultiBatchNorm1d)
    # the OPs really differ (different circuits per OP)
    assert len({o.tobytes() for o in b.torch_out}) == n_ops


FOLDED = {"mlp_batchnorm1d": {"fc1": "bn1", "fc2": "bn2", "fc3": None},
          "grouped_dilated_5x5": {"stem": "bn0", "g1": "bn1", "g2": "bn2", "fc": None},
          "dense_concat": None}     # None: no layer has a folded BatchNorm


@pytest.mark.parametrize("name", list(FOLDED))
def test_batchnorm_folded_only_where_it_directly_follows_a_layer(name):
    """BatchNorm1d after a linear layer (with and without bias) and BatchNorm2d after a conv with bias
    fold into that layer's per-OP affine; pre-activation BatchNorm stays a per-OP affine of its own.
    The emulation folds the same ones (nn.fold)."""
    from qos_compile.nn.fold import fold_map
    from qos_compile.onnx import export_onnx

    qnet = built(name).qnet
    folded = {layer.name: layer.folded_bn for layer in export_onnx(qnet).layers}
    if FOLDED[name] is None:
        assert set(folded.values()) == {None}
    else:
        assert folded == FOLDED[name]
    assert fold_map(qnet.net) == {k: v for k, v in folded.items() if v is not None}


#: Integer epilogues (numerics contract v2) of some networks: a layer feeding the next one directly
#: (through its folded BatchNorm and one clamp-like activation); None: no layer does.
REQUANT = {"residual_upsample": {"stem": "a1", "a1": "a2", "head": "fc"},   # signed, per-channel; the stem's
           # output also feeds proj and lateral (dequantized codes); the adds meet conv outputs, not
           # codes: float; head -> bnh -> F.relu -> F.adaptive_avg_pool2d -> flatten -> fc: an integer mean
           "mlp_batchnorm1d": {"fc1": "fc2"},                  # fc2 -> F.dropout -> fc3 stays float
           "bias_no_bn": {"fc1": "fc2"},                       # per-OP bias, F.relu then nn.Dropout
           "dense_concat": None}


@pytest.mark.parametrize("name", NAMES)
def test_integer_epilogues_where_layers_chain(name):
    """The exporter and the emulation pick the same integer epilogues (nn.fold.integer_links), and
    the networks above get the expected ones; bit-identity is checked by the tests below."""
    from qos_compile.nn.fold import requant_map, residual_map
    from qos_compile.onnx import export_onnx

    qnet = built(name).qnet
    links = {layer.name: layer.requantizes_into for layer in export_onnx(qnet).layers if layer.requantizes_into}
    emulated = {k: v[0] for k, v in requant_map(qnet.net).items()} | {k: v[0] for k, v in residual_map(qnet.net).items()}
    assert links == emulated
    if name in REQUANT:
        assert links == (REQUANT[name] or {}), links


@pytest.mark.parametrize("name", NAMES)
def test_model_pt_round_trip(name, tmp_path):
    """model.pt keeps the architecture as data: the rebuilt network computes the same at every OP
    (F.dropout(x, p, self.training) included: the record is traced in eval mode)."""
    from qos_compile.qosmodel import load_qos_model, save_qos_model

    b = built(name)
    save_qos_model(tmp_path / "model.pt", b.qnet)
    qnet, _ = load_qos_model(tmp_path / "model.pt")
    x = torch.from_numpy(b.x)
    with torch.no_grad():
        for op in range(b.qnet.num_ops):
            qnet.set_operating_point(op)
            assert np.array_equal(qnet(x).numpy(), b.torch_out[op]), (name, op)


@pytest.mark.parametrize("name", NAMES)
def test_fresh_process_rebuilds_the_users_network(name):
    """load_qos_model(model.pt) in a process where the user's classes do not exist computes, at every
    OP, bit for bit what the user's network computes here; qos-compile compiled that model.pt."""
    b = chained(name)
    assert b.rebuilt.split() == ["rebuilt:", "QosArchitecture", str(b.qnet.num_ops)], b.rebuilt
    assert b.fresh_out.shape == (b.qnet.num_ops, *b.torch_out[0].shape)
    for op in range(b.qnet.num_ops):
        assert np.array_equal(b.fresh_out[op], b.torch_out[op]), (name, op)
    sha = hashlib.sha256(b.model_pt.read_bytes()).hexdigest()
    for target in TARGETS:
        _compile(b, name, target)
        report = b.reports[target]
        assert report["tool"] == "qos-compile" and report["target"]["arch"] == target, report["target"]
        assert report["model"]["source"]["sha256"] == sha and report["model"]["num_ops"] == b.qnet.num_ops
        assert report["options"]["batch"] == BATCH and report["options"]["threads"] == 2
        assert report["verification"]["ran"] == (target == "x86_64"), report["verification"]


@pytest.mark.parametrize("name", NAMES)
def test_qos_run_matches_onnxruntime(name):
    """qos-run (x86-64) == onnxruntime on the exported model.onnx, every OP; bit for bit unless the
    network has a transcendental op."""
    from qos_compile.onnx import run_onnxruntime

    b, spec = chained(name), ARCHS[name]
    _compile(b, name, "x86_64")
    report = b.reports["x86_64"]["verification"]
    assert report["ran"] and report["ok"], report
    for op, got in enumerate(x86_outputs(name)):
        want = run_onnxruntime(b.outs["x86_64"] / "model.onnx", b.x, op, batch_size=64, threads=1)
        if spec.transcendental:
            _assert_close(got, want, f"{name} OP {op}: qos-run vs onnxruntime")
        else:
            assert np.array_equal(got, want), (name, op, float(np.max(np.abs(got - want))))
    if not spec.transcendental:
        assert report["bit_exact"], report


def _assert_device(y: np.ndarray, t: np.ndarray, name: str, what: str) -> None:
    """qos-run output ``y`` against PyTorch inference ``t``: bit for bit, or (sigmoid/SiLU) close."""
    if ARCHS[name].transcendental:
        _assert_close(y, t, what)
    else:
        assert np.array_equal(y, t), (what, int(np.any(y != t, 1).sum()), float(np.max(np.abs(y - t))))


@pytest.mark.parametrize("name", NAMES)
def test_qos_run_matches_pytorch_emulation(name):
    b = chained(name)
    for op, got in enumerate(x86_outputs(name)):
        _assert_device(got, b.torch_out[op], name, f"{name} OP {op}: qos-run vs PyTorch APPROX")
        _assert_device(got, b.fresh_out[op], name,
                       f"{name} OP {op}: qos-run vs PyTorch APPROX of model.pt, fresh process")


@pytest.mark.parametrize("name", ["mlp_batchnorm1d", "nonsquare_pools"])
def test_python_binding_on_vector_and_non_square_inputs(name):
    """The manifest's input is [batch, 64] / [batch, 1, 12, 16]; the ctypes binding runs it like qos-run."""
    from qos_compile.runtime.model import Model

    b = chained(name)
    with Model(_compile(b, name, "x86_64")) as m:
        assert m.inputs[0].shape == (BATCH, *b.x.shape[1:])
        for op in range(b.qnet.num_ops):
            m.select(op)
            assert np.array_equal(m.run(b.x[:BATCH]), x86_outputs(name)[op][:BATCH]), (name, op)


@pytest.mark.parametrize("name", NAMES)
def test_aarch64_bit_exact_with_x86(name):
    if not HAVE_ARM:
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64-static")
    from qos_compile.targets import get_target

    b = chained(name)
    out = _compile(b, name, "aarch64")
    prefix = tuple(get_target("aarch64").run_prefix())
    for op, want in enumerate(x86_outputs(name)):
        got = _qos_run(out, b.x, op, prefix)
        assert np.array_equal(got, want), (name, op, float(np.max(np.abs(got - want))))
        _assert_device(got, b.fresh_out[op], name, f"{name} OP {op}: aarch64 qos-run vs PyTorch APPROX of model.pt")
