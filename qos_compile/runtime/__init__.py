"""The C runtime's Python side: the ``.qosm`` manifest spec (``manifest``), building the C runtime
(``build``) and a ctypes binding (``binding``).

Names are imported lazily, so ``python -m qos_compile.runtime.manifest --write`` (regenerate the
C header and docs/manifest.md) runs the module cleanly::

    from qos_compile.runtime import ManifestWriter, read_manifest
    from qos_compile.runtime.binding import RuntimeLibrary
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Arg": "manifest", "ArgKind": "manifest", "DType": "manifest", "Manifest": "manifest",
    "ManifestError": "manifest", "ManifestWriter": "manifest", "Role": "manifest",
    "generate_c_header": "manifest", "generate_markdown": "manifest", "read_manifest": "manifest",
    "RuntimeLibrary": "binding", "Model": "binding", "QosRuntimeError": "binding",
    "build_host_library": "build", "build_static": "build",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
