"""ctypes binding of the C runtime (``runtime/qos_runtime.h``).

::

    lib = RuntimeLibrary()                       # builds/loads the host library (cached)
    kernels = ctypes.CDLL("my_kernels.so")       # or {name: address}, or a callable name -> address
    with lib.open("model.qosm", kernels) as model:
        model.select("approx")                   # or an index
        y = model.run(x)                         # numpy in, numpy out

The runtime library is loaded with ``RTLD_GLOBAL``, so kernel libraries loaded after it
resolve the backend hooks (``TVMBackendAllocWorkspace``, ``TVMFFIErrorSetRaisedFromCStrParts``,
...) against it. Errors raise :class:`QosRuntimeError` (a ``QosError``) with the C error code.
"""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import QosError
from .manifest import DTYPE_INFO, DType, MAX_NDIM

__all__ = ["RuntimeLibrary", "Model", "QosRuntimeError", "IOInfo", "ERROR_CODES"]

ERROR_CODES = {0: "OK", -1: "ARG", -2: "IO", -3: "NOMEM", -4: "FORMAT", -5: "VERSION", -6: "CHECKSUM",
               -7: "KERNEL_MISSING", -8: "KERNEL", -9: "SIZE", -10: "LIMIT"}
ERROR_MAX = 512

_LOOKUP = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)


class QosRuntimeError(QosError):
    """A C runtime error: ``code`` is the QOS_ERR_* value, ``name`` its short name (e.g. "FORMAT")."""

    def __init__(self, code: int, message: str):
        self.code = code
        self.name = ERROR_CODES.get(code, "UNKNOWN")
        super().__init__(f"{message} [QOS_ERR_{self.name}]")


class _TensorInfo(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("dtype", ctypes.c_int32), ("ndim", ctypes.c_int32),
                ("shape", ctypes.c_int64 * MAX_NDIM), ("nbytes", ctypes.c_size_t), ("scale", ctypes.c_float),
                ("zero_point", ctypes.c_int32)]


class IOInfo:
    def __init__(self, s: _TensorInfo):
        self.name = s.name.decode("utf-8", "replace")
        self.dtype = np.dtype(DTYPE_INFO[DType(s.dtype)][4])
        self.shape = tuple(int(s.shape[k]) for k in range(s.ndim))
        self.nbytes = int(s.nbytes)
        self.scale = float(s.scale)
        self.zero_point = int(s.zero_point)

    def __repr__(self) -> str:
        return f"IOInfo({self.name!r}, {self.dtype}, {self.shape})"


class RuntimeLibrary:
    """The loaded C runtime. ``path`` defaults to a freshly built (cached) host library."""

    def __init__(self, path: str | os.PathLike | None = None):
        if path is None:
            from .build import build_host_library

            path = build_host_library()
        self.path = Path(path)
        lib = ctypes.CDLL(str(self.path), mode=ctypes.RTLD_GLOBAL)
        P, c = ctypes.c_void_p, ctypes
        sig = {
            "qos_open_file": (c.c_int, [c.c_char_p, _LOOKUP, P, c.POINTER(P), c.c_char_p, c.c_size_t]),
            "qos_open_memory": (c.c_int, [c.c_char_p, c.c_size_t, _LOOKUP, P, c.POINTER(P), c.c_char_p,
                                          c.c_size_t]),
            "qos_close": (None, [P]),
            "qos_num_ops": (c.c_uint32, [P]),
            "qos_op_name": (c.c_char_p, [P, c.c_uint32]),
            "qos_find_op": (c.c_int32, [P, c.c_char_p]),
            "qos_select": (c.c_int, [P, c.c_uint32]),
            "qos_selected": (c.c_uint32, [P]),
            "qos_num_inputs": (c.c_uint32, [P]),
            "qos_num_outputs": (c.c_uint32, [P]),
            "qos_input_info": (c.c_int, [P, c.c_uint32, c.POINTER(_TensorInfo)]),
            "qos_output_info": (c.c_int, [P, c.c_uint32, c.POINTER(_TensorInfo)]),
            "qos_run": (c.c_int, [P, P, c.c_size_t, P, c.c_size_t]),
            "qos_run_multi": (c.c_int, [P, c.POINTER(P), c.POINTER(c.c_size_t), c.POINTER(P),
                                        c.POINTER(c.c_size_t)]),
            "qos_last_error": (c.c_char_p, [P]),
            "qos_strerror": (c.c_char_p, [c.c_int]),
            "qos_metadata": (P, [P, c.POINTER(c.c_size_t)]),
            "qos_arena_bytes": (c.c_uint64, [P]),
            "qos_file_bytes": (c.c_uint64, [P]),
        }
        for name, (res, args) in sig.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self.lib = lib

    def open(self, source: str | os.PathLike | bytes | bytearray,
             kernel_lookup: Mapping[str, Any] | ctypes.CDLL | Callable[[str], Any] | None) -> "Model":
        """Open a manifest (path or bytes) with kernels from a dict of name -> function address
        (int or ctypes function), a ``ctypes.CDLL`` (symbols by name), a callable, or None
        (inspection only: ``run`` then fails)."""
        cb = _make_lookup(kernel_lookup)
        handle = ctypes.c_void_p()
        err = ctypes.create_string_buffer(ERROR_MAX)
        if isinstance(source, (bytes, bytearray)):
            data = bytes(source)
            rc = self.lib.qos_open_memory(data, len(data), cb, None, ctypes.byref(handle), err, ERROR_MAX)
        else:
            rc = self.lib.qos_open_file(os.fsencode(source), cb, None, ctypes.byref(handle), err, ERROR_MAX)
        if rc != 0:
            raise QosRuntimeError(rc, err.value.decode("utf-8", "replace") or "cannot open the manifest")
        return Model(self, handle, keep=(cb, kernel_lookup))

    def try_open(self, data: bytes, kernel_lookup: Any = None) -> tuple[int, str]:
        """Open from memory and close again: (error code, message) -- for robustness tests."""
        try:
            self.open(data, kernel_lookup).close()
            return 0, ""
        except QosRuntimeError as exc:
            return exc.code, str(exc)


def _address(fn: Any) -> int | None:
    if fn is None:
        return None
    if isinstance(fn, int):
        return fn
    return ctypes.cast(fn, ctypes.c_void_p).value


def _make_lookup(kernel_lookup: Any):
    if kernel_lookup is None:
        return ctypes.cast(None, _LOOKUP)
    if isinstance(kernel_lookup, ctypes.CDLL):
        lib = kernel_lookup

        def resolve(name: str) -> Any:
            return getattr(lib, name, None)
    elif isinstance(kernel_lookup, Mapping):
        resolve = kernel_lookup.get
    elif callable(kernel_lookup):
        resolve = kernel_lookup
    else:
        raise QosError("kernel_lookup must be a dict, a ctypes.CDLL, a callable or None")

    def lookup(name: bytes, _user: Any) -> int | None:
        try:
            return _address(resolve(name.decode("utf-8", "replace")))
        except Exception:  # never let an exception cross the C boundary
            return None

    return _LOOKUP(lookup)


class Model:
    """An opened manifest. Not thread-safe from Python beyond what the C API guarantees."""

    def __init__(self, lib: RuntimeLibrary, handle: ctypes.c_void_p, keep: Any = None):
        self._lib, self._h, self._keep = lib, handle, keep

    # -- lifetime
    def close(self) -> None:
        if self._h:
            self._lib.lib.qos_close(self._h)
            self._h = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _handle(self) -> ctypes.c_void_p:
        if not self._h:
            raise QosError("the model is closed")
        return self._h

    # -- info
    @property
    def operating_points(self) -> list[str]:
        h = self._handle()
        return [self._lib.lib.qos_op_name(h, i).decode("utf-8", "replace")
                for i in range(self._lib.lib.qos_num_ops(h))]

    @property
    def inputs(self) -> list[IOInfo]:
        return [self._info(self._lib.lib.qos_input_info, i) for i in range(self._lib.lib.qos_num_inputs(self._h))]

    @property
    def outputs(self) -> list[IOInfo]:
        return [self._info(self._lib.lib.qos_output_info, i) for i in range(self._lib.lib.qos_num_outputs(self._h))]

    def _info(self, fn: Any, i: int) -> IOInfo:
        s = _TensorInfo()
        rc = fn(self._handle(), i, ctypes.byref(s))
        if rc != 0:
            raise QosRuntimeError(rc, f"no input/output {i}")
        return IOInfo(s)

    @property
    def metadata(self) -> bytes:
        n = ctypes.c_size_t()
        p = self._lib.lib.qos_metadata(self._handle(), ctypes.byref(n))
        return ctypes.string_at(p, n.value) if p and n.value else b""

    def metadata_json(self) -> Any:
        return json.loads(self.metadata.decode("utf-8")) if self.metadata else None

    @property
    def arena_bytes(self) -> int:
        return int(self._lib.lib.qos_arena_bytes(self._handle()))

    @property
    def selected(self) -> int:
        return int(self._lib.lib.qos_selected(self._handle()))

    @property
    def last_error(self) -> str:
        return self._lib.lib.qos_last_error(self._handle()).decode("utf-8", "replace")

    # -- select / run
    def select(self, op: int | str) -> None:
        h = self._handle()
        if isinstance(op, str):
            idx = self._lib.lib.qos_find_op(h, op.encode())
            if idx < 0:
                raise QosError(f"no operating point {op!r} (have {', '.join(self.operating_points)})")
            op = idx
        rc = self._lib.lib.qos_select(h, int(op))
        if rc != 0:
            raise QosRuntimeError(rc, f"operating point {op} out of range (0..{len(self.operating_points) - 1})")

    def run(self, *xs: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """Run one inference; one array per input (shape and dtype as the model's). Returns the
        output array (a tuple of them if the model has several)."""
        h = self._handle()
        ins, outs = self.inputs, self.outputs
        if len(xs) != len(ins):
            raise QosError(f"the model takes {len(ins)} input(s), got {len(xs)}")
        arrays = []
        for x, info in zip(xs, ins):
            a = np.ascontiguousarray(x)
            if a.dtype != info.dtype or a.shape != info.shape:
                if a.size != int(np.prod(info.shape)) or a.dtype != info.dtype:
                    raise QosError(f"input {info.name!r} must be {info.dtype} {info.shape}, got {a.dtype} {a.shape}")
                a = a.reshape(info.shape)
            arrays.append(a)
        results = [np.empty(o.shape, o.dtype) for o in outs]
        n_in, n_out = len(arrays), len(results)
        in_p = (ctypes.c_void_p * n_in)(*[a.ctypes.data for a in arrays])
        in_n = (ctypes.c_size_t * n_in)(*[a.nbytes for a in arrays])
        out_p = (ctypes.c_void_p * n_out)(*[r.ctypes.data for r in results])
        out_n = (ctypes.c_size_t * n_out)(*[r.nbytes for r in results])
        rc = self._lib.lib.qos_run_multi(h, in_p, in_n, out_p, out_n)
        if rc != 0:
            raise QosRuntimeError(rc, self.last_error or "run failed")
        return results[0] if n_out == 1 else tuple(results)
