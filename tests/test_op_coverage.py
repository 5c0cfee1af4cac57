"""Every entry of the allowlist (``qos_compile.nn.graph``: MODULES, FUNCTIONS, METHODS) through the
exporter: one tiny network per entry, written with that spelling, accepted by wrap_model (strict),
exported, checked, run in stock onnxruntime at every OP and compared with the PyTorch APPROX
emulation. The table below must name every entry, so an op added to the allowlist without an
exporter case fails here. Also: what the exporter refuses (one line each).

A few spellings never reach the exporter as themselves because torch.fx records them as another
allowlisted entry (``F.sigmoid`` is ``x.sigmoid()`` inside, ``x += y`` on a traced tensor is
``operator.add``): the table names the entry they trace to (``ALIASES``) and the test checks that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qos_compile.errors import QosError
from qos_compile.nn import Mode, MultiBatchNorm, QoSNet, wrap_model
from qos_compile.nn.graph import FUNCTIONS, METHODS, MODULES, capture
from qos_compile.onnx import check_model, export_onnx, run_onnxruntime

pytest.importorskip("onnxruntime")

CIRCUITS = ["mul8u_1JFF", "mul8u_1446"]   # exact, low rank; two OPs
CONV_IN = (2, 6, 8)                        # non-square on purpose
LINEAR_IN = (12,)


@dataclass(frozen=True)
class Case:
    """``body(net, y)`` on the stem's output y ([N, 4, 6, 8] after a conv, [N, 6] after a linear
    layer); ``module``: the op's module, as ``net.m``; ``stem``: "conv" or "linear"."""

    body: Callable[[Any, torch.Tensor], torch.Tensor]
    module: Callable[[], nn.Module] | None = None
    stem: str = "conv"


def _m(factory: Callable[[], nn.Module], body: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
       stem: str = "conv") -> Case:
    return Case(body or (lambda n, y: n.m(y)), factory, stem)


CASES: dict[str, Case] = {
    # --- modules (Conv2d / Linear / BatchNorm become ApproxConv2d / ApproxLinear / MultiBatchNorm)
    "Conv2d": Case(lambda n, y: y),
    "Linear": Case(lambda n, y: y, stem="linear"),
    "BatchNorm2d": _m(lambda: nn.BatchNorm2d(4), lambda n, y: n.m(F.relu(y))),          # standalone, per OP
    "BatchNorm1d": _m(lambda: nn.BatchNorm1d(6), lambda n, y: n.m(F.relu(y)), stem="linear"),
    "ReLU": _m(nn.ReLU),
    "ReLU6": _m(nn.ReLU6, lambda n, y: n.m(y * 8.0)),
    "Hardtanh": _m(lambda: nn.Hardtanh(-0.5, 0.25)),
    "Hardswish": _m(nn.Hardswish, lambda n, y: n.m(y * 4.0)),
    "Sigmoid": _m(nn.Sigmoid),
    "SiLU": _m(nn.SiLU, lambda n, y: n.m(y * 4.0)),
    "Tanh": _m(nn.Tanh),
    "LeakyReLU": _m(lambda: nn.LeakyReLU(0.1)),
    "Softmax": _m(lambda: nn.Softmax(dim=1)),
    "MaxPool2d": _m(lambda: nn.MaxPool2d(3, stride=2, padding=1)),
    "AvgPool2d": _m(lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)),
    "AdaptiveAvgPool2d": _m(lambda: nn.AdaptiveAvgPool2d((3, 4))),
    "Flatten": _m(nn.Flatten),
    "Upsample": _m(lambda: nn.Upsample(scale_factor=(2, 3))),
    "Identity": _m(nn.Identity),
    "Dropout": _m(lambda: nn.Dropout(0.5)),
    "Dropout2d": _m(lambda: nn.Dropout2d(0.5)),
    # --- functions
    "operator.add": Case(lambda n, y: y + y.relu() + 1.5),
    "operator.iadd": Case(lambda n, y: _iadd(y)),
    "operator.sub": Case(lambda n, y: 1.0 - y - y.relu()),
    "operator.mul": Case(lambda n, y: y * y.mean((2, 3), keepdim=True) * 2.0),   # [N, C, 1, 1] broadcast
    "operator.imul": Case(lambda n, y: _imul(y)),
    "operator.truediv": Case(lambda n, y: y / 3.0),
    "operator.getitem": Case(lambda n, y: y[:, 1:3, ::2, None, 1:]),
    "torch.add": Case(lambda n, y: torch.add(y, y.relu())),
    "torch.sub": Case(lambda n, y: torch.sub(y, 0.25)),
    "torch.mul": Case(lambda n, y: torch.mul(y, y)),
    "torch.div": Case(lambda n, y: torch.div(y, 2.5)),
    "torch.cat": Case(lambda n, y: torch.cat([y, y.relu()], 1)),
    "torch.concat": Case(lambda n, y: torch.concat((y, y * 2.0), dim=2)),
    "torch.flatten": Case(lambda n, y: torch.flatten(y, 1)),
    "torch.reshape": Case(lambda n, y: torch.reshape(y, (-1, 4, 48))),
    "torch.unsqueeze": Case(lambda n, y: torch.unsqueeze(y, 2)),
    "torch.mean": Case(lambda n, y: torch.mean(y, (2, 3))),
    "torch.relu": Case(lambda n, y: torch.relu(y)),
    "torch.sigmoid": Case(lambda n, y: torch.sigmoid(y)),
    "torch.tanh": Case(lambda n, y: torch.tanh(y)),
    "F.relu": Case(lambda n, y: F.relu(y)),
    "F.relu6": Case(lambda n, y: F.relu6(y * 8.0)),
    "F.hardtanh": Case(lambda n, y: F.hardtanh(y, -0.25, 0.75)),
    "F.hardswish": Case(lambda n, y: F.hardswish(y * 4.0)),
    "F.sigmoid": Case(lambda n, y: F.sigmoid(y)),
    "F.tanh": Case(lambda n, y: F.tanh(y)),
    "F.silu": Case(lambda n, y: F.silu(y * 4.0)),
    "F.dropout": Case(lambda n, y: F.dropout(y, 0.5, False)),
    "F.dropout2d": Case(lambda n, y: F.dropout2d(y, 0.5, False)),
    "F.adaptive_avg_pool2d": Case(lambda n, y: F.adaptive_avg_pool2d(y, 1)),
    "F.avg_pool2d": Case(lambda n, y: F.avg_pool2d(y, 2)),
    "F.max_pool2d": Case(lambda n, y: F.max_pool2d(y, 2)),
    "F.pad": Case(lambda n, y: F.pad(F.pad(y, (1, 2, 0, 1)), (0, 0, 0, 0, 2, 2), "constant", 0.0)),
    "F.interpolate": Case(lambda n, y: F.interpolate(y, size=(12, 24), mode="nearest")),
    # --- Tensor methods
    "Tensor.size": Case(lambda n, y: y.view(y.size(0), -1)),
    "Tensor.view": Case(lambda n, y: y.view(-1, 4, 48)),
    "Tensor.reshape": Case(lambda n, y: y.reshape(-1, 2, 2, 48)),
    "Tensor.flatten": Case(lambda n, y: y.flatten(2)),
    "Tensor.contiguous": Case(lambda n, y: y.contiguous()),
    "Tensor.clone": Case(lambda n, y: y.clone()),
    "Tensor.relu": Case(lambda n, y: y.relu()),
    "Tensor.relu_": Case(lambda n, y: y.relu_()),
    "Tensor.sigmoid": Case(lambda n, y: y.sigmoid()),
    "Tensor.tanh": Case(lambda n, y: y.tanh()),
    "Tensor.add": Case(lambda n, y: y.add(1.0)),
    "Tensor.add_": Case(lambda n, y: y.relu().add_(y)),
    "Tensor.mul": Case(lambda n, y: y.mul(y)),
    "Tensor.mul_": Case(lambda n, y: y.relu().mul_(0.5)),
    "Tensor.sub": Case(lambda n, y: y.sub(0.5)),
    "Tensor.div": Case(lambda n, y: y.div(2.0)),
    "Tensor.mean": Case(lambda n, y: y.mean(3)),
    "Tensor.unsqueeze": Case(lambda n, y: y.unsqueeze(-1)),
}

#: spellings torch.fx records as another allowlisted entry
ALIASES = {"F.sigmoid": "Tensor.sigmoid", "F.tanh": "Tensor.tanh", "operator.iadd": "operator.add",
           "operator.imul": "operator.mul"}
TRANSCENDENTAL = {"Sigmoid", "SiLU", "Tanh", "Softmax", "torch.sigmoid", "torch.tanh", "F.sigmoid", "F.tanh",
                  "F.silu", "Tensor.sigmoid", "Tensor.tanh"}


def _iadd(y: torch.Tensor) -> torch.Tensor:
    z = y.relu()
    z += y
    return z


def _imul(y: torch.Tensor) -> torch.Tensor:
    z = y.relu()
    z *= y
    return z


class _Net(nn.Module):
    """A stem (the one approximate layer) and the case's body."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1) if case.stem == "conv" else nn.Linear(12, 6)
        if case.module is not None:
            self.m = case.module()
        self.body = case.body   # a plain function: torch.fx traces through it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self, self.stem(x))


def _allowlist() -> set[str]:
    return set(MODULES) | set(FUNCTIONS) | {f"Tensor.{m}" for m in METHODS}


def _recorded(model: nn.Module) -> set[str]:
    """Allowlist names in the architecture record of ``model`` (modules by type)."""
    rec = capture(model)
    names = set()
    for node in rec["nodes"]:
        if node["op"] == "call_module":
            names.add(rec["modules"][node["target"]]["type"])
        elif node["op"] == "call_function":
            names.add(node["target"])
        elif node["op"] == "call_method":
            names.add(f"Tensor.{node['target']}")
    return names


def _wrapped(case: Case, entry: str | None = None) -> tuple[QoSNet, torch.Tensor]:
    """The case's network wrapped (2 OPs, per-OP BatchNorm statistics of their own), calibrated, eval,
    APPROX; and its input. ``entry``: the allowlist entry the record must contain."""
    torch.manual_seed(0)
    model = _Net(case)
    shape = CONV_IN if case.stem == "conv" else LINEAR_IN
    x = 3 * torch.randn(64, *shape, generator=torch.Generator().manual_seed(1))
    if entry is not None:
        assert ALIASES.get(entry, entry) in _recorded(model)
    qnet = wrap_model(model, CIRCUITS, num_ops=2, input_shape=shape)
    qnet.set_assignment([[0], [1]])
    qnet.set_mode(Mode.QUANT)
    qnet.train()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        qnet(x)
        for m in qnet.modules():        # every OP's BatchNorm its own statistics
            if isinstance(m, MultiBatchNorm):
                for bn in m.bns:
                    bn.running_mean.normal_(0, 0.2, generator=gen)
                    bn.running_var.uniform_(0.5, 2.0, generator=gen)
                    bn.weight.normal_(1, 0.2, generator=gen)
    qnet.eval()
    qnet.set_mode(Mode.APPROX)
    return qnet, x


def test_the_table_names_every_allowlist_entry():
    assert set(CASES) == _allowlist()
    assert set(ALIASES) <= set(CASES) and set(ALIASES.values()) <= set(CASES)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_exported_and_run_in_onnxruntime(name):
    qnet, x = _wrapped(CASES[name], name)
    ex = export_onnx(qnet)
    check_model(ex.model)
    for op in range(qnet.num_ops):
        qnet.set_operating_point(op)
        with torch.no_grad():
            want = qnet(x).numpy()
        got = run_onnxruntime(ex, x.numpy(), op, batch_size=64, threads=1)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        # the one approximate layer's output differs from PyTorch's by float rounding only
        # (one folded affine vs dequantize-then-bias); transcendental ops add their own exp's
        tol = (1e-5 if name in TRANSCENDENTAL else 2e-6) * max(1.0, float(np.abs(want).max()))
        assert float(np.abs(got - want).max()) <= tol, (name, op, float(np.abs(got - want).max()))


def test_batchnorm1d_on_n_c_l_is_a_per_op_affine_of_its_own():
    """BatchNorm1d on [N, C, L] (here a conv's output flattened to [N, 4, 48]) normalises C: exported
    as its own per-OP affine (never folded into the linear layer before it, which would be axis L)."""
    qnet, x = _wrapped(Case(lambda n, y: n.m(y.flatten(2)), lambda: nn.BatchNorm1d(4)))
    ex = export_onnx(qnet)
    assert ex.layers[0].folded_bn is None
    for op in range(qnet.num_ops):
        qnet.set_operating_point(op)
        with torch.no_grad():
            want = qnet(x).numpy()
        got = run_onnxruntime(ex, x.numpy(), op, batch_size=64, threads=1)
        assert float(np.abs(got - want).max()) <= 2e-6 * float(np.abs(want).max()), op


# --------------------------------------------------------------------------- refusals
class _Upsample(nn.Module):
    def __init__(self, **kw: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.kw = kw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(x), **self.kw)


@pytest.mark.parametrize("kw, match", [
    ({"scale_factor": 2, "mode": "bilinear"}, r"unsupported upsampling mode='bilinear' at net"),
    ({"scale_factor": 1.5}, r"unsupported nearest upsampling 6x6 -> 9x9 at net .*integer factors"),
    ({"size": (9, 12)}, r"unsupported nearest upsampling 6x6 -> 9x12 at net"),
    ({"scale_factor": 2, "mode": "nearest-exact"}, r"unsupported upsampling mode='nearest-exact'"),
])
def test_upsampling_other_than_nearest_by_integers_is_refused(kw, match):
    qnet = wrap_model(_Upsample(**kw), ["mul8u_1JFF"], num_ops=1, input_shape=(1, 6, 6))
    qnet.set_mode(Mode.QUANT)
    with torch.no_grad():
        qnet(torch.rand(4, 1, 6, 6))
    qnet.eval()
    with pytest.raises(QosError, match=match) as err:
        export_onnx(qnet)
    assert "\n" not in str(err.value)


def test_nearest_upsampling_is_pure_data_movement():
    qnet = wrap_model(_Upsample(scale_factor=(3, 2)), ["mul8u_1JFF"], num_ops=1, input_shape=(1, 5, 7))
    qnet.set_mode(Mode.QUANT)
    with torch.no_grad():
        qnet(torch.rand(4, 1, 5, 7))
    qnet.eval()
    ops = {n.op_type for n in export_onnx(qnet).model.graph.node}
    assert {"Unsqueeze", "Expand", "Reshape"} <= ops and "Resize" not in ops


def test_hardswish_rounds_like_torch():
    """The exported Add, Clip, Mul, Div equal torch's hardswish bit for bit (onnxruntime), also around
    every rounding case; a network with nn.Hardswish exports no ONNX HardSwish."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from qos_compile.onnx.export import _Graph, _hardswish

    net = wrap_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Hardswish()), ["mul8u_1JFF"], num_ops=1,
                     input_shape=(1, 5, 5))
    net.set_mode(Mode.QUANT)
    with torch.no_grad():
        net(torch.rand(4, 1, 5, 5))
    assert "HardSwish" not in {n.op_type for n in export_onnx(net).model.graph.node}
    g = _Graph()
    g.fresh("x")
    out = _hardswish(g, "x", "hardswish")
    graph = helper.make_graph(g.nodes, "hardswish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    vals = np.concatenate([np.linspace(-4, 4, 100001, dtype=np.float32),
                           np.random.default_rng(0).normal(0, 3, 100000).astype(np.float32)])
    assert np.array_equal(sess.run(None, {"x": vals})[0], F.hardswish(torch.from_numpy(vals)).numpy())
