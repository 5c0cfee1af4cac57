"""Float reductions have one order everywhere: the exported average pools and means compute
``reference.ordered_sum`` in onnxruntime and in the compiled kernels, bit for bit.

Why: onnxruntime's own GlobalAveragePool/AveragePool/ReduceMean kernels add in an order of their
choosing (it depends on the SIMD width the CPU offers), TVM's kernels in another; one ulp in a
pooled value then flips a later rounding once in a few thousand inputs. The exporter therefore
spells every average out as element-wise adds in the fixed halving order of ``reference.py``.
"""
from __future__ import annotations

import subprocess

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qos_compile import reference
from qos_compile.nn import wrap_model
from qos_compile.onnx import export_onnx, make_session
from test_compile import HAVE_ARM

CIRCUITS = ["mul8u_1JFF", "mul8u_2P7"]


def test_ordered_sum_is_the_halving_tree_not_left_to_right():
    rng = np.random.default_rng(0)
    for n in range(1, 10):
        t = [rng.normal(size=5).astype(np.float32) for _ in range(n)]
        p = 1 << (n - 1).bit_length()
        padded = t + [np.zeros(5, np.float32)] * (p - n)
        while len(padded) > 1:
            padded = [padded[i] + padded[i + len(padded) // 2] for i in range(len(padded) // 2)]
        assert np.array_equal(reference.ordered_sum(t), padded[0]), n
    # the order matters in float32: left to right gives 1, the halving tree 2
    big = [np.float32(1e8), np.float32(1), np.float32(-1e8), np.float32(1)]
    assert float(((big[0] + big[1]) + big[2]) + big[3]) == 1.0
    assert float(reference.ordered_sum(big)) == 2.0


def test_pool_geometry_matches_pytorch():
    """Output size and divisor follow F.avg_pool2d, including ceil_mode and count_include_pad."""
    x = torch.rand(1, 1, 7, 9, dtype=torch.float64)
    for k, s, p, ceil, inc in [(3, 2, 1, True, False), (3, 2, 1, True, True), (2, 2, 0, False, True),
                               ((3, 2), (1, 2), (1, 0), False, False), (3, 3, 1, True, True)]:
        want = F.avg_pool2d(x, k, s, p, ceil_mode=ceil, count_include_pad=inc).numpy()[0, 0]
        got = reference.avg_pool2d(x.numpy().astype(np.float32), k, s, p, ceil, inc)[0, 0]
        assert got.shape == want.shape, (k, s, p, ceil, inc)
        assert np.allclose(got, want, rtol=1e-6), (k, s, p, ceil, inc)


class PoolNet(nn.Module):
    """Every kind of average the exporter knows, on the network input (float) and between layers."""

    def __init__(self) -> None:
        super().__init__()
        self.pool_in = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool_mid = nn.AdaptiveAvgPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool_in(x)
        y = F.relu(self.bn(self.conv(x)))
        a = self.pool_mid(y)                                  # 2x2 windows
        b = F.avg_pool2d(y, 2)
        g = F.adaptive_avg_pool2d(F.relu(self.conv2(a)), 1).flatten(1)
        m = b.mean((2, 3))
        return self.fc(torch.cat([g, m], 1))


def _qnet() -> object:
    torch.manual_seed(0)
    qnet = wrap_model(PoolNet(), CIRCUITS, num_ops=2)
    n = len(qnet.approx_layers())
    qnet.set_assignment([[0] * n, [1] * n])
    qnet.set_mode("quant")
    qnet.train()
    with torch.no_grad():
        qnet(torch.randn(64, 3, 11, 15))
    qnet.eval()
    qnet.freeze_observers(True)
    qnet.set_mode("approx")
    return qnet


def _wide_inputs(n: int, seed: int) -> np.ndarray:
    """Values spread over several octaves, so that the order of float additions shows."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 3, 11, 15)) * np.exp(rng.normal(size=(n, 3, 11, 15)))).astype(np.float32)


def test_exported_input_pool_equals_reference_in_onnxruntime(tmp_path):
    """The average pool on the network input, read out of onnxruntime, is reference.avg_pool2d."""
    qnet = _qnet()
    path = tmp_path / "pool.onnx"
    export_onnx(qnet, path, input_shape=(3, 11, 15))
    model = onnx.load(path)
    assert not {"AveragePool", "GlobalAveragePool", "ReduceMean"} & {nd.op_type for nd in model.graph.node}
    model.graph.output.append(onnx.ValueInfoProto(name="pool_in"))
    sess = make_session(model, threads=1)
    x = _wide_inputs(64, 1)
    got = sess.run(["pool_in"], {"input": x, "operating_point": np.array(0, np.int64)})[0]
    assert np.array_equal(got, reference.avg_pool2d(x, 3, 2, 1, True, False))


def test_compiled_pools_bit_exact_with_onnxruntime_and_aarch64(tmp_path):
    """qos-run (x86-64, and aarch64 under qemu) == onnxruntime on every OP, for 512 wide-range inputs."""
    from qos_compile.compiler import compile_qnet
    from qos_compile.targets import get_target

    qnet = _qnet()
    batch = 128
    x = _wide_inputs(4 * batch, 2)
    res = compile_qnet(qnet, "x86_64", tmp_path / "x86", batch=batch, threads=2, input_shape=(3, 11, 15))
    sess = make_session(str(res.onnx), threads=1)
    inp = tmp_path / "x.bin"
    x.tofile(inp)

    def qos_run(out, op, prefix=()):
        y = tmp_path / f"y{op}.bin"
        p = subprocess.run([*prefix, str(out / "qos-run"), str(out / "model.qosm"), "--op", str(op), "--input",
                            str(inp), "--output", str(y)], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        return np.fromfile(y, np.float32).reshape(len(x), -1)

    outs = []
    for op in range(2):
        want = np.concatenate([sess.run(None, {"input": x[i:i + batch], "operating_point": np.array(op, np.int64)})[0]
                               for i in range(0, len(x), batch)])
        got = qos_run(tmp_path / "x86", op)
        assert np.array_equal(got, want), (op, int(np.sum(np.any(got != want, 1))))
        outs.append(got)
    assert not np.array_equal(outs[0], outs[1])
    if not HAVE_ARM:
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64-static")
    compile_qnet(qnet, "aarch64", tmp_path / "arm", batch=batch, threads=2, input_shape=(3, 11, 15))
    prefix = get_target("aarch64").run_prefix()
    for op in range(2):
        assert np.array_equal(qos_run(tmp_path / "arm", op, prefix), outs[op]), op
