"""Baselines the approximate kernels are compared against, all measured in the same run.

* ``float``: the float network in PyTorch (eval, no grad).
* ``ort-int8``: the exact-int8 network in onnxruntime. The float network is exported with
  PyTorch's TorchScript ONNX exporter (``torch.onnx.export(..., dynamo=False)``: offline, no
  ``onnxscript`` needed), then quantized statically with
  ``onnxruntime.quantization.quantize_static`` (QOperator format: QLinearConv / QGemm or
  MatMulInteger-based ops, u8 activations x s8 weights, MinMax calibration). Its QLinearConv
  was the fastest exact int8 conv measured on the development hosts (VNNI where present):
  the practical limit for an exact int8 layer on a CPU.
* ``tvm-exact-layers``: TVM's exact-product int8 conv kernel
  (``qos_compile.tvm.kernels.exact_conv2d``) for every conv layer shape of the network,
  built for the host; the sum of per-layer times is a layer-level baseline (it leaves out
  the glue between layers, BN/ReLU, pooling and the classifier).

A QAT / QoS network (``ApproxConv2d``/``ApproxLinear`` layers) is benchmarked as the plain
float network with the same weights (``plain_float``); see the caveats there.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import QosError
from ..runtime_env import import_tvm
from .timing import Timing, measure


# --------------------------------------------------------------------------- helpers
def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, (tuple, list)):          # (images, labels) batches
        x = x[0]
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def plain_float(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every Conv2d/Linear *subclass* (e.g. ApproxConv2d) replaced by
    the plain layer with the same weights and bias, so the copy runs and exports as a float network.

    Per-OP BatchNorm modules are kept as they are (they must run/export as ordinary modules).
    """
    m = copy.deepcopy(model).eval()

    def plain(layer: nn.Module) -> nn.Module | None:
        if isinstance(layer, nn.Conv2d) and type(layer) is not nn.Conv2d:
            new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                            layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                            layer.padding_mode)
        elif isinstance(layer, nn.Linear) and type(layer) is not nn.Linear:
            new = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
        else:
            return None
        with torch.no_grad():
            new.weight.copy_(layer.weight.detach().float())
            bias = layer.current_bias() if hasattr(layer, "current_bias") else layer.bias
            if new.bias is not None and bias is not None:
                new.bias.copy_(bias.detach().float().reshape(-1))
        return new.eval()

    for name, child in list(m.named_modules()):
        for cname, sub in list(child.named_children()):
            rep = plain(sub)
            if rep is not None:
                setattr(child, cname, rep)
    return m


# --------------------------------------------------------------------------- (a) float torch
def float_latency(model: nn.Module, x: Any, repeats: int = 20, warmup: int = 2, threads: int | None = None) -> Timing:
    """Latency of the float model in PyTorch (eval, no grad) on input ``x`` (a batch)."""
    return measure({"float": float_runner(model, x, threads)}, repeats, warmup)["float"]


def float_runner(model: nn.Module, x: Any, threads: int | None = None):
    m = plain_float(model)
    xt = _as_tensor(x).float()
    if threads:
        torch.set_num_threads(int(threads))

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return m(xt)
    return run


# --------------------------------------------------------------------------- (b) onnxruntime int8
def export_float_onnx(model: nn.Module, input_shape: Sequence[int], path: str | os.PathLike[str],
                      opset: int = 17) -> Path:
    """Export the float network to ONNX (TorchScript exporter, dynamic batch). Offline; no onnxscript."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = plain_float(model)
    dummy = torch.zeros(tuple(int(v) for v in input_shape), dtype=torch.float32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, (dummy,), str(path), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as e:  # noqa: BLE001 - torch raises many types
        raise QosError(f"could not export the float network to ONNX: {str(e).strip().splitlines()[0]}") from None
    _inline_identity_initializers(path)
    onnx.checker.check_model(str(path))
    return path


def _inline_identity_initializers(path: Path) -> None:
    """The TorchScript exporter shares equal constants (e.g. folded BN biases) through ``Identity``
    nodes; onnxruntime's quantizer wants a Conv's bias to be an initializer. Copy them instead."""
    import onnx

    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    keep = []
    for n in m.graph.node:
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in {o.name for o in m.graph.output}:
            t = onnx.TensorProto()
            t.CopyFrom(inits[n.input[0]])
            t.name = n.output[0]
            m.graph.initializer.append(t)
            inits[t.name] = t
        else:
            keep.append(n)
    if len(keep) != len(m.graph.node):
        del m.graph.node[:]
        m.graph.node.extend(keep)
        onnx.save(m, str(path))


class _CalibReader:
    """onnxruntime CalibrationDataReader over batches of float inputs."""

    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self.input_name = input_name
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        b = next(self._it, None)
        return None if b is None else {self.input_name: b}


def _calib_batches(calib: Any, max_batches: int) -> list[np.ndarray]:
    if isinstance(calib, (torch.Tensor, np.ndarray)):
        a = np.asarray(calib.detach().cpu().numpy() if isinstance(calib, torch.Tensor) else calib, np.float32)
        return [a[i:i + 16] for i in range(0, min(len(a), 16 * max_batches), 16)]
    out = []
    for b in calib:
        out.append(np.ascontiguousarray(_as_tensor(b).detach().cpu().numpy().astype(np.float32)))
        if len(out) >= max_batches:
            break
    if not out:
        raise QosError("empty calibration data")
    return out


@contextlib.contextmanager
def _root_log_level(level: int) -> Iterator[None]:
    root = logging.getLogger()
    old = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(old)


def ort_int8_model(model: nn.Module, calib: Any, path: str | os.PathLike[str], *, per_channel: bool = False,
                   fmt: str = "qoperator", max_calib_batches: int = 8) -> Path:
    """Export ``model`` to float ONNX and quantize it statically (u8 activations, s8 weights) to ``path``.

    ``calib``: a tensor/array of inputs (N, C, H, W) or an iterable of batches (or (x, y) pairs).
    ``fmt``: "qoperator" (QLinearConv/QGemm...) or "qdq" (QuantizeLinear/DequantizeLinear around Conv).
    The float model is kept next to it as ``<stem>.float.onnx``.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    path = Path(path)
    batches = _calib_batches(calib, max_calib_batches)
    float_path = path.with_name(path.stem + ".float.onnx")
    export_float_onnx(model, (1, *batches[0].shape[1:]), float_path)
    qf = {"qoperator": QuantFormat.QOperator, "qdq": QuantFormat.QDQ}.get(fmt)
    if qf is None:
        raise QosError(f"unknown quantization format {fmt!r}; use qoperator or qdq")
    try:
        # the quantizer prints tensor protos and logs shape-inference advice on the root logger
        with contextlib.redirect_stdout(io.StringIO()), _root_log_level(logging.ERROR):
            quantize_static(str(float_path), str(path), _CalibReader("input", batches), quant_format=qf,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            per_channel=per_channel, calibrate_method=CalibrationMethod.MinMax)
    except Exception as e:  # noqa: BLE001
        raise QosError(f"onnxruntime could not quantize {float_path.name}: {str(e).strip().splitlines()[0]}") from None
    return path


def ort_session(path: str | os.PathLike[str], threads: int = 1):
    """An onnxruntime CPU session with ``intra_op_num_threads`` (and inter-op 1) set explicitly."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_runner(path: str | os.PathLike[str], x: Any, threads: int = 1):
    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    feed = {name: np.ascontiguousarray(_as_tensor(x).detach().cpu().numpy().astype(np.float32))}
    return lambda: sess.run(None, feed)[0]


def ort_latency(path: str | os.PathLike[str], x: Any, repeats: int = 20, threads: int = 1, warmup: int = 2) -> Timing:
    """Latency of the ONNX model at ``path`` on input batch ``x`` in onnxruntime."""
    return measure({"ort": ort_runner(path, x, threads)}, repeats, warmup)["ort"]


def ort_predict(path: str | os.PathLike[str], x: Any, threads: int = 1) -> np.ndarray:
    """Logits of the ONNX model for batch ``x``."""
    return ort_runner(path, x, threads)()


def ort_accuracy(path: str | os.PathLike[str], loader: Iterable[Any], threads: int = 1) -> float:
    """Top-1 accuracy of the ONNX model over ``loader`` ((images, labels) batches)."""
    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    right = total = 0
    for xb, yb in loader:
        logits = sess.run(None, {name: _as_tensor(xb).detach().cpu().numpy().astype(np.float32)})[0]
        y = np.asarray(yb.detach().cpu().numpy() if isinstance(yb, torch.Tensor) else yb)
        right += int((logits.argmax(1) == y).sum())
        total += len(y)
    if total == 0:
        raise QosError("empty evaluation data")
    return right / total


def onnx_op_types(path: str | os.PathLike[str]) -> dict[str, int]:
    """How many nodes of each op type the ONNX model has."""
    import onnx

    counts: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


# --------------------------------------------------------------------------- (c) TVM exact layers
@dataclass
class ConvLayer:
    name: str
    spec: Any                     # qos_compile.tvm.kernels.ConvSpec


def conv_layers(model: nn.Module, input_shape: Sequence[int]) -> list[ConvLayer]:
    """Every Conv2d of ``model`` with the shapes it sees for an input of ``input_shape`` (forward order)."""
    from ..tvm.kernels import ConvSpec

    m = plain_float(model)
    found: list[ConvLayer] = []
    hooks = []
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Conv2d):
            def hook(mod, inp, out, name=name):
                if isinstance(mod.padding, str):
                    raise QosError(f"conv {name}: string padding {mod.padding!r} is not supported here")
                ph, pw = mod.padding
                found.append(ConvLayer(name, ConvSpec.make(tuple(inp[0].shape), tuple(mod.weight.shape),
                                                           mod.stride, (ph, pw, ph, pw), mod.dilation,
                                                           mod.groups, 0, False)))
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            m(torch.zeros(tuple(int(v) for v in input_shape)))
    finally:
        for h in hooks:
            h.remove()
    return found


@dataclass
class LayerTimes:
    """Per-layer TVM exact-conv times and their sum (the layer-level baseline), ms."""

    layers: dict[str, Timing]
    total: Timing                 # the whole sequence of layers run back to back, per call
    sum_of_medians_ms: float
    specs: dict[str, Any] = field(default_factory=dict)


class TvmExactLayers:
    """TVM exact int8 conv kernels for a list of conv layers, built once for the host."""

    def __init__(self, layers: Sequence[ConvLayer], target: str = "x86_64", threads: int | None = None,
                 seed: int = 0) -> None:
        from ..tvm.build import build_kernels, set_host_threads
        from ..tvm.kernels import exact_conv2d_func

        tvm = import_tvm()
        if not layers:
            raise QosError("the network has no conv layers")
        if threads:
            set_host_threads(threads)
        uniq: dict[Any, str] = {}
        for lay in layers:
            uniq.setdefault(lay.spec, f"exact{len(uniq)}")
        self.built = build_kernels({k: exact_conv2d_func(s, target) for s, k in uniq.items()}, target)
        if self.built.module is None:
            raise QosError(f"target {target} is not the host; TVM exact layer times need a host build")
        dev, rng = tvm.cpu(), np.random.default_rng(seed)
        self.layers = list(layers)
        self.calls = {}
        for lay in self.layers:
            s = lay.spec
            args = (tvm.runtime.tensor(rng.integers(0, 256, s.x_shape, dtype=np.uint8), dev),
                    tvm.runtime.tensor(rng.integers(0, 256, s.w_shape, dtype=np.uint8), dev),
                    tvm.runtime.tensor(np.zeros(s.out_shape, np.int32), dev))
            fn = self.built.module[self.built.symbols[uniq[s]]]
            self.calls[lay.name] = (fn, args)

    def run_all(self) -> None:
        for fn, args in self.calls.values():
            fn(*args)

    def runner(self, name: str):
        fn, args = self.calls[name]
        return lambda: fn(*args)


def tvm_exact_layer_times(model_or_layers: nn.Module | Sequence[ConvLayer], input_shape: Sequence[int] | None = None,
                          target: str = "x86_64", repeats: int = 20, warmup: int = 2,
                          threads: int | None = None) -> LayerTimes:
    """Time TVM's exact int8 conv for every conv layer shape (host build); per layer and summed."""
    if isinstance(model_or_layers, nn.Module):
        if input_shape is None:
            raise QosError("input_shape is needed to find the conv layer shapes of a network")
        layers = conv_layers(model_or_layers, input_shape)
    else:
        layers = list(model_or_layers)
    t = TvmExactLayers(layers, target, threads)
    fns = {lay.name: t.runner(lay.name) for lay in layers}
    fns["__all__"] = t.run_all
    res = measure(fns, repeats, warmup)
    total = res.pop("__all__")
    return LayerTimes(res, total, sum(v.median_ms for v in res.values()), {lay.name: lay.spec for lay in layers})


# --------------------------------------------------------------------------- all together
@dataclass
class BaselineReport:
    timings: dict[str, Timing]            # float, ort-int8 (+ ort-float), tvm-exact-layers: per batch
    int8_path: Path
    int8_op_types: dict[str, int]
    batch: int
    threads: int
    top1_agreement: float                 # ORT int8 vs float top-1 on the timed batch

    def rows(self) -> list[dict[str, Any]]:
        return [{"baseline": k, "ms per batch (median, IQR)": v, "batch": self.batch, "threads": self.threads}
                for k, v in self.timings.items()]


def measure_baselines(model: nn.Module, x: Any, calib: Any, workdir: str | os.PathLike[str], repeats: int = 20,
                      threads: int = 1, warmup: int = 2, with_tvm: bool = True, with_ort_float: bool = True,
                      fmt: str = "qoperator") -> BaselineReport:
    """Measure every baseline on batch ``x`` in one interleaved run (same load for every row)."""
    workdir = Path(workdir)
    xt = _as_tensor(x).float()
    int8 = ort_int8_model(model, calib, workdir / "model.int8.onnx", fmt=fmt)
    fns = {"float torch": float_runner(model, xt, threads), "ort int8": ort_runner(int8, xt, threads)}
    if with_ort_float:
        fns["ort float"] = ort_runner(int8.with_name(int8.stem + ".float.onnx"), xt, threads)
    if with_tvm:
        tvm_layers = TvmExactLayers(conv_layers(model, tuple(xt.shape)), threads=threads)
        fns["tvm exact conv layers (sum)"] = tvm_layers.run_all
    ref = fns["float torch"]().argmax(1).numpy()
    agree = float((fns["ort int8"]().argmax(1) == ref).mean())
    timings = measure(fns, repeats, warmup)
    return BaselineReport(timings, int8, onnx_op_types(int8), int(xt.shape[0]), int(threads), agree)


def _main(argv: Sequence[str] | None = None) -> None:   # python -m qos_compile.bench.baselines
    import argparse
    import tempfile

    from ..models import build_model
    from .timing import format_table

    ap = argparse.ArgumentParser(description="float / ORT int8 / TVM exact baselines on an untrained zoo net")
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    net = build_model(a.model, 10, a.channels, a.size).eval()
    calib = torch.rand(64, a.channels, a.size, a.size)
    x = torch.rand(a.batch, a.channels, a.size, a.size)
    with tempfile.TemporaryDirectory() as d:
        rep = measure_baselines(net, x, calib, d, a.repeats, a.threads)
    print(f"{a.model} {a.channels}x{a.size}x{a.size}, batch {a.batch}, {a.threads} thread(s); "
          f"int8 ops: {rep.int8_op_types}; top-1 agreement int8 vs float {rep.top1_agreement:.2f}")
    print(format_table(rep.rows()))


if __name__ == "__main__":
    _main()
