"""The final multi-OP QoSNet built from a tolerance-trained single-OP one."""
from __future__ import annotations

import copy
import re
from typing import Sequence

import torch

from ..errors import QosError
from ..multipliers import Multiplier
from ..nn import QoSNet, wrap_model
from ..nn.graph import rebuild

__all__ = ["expand_operating_points", "clone_qnet", "input_shape_of"]

_BN_COPY = re.compile(r"\.bns\.(\d+)\.")


def input_shape_of(qnet: QoSNet) -> tuple[int, ...]:
    """Per-sample input shape (any rank): what ``wrap_model`` was given, else the zoo model's ``qos_arch``."""
    if qnet.input_shape is not None:
        return tuple(int(v) for v in qnet.input_shape)
    arch = getattr(qnet.net, "qos_arch", None)
    if not isinstance(arch, dict):
        raise QosError("the model's input shape is unknown: wrap it with wrap_model(..., input_shape=...)")
    size = int(arch.get("input_size", 32))
    return int(arch.get("in_channels", 3)), size, size


def _fresh_float_net(src: QoSNet) -> torch.nn.Module:
    """A new float network of ``src``'s architecture record (``nn.graph.rebuild``: exactly what
    ``load_qos_model`` rebuilds, for zoo and user models alike; no user code runs)."""
    if src.architecture is None:
        raise QosError("the model has no architecture record (built with wrap_model(strict=False)), so it "
                       "cannot be expanded, saved or compiled")
    net = rebuild(src.architecture)
    arch = getattr(src.net, "qos_arch", None)
    if isinstance(arch, dict):
        net.qos_arch = dict(arch)   # the zoo entry travels as provenance
    return net


def expand_operating_points(src: QoSNet, bank: Sequence[Multiplier], assign: Sequence[Sequence[int | str]]) -> QoSNet:
    """A new QoSNet with ``len(assign)`` OPs over ``bank``, every OP starting from ``src``'s
    OP 0 (weights, quantization state, BatchNorm, biases, σ's), and ``assign[op][layer]``
    (bank indices or circuit names) set. ``src`` is left unchanged.

    The model is rebuilt from ``src.architecture`` (so the result is what ``load_qos_model``
    rebuilds, with the layers in the same order) and loaded with ``strict=True``.
    """
    num_ops = len(assign)
    if num_ops < 1:
        raise QosError("at least one operating point is needed")
    dst = wrap_model(_fresh_float_net(src), list(bank), num_ops=num_ops, qconfig=src.qconfig,
                     input_shape=input_shape_of(src), sigma_init=0.0)
    src_state = src.state_dict()
    state = {}
    for key, value in dst.state_dict().items():
        if key.startswith("bank."):
            state[key] = value
            continue
        m = _BN_COPY.search(key)
        src_key = key[:m.start()] + ".bns.0." + key[m.end():] if m else key
        if src_key not in src_state:
            raise QosError(f"cannot expand the model: {src_key} is missing in the source model")
        v = src_state[src_key]
        if key.endswith("bias_per_op"):
            v = v[:1].repeat(num_ops, 1)
        elif key.endswith(".assign"):
            v = value
        if isinstance(v, torch.Tensor) and v.shape != value.shape:
            raise QosError(f"cannot expand the model: {key} has shape {tuple(v.shape)}, expected {tuple(value.shape)}")
        state[key] = v
    dst.load_state_dict(state, strict=True)
    dst.set_assignment(assign)
    dst.set_mode(src.mode)
    dst.train(src.training)
    return dst


def clone_qnet(qnet: QoSNet) -> QoSNet:
    """An independent deep copy (own parameters, buffers and bank)."""
    return copy.deepcopy(qnet)
