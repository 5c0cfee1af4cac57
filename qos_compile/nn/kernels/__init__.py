"""Build-on-first-use loader of the C kernels (``lut_gemm.c``): the general table-lookup
GEMM and the activation quantize/expand helpers of the convolution strategies.

The shared object is compiled with the system C compiler (``$CC``, else cc/gcc/clang)
through ``qos_compile.cbuild`` into ``$QOS_COMPILE_CACHE`` (default ``~/.cache/qos-compile``)
under a name keyed by a hash of the source, the flags, the compiler and the host CPU
(``-march=native`` code must not travel to another CPU through a shared home directory).
It is written to a temporary file and renamed into place, so concurrent processes never
see half a file.
The kernels use OpenMP with ``torch.get_num_threads()`` threads; in a torch process they
bind to torch's own GNU OpenMP runtime (same soname) and share its thread pool. Without
OpenMP support the build falls back to single-threaded kernels.
``QOS_COMPILE_NO_CKERNEL=1`` disables the kernels (callers then use torch fallbacks).
"""
from __future__ import annotations

import ctypes
import os
import threading
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ... import cbuild
from ...errors import QosError

_SOURCE = Path(__file__).with_name("lut_gemm.c")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11")
_lock = threading.Lock()

_p, _i64, _f32, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "qos_lut_gemm": [_p, _p, _p, _p, _i32, ctypes.c_int32, _p] + [_i64] * 5 + [_i32],
    "qos_quantize": [_p, _i64] + [_f32] * 5 + [_p, _p, _i32],
    "qos_expand": [_p, _p, _p] + [_i64] * 3 + [_i32],
}


def cache_dir() -> Path:
    """Where compiled kernels are kept (``$QOS_COMPILE_CACHE`` or ``~/.cache/qos-compile``)."""
    return cbuild.cache_dir()


def _build(cc: list[str], flags: tuple[str, ...]) -> Path:
    """``lut_gemm-<hash>.so`` in the cache (the hash covers the CPU: the flags ask for -march=native)."""
    return cbuild.cached_compile(cc, [_SOURCE], "lut_gemm.so", flags=flags, out_dir=cache_dir(), what=_SOURCE.name)


@lru_cache(maxsize=2)
def load(portable: bool = False) -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with one warning) when it cannot be built.

    ``portable=True`` builds the plain-C path even where AVX-512 VBMI is available (tests).
    """
    if os.environ.get("QOS_COMPILE_NO_CKERNEL"):
        return None
    try:
        cc = cbuild.find_compiler()
    except QosError as exc:
        warnings.warn(f"qos-compile: {exc}; approximate layers use slower torch fallbacks",
                      RuntimeWarning, stacklevel=2)
        return None
    extra = ("-DQOS_PORTABLE",) if portable else ()
    lib, error = None, None
    with _lock:
        for flags in (_FLAGS + extra, tuple(f for f in _FLAGS if f != "-fopenmp") + extra):
            try:
                lib = ctypes.CDLL(str(_build(cc, flags)))
                break
            except (QosError, OSError) as exc:  # e.g. clang without libomp: retry single-threaded
                error = exc
    if lib is None:
        warnings.warn(f"qos-compile: building the C kernels failed ({error}); approximate layers use slower "
                      "torch fallbacks", RuntimeWarning, stacklevel=2)
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, argtypes
    lib.qos_lut_gemm_simd.restype = ctypes.c_int
    return lib


_GRAIN = 1 << 16  # work items (MACs or elements) per thread below which threads cost more than they save


def _threads(work: int) -> int:
    """Threads for ``work`` items: torch's count, fewer for small jobs (a thread that the OS
    has descheduled stalls the others at the barrier)."""
    return max(1, min(torch.get_num_threads(), work // _GRAIN))


def _check(rc: int) -> None:
    if rc != 0:
        raise QosError("a C kernel rejected its arguments")


def _want(t: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """The kernels read raw memory: refuse anything but the expected dtype on the CPU."""
    if t.dtype != dtype or t.device.type != "cpu":
        raise QosError(f"C kernel argument {what} must be a CPU {dtype} tensor, got {t.dtype} on {t.device}")


def _planes_of(lut: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Byte planes of a table for the VBMI kernel: (4, 256, 256) uint8, plane count, offset."""
    t = lut.numpy().astype(np.int64)
    lo = int(t.min())
    v = (t - lo).astype(np.uint32)
    planes = np.stack([((v >> (8 * i)) & 0xFF).astype(np.uint8) for i in range(4)])
    return torch.from_numpy(planes), (2 if int(v.max()) < 65536 else 4), lo


_PLANES: dict[str, tuple[torch.Tensor, int, int]] = {}


def _planes_for(lut: torch.Tensor, key: str | None) -> tuple[torch.Tensor, int, int]:
    """``_planes_of(lut)``, cached under ``key`` (one entry per circuit used)."""
    if key is None:
        return _planes_of(lut)
    found = _PLANES.get(key)
    if found is None:
        found = _PLANES[key] = _planes_of(lut)
    return found


def lut_gemm(x: torch.Tensor, w: torch.Tensor, lut: torch.Tensor, groups: int = 1, portable: bool = False,
             key: str | None = None) -> torch.Tensor | None:
    """``out[bg, o, p] = sum_k lut[w[bg % groups, o, k], x[bg, k, p]]`` with the C kernel.

    x: (BG, K, P) uint8 table indices; w: (G, O, K) uint8; lut: (256, 256) int32 (CPU);
    ``key``: a stable identity of the table (its SHA-256) to cache its byte planes under.
    Returns int32 (BG, O, P), or None when the kernel is unavailable. The caller must
    ensure ``K * max|lut| < 2**31``.
    """
    lib = load(portable)
    if lib is None:
        return None
    x, w, lut = x.contiguous(), w.contiguous(), lut.contiguous()
    _want(x, torch.uint8, "x")
    _want(w, torch.uint8, "w")
    _want(lut, torch.int32, "lut")
    bg, k, p = x.shape
    g, o, kw = w.shape
    if kw != k or g != groups or bg % groups or lut.shape != (256, 256):
        raise QosError(f"lut_gemm shapes do not match: x {tuple(x.shape)}, w {tuple(w.shape)}, groups {groups}")
    planes, nplanes, lo = _planes_for(lut, key)
    out = torch.empty((bg, o, p), dtype=torch.int32)
    _check(lib.qos_lut_gemm(x.data_ptr(), w.data_ptr(), lut.data_ptr(), planes.data_ptr(), nplanes, lo,
                            out.data_ptr(), bg, g, o, k, p, _threads(bg * o * k * p)))
    return out


def quantize_indices(x: torch.Tensor, inv: float, zero: int, qmin: int, qmax: int,
                     offset: int) -> tuple[torch.Tensor, int, int] | None:
    """``clamp(round(x * inv) + zero, qmin, qmax) + offset`` as uint8 (x: float32, CPU), and the
    smallest and largest index; None when the kernel is unavailable."""
    lib = load()
    if lib is None:
        return None
    x = x.contiguous()
    _want(x, torch.float32, "x")
    idx = torch.empty(x.shape, dtype=torch.uint8)
    rng = torch.empty(2, dtype=torch.uint8)
    _check(lib.qos_quantize(x.data_ptr(), x.numel(), inv, float(zero), float(qmin), float(qmax), float(offset),
                            idx.data_ptr(), rng.data_ptr(), _threads(x.numel())))
    return idx, int(rng[0]), int(rng[1])


def expand(idx: torch.Tensor, table: torch.Tensor, groups: int) -> torch.Tensor | None:
    """(N, C, ...) uint8 indices -> (N, G, T, C/G, ...) float32 with ``out[:, g, t] = table[t][idx[:, g]]``;
    None when the kernel is unavailable. table: (T, 256) float32."""
    lib = load()
    if lib is None:
        return None
    idx, table = idx.contiguous(), table.contiguous()
    _want(idx, torch.uint8, "idx")
    _want(table, torch.float32, "table")
    if table.ndim != 2 or table.shape[1] != 256 or idx.ndim < 2 or idx.shape[1] % groups:
        raise QosError(f"expand shapes do not match: idx {tuple(idx.shape)}, table {tuple(table.shape)}")
    n, c = idx.shape[:2]
    t = table.shape[0]
    inner = idx.numel() // max(1, n * groups)
    out = torch.empty((n, groups, t, c // groups, *idx.shape[2:]), dtype=torch.float32)
    _check(lib.qos_expand(idx.data_ptr(), table.data_ptr(), out.data_ptr(), n * groups * t, t, inner,
                          _threads(out.numel())))
    return out


def simd_enabled(portable: bool = False) -> bool:
    """Whether the loaded kernel uses the AVX-512 VBMI byte-permute path."""
    lib = load(portable)
    return bool(lib is not None and lib.qos_lut_gemm_simd())
