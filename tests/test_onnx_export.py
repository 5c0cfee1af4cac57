"""Whole-network ONNX export: checker, per-layer accumulators, end-to-end agreement, slots, errors."""
from __future__ import annotations

import inspect
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qos_compile.data import load_dataset
from qos_compile.errors import QosError
from qos_compile.models import build_model
from qos_compile.multipliers import bundled, get
from qos_compile.nn import Mode, MultiBatchNorm2d, QoSNet, QuantConfig, wrap_model
from qos_compile.nn.functional import approx_conv2d_acc, approx_linear_acc
from qos_compile.onnx import check_model, export_onnx, layer_accumulators, make_session, run_onnxruntime

pytest.importorskip("onnxruntime")

THREADS = 1
UNSIGNED = ["mul8u_1JFF", "mul8u_2P7", "mul8u_1446"]  # exact, mild, moderate (asymmetric tables)
STRONG = ["mul8u_1JFF", "mul8u_1446", "mul8u_12N4"]  # ... and a strong one (large jumps between neighbours)
SIGNED = ["mul8s_1KVB", "mul8s_1KX2", "mul8s_1L2H"]


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The emulation runs many small ops: one torch thread is faster on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ds = load_dataset("digits", image_size=16, seed=0)
    train = torch.stack([ds.train[i][0] for i in range(len(ds.train))])
    labels = torch.tensor([int(ds.train[i][1]) for i in range(len(ds.train))])
    test = torch.stack([ds.test[i][0] for i in range(len(ds.test))])
    return train, labels, test


def _train_briefly(qnet: QoSNet, x: torch.Tensor, y: torch.Tensor, steps: int = 10, seed: int = 0) -> None:
    """A few float Adam steps: enough for ~85% digits accuracy, i.e. realistic logit margins."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    opt = torch.optim.Adam(qnet.parameters(), lr=1e-2)
    qnet.set_mode(Mode.FLOAT)
    qnet.train()
    for i in range(steps):
        idx = perm[(i * 128) % (len(x) - 128):][:128]
        loss = F.cross_entropy(qnet(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _calibrate(qnet: QoSNet, x: torch.Tensor, seed: int = 1) -> QoSNet:
    """Observers from QUANT-mode training passes, then every OP's BatchNorm statistics
    re-estimated in APPROX mode (as per-OP fine-tuning would) and perturbed a little per OP
    (γ, β and per-OP biases); returns the net in eval + APPROX mode at OP 0."""
    qnet.set_mode(Mode.QUANT)
    qnet.train()
    with torch.no_grad():
        for i in range(0, len(x), 64):
            qnet(x[i:i + 64])
        qnet.freeze_observers()
        qnet.set_mode(Mode.APPROX)
        bns = [mod for mod in qnet.modules() if isinstance(mod, MultiBatchNorm2d)]
        for op in range(qnet.num_ops):
            qnet.set_operating_point(op)
            for mod in bns:
                mod.bns[op].reset_running_stats()
                mod.bns[op].momentum = None  # cumulative average over the passes below
            for i in range(0, len(x), 64):
                qnet(x[i:i + 64])
            for mod in bns:
                mod.bns[op].momentum = 0.1
        gen = torch.Generator().manual_seed(seed)
        for mod in bns:
            for bn in mod.bns:
                bn.weight.mul_(1 + 0.1 * torch.randn(bn.weight.shape, generator=gen))
                bn.bias.add_(0.05 * torch.randn(bn.bias.shape, generator=gen))
        for info in qnet.approx_layers():
            if info.module.bias_per_op is not None:
                info.module.bias_per_op.add_(0.05 * torch.randn(info.module.bias_per_op.shape, generator=gen))
    qnet.eval()
    qnet.set_operating_point(0)
    return qnet


def _assign(qnet: QoSNet, seed: int = 0) -> None:
    """OP 0: circuit 0 everywhere, OP 1: mixed, OP 2: the last circuit everywhere."""
    n, m = len(qnet.approx_layers()), len(qnet.bank)
    mixed = [int(v) for v in np.random.default_rng(seed).integers(0, m, n)]
    rows = [[0] * n, mixed, [m - 1] * n][:qnet.num_ops]
    qnet.set_assignment(rows)


@pytest.fixture(scope="module")
def resnet(digits) -> QoSNet:
    torch.manual_seed(0)
    qnet = wrap_model(build_model("resnet8", 10, in_channels=1, input_size=16), [get(n) for n in UNSIGNED],
                      num_ops=3)
    _assign(qnet)
    _train_briefly(qnet, digits[0], digits[1])
    return _calibrate(qnet, digits[0][:128])


@pytest.fixture(scope="module")
def inputs(digits) -> torch.Tensor:
    """300 inputs: the digits test split (269) and noisy copies of some of it."""
    test = digits[2]
    noisy = test[:31] + 0.1 * torch.randn(test[:31].shape, generator=torch.Generator().manual_seed(7))
    return torch.cat([test, noisy])


@pytest.fixture(scope="module")
def exported(resnet, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "resnet8.onnx"
    return export_onnx(resnet, path, metadata={"normalization": {"mean": [0.3], "std": [0.4]}})


@pytest.fixture(scope="module")
def session(exported):
    return make_session(exported, threads=THREADS)


def _torch_logits(qnet: QoSNet, x: torch.Tensor, op: int) -> np.ndarray:
    qnet.set_mode(Mode.APPROX)
    qnet.set_operating_point(op)
    with torch.no_grad():
        return qnet(x).numpy()


# --- structure ------------------------------------------------------------------------------------

def test_model_is_valid_and_self_describing(resnet, exported):
    model = onnx.load(str(exported.path))
    check_model(model)
    check_model(exported.path)
    onnx.checker.check_model(model, full_check=True)
    assert [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input] == [
        ("input", onnx.TensorProto.FLOAT), ("operating_point", onnx.TensorProto.INT64)]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 16, 16]
    assert len(model.graph.input[1].type.tensor_type.shape.dim) == 0  # scalar
    assert [o.name for o in model.graph.output] == ["output"]
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 18), ("ai.qosnets", 1)}
    assert {f.name for f in model.functions} == {"ApproxConv", "ApproxGemm"}
    custom = [n for n in model.graph.node if n.domain == "ai.qosnets"]
    names = [info.name for info in resnet.approx_layers()]
    assert [n.name for n in custom] == [f"{name}/{'ApproxGemm' if name == 'fc' else 'ApproxConv'}" for name in names]
    conv1 = custom[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv1.attribute}
    z = int(resnet.net.conv1.act_qparams()[1])
    assert attrs == {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1],
                     "group": 1, "pad_value": z}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert inits["luts"].shape == (3, 256, 256) and inits["luts"].dtype == np.int32
    np.testing.assert_array_equal(inits["luts"], resnet.bank.luts.numpy())
    assert inits["layer2.0.conv1.assign"].tolist() == [row[3] for row in resnet.assignment()]
    # the output: float32(q + B) * s, per-OP int32 B and float32 s; no layer has contract v1's float epilogue
    assert (inits["fc.out_bias_per_op"].shape, inits["fc.out_bias_per_op"].dtype) == ((3, 10), np.int32)
    assert (inits["fc.out_scale_per_op"].shape, inits["fc.out_scale_per_op"].dtype) == ((3, 10), np.float32)
    assert not any(k.endswith((".scale_per_op", ".shift_per_op")) for k in inits)
    # each block's conv1 -> bn1 -> relu -> conv2 is integer-only (contract v2): per-OP int
    # multipliers, offsets, shifts and zero points, and conv2 reads the codes it writes
    assert {k: (v.shape, v.dtype) for k, v in inits.items() if k.startswith("layer1.0.conv1.rq_")} == {
        "layer1.0.conv1.rq_mult_per_op": ((3, 16, 1, 1), np.int32),
        "layer1.0.conv1.rq_offset_per_op": ((3, 16, 1, 1), np.int64),
        "layer1.0.conv1.rq_shift_per_op": ((3, 16, 1, 1), np.int32),
        "layer1.0.conv1.rq_zero_per_op": ((3, 16, 1, 1), np.int64)}
    assert "layer1.0.conv1.scale_per_op" not in inits and "layer1.0.conv2.x_inv_scale" not in inits
    # the stem and each block's residual add (conv2 + bn2 + skip -> relu) requantize into the next
    # block's conv1; the last block's into fc's codes, which the global pool averages in integers
    assert [(layer.name, layer.requantizes_into, layer.residual) for layer in exported.layers
            if layer.requantizes_into] == [
        ("conv1", "layer1.0.conv1", False), ("layer1.0.conv1", "layer1.0.conv2", False),
        ("layer1.0.conv2", "layer2.0.conv1", True), ("layer2.0.conv1", "layer2.0.conv2", False),
        ("layer2.0.conv2", "layer3.0.conv1", True), ("layer3.0.conv1", "layer3.0.conv2", False),
        ("layer3.0.conv2", "fc", True)]
    pooled = [n for n in model.graph.node if n.name.startswith("layer3.0.conv2/mean_codes/")]
    assert [n.op_type for n in pooled] == ["ReduceSum", "Add", "Div", "Add"]
    assert {k: (v.shape, v.dtype) for k, v in inits.items() if k.startswith("layer2.0.conv2.rq_")} == {
        "layer2.0.conv2.rq_mult_per_op": ((3, 32, 1, 1), np.int32),
        "layer2.0.conv2.rq_skip_mult_per_op": ((3, 32, 1, 1), np.int64),
        "layer2.0.conv2.rq_offset_per_op": ((3, 32, 1, 1), np.int64),
        "layer2.0.conv2.rq_shift_per_op": ((3, 32, 1, 1), np.int32),
        "layer2.0.conv2.rq_zero_per_op": ((3, 32, 1, 1), np.int64)}
    # every BatchNorm follows its conv: folded, no BatchNormalization left
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert all(layer.folded_bn == layer.name.replace("conv", "bn") for layer in exported.layers[:-1])
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["qos.circuits"]) == UNSIGNED
    assert json.loads(meta["qos.assignment"]) == resnet.assignment()
    assert json.loads(meta["qos.num_ops"]) == 3 and json.loads(meta["qos.signed"]) is False
    assert json.loads(meta["qos.normalization"]) == {"mean": [0.3], "std": [0.4]}
    assert meta["qos.variant"] == "operating_point" and "ai.qosnets" in model.doc_string
    assert [layer.name for layer in exported.layers] == names and exported.num_ops == 3
    first = exported.layers[0]
    assert first.kind == "conv" and first.x_zero_point == z and first.signed is False
    assert exported.layers[-1].kind == "linear" and exported.layers[-1].attrs == {}


def test_written_atomically(exported):
    folder = exported.path.parent
    assert [p.name for p in folder.iterdir()] == ["resnet8.onnx"]
    assert exported.path.read_bytes() == exported.model.SerializeToString()


# --- numerics -------------------------------------------------------------------------------------

def test_layer_accumulators_identical_to_pytorch(resnet):
    """ONNX Runtime's int32 accumulators equal PyTorch's on the same codes, every layer, every OP;
    the codes themselves equal PyTorch's (exactly at the first layer)."""
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    debug = export_onnx(resnet, debug=True)
    layers = {info.name: info.module for info in resnet.approx_layers()}
    for op in range(3):
        captured: dict[str, np.ndarray] = {}
        hooks = [mod.register_forward_pre_hook(
            lambda m, args, n=name: captured.__setitem__(n, m.quantize_input(args[0])[0].numpy()))
            for name, mod in layers.items()]
        _torch_logits(resnet, x, op)
        for h in hooks:
            h.remove()
        traces = layer_accumulators(debug, x, op, threads=THREADS)
        assert list(traces) == list(layers)
        for name, mod in layers.items():
            t = traces[name]
            lut = resnet.bank.luts[int(mod.assign[op])]
            w = mod.weight_codes()[0]
            codes = torch.from_numpy(t.codes)
            if name == "fc":
                ref = approx_linear_acc(codes, w, lut, signed=False)
            else:
                ref = approx_conv2d_acc(codes, w, lut, mod.stride, mod.pads(), mod.dilation, mod.groups,
                                        pad_code=int(mod.act_qparams()[1]), signed=False)
            assert t.acc.dtype == np.int32
            np.testing.assert_array_equal(t.acc, ref.numpy(), err_msg=f"{name} OP {op}")
            # PyTorch inference computes the exported epilogue, so every layer's codes are identical too
            np.testing.assert_array_equal(captured[name], t.codes, err_msg=f"codes of {name} OP {op}")


def test_end_to_end_agreement_every_op(resnet, session, inputs):
    """onnxruntime == PyTorch inference (APPROX, eval, no gradients) bit for bit at every OP, with
    per-OP BatchNorm folded into the layers; switching operating_point changes the output."""
    outs = []
    for op in range(3):
        ref = _torch_logits(resnet, inputs, op)
        y = run_onnxruntime(session, inputs, operating_point=op, batch_size=50)
        assert y.shape == ref.shape == (300, 10) and y.dtype == np.float32
        assert np.array_equal(y, ref), (op, int(np.any(y != ref, 1).sum()), float(np.abs(y - ref).max()))
        outs.append(y)
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[0], outs[2])


def _slot_kinds(layer) -> tuple[str, ...]:
    """The per-OP slot inputs of an exported layer: its table and its epilogue's tensors."""
    if layer.output:
        return ("lut", "out_bias", "out_scale")
    if layer.residual:
        return ("lut", "rq_mult", "rq_skip_mult", "rq_offset", "rq_shift", "rq_zero")
    if layer.requantizes_into is not None:
        return ("lut", "rq_mult", "rq_offset", "rq_shift", "rq_zero")
    return ("lut", "scale", "shift")


def test_slots_variant_matches(resnet, exported, session):
    x = torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    ex = export_onnx(resnet, slots=True)
    check_model(ex)
    model = ex.model
    names = [info.name for info in resnet.approx_layers()]
    expected = ["input"] + [f"slot.{layer.name}.{k}" for layer in ex.layers for k in _slot_kinds(layer)]
    assert [i.name for i in model.graph.input] == expected
    assert "operating_point" not in {i.name for i in model.graph.input}
    assert set(ex.slots) == set(expected[1:]) and all(len(v) == 3 for v in ex.slots.values())
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert shapes["slot.conv1.lut"] == [256, 256] and shapes["slot.layer3.0.conv2.rq_skip_mult"] == [64, 1, 1]
    assert shapes["slot.fc.out_bias"] == shapes["slot.fc.out_scale"] == [10]
    inits = {t.name for t in model.graph.initializer}
    assert "luts" not in inits and "conv1.weight_codes" in inits and not any(n.endswith("assign") for n in inits)
    slot_sess = make_session(ex, threads=THREADS)
    for op in range(3):
        feed = ex.slot_feed(op)
        np.testing.assert_array_equal(feed["slot.layer1.0.conv2.lut"],
                                      resnet.bank.luts[resnet.assignment()[op][2]].numpy())
        full = run_onnxruntime(session, x, operating_point=op)
        np.testing.assert_array_equal(run_onnxruntime(slot_sess, x, slots=feed), full)
    with pytest.raises(QosError, match="slot"):
        run_onnxruntime(slot_sess, x)
    with pytest.raises(QosError, match="out of range"):
        ex.slot_feed(3)
    with pytest.raises(QosError, match="operating_point"):
        run_onnxruntime(session, x)


# --- zoo and a network with every supported float op -------------------------------------------------

@pytest.mark.parametrize("arch", ["mobilenetv2", "lenet5", "resnet20"])
def test_zoo_models_export_and_agree(arch: str):
    """Untrained zoo models with the strong circuit set: identical accumulators at every layer,
    logits close to PyTorch's (float drift only) at every OP."""
    torch.manual_seed(1)
    kw = {"width_mult": 0.25, "small_input": True} if arch == "mobilenetv2" else {}
    channels, size = (3, 16) if arch == "mobilenetv2" else (1, 16)
    qnet = wrap_model(build_model(arch, 10, in_channels=channels, input_size=size, **kw),
                      [get(n) for n in STRONG], num_ops=2)
    _assign(qnet, seed=2)
    gen = torch.Generator().manual_seed(5)
    _calibrate(qnet, torch.rand(32, channels, size, size, generator=gen))
    ex = export_onnx(qnet, debug=True)
    check_model(ex)
    assert ex.input_shape == (channels, size, size)
    x = torch.rand(8, channels, size, size, generator=gen)
    sess = make_session(ex, threads=THREADS)
    for op in range(2):
        ref = _torch_logits(qnet, x, op)
        y = run_onnxruntime(sess, x, operating_point=op)
        assert (y.argmax(1) == ref.argmax(1)).mean() >= 7 / 8
        assert np.abs(y - ref).mean() <= 1e-2 * np.abs(ref).max()
    traces = layer_accumulators(ex, x[:1], 1, threads=THREADS)
    assert list(traces) == [info.name for info in qnet.approx_layers()]
    for info in qnet.approx_layers():
        mod, t = info.module, traces[info.name]
        lut = qnet.bank.luts[int(mod.assign[1])]
        codes, w = torch.from_numpy(t.codes), mod.weight_codes()[0]
        ref = (approx_linear_acc(codes, w, lut, signed=False) if info.kind == "linear" else
               approx_conv2d_acc(codes, w, lut, mod.stride, mod.pads(), mod.dilation, mod.groups,
                                 pad_code=int(mod.act_qparams()[1]), signed=False))
        np.testing.assert_array_equal(t.acc, ref.numpy(), err_msg=info.name)


class _Mixed(nn.Module):
    """Grouped conv with O/G > 1, asymmetric/string padding, standalone BN, pooling, cat, slicing, view."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True)
        self.bn0 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, (3, 2), padding="same", dilation=(1, 2), groups=2, bias=True)
        self.pre_bn = nn.BatchNorm2d(8)  # standalone: its input is a sum, not an approximate layer
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn_dw = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Linear(32, 24), nn.ReLU(inplace=True), nn.Dropout(0.1), nn.Linear(24, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn0(self.stem(x)))
        y = self.pre_bn(x + self.grouped(x))
        z = torch.relu(self.bn_dw(self.dw(y)))
        z = torch.cat([z[:, :4], F.avg_pool2d(z, 3, stride=1, padding=1)[:, 4:]], dim=1)
        z = self.pool(z)
        return self.head(z.view(z.size(0), -1))


@pytest.mark.parametrize("signed,per_channel", [(True, True), (False, True), (True, False)])
def test_mixed_network_signed_per_channel(signed: bool, per_channel: bool):
    torch.manual_seed(2)
    names = SIGNED if signed else UNSIGNED
    qnet = wrap_model(_Mixed(), [get(n) for n in names], num_ops=3, qconfig=QuantConfig(per_channel=per_channel))
    _assign(qnet, seed=3)
    gen = torch.Generator().manual_seed(6)
    _calibrate(qnet, torch.randn(48, 3, 8, 8, generator=gen))
    ex = export_onnx(qnet, input_shape=(3, 8, 8), debug=True)
    check_model(ex)
    layers = {layer.name: layer for layer in ex.layers}
    assert layers["stem"].folded_bn == "bn0" and layers["grouped"].folded_bn is None
    assert layers["grouped"].attrs["pads"] == [1, 1, 1, 1] and layers["grouped"].attrs["group"] == 2
    assert layers["stem"].w_zero_point.shape == ((8,) if per_channel else ())
    assert all(layer.signed is signed for layer in ex.layers)
    x = torch.randn(16, 3, 8, 8, generator=gen)
    sess = make_session(ex, threads=THREADS)
    slots = export_onnx(qnet, input_shape=(3, 8, 8), slots=True)
    order = [i.name for i in slots.model.graph.input]
    kinds = {layer.name: _slot_kinds(layer) for layer in slots.layers}
    assert layers["head.0"].requantizes_into == "head.3"           # linear -> ReLU -> linear: integer-only
    assert order == ["input"] + [f"slot.{n}.{k}" for n in ("stem", "grouped") for k in kinds[n]] + [
        "slot.pre_bn.scale", "slot.pre_bn.shift"] + [f"slot.{n}.{k}" for n in ("dw", "head.0", "head.3")
                                                     for k in kinds[n]]
    assert slots.slots["slot.pre_bn.scale"][0].shape == (8, 1, 1)
    slot_sess = make_session(slots, threads=THREADS)
    for op in range(3):
        ref = _torch_logits(qnet, x, op)
        y = run_onnxruntime(sess, x, operating_point=op)
        assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.9
        np.testing.assert_allclose(y, ref, atol=0.05 * np.abs(ref).max())
        np.testing.assert_array_equal(run_onnxruntime(slot_sess, x, slots=slots.slot_feed(op)), y)
        traces = layer_accumulators(ex, x[:4], op)
        for info in qnet.approx_layers():
            mod, t = info.module, traces[info.name]
            assert t.codes.dtype == (np.int8 if signed else np.uint8)
            lut = qnet.bank.luts[int(mod.assign[op])]
            codes, w = torch.from_numpy(t.codes), mod.weight_codes()[0]
            ref_acc = (approx_linear_acc(codes, w, lut, signed=signed) if info.kind == "linear" else
                       approx_conv2d_acc(codes, w, lut, mod.stride, mod.pads(), mod.dilation, mod.groups,
                                         pad_code=int(mod.act_qparams()[1]), signed=signed))
            np.testing.assert_array_equal(t.acc, ref_acc.numpy(), err_msg=f"{info.name} OP {op}")


def test_quantize_linear_variant(resnet):
    """The standard QuantizeLinear divides by the scale: same model otherwise, codes may differ at ties."""
    ex = export_onnx(resnet, quantize="QuantizeLinear")
    check_model(ex)
    # only the network's input is quantized: every other layer's codes the layer before requantizes
    assert sum(n.op_type == "QuantizeLinear" for n in ex.model.graph.node) == 8 - 7
    assert sum(layer.requantizes_into is not None for layer in ex.layers) == 7
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(9))
    y = run_onnxruntime(ex, x, operating_point=1, threads=THREADS)
    assert (y.argmax(1) == _torch_logits(resnet, x, 1).argmax(1)).all()


def test_round_half_to_even_like_pytorch(resnet):
    """Inputs whose scaled value x * (1/s) is exactly k + 1/2 quantize like PyTorch (half to even
    on the float32 product), where QuantizeLinear's x / s could round the other way."""
    layer = resnet.net.conv1
    s, _ = layer.act_qparams()
    inv = np.float32((1.0 / s).item())
    ties = []
    for k in range(-40, 200):
        x = np.float32((k + 0.5) / float(inv))
        for _ in range(4):  # walk to an x whose float32 product is exactly the tie
            prod = np.float32(x * inv)
            if prod == np.float32(k + 0.5):
                ties.append(x)
                break
            x = np.nextafter(x, np.float32(np.inf) if prod < k + 0.5 else np.float32(-np.inf))
    assert len(ties) >= 100
    x = torch.from_numpy(np.resize(np.array(ties, np.float32), 256).reshape(1, 1, 16, 16))
    traces = layer_accumulators(export_onnx(resnet, debug=True), x, 0, threads=THREADS)
    np.testing.assert_array_equal(traces["conv1"].codes, layer.quantize_input(x)[0].numpy())


# --- errors -------------------------------------------------------------------------------------

class _WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.encoder = nn.Sequential(nn.Identity(), nn.Identity(), nn.Identity(), nn.LSTM(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.conv(x))


class _Sorts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sort(self.conv(x), dim=1)[0]


def _forward_line(cls: type) -> str:
    """`` (test_onnx_export.py:N: <code>)`` for the one-line forward of ``cls``."""
    lines, start = inspect.getsourcelines(cls.forward)
    return f" (test_onnx_export.py:{start + 1}: {lines[1].strip()})"


def test_unsupported_layer_names_it_and_where():
    """wrap_model refuses ops outside the allowlist up front (op, where, the user's source line); a network
    wrapped with strict=False (emulation only) gets the same from the exporter."""
    with pytest.raises(QosError) as err:
        wrap_model(_WithLSTM(), num_ops=2)
    assert str(err.value) == "unsupported layer nn.LSTM at net.encoder.3" + _forward_line(_WithLSTM)
    qnet = wrap_model(_WithLSTM(), num_ops=2, strict=False)
    qnet.eval()
    with torch.no_grad():
        qnet.net.conv(torch.zeros(1, 1, 8, 8))  # calibrates the only approximate layer
    with pytest.raises(QosError) as err:
        export_onnx(qnet, input_shape=(1, 8, 8))
    assert str(err.value) == "unsupported layer nn.LSTM at net.encoder.3" + _forward_line(_WithLSTM)

    with pytest.raises(QosError) as err:
        wrap_model(_Sorts(), num_ops=1)
    assert str(err.value) == "unsupported function torch.sort at net (sort)" + _forward_line(_Sorts)
    qnet = wrap_model(_Sorts(), num_ops=1, strict=False)
    with pytest.raises(QosError) as err:
        export_onnx(qnet, input_shape=(1, 8, 8))
    assert str(err.value) == "unsupported function torch.sort at net" + _forward_line(_Sorts)


def test_export_errors(resnet, tmp_path):
    fresh = wrap_model(build_model("lenet5", 10, in_channels=1, input_size=16), num_ops=1)
    with pytest.raises(QosError, match="no calibrated activation range"):
        export_onnx(fresh)
    with pytest.raises(QosError, match="QoSNet"):
        export_onnx(resnet.net)
    with pytest.raises(QosError, match="opset"):
        export_onnx(resnet, opset=13)
    with pytest.raises(QosError, match="quantize"):
        export_onnx(resnet, quantize="nearest")
    with pytest.raises(QosError, match="debug=True"):
        layer_accumulators(export_onnx(resnet), torch.zeros(1, 1, 16, 16), 0)
    with pytest.raises(QosError, match="cannot read"):
        run_onnxruntime(tmp_path / "missing.onnx", np.zeros((1, 1, 16, 16), np.float32), 0)
    assert not list(tmp_path.iterdir())


def test_export_leaves_the_qosnet_as_it_was(resnet):
    resnet.train()
    resnet.set_mode(Mode.QUANT)
    resnet.set_operating_point(2)
    before = {k: v.clone() for k, v in resnet.state_dict().items() if isinstance(v, torch.Tensor)}
    try:
        export_onnx(resnet, slots=True)
        assert resnet.training and resnet.mode == Mode.QUANT and resnet.operating_point == 2
        assert all(m.training for m in resnet.modules())
        assert all(info.module.mode == Mode.QUANT for info in resnet.approx_layers())
        after = resnet.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        resnet.eval()
        resnet.set_mode(Mode.APPROX)
        resnet.set_operating_point(0)


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.conv(x))


def test_shared_layer_is_refused():
    qnet = wrap_model(_Twice(), num_ops=1)
    qnet.eval()
    qnet.set_mode(Mode.QUANT)
    qnet(torch.rand(1, 2, 6, 6))  # eval: the first input initialises the observer
    with pytest.raises(QosError, match="called more than once"):
        export_onnx(qnet, input_shape=(2, 6, 6))


def test_exact_signed_bank_roundtrip_from_path(tmp_path):
    """A signed, exact-circuit network run from the written file equals PyTorch bit for bit where
    no BatchNorm is folded (LeNet: y = q * s + bias in both)."""
    torch.manual_seed(4)
    qnet = wrap_model(build_model("lenet5", 10, in_channels=1, input_size=16), [bundled().exact(True)], num_ops=1)
    _calibrate(qnet, torch.rand(32, 1, 16, 16, generator=torch.Generator().manual_seed(8)))
    path = tmp_path / "sub" / "lenet.onnx"
    ex = export_onnx(qnet, path)
    assert ex.path == path and path.exists()
    x = torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(9))
    np.testing.assert_array_equal(run_onnxruntime(path, x, 0, threads=THREADS), _torch_logits(qnet, x, 0))
