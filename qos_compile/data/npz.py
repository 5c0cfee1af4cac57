"""A user data set in one NumPy ``.npz`` archive: ``--dataset npz:PATH``.

The archive holds four arrays (other entries are ignored):

* ``x_train``, ``x_test``: images, either ``uint8`` (0..255) as ``(N, H, W)`` (one channel) or
  ``(N, H, W, C)`` with C <= 4, or ``float32`` as ``(N, C, H, W)`` (used as given, no /255);
* ``y_train``, ``y_test``: integer class labels ``(N,)``, 0..K-1 with K = max(y_train) + 1.

It is read with ``np.load(allow_pickle=False)``: an archive holding pickled objects is refused
and nothing in it runs. Every array's dtype and shape are read from its ``.npy`` header and
checked (with the size limit, ``$QOS_MAX_DATA_BYTES``, default 8 GiB) before any data is read;
uncompressed members (``np.savez``) are memory-mapped instead of copied out of the archive.
10 % of the training samples (stratified) become the validation split.
"""
from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import QosError
from .core import DatasetSplits, check_image_size, max_data_bytes, size_hw, user_splits

KEYS = ("x_train", "y_train", "x_test", "y_test")
MAX_SIDE = 8192          # pixels per image side in the file (resizing may shrink them)
MAX_CHANNELS_UINT8 = 4   # uint8 images are N,H,W,C: a larger C is almost surely N,C,H,W by mistake
MAX_CHANNELS_FLOAT = 64
MAX_CLASSES = 100_000
_LAYOUT = "x_train, y_train, x_test, y_test (x: uint8 N,H,W or N,H,W,C, or float32 N,C,H,W; y: integers N)"


@dataclass(frozen=True)
class _Header:
    """What a member's ``.npy`` header says, plus where its data starts when it can be mapped."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int | None   # byte offset of the data in the .npz file (stored, unencrypted members only)


def _fail(path: Path, what: str) -> QosError:
    return QosError(f"npz:{path}: {what}")


def _read_header(path: Path, zf: zipfile.ZipFile, key: str) -> _Header:
    """Parse ``key.npy``'s header without reading its data."""
    info = zf.getinfo(f"{key}.npy")
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # (3, 0): utf-8 field names; numpy has no public reader for it
                shape, fortran, dtype = np.lib.format._read_array_header(f, version)  # noqa: SLF001
            header_len = f.tell()
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise _fail(path, f"{key} is not a readable .npy array ({' '.join(str(e).split())[:120]})") from None
    offset = None
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
        # the data start after the member's local header (its own name/extra lengths) and the .npy header
        with open(path, "rb") as raw:
            raw.seek(info.header_offset)
            local = raw.read(30)
        if len(local) == 30 and local[:4] == b"PK\x03\x04":
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            offset = info.header_offset + 30 + name_len + extra_len + header_len
    return _Header(tuple(int(v) for v in shape), np.dtype(dtype), bool(fortran), offset)


def _check_images(path: Path, key: str, h: _Header) -> tuple[int, int, int, int]:
    """(N, C, H, W) of an image array header; QosError for a dtype/rank/shape it cannot be."""
    if h.dtype == np.uint8:
        if len(h.shape) == 3:
            n, height, width = h.shape
            c = 1
        elif len(h.shape) == 4:
            n, height, width, c = h.shape
            if not 1 <= c <= MAX_CHANNELS_UINT8:
                raise _fail(path, f"{key} is uint8 {h.shape}: uint8 images are N,H,W or N,H,W,C with C <= "
                                  f"{MAX_CHANNELS_UINT8} (N,C,H,W uint8 is not accepted: transpose to N,H,W,C, "
                                  f"or store float32 N,C,H,W)")
        else:
            raise _fail(path, f"{key} is uint8 with shape {h.shape}: uint8 images are N,H,W or N,H,W,C")
    elif h.dtype == np.float32:
        if len(h.shape) != 4:
            raise _fail(path, f"{key} is float32 with shape {h.shape}: float32 images are N,C,H,W")
        n, c, height, width = h.shape
        if not 1 <= c <= MAX_CHANNELS_FLOAT:
            raise _fail(path, f"{key} is float32 {h.shape}: N,C,H,W with 1..{MAX_CHANNELS_FLOAT} channels expected")
    else:
        raise _fail(path, f"{key} has dtype {h.dtype}: images are uint8 (N,H,W / N,H,W,C) or float32 (N,C,H,W)")
    if n < 1:
        raise _fail(path, f"{key} holds no images")
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise _fail(path, f"{key} images are {height}x{width}; at most {MAX_SIDE} pixels a side")
    return n, c, height, width


def _check_labels(path: Path, key: str, h: _Header, n: int, images: str) -> None:
    """A label header must be a 1-D integer array as long as its images."""
    if h.dtype.kind not in "iu" or h.dtype.hasobject:
        raise _fail(path, f"{key} has dtype {h.dtype}: labels must be integers (class indices 0..K-1)")
    if len(h.shape) != 1:
        raise _fail(path, f"{key} has shape {h.shape}: labels are one integer per image, shape (N,)")
    if h.shape[0] != n:
        raise _fail(path, f"{images} has {n} images but {key} has {h.shape[0]} labels")


def _load(path: Path, npz: Any, key: str, h: _Header) -> np.ndarray:
    """The member's array: memory-mapped when stored uncompressed, else read (allow_pickle=False)."""
    if h.offset is not None:
        try:
            return np.memmap(path, dtype=h.dtype, mode="r", offset=h.offset, shape=h.shape,
                             order="F" if h.fortran else "C")
        except (ValueError, OSError):
            pass  # e.g. a truncated file: the regular reader gives the precise error
    try:
        return npz[key]
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise _fail(path, f"cannot read {key} ({' '.join(str(e).split())[:120]})") from None


def _images_tensor(path: Path, key: str, arr: np.ndarray) -> torch.Tensor:
    """(N, C, H, W) tensor (a private copy) of uint8 N,H,W[,C] or float32 N,C,H,W images."""
    view = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2) if arr.dtype == np.uint8 else arr
    # contiguous and writable: copies a read-only memory map (torch must own its memory), nothing else
    out = np.require(view, requirements=["C", "W", "E"])
    if out.dtype == np.uint8:
        return torch.from_numpy(out)
    for part in np.array_split(out, max(1, len(out) // 4096)):
        if not np.isfinite(part).all():
            raise _fail(path, f"{key} contains NaN or infinite values")
    return torch.from_numpy(out)


def _labels_tensor(path: Path, key: str, arr: np.ndarray, num_classes: int | None) -> torch.Tensor:
    labels = np.asarray(arr).astype(np.int64)
    if labels.size and labels.min() < 0:
        raise _fail(path, f"{key} has a negative label ({int(labels.min())}); labels are class indices 0..K-1")
    if num_classes is not None and labels.size and labels.max() >= num_classes:
        raise _fail(path, f"{key} has label {int(labels.max())}, but y_train's labels are 0..{num_classes - 1}")
    return torch.from_numpy(labels)


def dataset_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """What changes when the file changes (its resolved path, size and modification time); None if missing."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError:
        return None
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def load_npz(path: str | os.PathLike[str], image_size: Any = None, seed: int = 0) -> DatasetSplits:
    """Read an ``npz:`` data set (module doc); ``image_size`` (int or (H, W)) resizes, None keeps the size."""
    p = Path(path).expanduser()
    if not p.exists():
        raise _fail(p, "no such file")
    if not p.is_file():
        raise _fail(p, "not a file (an .npz archive holding " + _LAYOUT + ")")
    size = check_image_size(image_size, None)
    try:
        npz = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise _fail(p, f"not a readable .npz archive ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise _fail(p, "a single .npy array, not an .npz archive with " + _LAYOUT)
    with npz:
        missing = [k for k in KEYS if k not in npz.files]
        if missing:
            raise _fail(p, f"missing {', '.join(missing)} (has: {', '.join(npz.files) or 'nothing'}); expected "
                           + _LAYOUT)
        headers = {k: _read_header(p, npz.zip, k) for k in KEYS}
        for k, h in headers.items():
            if h.dtype.hasobject:
                raise _fail(p, f"{k} holds Python objects; only plain numeric arrays are read")
        shapes = {split: _check_images(p, f"x_{split}", headers[f"x_{split}"]) for split in ("train", "test")}
        for split in ("train", "test"):
            _check_labels(p, f"y_{split}", headers[f"y_{split}"], shapes[split][0], f"x_{split}")
        if headers["x_train"].dtype != headers["x_test"].dtype:
            raise _fail(p, f"x_train is {headers['x_train'].dtype} but x_test {headers['x_test'].dtype}; use one type")
        if shapes["train"][1] != shapes["test"][1]:
            raise _fail(p, f"x_train has {shapes['train'][1]} channel(s) but x_test {shapes['test'][1]}")
        # memory needed: the images as stored, again at the output size, and int64 labels
        item = headers["x_train"].dtype.itemsize
        need = 0
        for n, c, height, width in shapes.values():
            out_h, out_w = size_hw(size) if size is not None else (height, width)
            need += n * c * (height * width + out_h * out_w) * item + 8 * n
        limit = max_data_bytes()
        if need > limit:
            raise _fail(p, f"needs about {need / 2**30:.1f} GiB in memory, over the limit of {limit / 2**30:.1f} GiB "
                           f"(set $QOS_MAX_DATA_BYTES to allow more)")
        y_train = _labels_tensor(p, "y_train", _load(p, npz, "y_train", headers["y_train"]), None)
        num_classes = int(y_train.max()) + 1
        if num_classes > MAX_CLASSES:
            raise _fail(p, f"y_train's largest label is {num_classes - 1}; at most {MAX_CLASSES} classes")
        y_test = _labels_tensor(p, "y_test", _load(p, npz, "y_test", headers["y_test"]), num_classes)
        x_train = _images_tensor(p, "x_train", _load(p, npz, "x_train", headers["x_train"]))
        x_test = _images_tensor(p, "x_test", _load(p, npz, "x_test", headers["x_test"]))
    return user_splits(f"npz:{path}", (x_train, y_train), (x_test, y_test), [str(i) for i in range(num_classes)],
                       size, seed, source=str(p.resolve()),
                       notes={"split": "90/10 of x_train (stratified) + x_test", "format": "npz",
                              "stored": f"{headers['x_train'].dtype} {headers['x_train'].shape}"})
