"""A user data set as a folder of image files: ``--dataset imagefolder:DIR``.

Layout (as torchvision's ``ImageFolder`` over two folders)::

    DIR/train/<class>/*.png|*.jpg|*.jpeg     (sub-folders of a class folder count too)
    DIR/test/<class>/...

Classes are the sub-folder names of ``train/`` in sorted order and must be the same in
``test/``. Images are read with Pillow: all greyscale -> 1 channel, otherwise RGB (alpha
dropped); resized bilinearly to ``image_size`` when given, else they must all be one size.
Hidden files and folders (``.name``) and files with other extensions are skipped. Counts and
sizes are checked from the image headers (with the size limit, ``$QOS_MAX_DATA_BYTES``,
default 8 GiB) before anything is decoded. 10 % of the training images (stratified) become
the validation split.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import QosError
from .core import DatasetSplits, check_image_size, max_data_bytes, size_hw, user_splits

EXTENSIONS = (".png", ".jpg", ".jpeg")
MAX_SIDE = 8192          # pixels per image side (a larger one is refused before decoding)
MAX_IMAGES = 10_000_000
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
_LAYOUT = "DIR/train/<class>/*.png|jpg and DIR/test/<class>/*.png|jpg"


def _fail(root: Path, what: str) -> QosError:
    return QosError(f"imagefolder:{root}: {what}")


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        raise QosError("imagefolder: reading images needs Pillow (pip install pillow)") from None
    return Image


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _class_folders(root: Path, split: str) -> list[str]:
    folder = root / split
    if not folder.is_dir():
        raise _fail(root, f"no {split}/ folder (expected {_LAYOUT})")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and _visible(e.name))
    if not classes:
        raise _fail(root, f"{split}/ has no class folders (expected {_LAYOUT})")
    return classes


def _image_files(root: Path, split: str, cls: str) -> list[Path]:
    """Every image file under ``split/cls`` (recursively, sorted), skipping hidden entries."""
    found: list[Path] = []
    for here, dirs, files in os.walk(root / split / cls):
        dirs[:] = sorted(d for d in dirs if _visible(d))
        found += [Path(here) / f for f in sorted(files)
                  if _visible(f) and os.path.splitext(f)[1].lower() in EXTENSIONS]
    if not found:
        raise _fail(root, f"empty class folder {split}/{cls} (no {'/'.join(e[1:] for e in EXTENSIONS)} files)")
    return found


def _probe(root: Path, path: Path) -> tuple[tuple[int, int], str]:
    """(width, height) and mode from the image's header (nothing decoded yet)."""
    Image = _pillow()
    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _fail(root, f"cannot read image {path.relative_to(root)} ({' '.join(str(e).split())[:100]})") from None


def _decode(root: Path, paths: list[Path], mode: str, hw: tuple[int, int]) -> torch.Tensor:
    """Decode ``paths`` to uint8 (N, C, H, W), converted to ``mode`` ("L" or "RGB") and resized to ``hw``."""
    Image = _pillow()
    channels = 1 if mode == "L" else 3

    def one(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                im = im.convert(mode)
                if im.size != (hw[1], hw[0]):
                    im = im.resize((hw[1], hw[0]), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise _fail(root, f"cannot read image {path.relative_to(root)} "
                              f"({' '.join(str(e).split())[:100]})") from None
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    out = np.empty((len(paths), channels, *hw), dtype=np.uint8)
    # Pillow releases the GIL while decoding, so threads help on large folders
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for i, arr in enumerate(pool.map(one, paths)):
            out[i] = arr
    return torch.from_numpy(out)


def dataset_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """A hash of every file's relative path, size and modification time under ``train/`` and ``test/``."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return None
    h = hashlib.sha256(str(root.resolve()).encode())
    for split in ("train", "test"):
        for here, dirs, files in os.walk(root / split):
            dirs.sort()
            for f in sorted(files):
                try:
                    st = (Path(here) / f).stat()
                except OSError:
                    continue
                h.update(f"{os.path.relpath(os.path.join(here, f), root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_imagefolder(path: str | os.PathLike[str], image_size: Any = None, seed: int = 0) -> DatasetSplits:
    """Read an ``imagefolder:`` data set (module doc); ``image_size`` (int or (H, W)) resizes."""
    root = Path(path).expanduser()
    if not root.exists():
        raise _fail(root, f"no such folder (expected {_LAYOUT})")
    if not root.is_dir():
        raise _fail(root, f"not a folder (expected {_LAYOUT})")
    size = check_image_size(image_size, None)
    classes = _class_folders(root, "train")
    test_classes = _class_folders(root, "test")
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        parts = ([f"only in train/: {', '.join(only_train[:5])}"] if only_train else []) + \
                ([f"only in test/: {', '.join(only_test[:5])}"] if only_test else [])
        raise _fail(root, f"train/ and test/ have different class folders ({'; '.join(parts)})")
    files = {split: [(p, k) for k, cls in enumerate(classes) for p in _image_files(root, split, cls)]
             for split in ("train", "test")}
    count = sum(len(v) for v in files.values())
    if count > MAX_IMAGES:
        raise _fail(root, f"{count} images; at most {MAX_IMAGES}")
    probes = {split: [_probe(root, p) for p, _ in v] for split, v in files.items()}
    every = [(pr, p) for split in files for pr, (p, _) in zip(probes[split], files[split])]
    for (w, h), p in ((pr[0], p) for pr, p in every):
        if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
            raise _fail(root, f"image {p.relative_to(root)} is {h}x{w}; at most {MAX_SIDE} pixels a side")
    mode = "L" if all(pr[1] in _GREY_MODES for pr, _ in every) else "RGB"
    if size is None:
        sizes = {pr[0] for pr, _ in every}
        if len(sizes) > 1:
            (w0, h0), p0 = every[0][0][0], every[0][1]
            w1, h1 = next(pr[0] for pr, _ in every if pr[0] != (w0, h0))
            p1 = next(p for pr, p in every if pr[0] == (w1, h1))
            raise _fail(root, f"images differ in size ({p0.relative_to(root)} is {h0}x{w0}, {p1.relative_to(root)} "
                              f"{h1}x{w1}); give --input-size to resize them")
        w0, h0 = next(iter(sizes))
        hw = (h0, w0)
    else:
        hw = size_hw(size)
    need = count * (1 if mode == "L" else 3) * hw[0] * hw[1] + 8 * count
    limit = max_data_bytes()
    if need > limit:
        raise _fail(root, f"needs about {need / 2**30:.1f} GiB in memory, over the limit of {limit / 2**30:.1f} GiB "
                          f"(set $QOS_MAX_DATA_BYTES to allow more)")
    data = {}
    for split, v in files.items():
        data[split] = (_decode(root, [p for p, _ in v], mode, hw), torch.tensor([k for _, k in v], dtype=torch.int64))
    return user_splits(f"imagefolder:{path}", data["train"], data["test"], classes, None if size is None else hw,
                       seed, source=str(root.resolve()),
                       notes={"split": "90/10 of train/ (stratified) + test/", "format": "imagefolder",
                              "mode": mode})
