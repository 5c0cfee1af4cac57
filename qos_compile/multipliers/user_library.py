"""The user's own multiplier library: imported circuits saved next to the bundled ones.

Location: ``$QOS_COMPILE_HOME/multipliers/`` (default ``~/.local/share/qos-compile/multipliers/``),
one ``NAME.npz`` per circuit. File format (``qos-compile.multiplier``, version 1), readable
with plain NumPy and **no pickle** (written and read with ``allow_pickle=False``):

* ``lut``: int32 little-endian, shape (256, 256), ``lut[A, B]`` (signed: index ``code + 128``);
* ``meta``: a 0-d unicode array holding a JSON object: ``format``, ``version``, ``name``,
  ``signed``, ``aliases``, ``power_mw``, ``area_um2``, ``delay_ns`` (null if unknown),
  ``power_is_estimate``, ``source``, ``citation``, ``published`` and ``sha256`` of ``lut``
  (checked on load).

Files are written atomically (a temporary file in the same folder, then ``os.replace``),
so a crash never leaves a half-written circuit behind.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import QosError
from .importers import check_name
from .library import Library, bundled
from .multiplier import Multiplier

FORMAT = "qos-compile.multiplier"
FORMAT_VERSION = 1
HOME_ENV = "QOS_COMPILE_HOME"
_MAX_FILE_BYTES = 8 << 20


def home_dir() -> Path:
    """qos-compile's data folder: ``$QOS_COMPILE_HOME``, else ``~/.local/share/qos-compile``."""
    env = os.environ.get(HOME_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "qos-compile"


def user_dir() -> Path:
    """The user multiplier library folder, ``home_dir()/multipliers`` (may not exist yet)."""
    return home_dir() / "multipliers"


# --------------------------------------------------------------------------- file format
def _meta(m: Multiplier) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": m.name,
        "signed": m.signed,
        "aliases": list(m.aliases),
        "power_mw": m.power_mw,
        "area_um2": m.area_um2,
        "delay_ns": m.delay_ns,
        "power_is_estimate": m.power_is_estimate,
        "source": m.source,
        "citation": m.citation,
        "published": dict(m.published),
        "sha256": m.sha256,
        "written_by": f"qos-compile {__version__}",
    }


def save_multiplier(m: Multiplier, path: str | os.PathLike[str]) -> Path:
    """Write ``m`` to ``path`` (must end in ``.npz``) atomically, replacing an existing file; return the path."""
    p = Path(path)
    if p.suffix.lower() != ".npz":
        raise QosError(f"a multiplier file must end in .npz, got {p}")
    try:
        meta = json.dumps(_meta(m), sort_keys=True, allow_nan=False)
    except ValueError:
        raise QosError(f"{m.name}: power, area and delay must be finite numbers or unknown") from None
    lut = np.ascontiguousarray(m.lut, dtype="<i4")
    folder = p.parent if str(p.parent) else Path(".")
    tmp: str | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, allow_pickle=False, lut=lut, meta=np.array(meta))
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the user's usual mode
        os.replace(tmp, p)
        tmp = None
    except OSError as e:
        raise QosError(f"cannot write {p}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return p


def _field(meta: dict[str, Any], key: str, kinds: tuple[type, ...], path: Path, optional: bool = False) -> Any:
    value = meta.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise QosError(f"{path}: metadata field {key!r} is missing or has the wrong type")
    if isinstance(value, float) and not math.isfinite(value):
        raise QosError(f"{path}: metadata field {key!r} is not finite")
    return value


def is_multiplier_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a .npz archive with the ``lut`` and ``meta`` arrays of this format."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04":
                return False
        with np.load(path, allow_pickle=False) as z:
            return isinstance(z, np.lib.npyio.NpzFile) and {"lut", "meta"} <= set(z.files)
    except Exception:  # unreadable: not one of ours (the caller reports it as a table file)
        return False


def load_multiplier_file(path: str | os.PathLike[str]) -> Multiplier:
    """Read a circuit written by `save_multiplier`; check its format, fields and table hash."""
    p = Path(path)
    try:
        if p.stat().st_size > _MAX_FILE_BYTES:
            raise QosError(f"{p} is too large to be a multiplier file")
        with np.load(p, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile) or not {"lut", "meta"} <= set(z.files):
                raise QosError(f"{p} is not a qos-compile multiplier file (needs arrays 'lut' and 'meta')")
            if any(info.file_size > _MAX_FILE_BYTES for info in z.zip.infolist()):  # no zip bombs
                raise QosError(f"{p} holds an array too large for a multiplier file")
            lut, meta_arr = z["lut"], z["meta"]
        meta = json.loads(str(meta_arr[()]))
    except QosError:
        raise
    except FileNotFoundError:
        raise QosError(f"no such file: {p}") from None
    except Exception as e:  # corrupt zip, bad JSON, pickled data, ...
        why = " ".join(str(e).split()) or type(e).__name__
        raise QosError(f"{p} is not a readable multiplier file ({why})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise QosError(f"{p} is not a qos-compile multiplier file")
    version = meta.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise QosError(f"{p} has format version {version!r}; this qos-compile reads version {FORMAT_VERSION}")
    num = (int, float)
    aliases = _field(meta, "aliases", (list,), p)
    published = _field(meta, "published", (dict,), p)
    if not all(isinstance(a, str) for a in aliases) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in published.items()
    ):
        raise QosError(f"{p}: metadata fields 'aliases'/'published' must hold strings")
    power, area, delay = (_field(meta, k, num, p, optional=True) for k in ("power_mw", "area_um2", "delay_ns"))
    m = Multiplier(
        name=check_name(_field(meta, "name", (str,), p)),
        signed=_field(meta, "signed", (bool,), p),
        lut=lut,
        aliases=tuple(check_name(a) for a in aliases),
        power_mw=None if power is None else float(power),
        area_um2=None if area is None else float(area),
        delay_ns=None if delay is None else float(delay),
        power_is_estimate=_field(meta, "power_is_estimate", (bool,), p),
        source=_field(meta, "source", (str,), p),
        citation=_field(meta, "citation", (str,), p),
        published=published,
    )
    if m.sha256 != meta.get("sha256"):
        raise QosError(f"{p} is corrupt: its table does not match the SHA-256 recorded in it")
    return m


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
