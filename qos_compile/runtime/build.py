"""Compile the C runtime (``runtime/``): a host shared library for ctypes, static libraries and programs
for any (cross) C compiler, and the libFuzzer target.

Every build goes through ``qos_compile.cbuild`` (warnings on, outputs cached by a hash of every
source and header, the flags, the compiler and the machine, written atomically). The default
folder is ``$QOS_COMPILE_CACHE/runtime`` (else ``~/.cache/qos-compile/runtime``).

The runtime sources are found by ``qos_compile.resources.data_dir("runtime")`` (the copy an
installed wheel ships, else ``<repo>/runtime`` in a checkout); set ``QOS_RUNTIME_DIR`` to use
another copy.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

from .. import cbuild
from ..errors import QosError
from ..resources import data_dir

__all__ = ["RUNTIME_SOURCES", "runtime_dir", "cache_dir", "build_host_library", "build_static",
           "build_program", "build_fuzzer", "TEST_KERNELS_SOURCE", "DRIVER_SOURCE"]

RUNTIME_SOURCES = ("qos_manifest.c", "qos_runtime.c", "qos_backend.c")
RUNTIME_HEADERS = ("qos_runtime.h", "qos_manifest.h", "qos_manifest_format.h", "qos_backend.h")
CFLAGS = ("-std=c99", "-O2", "-pthread")   # cbuild adds -Wall -Wextra
DRIVER_SOURCE = "qos_run_main.c"
TEST_KERNELS_SOURCE = "tests/qos_test_kernels.c"


def runtime_dir() -> Path:
    """The folder holding the runtime's C sources (``$QOS_RUNTIME_DIR``, else the installed/checkout copy)."""
    env = os.environ.get("QOS_RUNTIME_DIR")
    d = Path(env) if env else data_dir("runtime")
    if not (d / "qos_runtime.c").is_file():
        raise QosError(f"the C runtime sources are not at {d} (reinstall qos-compile, or set QOS_RUNTIME_DIR "
                       "to a copy of its runtime/ folder)")
    return d


def cache_dir() -> Path:
    """Where runtime builds are kept (``$QOS_COMPILE_CACHE/runtime``, default ``~/.cache/qos-compile/runtime``)."""
    return cbuild.cache_dir("runtime")


def _resolve(paths: Sequence[str | os.PathLike]) -> list[Path]:
    rd = runtime_dir()
    return [p if p.is_absolute() else rd / p for p in map(Path, paths)]


def _headers() -> list[Path]:
    rd = runtime_dir()
    return [rd / n for n in RUNTIME_HEADERS]


def build_host_library(out_dir: str | os.PathLike | None = None, cc: str | None = None,
                       extra_sources: Sequence[str | os.PathLike] = (),
                       extra_flags: Sequence[str] = ()) -> Path:
    """``libqos_runtime-<hash>.so`` for this machine (``cc -O2 -shared -fPIC``), for ctypes."""
    srcs = _resolve([*RUNTIME_SOURCES, *extra_sources])
    return cbuild.cached_compile(cbuild.find_compiler(cc), srcs, "libqos_runtime.so", out_dir=out_dir or cache_dir(),
                                 flags=[*CFLAGS, "-shared", "-fPIC", *extra_flags, f"-I{runtime_dir()}"],
                                 depends=_headers(), what="the runtime library")


def build_static(out_dir: str | os.PathLike | None = None, cc: str = "aarch64-linux-gnu-gcc",
                 extra_objects: Sequence[str | os.PathLike] = (), extra_flags: Sequence[str] = (),
                 ar: str | None = None) -> Path:
    """``libqos_runtime-<hash>.a`` built by ``cc`` (any cross compiler), plus ``extra_objects`` (e.g. kernel .o)."""
    cc_cmd = cbuild.find_compiler(cc)
    srcs = _resolve(RUNTIME_SOURCES)
    objs = [Path(o).resolve() for o in extra_objects]
    flags = [*CFLAGS, *extra_flags, f"-I{runtime_dir()}", "-c"]
    ar_path = ar or cbuild.find_archiver(cc_cmd)

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="qos_rt_obj_") as td:
            built = [cbuild.compile_c(cc_cmd, [s], Path(td) / (s.stem + ".o"), flags=flags, what=s.name)
                     for s in srcs]
            cbuild.archive(ar_path, [*built, *objs], tmp)

    key = cbuild.cache_key(cc_cmd, [*srcs, *objs], [*cbuild.WARNING_FLAGS, *flags, ar_path], _headers())
    return cbuild.cached(out_dir or cache_dir(), "libqos_runtime.a", key, build, executable=False)


def build_program(sources: Sequence[str | os.PathLike], name: str, out_dir: str | os.PathLike | None = None,
                  cc: str | None = None, *, static: bool = False, with_runtime: bool = True,
                  extra_objects: Sequence[str | os.PathLike] = (), extra_flags: Sequence[str] = (),
                  libs: Sequence[str] = ("-lpthread",)) -> Path:
    """An executable (or, with ``-shared`` in ``extra_flags``, a library) from ``sources`` (relative paths
    are under runtime/) + the runtime sources, cached as ``<name>-<hash>``.

    E.g. the on-device driver for aarch64::

        build_program([DRIVER_SOURCE, "my_kernels.c"], "qos-run", cc="aarch64-linux-gnu-gcc", static=True)
    """
    srcs = _resolve([*sources, *(RUNTIME_SOURCES if with_runtime else ())])
    objs = [Path(o).resolve() for o in extra_objects]
    flags = [*CFLAGS, *extra_flags, *(["-static"] if static else []), f"-I{runtime_dir()}"]
    return cbuild.cached_compile(cbuild.find_compiler(cc), [*srcs, *objs], name, out_dir=out_dir or cache_dir(),
                                 flags=flags, ldflags=libs, depends=_headers(), what=name)


#: libFuzzer + ASan/UBSan; FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION makes the loader skip the CRC
#: check (runtime/qos_manifest.c), so every mutation reaches the parser. Fuzzing builds only.
FUZZ_FLAGS = ("-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all",
              "-DQOS_MAX_ARENA_BYTES=((uint64_t)64<<20)", "-DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION")


def build_fuzzer(out_dir: str | os.PathLike | None = None, cc: str = "clang") -> Path:
    """The libFuzzer target ``runtime/fuzz/fuzz_manifest.c`` (needs Debian's clang + libclang-rt-*-dev)."""
    try:
        cbuild.find_compiler(cc)
    except QosError:
        raise QosError(f"'{cc}' not found: the manifest fuzzer needs clang with libFuzzer "
                       "(Debian: apt-get install clang libclang-rt-14-dev)") from None
    return build_program(["fuzz/fuzz_manifest.c", "tests/qos_touch_kernel.c"], "fuzz_manifest", out_dir, cc,
                         extra_flags=["-std=c99", *FUZZ_FLAGS], libs=("-lpthread",))
