"""The QoS checkpoint container (``model.pt``), safe by construction (docs/design.md, section 4.1).

On disk it is an ordinary ``torch.save`` zip archive of exactly this structure::

    {"format": "qos-nets-checkpoint", "version": 1,
     "meta_json": "<JSON text>", "tensors": {name: torch.Tensor, ...}}

Only tensors, str and int: every part is a type ``torch.load(weights_only=True)``
accepts, so loading never needs (and never uses) unrestricted unpickling. Everything
that is not a tensor (architecture, assignment, names, hashes, provenance) goes into
``meta_json``. What the tensors and meta keys mean is up to the writer (the search
and fine-tuning code); this module only guarantees a safe, atomic, well-formed file.
"""
from __future__ import annotations

import codecs
import io
import json
import os
import pickle
import pickletools
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Sequence

import numpy as np

from .atomic import atomic_open
from .errors import QosError
from .multipliers.table import table_sha256, validate_table

__all__ = ["FORMAT", "VERSION", "CONTAINER_LIMITS", "ContainerLimits", "save_checkpoint", "load_checkpoint",
           "verify_tables"]

FORMAT = "qos-nets-checkpoint"
VERSION = 1


@dataclass(frozen=True)
class ContainerLimits:
    """What a checkpoint archive may hold, checked from the zip's directory before torch reads it,
    so an oversized or lying file is refused without allocating (docs/model_pt.md)."""

    tensors: int = 1 << 18              # tensor storages (zip entries under data/)
    tensor_bytes: int = 1 << 32         # all storages together (4 GiB)
    pickle_bytes: int = 1 << 26         # the pickle (data.pkl), and any other entry
    directory_bytes: int = 1 << 25      # the zip's central directory
    meta_chars: int = 1 << 24           # the meta JSON text


CONTAINER_LIMITS = ContainerLimits()

_ZIP_MAGIC = b"PK\x03\x04"
# Pickle opcodes that import or call something: a QoS checkpoint's pickle has them only
# for torch's own tensor rebuild functions, which weights_only allows.
_OBJECT_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}
_REFUSED = "refusing to load {path}: the file contains code/objects that a QoS checkpoint never has"
_NOT_A_MODEL = "{path} is not a model.pt: not a PyTorch checkpoint file (neither a zip archive nor a pickle)"


def _one_line(text: str, limit: int = 160) -> str:
    """The informative line of a (possibly multi-paragraph) exception message, shortened."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    # torch's weights-only errors bury the reason under generic advice; prefer the reason.
    keys = ("GLOBAL", "Unsupported", "unsupported", "failed finding", "failed reading")
    line = next((ln for ln in lines if any(k in ln for k in keys)), lines[0] if lines else "")
    return line.split(". ")[0][:limit]  # first sentence: the rest is generic advice


# ----------------------------------------------------------------------------- save
def _plain_tensors(tensors: Any) -> dict[str, Any]:
    import torch

    if not isinstance(tensors, dict):
        raise QosError(f"checkpoint tensors must be a dict of name -> tensor, got {type(tensors).__name__}")
    out: dict[str, Any] = {}
    for key, t in tensors.items():
        if not isinstance(key, str):
            raise QosError(f"checkpoint tensor names must be strings, got {key!r}")
        if not isinstance(t, torch.Tensor):
            raise QosError(f"checkpoint entry {key!r} is a {type(t).__name__}, not a torch.Tensor")
        # A plain CPU tensor without autograd history; clone so a view of a large storage
        # does not drag the whole storage into the file.
        out[key] = t.detach().to("cpu").clone()
    return out


def save_checkpoint(path: str | os.PathLike[str], tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write a QoS checkpoint atomically (``qos_compile.atomic``: a temporary file, then a rename).

    ``meta`` must be JSON-serialisable (no NaN/inf). An existing file at ``path`` is
    untouched unless the new file was written completely.
    """
    import torch

    if not isinstance(meta, dict):
        raise QosError(f"checkpoint meta must be a dict, got {type(meta).__name__}")
    try:
        meta_json = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise QosError(f"checkpoint meta is not JSON-serialisable: {_one_line(str(e))}") from None
    payload = {"format": FORMAT, "version": VERSION, "meta_json": meta_json, "tensors": _plain_tensors(tensors)}

    with atomic_open(path) as f:        # errors: QosError "cannot write <path>: ...", old file kept
        torch.save(payload, f)
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    try:  # make the rename durable; best effort (not every filesystem allows it)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# ----------------------------------------------------------------------------- load
def _pickle_streams_reference_objects(f: BinaryIO, max_streams: int = 4) -> bool:
    """True when the leading pickle stream(s) of ``f`` import or call something.

    Uses ``pickletools.genops``, which only parses opcodes and never executes them. A
    legacy (non-zip) torch file is several pickles back to back, hence ``max_streams``.
    """
    try:
        for _ in range(max_streams):
            seen_any = False
            for op, _arg, _pos in pickletools.genops(f):
                seen_any = True
                if op.name in _OBJECT_OPCODES:
                    return True
            if not seen_any:
                return False
    except Exception:  # not (or no longer) a parseable pickle: judge by what was seen
        return False
    return False


def _zip_pickle_references_objects(path: str) -> bool:
    """True when a pickle inside the zip archive imports or calls something (parsed only)."""
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith(".pkl"):
                    with z.open(name) as f:
                        if _pickle_streams_reference_objects(f, max_streams=1):
                            return True
    except Exception:
        return False
    return False


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a QoS checkpoint: ``(tensors, meta)``. Never executes code from the file.

    Uses ``torch.load(..., map_location="cpu", weights_only=True)`` only, and only on a zip
    archive whose directory is within :data:`CONTAINER_LIMITS` (checked first, allocating
    nothing). Any problem is a one-line QosError: missing/empty file, not a torch zip archive,
    truncated or corrupt archive, an oversized archive or meta, a pickle with code/objects
    (refused, never run), not a QoS checkpoint, unsupported version, bad meta JSON.
    """
    import torch

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise QosError(f"{p}: no such file" if not os.path.exists(p) else f"{p}: not a file")
    if os.path.getsize(p) == 0:
        raise QosError(f"{p}: empty file, not a QoS checkpoint")
    with open(p, "rb") as f:
        is_zip = f.read(4) == _ZIP_MAGIC
    if not is_zip:
        _refuse_non_zip(p)
    _check_archive(p)
    try:
        with open(p, "rb") as f:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about pickle protocols etc.
                # An open file (not the path) so no path-based dispatch (e.g. *.safetensors)
                # applies; weights_only=True given explicitly, so no environment variable
                # (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) can turn the restricted unpickler off.
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _one_line(str(e))
        # Inside a readable zip archive only the restricted unpickler can object, i.e. the
        # pickle names something outside the allow-list. Outside one, tell a pickle with
        # objects (refuse) from garbage (not a torch file) by parsing, never executing, it.
        if is_zip or "GLOBAL" in str(e) or _file_references_objects(p):
            raise QosError(_REFUSED.format(path=p) + f" ({reason})") from None
        raise QosError(f"{p}: not a PyTorch checkpoint file ({reason})") from None
    except Exception as e:  # the loader raises many types on garbage; all mean "unreadable"
        reason = _one_line(str(e)) or type(e).__name__
        if "TorchScript" in str(e):
            raise QosError(f"{p}: a TorchScript archive, not a QoS checkpoint") from None
        if is_zip:
            raise QosError(f"{p}: truncated or corrupt checkpoint archive ({reason})") from None
        # a legacy (non-zip) load of arbitrary bytes fails with internal errors such as
        # "KeyError: 101" that mean nothing to a user: say what the file is not instead
        raise QosError(_NOT_A_MODEL.format(path=p)) from None
    return _unpack(p, obj)


def _not_a_model(p: str) -> str:
    """The one line for a file that is neither a zip archive nor a pickle (a hint for Python source)."""
    hint = ("; a Python file: save_qos_model or 'qos-nets pipeline --model FILE.py:FUNCTION' writes a model.pt"
            if p.endswith(".py") else "")
    return _NOT_A_MODEL.format(path=p) + hint


def _is_text(p: str) -> bool:
    """True when the file starts with UTF-8 text (no control bytes but tabs, newlines, form feeds).

    A protocol-2+ pickle or legacy torch file starts with 0x80, which no UTF-8 text does."""
    with open(p, "rb") as f:
        head = f.read(4096)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return not any(b < 32 and b not in b"\t\n\r\f" for b in head)


def _is_text_pickle(p: str, limit: int = 1 << 20) -> bool:
    """True when a text file is a (protocol-0) pickle: its first ``limit`` bytes parse (never run)
    up to a STOP opcode, and the stream imports or calls something or nothing but whitespace
    follows it (a text that starts with ".", i.e. STOP, is not a pickle)."""
    with open(p, "rb") as f:
        head = io.BytesIO(f.read(limit))    # a text line is read whole: bound what is read
    objects = False
    try:
        for op, _arg, _pos in pickletools.genops(head):
            objects = objects or op.name in _OBJECT_OPCODES
    except Exception:  # noqa: BLE001 - not a pickle, or a truncated one
        return False
    return objects or not head.read().strip()   # genops returns only at STOP


def _refuse_non_zip(p: str) -> None:
    """Every QoS checkpoint is a torch zip archive; a legacy torch file or a raw pickle is refused
    unread (its loader sizes storages from the file's own claims before reading them)."""
    # Text (Python source, JSON, ...) parses as a few pickle opcodes ("import" starts with INST)
    # before it fails: only a protocol-0 pickle parses to its STOP.
    if _is_text(p) and not _is_text_pickle(p):
        raise QosError(_not_a_model(p))
    if _file_references_objects(p):
        raise QosError(_REFUSED.format(path=p) + " (a pickle that imports or calls something)")
    with open(p, "rb") as f:
        try:
            seen = sum(1 for _ in zip(range(2), pickletools.genops(f)))
        except Exception:  # noqa: BLE001 - not a pickle at all
            seen = 0
    if seen:
        raise QosError(f"{p}: not a QoS checkpoint (a pickle or legacy torch file; QoS checkpoints are torch zip "
                       "archives)")
    raise QosError(_not_a_model(p))


def _check_archive(p: str) -> None:
    """Refuse an archive whose directory declares more than CONTAINER_LIMITS, compressed entries
    or more stored bytes than the file has; reads only the zip's directory."""
    lim = CONTAINER_LIMITS
    size = os.path.getsize(p)
    # the end record first, so a directory of millions of entries is refused before it is parsed;
    # zipfile's reader of it is private but unchanged since Python 2 (skipped if it ever goes)
    end_record = getattr(zipfile, "_EndRecData", None)
    if end_record is not None:
        with open(p, "rb") as f:
            end = end_record(f)
        if end is not None and (end[4] > lim.tensors + 64 or end[5] > lim.directory_bytes):  # entries, bytes
            raise QosError(f"{p}: checkpoint archive with {end[4]} entries in a directory of {end[5]} bytes "
                           f"(at most {lim.tensors} tensors)")
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise QosError(f"{p}: truncated or corrupt checkpoint archive ({_one_line(str(e))})") from None
    storages, stored = 0, 0
    for info in infos:
        parts = info.filename.split("/")
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise QosError(f"{p}: checkpoint archive with a compressed entry {info.filename[:80]!r} "
                           "(torch.save stores entries uncompressed)")
        stored += info.file_size
        if len(parts) == 3 and parts[1] == "data":
            storages += 1
        elif info.file_size > lim.pickle_bytes:
            raise QosError(f"{p}: checkpoint archive entry {info.filename[:80]!r} has {info.file_size} bytes "
                           f"(at most {lim.pickle_bytes})")
    if storages > lim.tensors:
        raise QosError(f"{p}: checkpoint archive with {storages} tensors (at most {lim.tensors})")
    if stored > size:
        raise QosError(f"{p}: truncated or corrupt checkpoint archive (its directory lists {stored} bytes, "
                       f"the file has {size})")
    if stored > lim.tensor_bytes + lim.pickle_bytes:
        raise QosError(f"{p}: checkpoint archive with {stored} bytes of tensors (at most {lim.tensor_bytes})")


def _file_references_objects(p: str) -> bool:
    if zipfile.is_zipfile(p):
        return _zip_pickle_references_objects(p)
    with open(p, "rb") as f:
        return _pickle_streams_reference_objects(f)


def _unpack(p: str, obj: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise QosError(f"{p}: a PyTorch file but not a QoS checkpoint (no format '{FORMAT}')")
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise QosError(f"{p}: QoS checkpoint without a valid version number")
    if version != VERSION:
        raise QosError(f"{p}: unsupported QoS checkpoint version {version} (this qos-compile reads {VERSION})")
    meta_json = obj.get("meta_json")
    if not isinstance(meta_json, str):
        raise QosError(f"{p}: QoS checkpoint without meta_json text")
    if len(meta_json) > CONTAINER_LIMITS.meta_chars:
        raise QosError(f"{p}: QoS checkpoint meta_json has {len(meta_json)} characters "
                       f"(at most {CONTAINER_LIMITS.meta_chars})")
    try:
        meta = json.loads(meta_json)
    except ValueError as e:  # json.JSONDecodeError, also recursion/UTF problems
        raise QosError(f"{p}: QoS checkpoint meta_json is not valid JSON ({_one_line(str(e))})") from None
    except RecursionError:
        raise QosError(f"{p}: QoS checkpoint meta_json is nested too deeply") from None
    if not isinstance(meta, dict):
        raise QosError(f"{p}: QoS checkpoint meta_json must hold a JSON object")
    tensors = obj.get("tensors")
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise QosError(f"{p}: QoS checkpoint 'tensors' must map names to tensors")
    return tensors, meta


# ----------------------------------------------------------------------------- tables
def verify_tables(luts: Any, sha256s: Sequence[str], names: Sequence[str] | None = None) -> None:
    """Check every stored multiplier table against its recorded SHA-256.

    ``luts`` (M, 256, 256) integer tensor/array; ``sha256s`` and ``names`` one per table.
    The hash is :func:`qos_compile.multipliers.table_sha256` (little-endian int32,
    row-major), the same as ``Multiplier.sha256``. Raises QosError naming the first
    circuit whose table does not match (a corrupted or edited checkpoint).
    """
    if hasattr(luts, "detach"):
        luts = luts.detach().cpu().numpy()
    arr = np.asarray(luts)
    if arr.ndim != 3 or arr.shape[1:] != (256, 256):
        raise QosError(f"multiplier tables must have shape (M, 256, 256), got {arr.shape}")
    m = arr.shape[0]
    if len(sha256s) != m or (names is not None and len(names) != m):
        raise QosError(f"{m} multiplier tables but {len(sha256s)} hashes"
                       + ("" if names is None else f" and {len(names)} names"))
    for i in range(m):
        name = names[i] if names is not None else f"#{i}"
        table = validate_table(arr[i], f"table of circuit {name}")
        if table_sha256(table) != str(sha256s[i]).lower():
            raise QosError(
                f"table of circuit {name} does not match its recorded SHA-256 (corrupted or edited checkpoint)"
            )
