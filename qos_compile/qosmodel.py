"""The QoS model file (``model.pt``): a QoSNet with everything needed to rebuild, evaluate and compile it.

Stored with :mod:`qos_compile.checkpoint` (a plain ``torch.save`` archive holding only
tensors and a JSON text, loaded with ``weights_only=True``; never executes code):

* tensors: every tensor of ``qnet.state_dict()`` under its own key (shared weights,
  per-OP BatchNorm copies and bias rows, ``assign`` buffers, observer ranges, AGN σ's,
  the bank's tables ``bank.luts``);
* meta (JSON): ``kind`` = ``"qos-model"``, ``format_version``, ``stage``, ``arch`` (the
  model's ``qos_arch``), ``qconfig``, ``num_ops``, ``input_shape``, ``layers`` (name, kind,
  MACs, in assignment order), ``bank`` (name, sha256, power_mw, signed per circuit),
  ``assign[op][layer]`` (circuit names), ``extra_state`` (the non-tensor entries of the
  state dict, e.g. the bank's names/hashes), ``versions``; plus whatever the writer adds
  (``ops``, ``search``, ``provenance``, ``finetune``, ``baseline``, ...).

:func:`load_qos_model` rebuilds the network with ``build_from_arch`` + ``wrap_model``,
verifies every table against its SHA-256, loads the state with ``strict=True`` and
returns it in APPROX mode, eval mode, OP 0. Any problem is one QosError line.

Float (pre-QAT) stage files use the same container with ``kind`` = ``"qos-float-model"``
(:func:`save_float_model` / :func:`load_float_model`).
"""
from __future__ import annotations

import dataclasses
import os
import platform
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .checkpoint import load_checkpoint, save_checkpoint, verify_tables
from .errors import QosError
from .models import build_from_arch
from .multipliers import Multiplier, bundled
from .nn import Mode, QoSNet, QuantConfig, wrap_model

__all__ = ["KIND", "FLOAT_KIND", "FORMAT_VERSION", "save_qos_model", "load_qos_model", "qos_model_meta",
           "save_float_model", "load_float_model", "versions", "is_qos_model_file"]

KIND = "qos-model"
FLOAT_KIND = "qos-float-model"
FORMAT_VERSION = 1
_STRUCTURAL = ("kind", "format_version", "stage", "arch", "qconfig", "num_ops", "input_shape", "layers", "bank",
               "assign", "extra_state", "versions")


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


def _arch(model: nn.Module) -> dict[str, Any]:
    arch = getattr(model, "qos_arch", None)
    if not isinstance(arch, dict):
        raise QosError("the model has no architecture record (qos_arch): build it with qos_compile.models")
    return dict(arch)


def _input_shape(arch: dict[str, Any]) -> list[int]:
    size = int(arch.get("input_size", 32))
    return [int(arch.get("in_channels", 3)), size, size]


def qos_model_meta(qnet: QoSNet, stage: str = "final") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the structural meta of ``qnet`` (see module doc)."""
    arch = _arch(qnet.net)
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    for key, value in qnet.state_dict().items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            extra[key] = value
    layers = qnet.approx_layers()
    bank = qnet.bank
    names = list(bank.names)
    meta = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "arch": arch,
        "qconfig": dataclasses.asdict(qnet.qconfig),
        "num_ops": qnet.num_ops,
        "input_shape": _input_shape(arch),
        "layers": [{"name": i.name, "kind": i.kind, "macs": i.macs} for i in layers],
        "bank": [{"name": n, "sha256": h, "power_mw": p, "signed": bank.signed}
                 for n, h, p in zip(names, bank.sha256, bank.power_mw)],
        "assign": [[names[i] for i in row] for row in qnet.assignment()],
        "extra_state": extra,
        "versions": versions(),
    }
    return tensors, meta


def save_qos_model(path: str | os.PathLike[str], qnet: QoSNet, meta: dict[str, Any] | None = None,
                   stage: str = "final") -> None:
    """Write ``qnet`` and ``meta`` (JSON-serialisable; keys other than the structural ones)
    to ``path`` atomically (a complete new file or the old one untouched)."""
    tensors, structural = qos_model_meta(qnet, stage)
    out = {k: v for k, v in (meta or {}).items() if k not in _STRUCTURAL}
    out.update(structural)
    save_checkpoint(path, tensors, out)


def _fail(path: Any, what: str) -> QosError:
    return QosError(f"{os.fspath(path)}: {what}")


def _multipliers(path: Any, tensors: dict[str, torch.Tensor], bank_meta: Any) -> list[Multiplier]:
    if not isinstance(bank_meta, list) or not bank_meta or not all(isinstance(b, dict) for b in bank_meta):
        raise _fail(path, "QoS model without a valid multiplier bank record")
    luts = tensors.get("bank.luts")
    if luts is None:
        raise _fail(path, "QoS model without multiplier tables (bank.luts)")
    try:
        names = [str(b["name"]) for b in bank_meta]
        shas = [str(b["sha256"]) for b in bank_meta]
        signed = [bool(b["signed"]) for b in bank_meta]
        power = [None if b.get("power_mw") is None else float(b["power_mw"]) for b in bank_meta]
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(path, f"malformed multiplier bank record ({e})") from None
    try:
        verify_tables(luts, shas, names)
    except QosError as e:
        raise _fail(path, str(e)) from None
    arr = luts.cpu().numpy()
    lib = bundled()
    out = []
    for i, name in enumerate(names):
        known = None
        if name in lib:
            cand = lib.get(name)
            if cand.sha256 == shas[i] and cand.signed == signed[i]:
                known = cand  # keeps the library's full metadata (citation, figures)
        out.append(known or Multiplier(name=name, signed=signed[i], lut=arr[i], power_mw=power[i]))
    return out


def load_qos_model(path: str | os.PathLike[str]) -> tuple[QoSNet, dict[str, Any]]:
    """Rebuild a QoSNet from a QoS model file: ``(qnet, meta)``, in APPROX mode, eval, OP 0.

    Never executes code from the file. QosError (one line) for: a missing/unreadable/
    truncated file, a pickle with code, a file that is not a QoS model, an unknown
    architecture, a table that does not match its SHA-256, or a state that does not fit.
    """
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != KIND:
        what = meta.get("kind")
        raise _fail(path, f"a QoS checkpoint but not a QoS model (kind {what!r}, expected {KIND!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise _fail(path, f"unsupported QoS model format version {meta.get('format_version')!r}")
    try:
        arch = meta["arch"]
        qcfg = QuantConfig(**meta["qconfig"])
        num_ops = int(meta["num_ops"])
        extra = dict(meta.get("extra_state") or {})
        assign = meta["assign"]
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(path, f"QoS model with incomplete meta ({type(e).__name__}: {e})") from None
    except QosError as e:
        raise _fail(path, f"QoS model with a bad quantization config ({e})") from None
    mults = _multipliers(path, tensors, meta.get("bank"))
    try:
        model = build_from_arch(arch)
        qnet = wrap_model(model, mults, num_ops=num_ops, qconfig=qcfg, input_shape=_input_shape(arch))
    except QosError as e:
        raise _fail(path, f"cannot rebuild the model ({e})") from None
    except (TypeError, ValueError, RuntimeError) as e:
        raise _fail(path, f"cannot rebuild the model ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    state: dict[str, Any] = dict(tensors)
    state.update(extra)
    try:
        qnet.load_state_dict(state, strict=True)
    except QosError as e:
        raise _fail(path, str(e)) from None
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        first = " ".join(str(e).split())[:200]
        raise _fail(path, f"the stored state does not fit the architecture ({first})") from None
    names = list(qnet.bank.names)
    stored = [[names[i] for i in row] for row in qnet.assignment()]
    if stored != assign:
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


def save_float_model(path: str | os.PathLike[str], model: nn.Module, meta: dict[str, Any] | None = None) -> None:
    """Write a plain (float, unwrapped) zoo model: its state dict and ``qos_arch``."""
    out = {k: v for k, v in (meta or {}).items() if k not in _STRUCTURAL}
    out.update(kind=FLOAT_KIND, format_version=FORMAT_VERSION, stage="float", arch=_arch(model),
               versions=versions())
    save_checkpoint(path, dict(model.state_dict()), out)


def load_float_model(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a float model written by :func:`save_float_model` (``strict=True``)."""
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != FLOAT_KIND:
        raise _fail(path, f"not a float model file (kind {meta.get('kind')!r})")
    try:
        model = build_from_arch(meta["arch"])
    except (KeyError, QosError) as e:
        raise _fail(path, f"cannot rebuild the model ({e})") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise _fail(path, f"the stored state does not fit the architecture ({' '.join(str(e).split())[:200]})") from None
    return model, meta
