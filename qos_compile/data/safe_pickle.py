"""Unpickling of the CIFAR python batches that can never run code from the file.

The official CIFAR-10/100 "python version" files are pickled dicts of numpy arrays,
lists, ints and byte strings. A plain ``pickle.load`` would call any importable
callable the file names; this unpickler resolves only the handful of globals that
numpy array reconstruction needs (both the NumPy 1 ``numpy.core`` and NumPy 2
``numpy._core`` spellings) and refuses every other one before anything is called.
"""
from __future__ import annotations

import codecs
import io
import pickle
from typing import Any, BinaryIO

import numpy as np

try:  # NumPy 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - NumPy 1
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list (it was not imported or called)."""


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 pickles bytes at protocol <= 2 as _codecs.encode(str, "latin1"); allow nothing else
    if not isinstance(obj, str) or codecs.lookup(encoding).name != "iso8859-1" or errors != "strict":
        raise pickle.UnpicklingError("only _codecs.encode(str, 'latin1') is allowed")
    return codecs.encode(obj, "latin1")


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed")
    return _numeric._frombuffer(buf, dtype, shape, order)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_encode,
}


class SafeUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` whose ``find_class`` knows only numpy array reconstruction."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - documented on the class
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"refused global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102
        raise pickle.UnpicklingError("persistent ids are not allowed")


def safe_load(f: BinaryIO | bytes) -> Any:
    """Unpickle numpy arrays, dicts, lists, strings and numbers only (Python 2 pickles read as latin-1)."""
    stream = io.BytesIO(f) if isinstance(f, (bytes, bytearray)) else f
    return SafeUnpickler(stream, encoding="latin1").load()
