"""Checking exported models and running them in stock onnxruntime."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from ..errors import QosError
from .export import INPUT_NAME, OP_INPUT_NAME, OUTPUT_NAME, OnnxExport, export_onnx

__all__ = ["check_model", "make_session", "run_onnxruntime", "layer_accumulators", "LayerTrace"]

ModelLike = Any  # OnnxExport | onnx.ModelProto | str | Path | onnxruntime.InferenceSession


def _as_model(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, OnnxExport):
        return model.model
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, Path)):
        try:
            return onnx.load(str(model))
        except Exception as exc:  # noqa: BLE001 - protobuf / IO errors
            raise QosError(f"cannot read ONNX model {model}: {exc}") from None
    raise QosError(f"expected an ONNX model, a path or an OnnxExport, got {type(model).__name__}")


def check_model(model: ModelLike) -> None:
    """``onnx.checker.check_model(full_check=True)`` (strict shape inference included);
    QosError with the checker's message if the model is invalid."""
    m = _as_model(model)
    try:
        onnx.checker.check_model(m, full_check=True)
    except Exception as exc:  # noqa: BLE001 - ValidationError, InferenceError
        raise QosError(f"invalid ONNX model: {str(exc).strip().splitlines()[0]}") from None


def make_session(model: ModelLike, threads: int | None = None) -> Any:
    """An onnxruntime CPU ``InferenceSession`` (no custom-op library: the model's functions
    define the ai.qosnets ops). ``threads``: intra-op threads (default: onnxruntime's).
    Idle worker threads sleep instead of spinning (friendlier on shared machines)."""
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    data = _as_model(model).SerializeToString()
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise QosError(f"onnxruntime cannot load the model: {str(exc).strip().splitlines()[0]}") from None


def _feed(sess: Any, x: Any, operating_point: int | None, slots: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
    names = [i.name for i in sess.get_inputs()]
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    feed: dict[str, Any] = {INPUT_NAME: np.ascontiguousarray(arr, dtype=np.float32)}
    if OP_INPUT_NAME in names:
        if operating_point is None:
            raise QosError("this model selects its OP at run time: pass operating_point")
        if isinstance(operating_point, bool) or not isinstance(operating_point, (int, np.integer)):
            raise QosError(f"operating_point must be an integer, got {operating_point!r}")
        feed[OP_INPUT_NAME] = np.array(int(operating_point), dtype=np.int64)
    elif operating_point is not None and slots is None:
        raise QosError("this model has slot inputs, not an operating_point input: pass slots=export.slot_feed(op)")
    wanted = [n for n in names if n.startswith("slot.")]
    if wanted:
        if slots is None:
            raise QosError("this model needs its slot inputs: pass slots=export.slot_feed(op)")
        missing = [n for n in wanted if n not in slots]
        if missing:
            raise QosError(f"missing slot inputs: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        for n in wanted:
            feed[n] = np.asarray(slots[n])
    return feed


def _run(sess: Any, x: Any, operating_point: int | None, slots: Mapping[str, np.ndarray] | None,
         outputs: list[str] | None, batch_size: int) -> list[np.ndarray]:
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if arr.ndim < 2:
        raise QosError(f"input must have a batch axis, got shape {arr.shape}")
    chunks: list[list[np.ndarray]] = []
    step = max(1, int(batch_size))
    for i in range(0, arr.shape[0], step):
        feed = _feed(sess, arr[i:i + step], operating_point, slots)
        try:
            chunks.append(sess.run(outputs, feed))
        except Exception as exc:  # noqa: BLE001
            raise QosError(f"onnxruntime failed: {str(exc).strip().splitlines()[0]}") from None
    if not chunks:
        raise QosError("empty input batch")
    return [np.concatenate([c[k] for c in chunks], axis=0) for k in range(len(chunks[0]))]


def run_onnxruntime(model: ModelLike, x: Any, operating_point: int | None = None,
                    slots: Mapping[str, np.ndarray] | None = None, *, batch_size: int = 16,
                    threads: int | None = None) -> np.ndarray:
    """Run an exported model in onnxruntime and return its output (float32).

    ``model``: OnnxExport, ModelProto, path or an existing InferenceSession (reuse one for
    repeated calls); ``x``: (N, C, H, W) array or tensor; ``operating_point`` for the
    default variant, ``slots`` (``export.slot_feed(op)``) for the slots variant. The batch
    is run in chunks of ``batch_size`` (the reference function bodies need
    O(batch * MACs) memory).
    """
    sess = make_session(model, threads)
    return _run(sess, x, operating_point, slots, [OUTPUT_NAME], batch_size)[0]


@dataclass(frozen=True)
class LayerTrace:
    """One approximate layer in onnxruntime: its input codes and int32 accumulators."""

    codes: np.ndarray
    acc: np.ndarray


def layer_accumulators(source: Any, x: Any, operating_point: int | None = None,
                       slots: Mapping[str, np.ndarray] | None = None, *, input_shape: Any = None,
                       batch_size: int = 16, threads: int | None = None) -> dict[str, LayerTrace]:
    """Every approximate layer's input codes and int32 accumulators computed by onnxruntime.

    ``source``: a model exported with ``debug=True`` (OnnxExport, ModelProto or path), or a
    QoSNet (exported here, in memory, with ``debug=True``; ``input_shape`` as for
    ``export_onnx``). Returns ``{layer name: LayerTrace(codes, acc)}`` in layer order.
    """
    from ..nn.wrap import QoSNet

    if isinstance(source, QoSNet):
        source = export_onnx(source, input_shape=input_shape, debug=True)
    model = _as_model(source)
    outs = [o.name for o in model.graph.output]
    layers = [n[:-len(".acc")] for n in outs if n.endswith(".acc") and n[:-len(".acc")] + ".codes" in outs]
    if not layers:
        raise QosError("the model has no accumulator outputs: export it with debug=True")
    names = [n for layer in layers for n in (f"{layer}.codes", f"{layer}.acc")]
    sess = make_session(model, threads)
    values = _run(sess, x, operating_point, slots, names, batch_size)
    return {layer: LayerTrace(values[2 * i], values[2 * i + 1]) for i, layer in enumerate(layers)}
