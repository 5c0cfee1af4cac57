"""The QoS model file (``model.pt``): a QoSNet with everything needed to rebuild, evaluate and compile it.

Stored with :mod:`qos_compile.checkpoint` (a plain ``torch.save`` archive holding only
tensors and a JSON text, loaded with ``weights_only=True``; never executes code):

* tensors: every tensor of the state dict that the recorded architecture rebuilds (shared
  weights, per-OP BatchNorm copies and bias rows, ``assign`` buffers, observer ranges, AGN
  σ's, the bank's tables ``bank.luts``);
* meta (JSON, typed and versioned by :mod:`qos_compile.model_schema`, docs/model_pt.md): the
  architecture as data (``nn.graph.capture``: torch.fx graph + allowlisted module settings),
  input and output shape, quantization, bank, layers, assignment, extra state, versions, and
  what the stages recorded (``ops``, ``search``, ``finetune``, ``baseline``, ``provenance``...).

:func:`save_qos_model` checks before writing that the record rebuilds exactly the state it
saves, so a written file always loads. :func:`load_qos_model` validates the meta completely
(:func:`qos_compile.model_schema.parse`), rebuilds the network from the record (importing no
user code: the user's class need not exist), wraps it, verifies every table against its
SHA-256, loads the state with ``strict=True`` and returns it in APPROX mode, eval mode,
OP 0. Any problem is one QosError line. Version-1 files (model zoo only) still load.

Float (pre-QAT) stage files use the same container and schema with ``kind`` =
``"qos-float-model"`` (:func:`save_float_model` / :func:`load_float_model`).
"""
from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from . import __version__
from .checkpoint import load_checkpoint, save_checkpoint, verify_tables
from .errors import QosError
from .model_schema import FLOAT_KIND, FORMAT_VERSION, KIND, STRUCTURAL, Circuit, ModelMeta, check_architecture, parse
from .multipliers import Multiplier, bundled
from .nn import Mode, QoSNet, wrap_model
from .nn.graph import capture, rebuild

__all__ = ["KIND", "FLOAT_KIND", "FORMAT_VERSION", "save_qos_model", "load_qos_model", "qos_model_meta",
           "save_float_model", "load_float_model", "versions", "is_qos_model_file"]

_STRICT_FALSE = ("the model has no architecture record: it was built with wrap_model(strict=False) or uses an op "
                 "outside the allowlist (docs/model_pt.md), so it can be emulated but not saved or compiled")


def versions() -> dict[str, str]:
    """Versions of the package and its numerical dependencies (provenance)."""
    out = {"qos_compile": __version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version()}
    try:
        import sklearn

        out["scikit_learn"] = sklearn.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _zoo(model: nn.Module) -> dict[str, Any] | None:
    """The model-zoo entry a model was built from (``qos_arch``), kept as provenance."""
    arch = getattr(model, "qos_arch", None)
    return dict(arch) if isinstance(arch, dict) else None


def _zoo_input_shape(zoo: dict[str, Any] | None) -> tuple[int, ...] | None:
    if zoo is None:
        return None
    size = int(zoo.get("input_size", 32))
    return int(zoo.get("in_channels", 3)), size, size


def _shapes(state: dict[str, Any]) -> dict[str, tuple[int, ...] | None]:
    """Key -> tensor shape (None for a non-tensor entry such as a module's extra state)."""
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()}


def _keep_rebuilt(state: dict[str, Any], rebuilt: dict[str, Any], what: str) -> dict[str, Any]:
    """The entries of ``state`` that the rebuilt model has, after checking it has all of them with
    the same shapes (entries of modules the forward never calls are not part of the architecture)."""
    have, want = _shapes(state), _shapes(rebuilt)
    for key, shape in want.items():
        if key.startswith("bank."):   # the probe's bank is a stand-in; the real one is checked on load
            continue
        if key not in have:
            raise QosError(f"cannot save {what}: the architecture record rebuilds {key}, which the model does not "
                           "have (is the model's forward different from its modules?)")
        if shape != have[key]:
            raise QosError(f"cannot save {what}: {key} has shape {have[key]} but the architecture record rebuilds "
                           f"it with shape {shape}")
    return {k: v for k, v in state.items() if k in want}


def _input_shape_of(model: nn.Module, given: Any, what: str) -> tuple[int, ...]:
    shape = given if given is not None else _zoo_input_shape(_zoo(model))
    if shape is None:
        raise QosError(f"cannot save {what}: its input shape is unknown (wrap it with "
                       "wrap_model(..., input_shape=(C, H, W)) or pass input_shape)")
    return tuple(int(v) for v in shape)


def qos_model_meta(qnet: QoSNet, stage: str = "final") -> tuple[dict[str, Any], dict[str, Any]]:
    """The state to save and the structural meta of ``qnet`` (see module doc); QosError unless
    the architecture record rebuilds exactly that state.

    The state is what ``qnet.state_dict()`` holds for the modules the record rebuilds
    (tensors and extra state), and the layers and assignment columns are those layers'.
    """
    if qnet.architecture is None:
        raise QosError(f"cannot save the model: {_STRICT_FALSE}")
    record = qnet.architecture
    input_shape = _input_shape_of(qnet.net, qnet.input_shape, "the model")
    out_shape = check_architecture(record, input_shape).output_shape
    # the probe is the model load_qos_model will build, on the meta device (no memory, no tables)
    with torch.device("meta"):
        probe = wrap_model(rebuild(record), None, num_ops=qnet.num_ops, qconfig=qnet.qconfig)
    state = _keep_rebuilt(qnet.state_dict(), probe.state_dict(), "the model")
    probe_layers = [i.name for i in probe.approx_layers()]
    layers = [i for i in qnet.approx_layers() if i.name in set(probe_layers)]
    if [i.name for i in layers] != probe_layers:
        raise QosError("cannot save the model: its approximate layers differ from the ones its architecture "
                       "record rebuilds")
    columns = [j for j, i in enumerate(qnet.approx_layers()) if i.name in set(probe_layers)]
    bank = qnet.bank
    meta = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "architecture": record,
        "input_shape": list(input_shape),
        "output_shape": list(out_shape),
        "qconfig": dataclasses.asdict(qnet.qconfig),
        "num_ops": qnet.num_ops,
        "layers": [{"name": i.name, "kind": i.kind, "macs": i.macs} for i in layers],
        "bank": [Circuit(n, h, p, bank.signed).to_json() for n, h, p in zip(bank.names, bank.sha256, bank.power_mw)],
        "assign": [[row[j] for j in columns] for row in qnet.assignment()],
        "extra_state": {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)},
        "versions": versions(),
    }
    zoo = _zoo(qnet.net)
    if zoo is not None:
        meta["zoo"] = zoo
    return state, meta


def save_qos_model(path: str | os.PathLike[str], qnet: QoSNet, meta: Mapping[str, Any] | None = None,
                   stage: str = "final") -> None:
    """Write ``qnet`` and ``meta`` (the stages' records: JSON-serialisable, keys other than the
    structural ones, validated by the schema) to ``path`` atomically (a complete new file or the
    old one untouched). QosError when ``qnet`` has no architecture record (``wrap_model(strict=False)``)."""
    state, structural = qos_model_meta(qnet, stage)
    _write(path, state, meta, structural)


def _write(path: str | os.PathLike[str], state: dict[str, Any], meta: Mapping[str, Any] | None,
           structural: dict[str, Any]) -> None:
    out = {k: v for k, v in dict(meta or {}).items() if k not in STRUCTURAL}
    out.update(structural)
    typed = parse(out, source=f"cannot save {os.fspath(path)}")   # what loads, checked before writing
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    save_checkpoint(path, tensors, typed.to_json())


def _fail(path: Any, what: str) -> QosError:
    return QosError(f"{os.fspath(path)}: {what}")


def _multipliers(path: Any, tensors: dict[str, torch.Tensor], bank: tuple[Circuit, ...]) -> list[Multiplier]:
    luts = tensors.get("bank.luts")
    if luts is None:
        raise _fail(path, "QoS model without multiplier tables (bank.luts)")
    names = [c.name for c in bank]
    try:
        verify_tables(luts, [c.sha256 for c in bank], names)
    except QosError as e:
        raise _fail(path, str(e)) from None
    arr = luts.cpu().numpy()
    lib = bundled()
    out = []
    for i, c in enumerate(bank):
        known = None
        if c.name in lib:
            cand = lib.get(c.name)
            if cand.sha256 == c.sha256 and cand.signed == c.signed:
                known = cand  # keeps the library's full metadata (citation, figures)
        out.append(known or Multiplier(name=c.name, signed=c.signed, lut=arr[i], power_mw=c.power_mw))
    return out


def _read(path: str | os.PathLike[str], kind: str) -> tuple[dict[str, torch.Tensor], ModelMeta, int]:
    """Tensors, validated meta and the tensors' element count of a file of ``kind``."""
    tensors, raw = load_checkpoint(path)
    meta = parse(raw, source=os.fspath(path))
    if meta.kind != kind:
        what = "QoS model" if kind == KIND else "float model file"
        raise _fail(path, f"a QoS checkpoint but not a {what} (kind {meta.kind!r}, expected {kind!r})")
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _fail(path, f"tensor {key} has non-finite values (NaN or inf)")
    return tensors, meta, sum(t.numel() for t in tensors.values())


def _rebuild(path: Any, meta: ModelMeta, max_params: int) -> nn.Module:
    """The float network of ``meta``'s architecture record, freshly initialised."""
    try:
        net = rebuild(meta.architecture, max_params=max_params)
    except QosError as e:
        raise _fail(path, f"meta.architecture: {e}") from None
    if meta.zoo is not None:
        net.qos_arch = dict(meta.zoo)   # provenance only (reports, ONNX metadata)
    return net


def _load_state(path: Any, module: nn.Module, state: dict[str, Any]) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except QosError as e:
        raise _fail(path, str(e)) from None
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        first = " ".join(str(e).split())[:200]
        raise _fail(path, f"the stored state does not fit the architecture ({first})") from None


def load_qos_model(path: str | os.PathLike[str]) -> tuple[QoSNet, ModelMeta]:
    """Rebuild a QoSNet from a QoS model file: ``(qnet, meta)``, in APPROX mode, eval, OP 0.

    Never executes code from the file and imports no user code. QosError (one line) for: a
    missing/unreadable/truncated/oversized file, a pickle with code, a file that is not a QoS
    model, any meta field that is malformed or out of range (``model_schema.LIMITS``), an
    architecture outside the allowlist, a non-finite tensor, a table that does not match its
    SHA-256, or a state that does not fit.
    """
    tensors, meta, elements = _read(path, KIND)
    mults = _multipliers(path, tensors, meta.bank)
    net = _rebuild(path, meta, elements)
    try:
        qnet = wrap_model(net, mults, num_ops=meta.num_ops, qconfig=meta.qconfig, input_shape=meta.input_shape)
    except QosError as e:
        raise _fail(path, f"cannot rebuild the model ({e})") from None
    except (TypeError, ValueError, RuntimeError) as e:
        raise _fail(path, f"cannot rebuild the model ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    layers = [i.name for i in qnet.approx_layers()]
    if layers != [x.name for x in meta.layers]:
        raise _fail(path, "meta.layers do not name the approximate layers of the architecture in order")
    state: dict[str, Any] = dict(tensors)
    state.update(meta.extra_state)
    _load_state(path, qnet, state)
    if [list(row) for row in meta.assign] != qnet.assignment():
        raise _fail(path, "the assignment in the meta differs from the stored assignment tensors")
    qnet.set_mode(Mode.APPROX)
    qnet.eval()
    qnet.set_operating_point(0)
    return qnet, meta


def is_qos_model_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a readable QoS checkpoint of any kind this package writes."""
    try:
        _, meta = load_checkpoint(path)
    except QosError:
        return False
    return meta.get("kind") in (KIND, FLOAT_KIND) or "stage" in meta


def save_float_model(path: str | os.PathLike[str], model: nn.Module, meta: Mapping[str, Any] | None = None, *,
                     input_shape: Sequence[int] | None = None) -> None:
    """Write a plain (float, unwrapped) model: its architecture record (``nn.graph.capture``),
    the state the record rebuilds and ``meta``'s stage records (kind ``qos-float-model``).

    ``input_shape`` (per sample): default from a model-zoo model's ``qos_arch``; QosError when
    neither is known or the model uses an op outside the allowlist (naming it).
    """
    record = capture(model)
    shape = _input_shape_of(model, input_shape, "the float model")
    out_shape = check_architecture(record, shape).output_shape
    with torch.device("meta"):
        probe = rebuild(record)
    state = _keep_rebuilt(dict(model.state_dict()), probe.state_dict(), "the float model")
    structural: dict[str, Any] = {
        "kind": FLOAT_KIND, "format_version": FORMAT_VERSION, "stage": "float", "architecture": record,
        "input_shape": list(shape), "output_shape": list(out_shape),
        "extra_state": {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}, "versions": versions()}
    zoo = _zoo(model)
    if zoo is not None:
        structural["zoo"] = zoo
    _write(path, state, meta, structural)


def load_float_model(path: str | os.PathLike[str]) -> tuple[nn.Module, ModelMeta]:
    """Rebuild a float model written by :func:`save_float_model` (``strict=True``): an
    ``fx.GraphModule`` of the recorded architecture, in training mode like a freshly built
    model; one QosError line otherwise."""
    tensors, meta, elements = _read(path, FLOAT_KIND)
    model = _rebuild(path, meta, elements)
    state: dict[str, Any] = dict(tensors)
    state.update(meta.extra_state)
    _load_state(path, model, state)
    return model, meta
