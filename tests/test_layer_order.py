"""A model whose layers are defined in another order than they are called: the assignment
(definition order) still reaches the right layer in the ONNX graph, the manifest and qos-run."""
from __future__ import annotations

import subprocess

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qos_compile.nn import wrap_model
from qos_compile.onnx import make_session

CIRCUITS = ["mul8u_1JFF", "mul8u_2P7", "mul8u_12N4"]


class DefinedBackwards(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8 * 4 * 4, 4)          # defined first, called last
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def test_assignment_follows_layer_names_not_call_order(tmp_path):
    from qos_compile.compiler import compile_qnet
    from qos_compile.runtime.manifest import read_manifest

    torch.manual_seed(0)
    qnet = wrap_model(DefinedBackwards(), CIRCUITS, num_ops=2, input_shape=(1, 8, 8))
    assert [i.name for i in qnet.approx_layers()] == ["fc", "conv2", "conv1"]
    # OP1: only conv1 (called first, defined last) runs the strong circuit
    qnet.set_assignment([["mul8u_1JFF"] * 3, ["mul8u_1JFF", "mul8u_2P7", "mul8u_12N4"]])
    qnet.set_mode("quant")
    qnet.train()
    with torch.no_grad():
        qnet(torch.rand(64, 1, 8, 8))
    qnet.eval()
    qnet.freeze_observers(True)
    qnet.set_mode("approx")
    x = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    res = compile_qnet(qnet, "x86_64", tmp_path / "out", batch=32, threads=2, input_shape=(1, 8, 8))

    meta = read_manifest(tmp_path / "out" / "model.qosm").metadata_json()
    assert {row["name"] for row in meta["layers"]} >= {"fc", "conv1", "conv2"}
    sess = make_session(str(res.onnx), threads=1)
    x.tofile(tmp_path / "x.bin")
    for op in range(2):
        qnet.set_operating_point(op)
        with torch.no_grad():
            torch_out = qnet(torch.from_numpy(x)).numpy()
        want = sess.run(None, {"input": x, "operating_point": np.array(op, np.int64)})[0]
        p = subprocess.run([str(tmp_path / "out" / "qos-run"), str(tmp_path / "out" / "model.qosm"), "--op", str(op),
                            "--input", str(tmp_path / "x.bin"), "--output", str(tmp_path / "y.bin")],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        got = np.fromfile(tmp_path / "y.bin", np.float32).reshape(32, -1)
        assert np.array_equal(got, want), op
        # the graph ran the circuit each layer is assigned: PyTorch (which runs the modules
        # themselves) agrees closely; a swapped assignment would put 12N4 on the wrong layer
        assert np.max(np.abs(got - torch_out)) <= 0.02 * np.max(np.abs(torch_out)), op
        assert np.mean(got.argmax(1) == torch_out.argmax(1)) >= 0.9
