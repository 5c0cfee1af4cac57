"""Datasets from local files only (never downloaded): digits, CIFAR-10/100, TinyImageNet.

``load_dataset(name, data_dir, image_size, seed)`` returns a :class:`DatasetSplits`
with ``train``/``val``/``test`` :class:`ImageDataset` s (``ds[i] -> (x, y)``), the
class count, channels, image size and the per-channel normalisation (computed on
the training split). Splits are stratified and seeded and reproduce exactly on any
machine for a given seed.

* ``digits``: scikit-learn's bundled 8x8 digits, upsampled to 16x16 by default, 70/15/15.
* ``cifar10`` / ``cifar100``: the official python batches; 90/10 train/val + the test batch.
* ``tinyimagenet``: the official ``tiny-imagenet-200`` folder; 90/10 of train/ + val/ as test.

``data_dir`` (default ``$QOS_DATA_DIR`` or ``./data``) may point at the dataset's own
folder (``cifar-10-batches-py``, ``cifar-100-python``, ``tiny-imagenet-200``) or its parent.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import QosError
from .core import (DATA_DIR_ENV, DatasetSplits, ImageDataset, Loaders, check_image_size, check_seed,
                   default_data_dir, stratified_split)
from .safe_pickle import SafeUnpickler, safe_load

DATASET_NAMES = ("digits", "cifar10", "cifar100", "tinyimagenet")
_ALIASES = {"tinyimagenet200": "tinyimagenet", "mnistdigits": "digits"}
_NATIVE_SIZE = {"digits": 16, "cifar10": 32, "cifar100": 32, "tinyimagenet": 64}


def dataset_names() -> list[str]:
    """Names ``load_dataset`` accepts."""
    return list(DATASET_NAMES)


def load_dataset(name: str, data_dir: str | Path | None = None, image_size: int | None = None,
                 seed: int = 0) -> DatasetSplits:
    """Load a dataset by name from local files; raise one clear QosError when it is missing or malformed.

    ``image_size=None`` keeps the default size (digits 16, CIFAR 32, TinyImageNet 64);
    another size resizes bilinearly. ``seed`` fixes the stratified split.
    """
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise QosError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    size = check_image_size(image_size, _NATIVE_SIZE[key])
    seed = check_seed(seed)
    if key == "digits":
        from .digits import load_digits_splits

        return load_digits_splits(size, seed)
    base = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if key in ("cifar10", "cifar100"):
        from .cifar import load_cifar

        return load_cifar(key, base, size, seed)
    from .tinyimagenet import load_tinyimagenet

    return load_tinyimagenet(base, size, seed)


__all__ = ["DATASET_NAMES", "DATA_DIR_ENV", "DatasetSplits", "ImageDataset", "Loaders", "SafeUnpickler",
           "dataset_names", "default_data_dir", "load_dataset", "safe_load", "stratified_split"]
