"""The package's import graph has no cycles, and its layers import only downwards.

How the graph is built (statically, with ``ast``; nothing is imported):

* Nodes: every module under ``qos_compile/``; a package is named by its ``__init__.py``
  (``qos_compile/tvm/__init__.py`` is ``qos_compile.tvm``).
* Edges: every ``import`` statement anywhere in a module, at module level, inside
  functions and classes, and under ``if TYPE_CHECKING:`` alike (a function-level import
  is still a dependency: it only hides a cycle until the function runs).
* Relative imports are resolved against the importing module's package (for an
  ``__init__.py``, the package itself).
* ``import a.b.c`` depends on ``a.b.c``; ``from pkg import name`` depends on ``pkg.name``
  when that is a module of the package, else on ``pkg`` (``name`` is an attribute of
  ``pkg/__init__.py``). Imports of anything outside ``qos_compile`` are ignored.
* Packages and their submodules: importing ``pkg.sub`` makes Python run
  ``pkg/__init__.py`` first, but that implicit step is NOT an edge. So an ``__init__.py``
  that imports (re-exports) its own submodules does not by itself form a cycle with them;
  a submodule that explicitly imports its package (``from . import name`` of a
  non-module ``name``, ``from .. import x``) depends on the package's ``__init__.py``, and
  then a cycle through it is a real one (the submodule would read a half-initialised
  package).
* Imports made by name at run time (``importlib.import_module("...")``) are not seen.

Cycles are the strongly connected components with more than one module (or a module
importing itself); the failure message lists every one by module names.

The layering checks ask what a module pulls in when it is imported, so there the implicit
step counts: each module also depends on its ancestor packages' ``__init__.py``
(``import_graph(with_packages=True)``), and the rule is checked on everything reachable.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "qos_compile"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` (source at ``path``) depends on, per the rules above."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps: set[str] = set()

    def inside(mod: str) -> bool:
        return mod == PACKAGE or mod.startswith(PACKAGE + ".")

    def deepest(mod: str) -> str | None:
        """``mod`` itself if it is a module, else its nearest ancestor that is one."""
        while mod and mod not in modules:
            mod = mod.rpartition(".")[0]
        return mod or None

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if inside(alias.name) and (dep := deepest(alias.name)):
                    deps.add(dep)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                up = node.level - 1
                if up >= len(base):
                    raise AssertionError(f"{name}: relative import beyond the top-level package")
                base = base[:len(base) - up]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not inside(target):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                dep = sub if sub in modules else deepest(target)
                if dep:
                    deps.add(dep)
    return deps


def import_graph(with_packages: bool = False) -> dict[str, set[str]]:
    """``{module: modules it imports}`` for every module of the package; ``with_packages``: plus
    the ancestor packages Python initialises first (``a.b.c`` -> ``a.b`` and ``a``)."""
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    if with_packages:
        for name, deps in graph.items():
            parts = name.split(".")
            deps.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle: strongly connected components (Tarjan) of more than one module,
    or a module importing itself; each sorted, the list sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(root: str) -> None:
        nonlocal counter
        # iterative DFS (the graph is deep enough to make recursion fragile)
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1 or v in graph.get(v, ()):
                        found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


def _in(mod: str, package: str) -> bool:
    return mod == package or mod.startswith(package + ".")


def _layer_violations(graph: dict[str, set[str]], lower: str, forbidden: tuple[str, ...]) -> list[str]:
    """``module -> forbidden module`` for every module of ``lower`` that reaches a forbidden one."""
    out = []
    for mod in sorted(m for m in graph if _in(m, lower)):
        bad = sorted(d for d in reachable(graph, mod) if any(_in(d, f) for f in forbidden))
        if bad:
            out.append(f"{mod} -> {', '.join(bad)}")
    return out


def test_the_graph_sees_every_module_and_resolves_imports():
    graph = import_graph()
    assert f"{PACKAGE}.tvm" in graph and f"{PACKAGE}.tvm.kernels" in graph
    assert f"{PACKAGE}.errors" in graph[f"{PACKAGE}.reference"]          # from .errors import QosError
    assert f"{PACKAGE}.multipliers.multiplier" in graph[f"{PACKAGE}.multipliers"]   # __init__ re-exports
    # the checker itself finds a cycle, a self-import, and no false one in a chain
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles between package modules:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_tvm_does_not_import_the_pytorch_emulation():
    """The compiler (``tvm``) reads table structure from ``multipliers``, never from ``nn``."""
    bad = _layer_violations(import_graph(with_packages=True), f"{PACKAGE}.tvm", (f"{PACKAGE}.nn",))
    assert not bad, "qos_compile.tvm imports qos_compile.nn:\n" + "\n".join(bad)


def test_multipliers_is_a_bottom_layer():
    """``multipliers`` depends on nothing above it (only errors, numerics, atomic, the version)."""
    above = tuple(f"{PACKAGE}.{p}" for p in ("nn", "search", "finetune", "onnx", "tvm", "runtime", "bench"))
    bad = _layer_violations(import_graph(with_packages=True), f"{PACKAGE}.multipliers", above)
    assert not bad, "qos_compile.multipliers imports an upper layer:\n" + "\n".join(bad)
