"""Atomic file writes: the one place that writes a temporary file and renames it.

A reader (or a crash, or Ctrl-C) never sees a half-written file: data goes to a
temporary file in the target's folder (same file system, so the rename is atomic),
is flushed to disk, gets the old file's mode (or a normal one), and then replaces the
target. On any error the temporary file is removed and the target is untouched.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import IO, Iterator

from .errors import QosError

__all__ = ["atomic_path", "atomic_open", "fresh_name", "write_bytes", "write_text"]


def fresh_name(parent: str | os.PathLike[str], prefix: str, suffix: str = "") -> Path:
    """A path in ``parent`` that does not exist: ``prefix`` + 16 random hex digits + ``suffix``.

    Temporary files and folders are made by this name (``os.open`` with ``O_EXCL``,
    ``os.mkdir``) inside the ``try`` that removes them: ``tempfile.mkstemp``/``mkdtemp`` are
    Python code, so a SIGINT/SIGTERM handler (``cli.run_cli`` raises in it) could fire inside
    them after the file exists and before its name reaches anyone who could remove it."""
    for _ in range(16):
        p = Path(parent) / f"{prefix}{secrets.token_hex(8)}{suffix}"
        if not os.path.lexists(p):
            return p
    raise QosError(f"cannot find a free temporary name {prefix}*{suffix} in {parent}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``.

    The caller writes the temporary path by any means (a compiler's ``-o``, a library's
    ``save``). ``mode``: the file mode of the result (default: the old file's, else
    0666 less the umask). Errors become ``QosError`` naming ``path``.
    """
    target = Path(os.path.abspath(os.fspath(path)))
    folder = target.parent
    if not folder.is_dir():
        raise QosError(f"cannot write {path}: folder {folder} does not exist")
    if target.is_dir():
        raise QosError(f"cannot write {path}: it is a folder")
    tmp = fresh_name(folder, f".{target.name}.", ".tmp")
    made = True
    try:
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as e:
            made = False              # nothing made (or the name was taken meanwhile: not ours)
            raise QosError(f"cannot write {path}: {e.strerror or e}") from None
        yield tmp
        if mode is None:
            mode = target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as e:
        raise QosError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if made:
            with contextlib.suppress(OSError):
                tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], binary: bool = True, mode: int | None = None) -> Iterator[IO]:
    """Open a temporary file for writing; on success it is fsynced and replaces ``path``."""
    with atomic_path(path, mode=mode) as tmp:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, binary=True, mode=mode) as f:
        f.write(data)


def write_text(path: str | os.PathLike[str], text: str, mode: int | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, binary=False, mode=mode) as f:
        f.write(text)
