"""The user's own float model: ``--model FILE.py:FUNC`` or ``--model package.module:FUNC``.

``FUNC()`` (no arguments) must return a ``torch.nn.Module``: the user's float network, built
with their own code. That code runs only here, in the float stage of ``qos-nets pipeline`` /
``qos-nets train``; every later stage, ``model.pt`` and the compiler work from the
architecture record taken from the network (``nn.graph.capture``) and never import it again.

A file is imported under a private module name with its folder first on ``sys.path`` (so it
can import its neighbours); a dotted module is imported with the current folder first on
``sys.path`` (as ``python -m`` would). Every failure (a missing file, module or function,
an import or a call that raises, a result that is not a module, an op outside the supported
set) is one QosError line naming the spec.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from ..errors import QosError

__all__ = ["UserModelSpec", "is_user_model", "parse_model_spec", "build_user_model", "model_source_sha256",
           "check_supported"]


@dataclass(frozen=True)
class UserModelSpec:
    """A parsed ``--model`` value: ``file`` or ``module`` (exactly one) and the function's name."""

    text: str
    file: Path | None
    module: str | None
    func: str


def is_user_model(spec: str) -> bool:
    """True for ``FILE.py:FUNC`` / ``package.module:FUNC`` (zoo names have no ``:``)."""
    return ":" in str(spec) or str(spec).strip().endswith(".py")


def parse_model_spec(text: str) -> UserModelSpec:
    """Split ``FILE.py:FUNC`` / ``package.module:FUNC``; QosError for anything else."""
    text = str(text).strip()
    target, sep, func = text.rpartition(":")
    usage = "expected a zoo name, FILE.py:FUNC or package.module:FUNC (FUNC() returns your torch.nn.Module)"
    if not sep or not target or not func:
        raise QosError(f"--model {text!r}: {usage}")
    if not func.isidentifier():
        raise QosError(f"--model {text!r}: {func!r} is not a Python function name; {usage}")
    if target.endswith(".py") or "/" in target or os.sep in target:
        return UserModelSpec(text, Path(target).expanduser(), None, func)
    if not all(part.isidentifier() for part in target.split(".")):
        raise QosError(f"--model {text!r}: {target!r} is neither a .py file nor a dotted module name; {usage}")
    return UserModelSpec(text, None, target, func)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:200]


def _where(e: BaseException, file: Path | None) -> str:
    """`` (line N)`` of the innermost frame in the user's file, when there is one."""
    if isinstance(e, SyntaxError) and e.lineno:
        return f" (line {e.lineno})"
    tb = e.__traceback__
    line = None
    while tb is not None:
        if file is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(file):
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" (line {line})" if line else ""


def _import_file(spec: UserModelSpec) -> ModuleType:
    path = spec.file
    assert path is not None
    if not path.is_file():
        raise QosError(f"--model {spec.text}: no such file {path}" if not path.exists()
                       else f"--model {spec.text}: {path} is not a file")
    resolved = path.resolve()
    name = "qos_user_model_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    ispec = importlib.util.spec_from_file_location(name, resolved)
    if ispec is None or ispec.loader is None:
        raise QosError(f"--model {spec.text}: cannot import {path} as Python source")
    module = importlib.util.module_from_spec(ispec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    sys.path.insert(0, str(resolved.parent))
    try:
        ispec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # the user's code may raise anything; one line, no traceback
        sys.modules.pop(name, None)
        raise QosError(f"--model {spec.text}: importing {path} raised {type(e).__name__}: {_first_line(e)}"
                       f"{_where(e, resolved)}") from None
    finally:
        _remove_path(str(resolved.parent))
    return module


def _remove_path(entry: str) -> None:
    try:
        sys.path.remove(entry)
    except ValueError:  # the user's code removed it itself
        pass


def _import_module(spec: UserModelSpec) -> ModuleType:
    assert spec.module is not None
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        return importlib.import_module(spec.module)
    except ModuleNotFoundError as e:
        if e.name and (spec.module == e.name or spec.module.startswith(e.name + ".")):
            raise QosError(f"--model {spec.text}: no module named {e.name!r} (looked in the current folder and "
                           f"the Python path)") from None
        raise QosError(f"--model {spec.text}: importing {spec.module} raised ModuleNotFoundError: "
                       f"{_first_line(e)}") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's code may raise anything
        raise QosError(f"--model {spec.text}: importing {spec.module} raised {type(e).__name__}: "
                       f"{_first_line(e)}") from None
    finally:
        _remove_path(cwd)


def _import(spec: UserModelSpec) -> ModuleType:
    return _import_file(spec) if spec.file is not None else _import_module(spec)


def build_user_model(text: str) -> nn.Module:
    """Import the spec's file or module, call ``FUNC()`` and return the ``nn.Module`` it built."""
    spec = parse_model_spec(text)
    module = _import(spec)
    where = str(spec.file) if spec.file is not None else spec.module
    fn: Any = getattr(module, spec.func, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                        and getattr(v, "__module__", None) == module.__name__)
        hint = f" (it defines: {', '.join(public[:8])})" if public else ""
        raise QosError(f"--model {spec.text}: {where} has no function {spec.func!r}{hint}")
    if not callable(fn):
        raise QosError(f"--model {spec.text}: {spec.func} in {where} is a {type(fn).__name__}, not a function")
    try:
        model = fn()
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's code may raise anything
        raise QosError(f"--model {spec.text}: {spec.func}() raised {type(e).__name__}: {_first_line(e)}"
                       f"{_where(e, spec.file.resolve() if spec.file else None)}") from None
    if not isinstance(model, nn.Module):
        raise QosError(f"--model {spec.text}: {spec.func}() returned {_a_type(model)}, not a torch.nn.Module")
    return model


def _a_type(value: Any) -> str:
    """``None``, or the value's type name with its article: "an int", "a list"."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def model_source_sha256(text: str) -> str | None:
    """SHA-256 of the file that defines the spec's function (cache keys), None when it cannot be found.

    Call after :func:`build_user_model` (a dotted module is then imported already)."""
    spec = parse_model_spec(text)
    path: str | None
    if spec.file is not None:
        path = str(spec.file)
    else:
        mod = sys.modules.get(str(spec.module))
        path = getattr(mod, "__file__", None)
    if not path:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def check_supported(model: nn.Module, text: str) -> dict[str, Any]:
    """The network's architecture record; QosError naming the first unsupported op and its source line."""
    from ..nn.graph import capture

    try:
        return capture(model)
    except QosError as e:
        raise QosError(f"--model {text}: {e}") from None
