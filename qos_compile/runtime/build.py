"""Compile the C runtime (``runtime/``): a host shared library for ctypes, static libraries and programs
for any (cross) C compiler, and the libFuzzer target.

Outputs are cached by a hash of every source and header, the flags and the compiler (path and
``--version``); they are written under a temporary name and renamed into place, so concurrent
builds never see half a file. The default folder is ``$QOS_COMPILE_CACHE/runtime`` (else
``~/.cache/qos-compile/runtime``).

The runtime sources are found next to the package (``<repo>/runtime``, an editable install); set
``QOS_RUNTIME_DIR`` to use another copy.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from ..errors import QosError

__all__ = ["RUNTIME_SOURCES", "runtime_dir", "cache_dir", "find_compiler", "build_host_library", "build_static",
           "build_program", "build_fuzzer", "TEST_KERNELS_SOURCE", "DRIVER_SOURCE"]

RUNTIME_SOURCES = ("qos_manifest.c", "qos_runtime.c", "qos_backend.c")
RUNTIME_HEADERS = ("qos_runtime.h", "qos_manifest.h", "qos_manifest_format.h", "qos_backend.h")
CFLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-pthread")
DRIVER_SOURCE = "qos_run_main.c"
TEST_KERNELS_SOURCE = "tests/qos_test_kernels.c"


def runtime_dir() -> Path:
    """The folder holding the runtime's C sources."""
    env = os.environ.get("QOS_RUNTIME_DIR")
    d = Path(env) if env else Path(__file__).resolve().parents[2] / "runtime"
    if not (d / "qos_runtime.c").is_file():
        raise QosError(f"the C runtime sources are not at {d} (install qos-compile editable from its repository, "
                       "or set QOS_RUNTIME_DIR)")
    return d


def cache_dir() -> Path:
    env = os.environ.get("QOS_COMPILE_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "qos-compile") / "runtime"


def find_compiler(cc: str | None = None) -> str:
    """Absolute path of ``cc`` (default: $CC, else cc, gcc, clang)."""
    names = [cc] if cc else [n for n in (os.environ.get("CC"), "cc", "gcc", "clang") if n]
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise QosError(f"no C compiler found (tried {', '.join(names)}); install gcc (Debian: apt-get install gcc)")


@lru_cache(maxsize=16)
def _compiler_id(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return cc + "\n" + out.splitlines()[0] if out else cc


def _resolve(paths: Sequence[str | os.PathLike]) -> list[Path]:
    rd = runtime_dir()
    return [p if p.is_absolute() else rd / p for p in map(Path, paths)]


def _key(cc: str, files: Sequence[Path], flags: Sequence[str], extra: Sequence[Path] = ()) -> str:
    h = hashlib.sha256()
    h.update(_compiler_id(cc).encode())
    h.update("\0".join(flags).encode())
    rd = runtime_dir()
    for f in [*files, *(rd / n for n in RUNTIME_HEADERS), *extra]:
        h.update(str(f.name).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise QosError(f"building {what} failed:\n$ {' '.join(cmd)}\n{proc.stderr.strip()[-3000:]}")


def _atomic_build(out: Path, build) -> Path:
    """Run ``build(tmp_path)`` and rename the result to ``out`` (skipped when ``out`` exists)."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        build(tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def build_host_library(out_dir: str | os.PathLike | None = None, cc: str | None = None,
                       extra_sources: Sequence[str | os.PathLike] = (),
                       extra_flags: Sequence[str] = ()) -> Path:
    """``libqos_runtime-<hash>.so`` for this machine (``cc -O2 -shared -fPIC``), for ctypes."""
    cc_path = find_compiler(cc)
    srcs = _resolve([*RUNTIME_SOURCES, *extra_sources])
    flags = [*CFLAGS, "-shared", "-fPIC", *extra_flags]
    out = Path(out_dir or cache_dir()) / f"libqos_runtime-{_key(cc_path, srcs, flags)}.so"
    return _atomic_build(out, lambda tmp: _run(
        [cc_path, *flags, f"-I{runtime_dir()}", *map(str, srcs), "-o", tmp], "the runtime library"))


def _ar_for(cc: str) -> str:
    base = os.path.basename(cc)
    for suffix in ("gcc", "clang", "cc"):
        if base.endswith(suffix) and base != suffix:
            cand = os.path.join(os.path.dirname(cc), base[: -len(suffix)] + "ar")
            if shutil.which(cand):
                return cand
    for name in ("ar", "llvm-ar"):
        if shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    raise QosError("no 'ar' found to build a static library (Debian: apt-get install binutils)")


def build_static(out_dir: str | os.PathLike | None = None, cc: str = "aarch64-linux-gnu-gcc",
                 extra_objects: Sequence[str | os.PathLike] = (), extra_flags: Sequence[str] = (),
                 ar: str | None = None) -> Path:
    """``libqos_runtime-<hash>.a`` built by ``cc`` (any cross compiler), plus ``extra_objects`` (e.g. kernel .o)."""
    cc_path = find_compiler(cc)
    srcs = _resolve(RUNTIME_SOURCES)
    objs = [Path(o).resolve() for o in extra_objects]
    flags = [*CFLAGS, *extra_flags]
    ar_path = ar or _ar_for(cc_path)
    out = Path(out_dir or cache_dir()) / f"libqos_runtime-{_key(cc_path, srcs, flags, objs)}.a"

    def build(tmp: str) -> None:
        with tempfile.TemporaryDirectory(prefix="qos_rt_obj_") as td:
            built = []
            for s in srcs:
                o = os.path.join(td, s.stem + ".o")
                _run([cc_path, *flags, f"-I{runtime_dir()}", "-c", str(s), "-o", o], s.name)
                built.append(o)
            os.unlink(tmp)
            _run([ar_path, "rcs", tmp, *built, *map(str, objs)], "the static runtime library")

    return _atomic_build(out, build)


def build_program(sources: Sequence[str | os.PathLike], name: str, out_dir: str | os.PathLike | None = None,
                  cc: str | None = None, *, static: bool = False, with_runtime: bool = True,
                  extra_objects: Sequence[str | os.PathLike] = (), extra_flags: Sequence[str] = (),
                  libs: Sequence[str] = ("-lpthread",)) -> Path:
    """An executable from ``sources`` (relative paths are under runtime/) + the runtime sources.

    E.g. the on-device driver for aarch64::

        build_program([DRIVER_SOURCE, "my_kernels.c"], "qos-run", cc="aarch64-linux-gnu-gcc", static=True)
    """
    cc_path = find_compiler(cc)
    srcs = _resolve([*sources, *(RUNTIME_SOURCES if with_runtime else ())])
    objs = [Path(o).resolve() for o in extra_objects]
    flags = [*CFLAGS, *extra_flags, *(["-static"] if static else [])]
    out = Path(out_dir or cache_dir()) / f"{name}-{_key(cc_path, srcs, [*flags, *libs], objs)}"
    return _atomic_build(out, lambda tmp: _run(
        [cc_path, *flags, f"-I{runtime_dir()}", *map(str, srcs), *map(str, objs), "-o", tmp, *libs], name))


FUZZ_FLAGS = ("-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all",
              "-DQOS_MAX_ARENA_BYTES=((uint64_t)64<<20)")


def build_fuzzer(out_dir: str | os.PathLike | None = None, cc: str = "clang") -> Path:
    """The libFuzzer target ``runtime/fuzz/fuzz_manifest.c`` (needs Debian's clang + libclang-rt-*-dev)."""
    if not shutil.which(cc):
        raise QosError(f"'{cc}' not found: the manifest fuzzer needs clang with libFuzzer "
                       "(Debian: apt-get install clang libclang-rt-14-dev)")
    return build_program(["fuzz/fuzz_manifest.c", "tests/qos_touch_kernel.c"], "fuzz_manifest", out_dir, cc,
                         extra_flags=["-std=c99", *FUZZ_FLAGS], libs=("-lpthread",))
