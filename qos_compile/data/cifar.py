"""CIFAR-10 / CIFAR-100 from the official "python version" pickled batches in a local folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import QosError
from .core import DatasetSplits, make_splits, resize
from .safe_pickle import RefusedGlobal, safe_load

VAL_FRACTION = 0.1  # held out of the training batches, stratified; the official test batch is the test split

_SPECS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": "test_batch",
        "label_key": "labels",
        "meta": ("batches.meta", "label_names"),
        "num_classes": 10,
        "expected": "data_batch_1..5 and test_batch",
        "archive": "the 'CIFAR-10 python version' archive, extracted",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": "test",
        "label_key": "fine_labels",
        "meta": ("meta", "fine_label_names"),
        "num_classes": 100,
        "expected": "train and test",
        "archive": "the 'CIFAR-100 python version' archive, extracted",
    },
}


def _find_folder(name: str, base: Path) -> Path:
    spec = _SPECS[name]
    files = [*spec["train"], spec["test"]]
    where = f"{base} or {base / spec['folder']}"
    if not base.is_dir():
        raise QosError(f"{name}: data folder {base} does not exist (expected {spec['expected']} in {where}: "
                       f"{spec['archive']})")
    for folder in (base, base / spec["folder"]):
        if folder.is_dir() and any((folder / f).is_file() for f in files):
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise QosError(f"{name}: expected {spec['expected']} in {folder} ({spec['archive']}); "
                               f"not found: {', '.join(missing)}")
            return folder
    raise QosError(f"{name}: expected {spec['expected']} in {where} ({spec['archive']}); not found: all of them")


def _str_keys(obj: Any) -> dict[str, Any]:
    # Python 2 pickles read as latin-1 give str keys, Python 3 ones may keep bytes keys
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def read_batch(path: Path, name: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file safely: returns uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    try:
        with open(path, "rb") as f:
            obj = safe_load(f)
    except RefusedGlobal as exc:
        raise QosError(f"{name}: {path} is not a plain CIFAR batch ({exc}); refusing to load it") from None
    except Exception as exc:  # any unpickling failure means a damaged or foreign file
        raise QosError(f"{name}: {path} is not a readable CIFAR python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise QosError(f"{name}: {path} is not a CIFAR python batch (a {type(obj).__name__}, not a dict)")
    obj = _str_keys(obj)
    if "data" not in obj or label_key not in obj:
        raise QosError(f"{name}: {path} has no 'data' and '{label_key}' entries (keys: {', '.join(map(str, obj))})")
    data = obj["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise QosError(f"{name}: {path}: 'data' must be a uint8 array (N, 3072), got {what}")
    try:
        labels = np.asarray(obj[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise QosError(f"{name}: {path}: '{label_key}' must be a list of integers") from None
    if len(labels) != len(data):
        raise QosError(f"{name}: {path}: {len(data)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise QosError(f"{name}: {path}: labels must lie in 0..{num_classes - 1}")
    # rows are 1024 red, 1024 green, 1024 blue values, each a 32x32 image row-major
    return data.reshape(-1, 3, 32, 32), labels


def _class_names(name: str, folder: Path) -> list[str]:
    spec = _SPECS[name]
    meta_file, key = spec["meta"]
    n = spec["num_classes"]
    path = folder / meta_file
    if path.is_file():
        try:
            with open(path, "rb") as f:
                meta = _str_keys(safe_load(f))
            names = [v.decode() if isinstance(v, bytes) else str(v) for v in meta[key]]
            if len(names) == n:
                return names
        except Exception:  # names are cosmetic: a bad meta file must not hide the data  # noqa: BLE001
            pass
    return [str(i) for i in range(n)]


def load_cifar(name: str, data_dir: Path, image_size: int, seed: int) -> DatasetSplits:
    """CIFAR-10/100: train batches split 90/10 (train/val, stratified by ``seed``), official test batch as test."""
    spec = _SPECS[name]
    folder = _find_folder(name, data_dir)
    parts = [read_batch(folder / f, name, spec["label_key"], spec["num_classes"]) for f in spec["train"]]
    train_x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    train_y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    tx, ty = read_batch(folder / spec["test"], name, spec["label_key"], spec["num_classes"])
    test = (resize(torch.from_numpy(tx), image_size), torch.from_numpy(ty))
    return make_splits(name, (resize(train_x, image_size), train_y), test, (VAL_FRACTION,), seed,
                       _class_names(name, folder), source=str(folder),
                       notes={"split": "90/10 of the training batches + official test batch", "native_size": 32})
