"""The user's own multiplier library: imported circuits saved next to the bundled ones.

Location: ``$QOS_COMPILE_HOME/multipliers/`` (default ``~/.local/share/qos-compile/multipliers/``),
one ``NAME.npz`` per circuit in the format of ``multiplier_file`` (plain NumPy, no pickle,
written atomically).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import QosError
from .library import Library, bundled
from .multiplier import Multiplier
# the file format's names stay importable from here (the CLI and tests do)
from .multiplier_file import (FORMAT, FORMAT_VERSION, check_name, is_multiplier_file,  # noqa: F401
                              load_multiplier_file, save_multiplier)

HOME_ENV = "QOS_COMPILE_HOME"


def home_dir() -> Path:
    """qos-compile's data folder: ``$QOS_COMPILE_HOME``, else ``~/.local/share/qos-compile``."""
    env = os.environ.get(HOME_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "qos-compile"


def user_dir() -> Path:
    """The user multiplier library folder, ``home_dir()/multipliers`` (may not exist yet)."""
    return home_dir() / "multipliers"


# --------------------------------------------------------------------------- the user library
def user_file(name: str, folder: str | os.PathLike[str] | None = None) -> Path:
    """Where the user circuit ``name`` is (or would be) stored: ``FOLDER/NAME.npz``."""
    return (Path(folder) if folder is not None else user_dir()) / f"{check_name(name)}.npz"


def user_multipliers(folder: str | os.PathLike[str] | None = None) -> list[tuple[Path, Multiplier]]:
    """All circuits in the user library as (file, circuit), sorted by file name. An unreadable file is an error."""
    d = Path(folder) if folder is not None else user_dir()
    if not d.is_dir():
        return []
    out = []
    for f in sorted(d.glob("*.npz")):
        try:
            m = load_multiplier_file(f)
        except QosError as e:
            raise QosError(f"user multiplier library: {e}; fix or remove the file") from None
        if f.name != f"{m.name}.npz":
            raise QosError(f"user multiplier library: {f} holds circuit {m.name!r}; "
                           f"rename it to {m.name}.npz or remove it")
        out.append((f, m))
    return out


def load_library(folder: str | os.PathLike[str] | None = None) -> Library:
    """The bundled circuits followed by the user library's, as one `Library`."""
    lib = bundled().copy()
    for f, m in user_multipliers(folder):
        try:
            lib.add(m)
        except QosError as e:
            raise QosError(f"user multiplier library: {f}: {e}; remove the file") from None
    return lib


def check_addable(m: Multiplier, library: Library | None = None) -> None:
    """Raise QosError if ``m``'s name, an alias or its table is already in ``library`` (default: `load_library()`)."""
    check_name(m.name)
    lib = (library if library is not None else load_library()).copy()
    try:
        lib.add(m)  # Library.add refuses a taken name (even an ambiguous one) or a known table
    except QosError as e:
        raise QosError(f"cannot add {m.name!r} to the library: {e}") from None


def add_user_multiplier(m: Multiplier, folder: str | os.PathLike[str] | None = None) -> Path:
    """Save ``m`` into the user library after checking it clashes with nothing; return the file written."""
    d = Path(folder) if folder is not None else user_dir()
    check_addable(m, load_library(d))
    path = user_file(m.name, d)
    if path.exists():  # e.g. an unreadable leftover the loader skipped; never overwrite silently
        raise QosError(f"{path} already exists; remove it first")
    return save_multiplier(m, path)


def remove_user_multiplier(name: str, folder: str | os.PathLike[str] | None = None) -> Path:
    """Delete the user circuit ``name`` (its primary name) from the user library; return the removed file."""
    d = Path(folder) if folder is not None else user_dir()
    for f, m in user_multipliers(d):
        if m.name == name:
            try:
                f.unlink()
            except OSError as e:
                raise QosError(f"cannot remove {f}: {e.strerror or e}") from None
            return f
    if any(name in (m.name, *m.aliases) for m in bundled()):
        raise QosError(f"{name!r} is a bundled circuit; only imported circuits can be removed")
    raise QosError(f"no imported circuit is called {name!r} (user library: {d})")
