"""TinyImageNet-200 from the official folder layout (read with Pillow), no download."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import QosError
from .core import DatasetSplits, make_splits

FOLDER = "tiny-imagenet-200"
VAL_FRACTION = 0.1   # held out of train/, stratified; the labelled val/ folder is the test split
_EXTS = (".jpeg", ".jpg", ".png")
_LAYOUT = "wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"


def _root(data_dir: Path) -> Path:
    for folder in (data_dir, data_dir / FOLDER):
        if (folder / "wnids.txt").is_file():
            return folder
    if not data_dir.is_dir():
        raise QosError(f"tinyimagenet: data folder {data_dir} does not exist (expected {_LAYOUT} in it or in "
                       f"{data_dir / FOLDER}: the tiny-imagenet-200.zip archive, extracted)")
    raise QosError(f"tinyimagenet: expected {_LAYOUT} in {data_dir} or {data_dir / FOLDER} "
                   f"(the tiny-imagenet-200.zip archive, extracted); not found: wnids.txt")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _EXTS and p.is_file())


def _load_images(paths: list[Path], size: int) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError:
        raise QosError("tinyimagenet: reading the JPEG files needs Pillow (pip install pillow)") from None

    def one(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")  # some TinyImageNet images are greyscale
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
        except (OSError, ValueError) as exc:
            raise QosError(f"tinyimagenet: cannot read image {path} ({exc})") from None

    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    # Pillow releases the GIL while decoding, so threads help on large folders
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for i, arr in enumerate(pool.map(one, paths)):
            out[i] = arr
    return torch.from_numpy(out)


def load_tinyimagenet(data_dir: Path, image_size: int, seed: int) -> DatasetSplits:
    """Classes are the wnids in sorted order (as an ImageFolder over train/ would number them)."""
    root = _root(data_dir)
    wnids = [w.strip() for w in (root / "wnids.txt").read_text().splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise QosError(f"tinyimagenet: {root / 'wnids.txt'} must list distinct class ids, one per line")
    classes = sorted(wnids)
    index = {w: i for i, w in enumerate(classes)}

    train_paths: list[Path] = []
    train_labels: list[int] = []
    for w in classes:
        folder = root / "train" / w / "images"
        if not folder.is_dir():
            raise QosError(f"tinyimagenet: expected {_LAYOUT} in {root}; not found: train/{w}/images")
        files = _images_in(folder)
        if not files:
            raise QosError(f"tinyimagenet: no images in {folder}")
        train_paths += files
        train_labels += [index[w]] * len(files)

    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise QosError(f"tinyimagenet: expected {_LAYOUT} in {root}; not found: val/val_annotations.txt")
    test_paths: list[Path] = []
    test_labels: list[int] = []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in index:
            raise QosError(f"tinyimagenet: {ann} line {n}: expected '<file>\\t<wnid>...' with a wnid from "
                           f"wnids.txt, got {line.strip()[:80]!r}")
        path = root / "val" / "images" / fields[0].strip()
        if not path.is_file() or Path(fields[0].strip()).name != fields[0].strip():
            raise QosError(f"tinyimagenet: {ann} line {n} names {fields[0].strip()!r}, not found in "
                           f"{root / 'val' / 'images'}")
        test_paths.append(path)
        test_labels.append(index[fields[1].strip()])
    if not test_paths:
        raise QosError(f"tinyimagenet: {ann} lists no images")

    train = (_load_images(train_paths, image_size), torch.tensor(train_labels, dtype=torch.int64))
    test = (_load_images(test_paths, image_size), torch.tensor(test_labels, dtype=torch.int64))
    return make_splits("tinyimagenet", train, test, (VAL_FRACTION,), seed, classes, source=str(root),
                       notes={"split": "90/10 of train/ + val/ as test", "native_size": 64})
