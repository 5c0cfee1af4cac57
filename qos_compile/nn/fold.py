"""Which per-OP BatchNorm folds into which approximate layer, which layers requantize
straight into the next one's codes, which residual adds are integer rescales and which
global average pools average codes (see ``affine``), read off the torch.fx graph of a
converted network; the exporter and the emulation both use it."""
from __future__ import annotations

import operator
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


def output_layers(graph: fx.Graph, modules: dict[str, nn.Module]) -> set[str]:
    """The approximate layers whose output (after its folded BatchNorm, if any) is the traced
    network's output itself: their epilogue is ``reference.output_values``'s."""
    out: set[str] = set()
    for node in graph.nodes:
        if node.op != "output" or not isinstance(node.args[0], fx.Node):
            continue
        value = node.args[0]
        src = value.args[0] if value.args and isinstance(value.args[0], fx.Node) else None
        if value.op == "call_module" and isinstance(modules.get(str(value.target)), MultiBatchNorm) and \
                src is not None and src.op == "call_module" and \
                isinstance(modules.get(str(src.target)), (ApproxConv2d, ApproxLinear)) and \
                fold_target(src, modules) == str(value.target):
            value = src
        if value.op == "call_module" and isinstance(modules.get(str(value.target)), (ApproxConv2d, ApproxLinear)):
            out.add(str(value.target))
    return out


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
    pass-through modules, a global average pool and the flatten after it), in order; ``clamp``
    the activation's float bounds (None: none); ``pool`` the global average pool's node, where
    a conv's codes are averaged in integers (``reference.mean_codes``) for a linear consumer."""

    consumer: str
    between: tuple[fx.Node, ...]
    clamp: tuple[float | None, float | None]
    pool: fx.Node | None = None


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


#: Clamps an integer epilogue may hold when its output has other readers than the next layer:
#: those read the dequantized codes, which these leave unchanged (ReLU's lower bound is the
#: zero point, whose value is exactly 0; an upper bound's code may dequantize above it).
FANOUT_CLAMPS = ((None, None), (0.0, None))


def pool_keeps_dims(node: fx.Node) -> bool:
    """Whether a global average pool node (``_global_pool``) keeps the [N, C, 1, 1] shape (a
    pooling module or function, ``mean(..., keepdim=True)``) or gives [N, C] (``mean``)."""
    if node.op == "call_module" or node.target is F.adaptive_avg_pool2d:
        return True
    return bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))


def _global_pool(node: fx.Node, src: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a global average pool of ``src`` [N, C, H, W] alone
    (``nn.AdaptiveAvgPool2d(1)``, ``F.adaptive_avg_pool2d(x, 1)``, ``x.mean((2, 3))`` or
    ``torch.mean(x, dim=(2, 3))``, with or without ``keepdim``)."""
    if node.args[:1] != (src,):
        return False
    if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.AdaptiveAvgPool2d):
        size = modules[str(node.target)].output_size
        return len(node.args) == 1 and not node.kwargs and size in (1, (1, 1))
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None)
        return size in (1, (1, 1)) and len(node.args) + len(node.kwargs) == 2
    if node.op == "call_method" and node.target == "mean" or node.op == "call_function" and node.target is torch.mean:
        if set(node.kwargs) - {"dim", "keepdim"} or len(node.args) > 3:
            return False
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)   # (src: a conv's, rank 4)
        return isinstance(dims, (tuple, list)) and sorted(int(d) % 4 for d in dims) == [2, 3]
    return False


def _flatten(node: fx.Node, src: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` flattens ``src`` [N, C, 1, 1] to [N, C] (``torch.flatten(x, 1)``,
    ``x.flatten(1)``, ``nn.Flatten()``)."""
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        return isinstance(mod, nn.Flatten) and (mod.start_dim, mod.end_dim) == (1, -1) and node.args == (src,)
    if node.kwargs or node.args[:1] != (src,):
        return False
    if node.op == "call_function" and node.target is torch.flatten or node.op == "call_method" and \
            node.target == "flatten":
        return node.args[1:] == (1,)
    return False


def _continue(cur: fx.Node, layer: nn.Module, modules: dict[str, nn.Module], between: list[fx.Node],
              activations: int, clamp: tuple[float | None, float | None]) -> RequantLink | None:
    """From value ``cur`` (an epilogue's output so far) on to the approximate layer of ``layer``'s
    type that reads it: through at most one more clamp-like activation in total and any
    pass-through modules, each read once; the last value may also have other readers
    (``FANOUT_CLAMPS``), which get the dequantized codes. A conv's codes may also go through a
    global average pool and a flatten to a linear layer (the pool: ``RequantLink.pool``)."""
    pool: fx.Node | None = None
    for _ in range(8):
        users = list(cur.users)
        consumers = [u for u in users if u.op == "call_module"
                     and isinstance(modules.get(str(u.target)), (ApproxConv2d, ApproxLinear))]
        if consumers:
            user = consumers[0]
            consumer = modules[str(user.target)]
            want = ApproxLinear if pool is not None else type(layer)
            if user.args != (cur,) or user.kwargs or type(consumer) is not want:
                return None
            if pool is not None and between[-1] is pool and pool_keeps_dims(pool):   # [N, C, 1, 1]: a flatten
                return None
            if len(users) > 1 and clamp not in FANOUT_CLAMPS:
                return None
            return RequantLink(str(user.target), tuple(between), clamp, pool)
        if len(users) != 1:
            return None
        user = users[0]
        if pool is None and isinstance(layer, ApproxConv2d) and _global_pool(user, cur, modules):
            pool = user
            between.append(user)
            cur = user
            continue
        if pool is not None:                                   # after the pool: its flatten, once
            if between[-1] is not pool or not pool_keeps_dims(pool) or not _flatten(user, cur, modules):
                return None
            between.append(user)
            cur = user
            continue
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


def requant_target(node: fx.Node, modules: dict[str, nn.Module]) -> RequantLink | None:
    """The link of approximate layer ``node`` to the approximate layer that reads its output:
    through its folded BatchNorm (``fold_target``), at most one ReLU/ReLU6/Hardtanh and any
    pass-through modules, every value but the last read once. conv feeds conv, linear feeds
    linear (the caller also checks that a linear layer's input is ``[N, K]``), and a conv feeds
    a linear layer through a global average pool (``RequantLink.pool``). None: no such layer."""
    layer = modules.get(str(node.target))
    if not isinstance(layer, (ApproxConv2d, ApproxLinear)):
        return None
    between: list[fx.Node] = []
    cur = node
    bn = fold_target(node, modules)
    if bn is not None:
        cur = next(iter(node.users))
        between.append(cur)
    return _continue(cur, layer, modules, between, 0, (None, None))


@dataclass(frozen=True)
class ResidualLink:
    """A conv layer whose output, after its folded BatchNorm, meets a skip connection in ``add``
    and whose sum goes on to ``link.consumer``: the add is an integer rescale of both operands
    into the consumer's codes. ``skip`` is the add's other operand, the dequantized codes of
    layer ``skip_codes_of``'s input (sliced or zero-padded at most); ``operand`` the conv's side
    (its folded BatchNorm's node, or the conv's own)."""

    add: fx.Node
    operand: fx.Node
    skip: fx.Node
    skip_codes_of: str
    link: RequantLink


#: Additions a residual link may be (``x + y``, ``torch.add(x, y)``, ``x += y``).
_ADDS = (operator.add, torch.add, operator.iadd)


def _selected_from(node: fx.Node, coded: dict[fx.Node, str], modules: dict[str, nn.Module]) -> str | None:
    """The layer whose input codes ``node`` selects from, when it is a coded value itself or a
    pass-through / slicing / zero padding of one (values selected or zero-filled, never
    computed, so they stay on the code grid), else None."""
    if node in coded:
        return coded[node]
    if not node.args or not isinstance(node.args[0], fx.Node) or node.args[0] not in coded:
        return None
    src = coded[node.args[0]]
    if node.op == "call_module":
        ok = isinstance(modules.get(str(node.target)), PASS_THROUGH) and len(node.args) == 1 and not node.kwargs
    elif node.op == "call_function" and node.target is F.pad:
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        ok = mode == "constant" and value in (None, 0, 0.0)
    else:
        ok = node.op == "call_function" and node.target is operator.getitem
    return src if ok else None


def integer_links(graph: fx.Graph, modules: dict[str, nn.Module]) -> tuple[dict[str, RequantLink],
                                                                          dict[str, ResidualLink]]:
    """The integer epilogues of a traced converted network, in graph order: ``{layer: link}`` of
    layers that requantize straight into the next layer (``requant_target``) and ``{layer:
    residual}`` of conv layers whose residual add is an integer rescale (``ResidualLink``): the
    add's other operand must be coded already (an earlier integer epilogue's output, which holds
    the codes of its consumer's input, or a selection of it; the add broadcasts as torch does)."""
    direct: dict[str, RequantLink] = {}
    residual: dict[str, ResidualLink] = {}
    coded: dict[fx.Node, str] = {}          # value -> the layer whose input codes it dequantizes
    pending: dict[fx.Node, str] = {}        # an add operand -> the conv whose epilogue it is

    def mark(link: RequantLink, last: fx.Node) -> None:
        if isinstance(modules[link.consumer], ApproxConv2d):   # (a linear link may keep the float
            coded[link.between[-1] if link.between else last] = link.consumer   # epilogue on [N, C, K])

    for node in graph.nodes:
        mod = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(mod, (ApproxConv2d, ApproxLinear)):
            link = requant_target(node, modules)
            if link is not None:
                direct[str(node.target)] = link
                mark(link, node)
            elif isinstance(mod, ApproxConv2d):
                bn = fold_target(node, modules)
                out = next(iter(node.users)) if bn is not None else node
                if len(out.users) == 1 and (bn is not None or len(node.users) == 1):
                    pending[out] = str(node.target)
            continue
        if node.op == "call_function" and node.target in _ADDS and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            for mine, skip in ((a, b), (b, a)):
                if not (isinstance(mine, fx.Node) and isinstance(skip, fx.Node) and mine in pending):
                    continue
                src = coded.get(skip)
                if src is None:
                    continue
                name = pending[mine]
                link = _continue(node, modules[name], modules, [node], 0, (None, None))
                if link is not None:
                    residual[name] = ResidualLink(node, mine, skip, src, link)
                    mark(link, node)
                break
            continue
        src = _selected_from(node, coded, modules)
        if src is not None:
            coded[node] = src
    return direct, residual


def requant_map(net: nn.Module) -> dict[str, tuple[str, tuple[float | None, float | None]]]:
    """``{layer name: (consumer name, clamp)}`` of a converted network's integer epilogues into the
    next layer (``requant_target``)."""
    direct, _ = integer_links(LeafTracer().trace(net), dict(net.named_modules()))
    return {name: (link.consumer, link.clamp) for name, link in direct.items()}


def residual_map(net: nn.Module) -> dict[str, tuple[str, str]]:
    """``{conv name: (consumer name, skip's code source)}`` of a converted network's integer
    residual adds (``integer_links``)."""
    _, residual = integer_links(LeafTracer().trace(net), dict(net.named_modules()))
    return {name: (r.link.consumer, r.skip_codes_of) for name, r in residual.items()}
