"""Run a ``qos-compile`` output folder from Python (the host build, through the C runtime).

::

    from qos_compile.runtime.model import Model

    with Model("out/") as m:              # out/ = qos-compile MODEL.pt --target x86_64 -o out
        print(m.operating_points)          # ['op0', 'op1', 'op2']
        m.select(1)                        # or a name; O(1), no copy
        logits = m.run(x)                  # numpy in (the model's input shape), numpy out

It loads ``OUT/libqos_model.so`` (the C runtime + TVM shim + the compiled kernels, one
self-contained shared library that ``qos-compile`` builds for targets that run on this
machine) with ctypes and opens ``OUT/model.qosm`` with the library's own kernel lookup
(``qos_linked_kernel_lookup``, over the same table of the model's own kernel entry points that
the ``qos-run`` binary resolves names through: a manifest naming anything else is refused), so
the Python binding and ``qos-run`` execute the same kernels in the same order.
"""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QosError
from .binding import IOInfo, RuntimeLibrary

__all__ = ["Model", "MANIFEST_NAME", "HOST_LIBRARY_NAME", "REPORT_NAME"]

MANIFEST_NAME = "model.qosm"
HOST_LIBRARY_NAME = "libqos_model.so"
REPORT_NAME = "report.json"


class Model:
    """A compiled QoS model: ``operating_points``, ``select(op)``, ``run(x)``."""

    def __init__(self, out_dir: "str | os.PathLike", threads: int | None = None):
        out = Path(out_dir)
        manifest, lib_path = out / MANIFEST_NAME, out / HOST_LIBRARY_NAME
        if not manifest.is_file():
            raise QosError(f"{out} is not a qos-compile output folder (no {MANIFEST_NAME})")
        if not lib_path.is_file():
            target = self._report_target(out)
            raise QosError(f"{out} has no {HOST_LIBRARY_NAME}: it was compiled for "
                           f"{target or 'another target'}, which does not run here; use its qos-run binary")
        self.out_dir = out
        try:
            self._lib = RuntimeLibrary(lib_path)
        except OSError as e:
            raise QosError(f"cannot load {lib_path}: {e}") from None
        cdll = self._lib.lib
        lookup = cdll.qos_linked_kernel_lookup
        lookup.restype, lookup.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_void_p]
        if threads is not None:
            set_threads = cdll.qos_shim_set_num_threads
            set_threads.restype, set_threads.argtypes = ctypes.c_int, [ctypes.c_int]
            set_threads(int(threads))
        self._lookup = lookup
        self._model = self._lib.open(manifest, lambda name: lookup(name.encode("utf-8"), None))

    @staticmethod
    def _report_target(out: Path) -> str | None:
        try:
            return json.loads((out / REPORT_NAME).read_text())["target"]["name"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # -- lifetime
    def close(self) -> None:
        if getattr(self, "_model", None) is not None:
            self._model.close()
            self._model = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _m(self) -> Any:
        if self._model is None:
            raise QosError("the model is closed")
        return self._model

    # -- information
    @property
    def operating_points(self) -> list[str]:
        """OP names, in index order."""
        return self._m().operating_points

    @property
    def selected(self) -> int:
        return self._m().selected

    @property
    def inputs(self) -> list[IOInfo]:
        return self._m().inputs

    @property
    def outputs(self) -> list[IOInfo]:
        return self._m().outputs

    @property
    def metadata(self) -> Any:
        """The manifest's JSON metadata."""
        return self._m().metadata_json()

    @property
    def report(self) -> Any:
        """``report.json`` of the output folder (None if absent)."""
        try:
            return json.loads((self.out_dir / REPORT_NAME).read_text())
        except (OSError, ValueError):
            return None

    # -- select / run
    def select(self, op: "int | str") -> None:
        """Switch to OP ``op`` (index or name) for the next runs."""
        self._m().select(op)

    def run(self, x: Any) -> np.ndarray:
        """One inference; ``x`` must have the model's input shape (floats are cast to its dtype)."""
        info = self.inputs[0]
        a = np.asarray(x)
        if a.dtype != info.dtype and a.dtype.kind == "f" and info.dtype.kind == "f":
            a = a.astype(info.dtype)
        return self._m().run(np.ascontiguousarray(a))

    __call__ = run
