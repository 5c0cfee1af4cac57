"""One circuit in one file: the ``.npz`` format of saved multipliers, and circuit names.

File format (``qos-compile.multiplier``, version 1), readable with plain NumPy and **no
pickle** (written and read with ``allow_pickle=False``):

* ``lut``: int32 little-endian, shape (256, 256), ``lut[A, B]`` (signed: index ``code + 128``);
* ``meta``: a 0-d unicode array holding a JSON object: ``format``, ``version``, ``name``,
  ``signed``, ``aliases``, ``power_mw``, ``area_um2``, ``delay_ns`` (null if unknown),
  ``power_is_estimate``, ``source``, ``citation``, ``published`` and ``sha256`` of ``lut``
  (checked on load).

Files are written atomically (``qos_compile.atomic``), so a crash never leaves a
half-written circuit behind. Both the importers (which re-import such files) and the user
library (which stores them) build on this module.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..atomic import atomic_open
from ..errors import QosError
from .multiplier import Multiplier

__all__ = ["FORMAT", "FORMAT_VERSION", "check_name", "save_multiplier", "is_multiplier_file",
           "load_multiplier_file"]

FORMAT = "qos-compile.multiplier"
FORMAT_VERSION = 1
_MAX_FILE_BYTES = 8 << 20
# Names become file names in the user library and must not look like `master:`/`v2022:` lookups.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid circuit name, else raise QosError.

    Valid: 1-64 characters from letters, digits and ``_ . + -``, starting with a letter
    or digit (no ``:``, which is reserved for ``master:``/``v2022:`` lookups, no ``/``).
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise QosError(
            f"invalid multiplier name {name!r}: use 1-64 letters, digits, '_', '.', '+' or '-', "
            "starting with a letter or digit"
        )
    return name


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
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QosError(f"cannot write {p}: {e.strerror or e}") from None
    with atomic_open(p) as fh:          # errors while writing: QosError "cannot write <p>: ..."
        np.savez_compressed(fh, allow_pickle=False, lut=lut, meta=np.array(meta))
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
