"""The one place that finds and runs the C compiler.

Every C build of qos-compile goes through here: the C runtime (``runtime/``), the TVM shim
and the linked ``qos-run`` / host library of a compiled model, the approximate-multiplier
kernels (``nn/kernels``), TVM's ``export_library`` and the C-model importer.

* ``find_compiler`` picks the host compiler (``$CC``, which may carry flags, else cc, gcc,
  clang); ``target_compiler`` the one of a target table entry (the cross compiler for
  aarch64). Both return a command (a list of words).
* ``compile_c`` runs the compiler once. The project's own C is built with ``-Wall -Wextra``
  (``WARNING_FLAGS``, placed first so a caller's flags can refine them); user C (the
  importer) and TVM's generated code are built with ``warnings=False``. The output is
  written under a temporary name and renamed into place (``qos_compile.atomic``), so no
  reader ever sees half a file.
* ``cached_compile`` / ``cached`` keep outputs in ``cache_dir()`` under a name keyed by a
  hash of the source bytes, the flags, the compiler (path and ``--version``) and the
  machine (plus the CPU's identity when a flag asks for ``native`` code, which must not
  travel to another CPU through a shared home folder).

Flags that matter for bit-exactness (``-ffp-contract=off``, ``-march=...``) are the
caller's: this module adds only warnings.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

from .atomic import atomic_path
from .errors import QosError

if TYPE_CHECKING:
    from .targets import Target

__all__ = ["WARNING_FLAGS", "CompileError", "find_compiler", "target_compiler", "target_with_compiler",
           "find_archiver", "compiler_identity", "cache_dir", "cache_key", "cached", "compile_c", "archive", "cached_compile",
           "tvm_fcompile"]

#: Warnings for the project's own C (it compiles clean with them, host and aarch64 cross builds).
WARNING_FLAGS = ("-Wall", "-Wextra")
_HOST_CANDIDATES = ("cc", "gcc", "clang")
_STDERR_TAIL = 3000   # characters of compiler output kept in an error message

Command = Sequence[str]                  # a compiler command: the program and any flags it carries
PathLike = Union[str, "os.PathLike[str]"]


class CompileError(QosError):
    """A compiler run that failed.

    ``command``: what ran; ``stderr``: its diagnostics (or the OS error when it could not
    start); ``returncode``: its exit status, None when it did not run to completion
    (``timed_out`` tells a timeout from a compiler that could not be started).
    """

    def __init__(self, message: str, command: Sequence[str], stderr: str = "", returncode: int | None = None,
                 timed_out: bool = False) -> None:
        super().__init__(message)
        self.command = list(command)
        self.stderr = stderr
        self.returncode = returncode
        self.timed_out = timed_out


# --------------------------------------------------------------------------- compilers
def find_compiler(cc: str | Command | None = None) -> list[str]:
    """The C compiler command for this machine.

    ``cc``: a name, path or command line (``"ccache gcc"``) to use; default ``$CC`` (which
    may carry flags), else the first of cc, gcc, clang on PATH. QosError when the requested
    compiler, or any compiler, is not found.
    """
    if cc is None:
        env = os.environ.get("CC", "").strip()
        if env:
            cmd = shlex.split(env)
            found = shutil.which(cmd[0])
            if found is None:
                raise QosError(f"the C compiler in $CC ({cmd[0]}) was not found")
            return [found, *cmd[1:]]
        for name in _HOST_CANDIDATES:
            found = shutil.which(name)
            if found:
                return [found]
        raise QosError(f"no C compiler found (looked for $CC, {', '.join(_HOST_CANDIDATES)}); "
                       "install gcc (Debian: apt-get install gcc)")
    found = shutil.which(cc) if isinstance(cc, str) else None
    if found:                    # a plain name or path (even one with spaces)
        return [found]
    cmd = shlex.split(cc) if isinstance(cc, str) else list(cc)
    if not cmd:
        raise QosError("empty C compiler command")
    found = shutil.which(cmd[0])
    if found is None:
        raise QosError(f"C compiler {cmd[0]!r} not found")
    return [found, *cmd[1:]]


def target_compiler(target: "str | Target") -> list[str]:
    """The C compiler (and linker) of a target table entry, e.g. ``aarch64-linux-gnu-gcc``.

    QosError naming the Debian package that provides it when it is missing.
    """
    from .targets import get_target

    return [get_target(target).check_toolchain()]


def target_with_compiler(target: "str | Target", cc: str | None) -> "Target":
    """The target, with its C compiler replaced by ``cc`` when given (``--cross-compiler``).

    QosError when ``cc`` is not found (naming the compiler and package the target normally uses).
    """
    import dataclasses

    from .targets import get_target

    t = get_target(target)
    if not cc:
        return t
    path = shutil.which(cc)
    if path is None:
        raise QosError(f"cross compiler {cc!r} not found (target {t.name} normally uses {t.cc} "
                       f"from the Debian package {t.package})")
    return dataclasses.replace(t, cc=path)


def find_archiver(cc: Command) -> str:
    """The ``ar`` that belongs to compiler ``cc`` (``aarch64-linux-gnu-ar`` next to ``-gcc``), else ar/llvm-ar."""
    base = os.path.basename(cc[0])
    for suffix in ("gcc", "clang", "cc"):
        if base.endswith(suffix) and base != suffix:
            cand = shutil.which(os.path.join(os.path.dirname(cc[0]), base[: -len(suffix)] + "ar"))
            if cand:
                return cand
    for name in ("ar", "llvm-ar"):
        found = shutil.which(name)
        if found:
            return found
    raise QosError("no 'ar' found to build a static library (Debian: apt-get install binutils)")


@lru_cache(maxsize=32)
def _identity(cc: tuple[str, ...]) -> str:
    try:
        out = subprocess.run([*cc, "--version"], capture_output=True, text=True, errors="replace",
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    lines = out.splitlines()
    return " ".join(cc) + ("\n" + lines[0] if lines else "")


def compiler_identity(cc: Command) -> str:
    """The command and the first line of its ``--version`` (a new compiler version means new outputs)."""
    return _identity(tuple(cc))


def _cpu_identity() -> str:
    """The host CPU's instruction set, for code built with ``-march=native`` and the like."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [ln for ln in text.splitlines() if ln.startswith(("flags", "Features", "model name", "CPU part"))]
    return "\n".join(keep[:4])


# --------------------------------------------------------------------------- the cache
def cache_dir(sub: str = "") -> Path:
    """Where built C outputs are kept: ``$QOS_COMPILE_CACHE`` (default ``~/.cache/qos-compile``) / ``sub``."""
    env = os.environ.get("QOS_COMPILE_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "qos-compile"
    return root / sub if sub else root


def cache_key(cc: Command, files: Sequence[PathLike], flags: Sequence[str] = (),
              depends: Sequence[PathLike] = ()) -> str:
    """A hash of everything that decides a build's output.

    ``files``: the inputs (sources, objects); ``depends``: further files they read (headers);
    ``flags``: every flag of the command. The compiler's identity and the machine are
    always part of the key, the CPU's identity when a flag asks for ``native`` code.
    """
    h = hashlib.sha256()
    h.update(compiler_identity(cc).encode() + b"\0")
    h.update(platform.machine().encode() + b"\0")
    if any("native" in f for f in flags):
        h.update(_cpu_identity().encode() + b"\0")
    h.update("\0".join(flags).encode() + b"\0\0")
    for f in [*files, *depends]:
        p = Path(f)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise QosError(f"cannot read {p}: {e.strerror or e}") from None
        h.update(p.name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:20]


def _mode(executable: bool) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if executable else 0o666) & ~mask


def cached(out_dir: PathLike | None, name: str, key: str, build: Callable[[Path], Any],
           executable: bool = True) -> Path:
    """``out_dir/<stem>-<key><suffix>`` of ``name``, built by ``build(tmp_path)`` unless it exists.

    ``out_dir`` defaults to ``cache_dir()``. ``build`` writes a temporary file next to the
    result (it exists, empty); it is renamed into place only when ``build`` returns.
    Concurrent builders of one key each write their own file, the last rename wins.
    """
    stem, suffix = os.path.splitext(name)
    out = Path(out_dir if out_dir is not None else cache_dir()) / f"{stem}-{key}{suffix}"
    if out.is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QosError(f"cannot create the build cache folder {out.parent}: {e.strerror or e}") from None
    with atomic_path(out, mode=_mode(executable)) as tmp:
        build(tmp)
    return out


# --------------------------------------------------------------------------- building
def compile_c(cc: Command, inputs: Sequence[PathLike], output: PathLike, *, flags: Sequence[str] = (),
              ldflags: Sequence[str] = (), warnings: bool = True, what: str | None = None,
              timeout: float | None = None) -> Path:
    """Run ``cc [-Wall -Wextra] <flags> <inputs> -o <output> <ldflags>``; the output is written atomically.

    ``inputs``: C sources, objects and archives in link order; ``ldflags``: what must follow
    them (``-lm``, ``-static``). ``warnings``: add ``WARNING_FLAGS`` (the project's own
    C); pass False for code that is not ours. ``what`` names the build in error messages.
    With ``-c`` in ``flags`` the output is an object file (not made executable).
    CompileError when the compiler fails, times out or cannot be started.
    """
    out = Path(output)
    label = what or out.name

    def run(tmp: Path) -> None:
        cmd = [*cc, *(WARNING_FLAGS if warnings else ()), *flags, *map(str, inputs), "-o", str(tmp), *ldflags]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CompileError(f"building {label} took longer than {timeout:.0f} s", cmd, timed_out=True) from None
        except OSError as e:
            raise CompileError(f"cannot run the C compiler {cc[0]}: {e.strerror or e}", cmd,
                               stderr=str(e.strerror or e)) from None
        if proc.returncode != 0:
            diag = (proc.stderr or proc.stdout).strip()
            raise CompileError(f"building {label} failed (exit {proc.returncode}):\n$ {shlex.join(cmd)}\n"
                               f"{diag[-_STDERR_TAIL:]}", cmd, stderr=proc.stderr, returncode=proc.returncode)

    with atomic_path(out, mode=_mode("-c" not in flags)) as tmp:
        run(tmp)
    return out


def archive(ar: str, objects: Sequence[PathLike], output: PathLike) -> Path:
    """The static library ``output`` of ``objects`` (``ar rcs``), written atomically."""
    with atomic_path(output, mode=_mode(False)) as tmp:
        tmp.unlink()    # ar refuses the empty placeholder as "not an archive"
        cmd = [ar, "rcs", str(tmp), *map(str, objects)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        except OSError as e:
            raise CompileError(f"cannot run {ar}: {e.strerror or e}", cmd, stderr=str(e.strerror or e)) from None
        if proc.returncode != 0:
            raise CompileError(f"building {Path(output).name} failed (exit {proc.returncode}):\n$ {shlex.join(cmd)}\n"
                               f"{proc.stderr.strip()[-_STDERR_TAIL:]}", cmd, stderr=proc.stderr,
                               returncode=proc.returncode)
    return Path(output)


def cached_compile(cc: Command, inputs: Sequence[PathLike], name: str, *, flags: Sequence[str] = (),
                   ldflags: Sequence[str] = (), depends: Sequence[PathLike] = (), warnings: bool = True,
                   out_dir: PathLike | None = None, what: str | None = None) -> Path:
    """``compile_c`` into the cache: ``out_dir`` (default ``cache_dir()``) ``/<stem>-<hash><suffix>`` of ``name``.

    The hash covers the compiler, the machine, every flag and the bytes of ``inputs`` and
    ``depends`` (headers the sources include); an existing output is reused as is.
    """
    all_flags = [*(WARNING_FLAGS if warnings else ()), *flags, "--", *ldflags]   # "--": flags vs ldflags
    key = cache_key(cc, inputs, all_flags, depends)
    return cached(out_dir, name, key, lambda tmp: compile_c(cc, inputs, tmp, flags=flags, ldflags=ldflags,
                                                            warnings=warnings, what=what or name),
                  executable="-c" not in flags)


def tvm_fcompile(cc: Command) -> Callable[..., None]:
    """An ``fcompile`` for TVM's ``export_library``: links TVM's objects into a shared library with ``cc``.

    TVM's generated code is not ours, so no warning flags; ``options`` from TVM (include
    folders for C modules) go before the files.
    """

    def fcompile(output: str, objects: "str | Sequence[str]", options: "str | Sequence[str] | None" = None) -> None:
        files = [objects] if isinstance(objects, str) else list(objects)
        opts = [options] if isinstance(options, str) else list(options or [])
        compile_c(cc, files, output, flags=["-shared", "-fPIC", *opts], warnings=False,
                  what=f"the TVM library {os.path.basename(output)}")

    def target_triple() -> str:   # asked by TVM only when a module does not state its own
        proc = subprocess.run([*cc, "-dumpmachine"], capture_output=True, text=True, errors="replace", timeout=30)
        return proc.stdout.strip()

    fcompile.output_format = "so"  # type: ignore[attr-defined]
    fcompile.get_target_triple = target_triple  # type: ignore[attr-defined]
    return fcompile
