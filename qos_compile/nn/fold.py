"""Which per-OP BatchNorm folds into which approximate layer, and which layers requantize
straight into the next one's codes (see ``affine``), read off the torch.fx graph of a
converted network; the exporter and the emulation both use it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .layers import ApproxConv2d, ApproxLinear
from .multibn import MultiBatchNorm, MultiBatchNorm1d, MultiBatchNorm2d
from .pooling import OrderedAdaptiveAvgPool2d, OrderedAvgPool2d

#: Modules a converted network is traced down to (their insides are one op each).
LEAVES = (ApproxConv2d, ApproxLinear, MultiBatchNorm, OrderedAvgPool2d, OrderedAdaptiveAvgPool2d)


class LeafTracer(fx.Tracer):
    """torch.fx tracer of a converted network with ``LEAVES`` as leaf modules."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True  # error messages name the user's source line

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LEAVES) or super().is_leaf_module(m, qualname)


def fold_target(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The qualified name of the per-OP BatchNorm folded into approximate layer ``node``, or None
    (see ``affine``; a linear layer's output must also be 2-D, which the caller checks)."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    mod = modules.get(str(users[0].target))
    if not isinstance(mod, MultiBatchNorm) or users[0].args != (node,) or users[0].kwargs:
        return None
    layer = modules[str(node.target)]
    if isinstance(mod, MultiBatchNorm2d) and isinstance(layer, ApproxConv2d) \
            or isinstance(mod, MultiBatchNorm1d) and isinstance(layer, ApproxLinear):
        return str(users[0].target)
    return None


def fold_map(net: nn.Module) -> dict[str, str]:
    """``{layer name: folded BatchNorm name}`` of a converted network (names inside ``net``)."""
    graph = LeafTracer().trace(net)
    modules = dict(net.named_modules())
    out: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), (ApproxConv2d, ApproxLinear)):
            bn = fold_target(node, modules)
            if bn is not None:
                out[str(node.target)] = bn
    return out


#: Modules an integer epilogue passes through unchanged (eval mode).
PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)


@dataclass(frozen=True)
class RequantLink:
    """An approximate layer whose epilogue is integer-only: it writes ``consumer``'s input codes.
    ``between`` are the graph nodes it absorbs (its folded BatchNorm, the activation,
    pass-through modules), in order; ``clamp`` the activation's float bounds (None: none)."""

    consumer: str
    between: tuple[fx.Node, ...]
    clamp: tuple[float | None, float | None]


def _activation(node: fx.Node, src: fx.Node, modules: dict[str, nn.Module]) -> tuple[float | None, float | None] | None:
    """The clamp bounds of ``node`` when it is a clamp-like activation (or a pass-through) of
    ``src`` alone, else None."""
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        if node.args != (src,) or node.kwargs:
            return None
        if isinstance(mod, PASS_THROUGH):
            return (None, None)
        if isinstance(mod, nn.ReLU6):
            return (0.0, 6.0)
        if isinstance(mod, nn.ReLU):
            return (0.0, None)
        if isinstance(mod, nn.Hardtanh):
            return (float(mod.min_val), float(mod.max_val))
        return None
    if node.op == "call_function" and node.target in (F.relu, torch.relu, torch.relu_, F.relu6):
        if node.args[:1] != (src,) or len(node.args) > 2 or set(node.kwargs) - {"inplace"}:
            return None
        return (0.0, 6.0) if node.target is F.relu6 else (0.0, None)
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return (0.0, None) if node.args == (src,) and not node.kwargs else None
    return None


def requant_target(node: fx.Node, modules: dict[str, nn.Module]) -> RequantLink | None:
    """The link of approximate layer ``node`` to the approximate layer that alone reads its
    output: through its folded BatchNorm (``fold_target``), at most one ReLU/ReLU6/Hardtanh and
    any pass-through modules, every value read once. conv feeds conv, linear feeds linear (the
    caller also checks that a linear layer's input is ``[N, K]``). None: no such layer."""
    layer = modules.get(str(node.target))
    if not isinstance(layer, (ApproxConv2d, ApproxLinear)):
        return None
    between: list[fx.Node] = []
    cur = node
    bn = fold_target(node, modules)
    if bn is not None:
        cur = next(iter(node.users))
        between.append(cur)
    clamp: tuple[float | None, float | None] = (None, None)
    activations = 0
    for _ in range(8):
        users = list(cur.users)
        if len(users) != 1:
            return None
        user = users[0]
        if user.op == "call_module" and isinstance(modules.get(str(user.target)), (ApproxConv2d, ApproxLinear)):
            consumer = modules[str(user.target)]
            if user.args != (cur,) or user.kwargs or type(consumer) is not type(layer):
                return None
            return RequantLink(str(user.target), tuple(between), clamp)
        bounds = _activation(user, cur, modules)
        if bounds is None:
            return None
        if bounds != (None, None):
            activations += 1
            if activations > 1:
                return None
            clamp = bounds
        between.append(user)
        cur = user
    return None


def requant_map(net: nn.Module) -> dict[str, tuple[str, tuple[float | None, float | None]]]:
    """``{layer name: (consumer name, clamp)}`` of a converted network's integer epilogues."""
    graph = LeafTracer().trace(net)
    modules = dict(net.named_modules())
    out: dict[str, tuple[str, tuple[float | None, float | None]]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            link = requant_target(node, modules)
            if link is not None:
                out[str(node.target)] = (link.consumer, link.clamp)
    return out
