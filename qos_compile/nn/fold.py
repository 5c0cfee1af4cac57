"""Which per-OP BatchNorm folds into which approximate layer (see ``affine``), read off the
torch.fx graph of a converted network; the exporter and the emulation both use it."""
from __future__ import annotations

import torch.fx as fx
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
