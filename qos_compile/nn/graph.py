"""The architecture of a float network as data: its torch.fx graph and its modules' settings.

``capture(model)`` traces a float ``nn.Module`` with torch.fx and records every node and every
called module as plain JSON (module type names and constructor arguments, function names,
method names, constant arguments). ``rebuild(record)`` turns such a record back into an
``fx.GraphModule`` with freshly initialised modules, importing no user code and executing
nothing from the record: every module type, function and method must be on the allowlist
below, which is exactly the op set the ONNX exporter supports. Anything else is refused with
one line naming it.

The allowlist is the single table of "what a model may contain": ``wrap_model`` checks a
user's network against it up front (naming the source line of the offending call), the
exporter dispatches on the same names, and ``model.pt`` stores records of it.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import QosError

__all__ = ["GRAPH_FORMAT", "GRAPH_VERSION", "MODULES", "FUNCTIONS", "METHODS", "LIMITS", "capture", "rebuild",
           "function_name", "source_line", "validate_record"]

GRAPH_FORMAT = "qos-graph"
GRAPH_VERSION = 1


@dataclass(frozen=True)
class Limits:
    """Bounds a record must respect before anything is built (hostile files cost little)."""

    nodes: int = 20_000
    modules: int = 10_000
    channels: int = 1 << 16        # conv channels / linear features / norm features
    kernel: int = 64               # conv / pool window side
    params: int = 1 << 28          # parameter elements of all rebuilt modules together
    arg_depth: int = 6             # nesting of tuples/lists in an argument
    arg_items: int = 64            # elements of one tuple/list argument
    name_chars: int = 200


LIMITS = Limits()

#: module type name -> (class, constructor arguments recorded). The name is what model.pt stores.
MODULES: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Conv2d": (nn.Conv2d, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                           "bias", "padding_mode")),
    "Linear": (nn.Linear, ("in_features", "out_features", "bias")),
    "BatchNorm2d": (nn.BatchNorm2d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "BatchNorm1d": (nn.BatchNorm1d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "ReLU": (nn.ReLU, ()),
    "ReLU6": (nn.ReLU6, ()),
    "Hardtanh": (nn.Hardtanh, ("min_val", "max_val")),
    "Hardswish": (nn.Hardswish, ()),
    "Sigmoid": (nn.Sigmoid, ()),
    "SiLU": (nn.SiLU, ()),
    "Tanh": (nn.Tanh, ()),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope",)),
    "Softmax": (nn.Softmax, ("dim",)),
    "MaxPool2d": (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")),
    "AvgPool2d": (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                 "divisor_override")),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "Upsample": (nn.Upsample, ("size", "scale_factor", "mode", "align_corners")),
    "Identity": (nn.Identity, ()),
    "Dropout": (nn.Dropout, ("p",)),
    "Dropout2d": (nn.Dropout2d, ("p",)),
}

#: function name (as model.pt stores it) -> the function. Several spellings of one op are listed
#: separately, because fx records whichever the user wrote.
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "operator.add": operator.add, "operator.iadd": operator.iadd, "operator.sub": operator.sub,
    "operator.mul": operator.mul, "operator.imul": operator.imul, "operator.truediv": operator.truediv,
    "operator.getitem": operator.getitem,
    "torch.add": torch.add, "torch.sub": torch.sub, "torch.mul": torch.mul, "torch.div": torch.div,
    "torch.cat": torch.cat, "torch.concat": torch.concat, "torch.flatten": torch.flatten,
    "torch.reshape": torch.reshape, "torch.unsqueeze": torch.unsqueeze, "torch.mean": torch.mean,
    "torch.relu": torch.relu, "torch.sigmoid": torch.sigmoid, "torch.tanh": torch.tanh,
    "F.relu": F.relu, "F.relu6": F.relu6, "F.hardtanh": F.hardtanh, "F.hardswish": F.hardswish,
    "F.sigmoid": F.sigmoid, "F.tanh": F.tanh, "F.silu": F.silu, "F.dropout": F.dropout, "F.dropout2d": F.dropout2d,
    "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d, "F.avg_pool2d": F.avg_pool2d, "F.max_pool2d": F.max_pool2d,
    "F.pad": F.pad, "F.interpolate": F.interpolate,
}
_FUNCTION_NAMES = {id(fn): name for name, fn in FUNCTIONS.items()}

#: Tensor methods a forward may call.
METHODS = frozenset({"size", "view", "reshape", "flatten", "contiguous", "clone", "relu", "relu_", "sigmoid", "tanh",
                     "add", "add_", "mul", "mul_", "sub", "div", "mean", "unsqueeze"})

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def function_name(fn: Any) -> str:
    """The allowlist name of ``fn``, or a readable ``module.name`` for error messages."""
    known = _FUNCTION_NAMES.get(id(fn))
    if known is not None:
        return known
    name = getattr(fn, "__name__", None) or repr(fn)
    mod = getattr(fn, "__module__", None) or ""
    if mod.startswith("torch.nn.functional"):
        mod = "F"
    elif mod in ("_operator", "operator"):
        mod = "operator"
    elif mod.startswith("torch") or mod == "":
        mod = "torch"
    return f"{mod}.{name}"


def source_line(node: fx.Node) -> str:
    """`` (file.py:12: y = g(x))`` for the user's line that created ``node``, or ""."""
    trace = node.stack_trace or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)', trace)
    for path, line, code in reversed(frames):
        if "/torch/" not in path and "/qos_compile/" not in path:
            return f" ({path.rsplit('/', 1)[-1]}:{line}: {code.strip()[:80]})"
    return ""


def _scope(node: fx.Node) -> str:
    return f"net.{node.target}" if node.op == "call_module" else f"net ({node.name})"


class _Tracer(fx.Tracer):
    """Leaves are the allowlisted modules (so their settings are recorded, not their insides)."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in _MODULE_TYPES or super().is_leaf_module(m, qualname)


_MODULE_TYPES = {cls: name for name, (cls, _) in MODULES.items()}


# --------------------------------------------------------------------------- encoding of values
def _encode(v: Any, where: str, depth: int = 0) -> Any:
    if depth > LIMITS.arg_depth:
        raise QosError(f"argument nested too deeply at {where}")
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise QosError(f"non-finite constant {v} at {where}")
        return v
    if isinstance(v, (tuple, list, torch.Size)):
        if len(v) > LIMITS.arg_items:
            raise QosError(f"argument with {len(v)} items at {where} (at most {LIMITS.arg_items})")
        key = "list" if isinstance(v, list) else "tuple"
        return {key: [_encode(x, where, depth + 1) for x in v]}
    if isinstance(v, slice):
        return {"slice": [_encode(v.start, where, depth + 1), _encode(v.stop, where, depth + 1),
                          _encode(v.step, where, depth + 1)]}
    if v is Ellipsis:
        return {"ellipsis": True}
    raise QosError(f"unsupported constant of type {type(v).__name__} at {where}")


def _decode(v: Any, nodes: dict[str, fx.Node], where: str, depth: int = 0) -> Any:
    if depth > LIMITS.arg_depth:
        raise QosError(f"argument nested too deeply at {where}")
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise QosError(f"non-finite constant at {where}")
        return v
    if isinstance(v, dict) and len(v) == 1:
        (key, val), = v.items()
        if key == "node" and isinstance(val, str):
            if val not in nodes:
                raise QosError(f"reference to unknown or later node {val!r} at {where}")
            return nodes[val]
        if key in ("tuple", "list") and isinstance(val, list):
            if len(val) > LIMITS.arg_items:
                raise QosError(f"argument with {len(val)} items at {where}")
            items = [_decode(x, nodes, where, depth + 1) for x in val]
            return tuple(items) if key == "tuple" else items
        if key == "slice" and isinstance(val, list) and len(val) == 3:
            parts = [_decode(x, nodes, where, depth + 1) for x in val]
            if not all(p is None or isinstance(p, (int, fx.Node)) and not isinstance(p, bool) for p in parts):
                raise QosError(f"bad slice at {where}")
            return slice(*parts)
        if key == "ellipsis" and val is True:
            return Ellipsis
    raise QosError(f"malformed argument {str(v)[:60]!r} at {where}")


# --------------------------------------------------------------------------- capture
def capture(model: nn.Module) -> dict[str, Any]:
    """The architecture record of float ``model`` (see module doc); QosError naming the first
    unsupported module, function or method and the line of the user's forward that calls it."""
    if any(type(m).__name__ in ("ApproxConv2d", "ApproxLinear", "MultiBatchNorm2d", "MultiBatchNorm1d")
           for m in model.modules()):
        raise QosError("the model is already converted to approximate layers")
    # the record is the inference network: fx bakes `self.training` into the graph as a constant
    # (`F.dropout(x, p, self.training)`), so trace in eval mode, then restore every module's flag
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        graph = _Tracer().trace(model)
    except QosError:
        raise
    except Exception as e:  # noqa: BLE001 - fx raises many types for untraceable code
        first = " ".join(str(e).split())[:200]
        raise QosError(f"cannot trace the model with torch.fx ({type(e).__name__}: {first})") from None
    finally:
        for m, flag in training.items():
            m.training = flag
    modules = dict(model.named_modules())
    rec_modules: dict[str, Any] = {}
    rec_nodes: list[dict[str, Any]] = []
    inputs = 0
    for node in graph.nodes:
        where = _scope(node) + source_line(node)
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op == "placeholder":
            inputs += 1
            if inputs > 1:
                raise QosError(f"the model's forward takes more than one input ({node.name}); one tensor is supported")
            entry["target"] = str(node.target)
        elif node.op == "call_module":
            target = str(node.target)
            mod = modules[target]
            tname = _MODULE_TYPES.get(type(mod))
            if tname is None:
                raise QosError(f"unsupported layer {_type_name(mod)} at {where}")
            rec_modules.setdefault(target, _module_record(tname, mod, where))
            entry["target"] = target
        elif node.op == "call_function":
            name = _FUNCTION_NAMES.get(id(node.target))
            if name is None:
                raise QosError(f"unsupported function {function_name(node.target)} at {where}")
            entry["target"] = name
        elif node.op == "call_method":
            if node.target not in METHODS:
                raise QosError(f"unsupported method Tensor.{node.target} at {where}")
            entry["target"] = str(node.target)
        elif node.op == "get_attr":
            raise QosError(f"unsupported use of the tensor attribute {node.target} at {where}: "
                           "parameters must live in a supported layer")
        elif node.op != "output":
            raise QosError(f"unsupported fx node {node.op} at {where}")
        if node.op != "placeholder":
            entry["args"] = _encode(tuple(node.args), where)
            entry["kwargs"] = {str(k): _encode(v, where) for k, v in node.kwargs.items()}
        rec_nodes.append(entry)
    if inputs != 1:
        raise QosError("the model's forward takes no input tensor")
    # modules in the model's own (named_modules) order, not first-call order: rebuild keeps this
    # order, so a rebuilt model lists its layers (and thus assignment rows) like the original
    rank = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    rec_modules = dict(sorted(rec_modules.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    record: dict[str, Any] = {"format": GRAPH_FORMAT, "version": GRAPH_VERSION, "modules": rec_modules,
                              "nodes": rec_nodes}
    containers = _container_kinds(modules, rec_modules)
    if containers:
        record["containers"] = containers
    return record


#: container classes a rebuilt model keeps, so ``net.layer1[0]`` indexes as in the original
_CONTAINERS: dict[str, type[nn.Module]] = {"Sequential": nn.Sequential, "ModuleList": nn.ModuleList}


def _container_kinds(modules: dict[str, nn.Module], leaves: dict[str, Any]) -> dict[str, str]:
    """The Sequential/ModuleList modules on the paths to the recorded leaves (others rebuild as
    plain modules: a user's own classes are never recreated)."""
    out: dict[str, str] = {}
    for target in leaves:
        parts = target.split(".")
        for k in range(1, len(parts)):
            path = ".".join(parts[:k])
            kind = next((n for n, c in _CONTAINERS.items() if type(modules.get(path)) is c), None)
            if kind is not None:
                out[path] = kind
    return out


def _restore_containers(gm: nn.Module, containers: Any, leaves: dict[str, Any]) -> None:
    """Turn the plain intermediate modules fx created back into the recorded containers."""
    if containers is None:
        return
    if not isinstance(containers, dict) or len(containers) > LIMITS.modules:
        raise QosError("architecture record has a malformed containers table")
    prefixes = {".".join(t.split(".")[:k]) for t in leaves for k in range(1, len(t.split(".")))}
    for path, kind in containers.items():
        if path not in prefixes or kind not in _CONTAINERS:
            raise QosError(f"architecture record has a bad container entry {str(path)[:60]!r}: {str(kind)[:30]!r}")
        parent_path, _, last = path.rpartition(".")
        parent = gm.get_submodule(parent_path) if parent_path else gm
        old = parent.get_submodule(last)
        if kind == "ModuleList" and not all(k.isdigit() for k in old._modules):
            raise QosError(f"architecture record: ModuleList {path} has non-index children")
        new = _CONTAINERS[kind]()
        for key, child in old._modules.items():
            new.add_module(key, child)
        parent._modules[last] = new       # same position in named_modules order


def _type_name(mod: nn.Module) -> str:
    cls = type(mod)
    if cls.__module__.startswith("torch.nn"):
        return f"nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _module_record(tname: str, mod: nn.Module, where: str) -> dict[str, Any]:
    _, attrs = MODULES[tname]
    out: dict[str, Any] = {"type": tname}
    for a in attrs:
        if a == "bias":
            out[a] = getattr(mod, "bias", None) is not None
        else:
            out[a] = _encode(getattr(mod, a), where)
    if tname == "Conv2d" and mod.padding_mode != "zeros":           # type: ignore[union-attr]
        raise QosError(f"unsupported nn.Conv2d(padding_mode={mod.padding_mode!r}) at {where}")
    return out


# --------------------------------------------------------------------------- rebuild
def _check_int(v: Any, lo: int, hi: int, what: str) -> None:
    items = v if isinstance(v, (tuple, list)) else (v,)
    for x in items:
        if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
            raise QosError(f"{what} = {v!r} is out of range {lo}..{hi}")


def _build_module(target: str, rec: Any) -> tuple[nn.Module, int]:
    """One allowlisted module from its record, sizes checked first; (module, parameter elements)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("type"), str):
        raise QosError(f"module record of {target} is malformed")
    tname = rec["type"]
    if tname not in MODULES:
        raise QosError(f"module {target} has type {tname!r}, which is not on the allowlist")
    cls, attrs = MODULES[tname]
    extra = set(rec) - {"type", *attrs}
    if extra:
        raise QosError(f"module {target} ({tname}) has unknown settings {sorted(extra)}")
    kwargs = {a: _decode(rec[a], {}, f"net.{target}") for a in attrs if a in rec}
    lim = LIMITS
    params = 0
    if tname == "Conv2d":
        for key in ("in_channels", "out_channels", "groups"):
            _check_int(kwargs.get(key, 1), 1, lim.channels, f"{target}.{key}")
        _check_int(kwargs.get("kernel_size"), 1, lim.kernel, f"{target}.kernel_size")
        _check_int(kwargs.get("stride", 1), 1, lim.kernel, f"{target}.stride")
        _check_int(kwargs.get("dilation", 1), 1, lim.kernel, f"{target}.dilation")
        if not isinstance(kwargs.get("padding", 0), str):
            _check_int(kwargs.get("padding", 0), 0, lim.kernel * lim.kernel, f"{target}.padding")
        if kwargs.get("padding_mode", "zeros") != "zeros":
            raise QosError(f"module {target}: padding_mode must be 'zeros'")
        k = kwargs["kernel_size"]
        kk = k * k if isinstance(k, int) else math.prod(k)
        g = kwargs.get("groups", 1)
        if kwargs["in_channels"] % g or kwargs["out_channels"] % g:
            raise QosError(f"module {target}: channels are not divisible by groups={g}")
        # exact element counts, never more: a file's own tensor elements bound them (max_params)
        bias = kwargs["out_channels"] if kwargs.get("bias", True) else 0
        params = kwargs["out_channels"] * (kwargs["in_channels"] // g) * kk + bias
    elif tname == "Linear":
        _check_int(kwargs.get("in_features"), 1, lim.channels * 64, f"{target}.in_features")
        _check_int(kwargs.get("out_features"), 1, lim.channels, f"{target}.out_features")
        bias = kwargs["out_features"] if kwargs.get("bias", True) else 0
        params = kwargs["in_features"] * kwargs["out_features"] + bias
    elif tname in ("BatchNorm2d", "BatchNorm1d"):
        _check_int(kwargs.get("num_features"), 1, lim.channels, f"{target}.num_features")
        params = kwargs["num_features"] * (2 * bool(kwargs.get("affine", True))
                                           + 2 * bool(kwargs.get("track_running_stats", True)))
    elif tname in ("MaxPool2d", "AvgPool2d"):
        _check_int(kwargs.get("kernel_size"), 1, lim.kernel, f"{target}.kernel_size")
    try:
        mod = cls(**kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise QosError(f"module {target} ({tname}) cannot be built: {' '.join(str(e).split())[:160]}") from None
    return mod, params


def validate_record(record: Any) -> None:
    """QosError (one line) unless ``record`` is a well-formed graph record within LIMITS."""
    if not isinstance(record, dict) or record.get("format") != GRAPH_FORMAT:
        raise QosError("architecture record is missing or not a qos-graph")
    if record.get("version") != GRAPH_VERSION:
        raise QosError(f"unsupported architecture record version {record.get('version')!r}")
    mods, nodes = record.get("modules"), record.get("nodes")
    if not isinstance(mods, dict) or not isinstance(nodes, list):
        raise QosError("architecture record without modules/nodes")
    if len(mods) > LIMITS.modules or len(nodes) > LIMITS.nodes:
        raise QosError(f"architecture record too large ({len(mods)} modules, {len(nodes)} nodes)")
    for name in list(mods) + [n.get("name") if isinstance(n, dict) else None for n in nodes]:
        if not isinstance(name, str) or len(name) > LIMITS.name_chars or not _NAME.match(name):
            raise QosError(f"architecture record has a bad name {str(name)[:60]!r}")


def rebuild(record: Any, max_params: int | None = None) -> fx.GraphModule:
    """An ``fx.GraphModule`` (float, freshly initialised) from a ``capture`` record.

    Executes nothing from the record: module types, functions and methods are looked up in the
    allowlist. Every size is checked before a module is built; ``max_params`` (e.g. the number
    of tensor elements the file holds) bounds the parameters of all modules together.
    """
    validate_record(record)
    budget = min(LIMITS.params, max_params if max_params is not None else LIMITS.params)
    root: dict[str, nn.Module] = {}
    total = 0
    for target, rec in record["modules"].items():
        mod, params = _build_module(target, rec)
        total += params
        if total > budget:
            raise QosError(f"the architecture needs more than {budget} parameters (at module {target})")
        root[target] = mod
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    outputs = 0
    for i, entry in enumerate(record["nodes"]):
        if not isinstance(entry, dict) or set(entry) - {"name", "op", "target", "args", "kwargs"}:
            raise QosError(f"architecture node {i} is malformed")
        name, op, target = entry.get("name"), entry.get("op"), entry.get("target")
        where = f"node {name}"
        if name in env:
            raise QosError(f"architecture node name {name!r} appears twice")
        if op == "placeholder":
            if i != 0 or not isinstance(target, str) or not _NAME.match(target):
                raise QosError("the architecture's input must be its first node")
            env[name] = graph.create_node("placeholder", target, name=name)
            continue
        if i == 0:
            raise QosError("the architecture's first node must be its input")
        args = _decode(entry.get("args", {"tuple": []}), env, where)
        kwargs_rec = entry.get("kwargs", {})
        if not isinstance(args, tuple) or not isinstance(kwargs_rec, dict):
            raise QosError(f"architecture {where} has malformed arguments")
        kwargs = {str(k): _decode(v, env, where) for k, v in kwargs_rec.items()}
        if op == "call_module":
            if target not in root:
                raise QosError(f"architecture {where} calls unknown module {str(target)[:60]!r}")
            fx_target: Any = target
        elif op == "call_function":
            if target not in FUNCTIONS:
                raise QosError(f"architecture {where} calls {str(target)[:60]!r}, which is not on the allowlist")
            fx_target = FUNCTIONS[target]
        elif op == "call_method":
            if target not in METHODS:
                raise QosError(f"architecture {where} calls Tensor.{str(target)[:60]}, which is not on the allowlist")
            fx_target = target
        elif op == "output":
            outputs += 1
            if outputs > 1 or i != len(record["nodes"]) - 1 or len(args) != 1:
                raise QosError("the architecture must end in exactly one output node")
            graph.output(args[0])
            continue
        else:
            raise QosError(f"architecture {where} has unsupported kind {str(op)[:40]!r}")
        env[name] = graph.create_node(op, fx_target, args, kwargs, name=name)
    if outputs != 1:
        raise QosError("the architecture has no output node")
    try:
        graph.lint()
        gm = fx.GraphModule(root, graph, class_name="QosArchitecture")
    except Exception as e:  # noqa: BLE001
        raise QosError(f"the architecture record does not form a valid graph ({' '.join(str(e).split())[:160]})") from None
    _order_modules(gm, list(record["modules"]))
    _restore_containers(gm, record.get("containers"), record["modules"])
    return gm


def _order_modules(gm: nn.Module, names: list[str]) -> None:
    """Reorder submodules in place so ``named_modules`` follows ``names`` (the record's order).

    ``fx.GraphModule`` inserts submodules by nesting depth, which would put e.g. ``fc`` before
    ``layer1.0.conv1`` and so change the order of a rebuilt model's approximate layers."""
    rank: dict[str, int] = {}
    for i, name in enumerate(names):
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            rank.setdefault(".".join(parts[:k]), i)
    for prefix, mod in list(gm.named_modules()):
        kids = mod._modules
        if len(kids) > 1:
            key = lambda kv: rank.get(f"{prefix}.{kv[0]}" if prefix else kv[0], len(names))  # noqa: E731
            ordered = sorted(kids.items(), key=key)
            kids.clear()
            kids.update(ordered)
