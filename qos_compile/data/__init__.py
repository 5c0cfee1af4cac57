"""Datasets from local files only (never downloaded): digits, CIFAR-10/100, TinyImageNet.

``load_dataset(name, data_dir, image_size, seed)`` returns a :class:`DatasetSplits`
with ``train``/``val``/``test`` :class:`ImageDataset` s (``ds[i] -> (x, y)``), the
class count, channels, image size and the per-channel normalisation (computed on
the training split). Splits are stratified and seeded and reproduce exactly on any
machine for a given seed.

* ``digits``: scikit-learn's bundled 8x8 digits, upsampled to 16x16 by default, 70/15/15.
* ``cifar10`` / ``cifar100``: the official python batches; 90/10 train/val + the test batch.
* ``tinyimagenet``: the official ``tiny-imagenet-200`` folder; 90/10 of train/ + val/ as test.
* ``npz:PATH``: the user's arrays ``x_train``/``y_train``/``x_test``/``y_test`` (``data/npz.py``).
* ``imagefolder:DIR``: the user's ``DIR/train/<class>/*.png|jpg`` and ``DIR/test/...`` (``data/imagefolder.py``).

``data_dir`` (default ``$QOS_DATA_DIR`` or ``./data``) may point at the dataset's own
folder (``cifar-10-batches-py``, ``cifar-100-python``, ``tiny-imagenet-200``) or its parent.
"""
from __future__ import annotations

from pathlib import Path

from typing import Any, Callable, Sequence

from ..errors import QosError
from .core import (DATA_DIR_ENV, DatasetSplits, ImageDataset, Loaders, check_image_size, check_normalization,
                   check_seed, default_data_dir, stratified_split, with_normalization)
from .safe_pickle import SafeUnpickler, safe_load

DATASET_NAMES = ("digits", "cifar10", "cifar100", "tinyimagenet")
_ALIASES = {"tinyimagenet200": "tinyimagenet", "mnistdigits": "digits"}
_NATIVE_SIZE = {"digits": 16, "cifar10": 32, "cifar100": 32, "tinyimagenet": 64}


def _read_npz(path: str, image_size: Any, seed: int) -> DatasetSplits:
    from .npz import load_npz

    return load_npz(path, image_size, seed)


def _read_imagefolder(path: str, image_size: Any, seed: int) -> DatasetSplits:
    from .imagefolder import load_imagefolder

    return load_imagefolder(path, image_size, seed)


def _fingerprint_npz(path: str) -> str | None:
    from .npz import dataset_fingerprint

    return dataset_fingerprint(path)


def _fingerprint_imagefolder(path: str) -> str | None:
    from .imagefolder import dataset_fingerprint

    return dataset_fingerprint(path)


#: ``KIND:PATH`` data sets of the user's own files: kind -> (reader(path, image_size, seed), fingerprint(path))
FILE_READERS: dict[str, tuple[Callable[[str, Any, int], DatasetSplits], Callable[[str], str | None]]] = {
    "npz": (_read_npz, _fingerprint_npz),
    "imagefolder": (_read_imagefolder, _fingerprint_imagefolder),
}
_FILE_SPELLINGS = "npz:FILE.npz, imagefolder:DIR"


def dataset_names() -> list[str]:
    """Names ``load_dataset`` accepts (besides ``npz:PATH`` and ``imagefolder:DIR``)."""
    return list(DATASET_NAMES)


def file_dataset(name: str) -> tuple[str, str] | None:
    """``("npz", PATH)`` for ``npz:PATH`` (likewise ``imagefolder:DIR``), None for a built-in name."""
    kind, sep, path = str(name).strip().partition(":")
    if not sep or kind.strip().lower() not in FILE_READERS:
        return None
    if not path.strip():
        raise QosError(f"dataset {name!r}: give a path after '{kind}:' (e.g. {_FILE_SPELLINGS})")
    return kind.strip().lower(), path.strip()


def canonical_dataset_name(name: str, absolute: bool = False) -> str:
    """The canonical spelling of a dataset name (``digits``, ``npz:PATH`` ...; with ``absolute``, the
    user's paths made absolute, which identifies them from any folder); QosError if unknown."""
    spec = file_dataset(name)
    if spec is not None:
        return f"{spec[0]}:{Path(spec[1]).expanduser().resolve() if absolute else spec[1]}"
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise QosError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}, or your own files: "
                       f"{_FILE_SPELLINGS}")
    return key


def dataset_fingerprint(name: str) -> str | None:
    """For the user's own files, a text that changes when they change (cache keys); None otherwise."""
    spec = file_dataset(name)
    return None if spec is None else FILE_READERS[spec[0]][1](spec[1])


def load_dataset(name: str, data_dir: str | Path | None = None, image_size: Any = None,
                 seed: int = 0, normalize: tuple[Sequence[float], Sequence[float]] | None = None) -> DatasetSplits:
    """Load a dataset by name from local files; raise one clear QosError when it is missing or malformed.

    ``name``: a built-in name or ``npz:PATH`` / ``imagefolder:DIR`` (``qos_compile.data.npz``,
    ``qos_compile.data.imagefolder``). ``image_size=None`` keeps the default size (digits 16,
    CIFAR 32, TinyImageNet 64, the user's files as stored); another size (one int, or
    (height, width) for the user's files) resizes bilinearly. ``seed`` fixes the stratified
    split. ``normalize=(mean, std)`` (per channel, images in [0, 1]) replaces the statistics
    of the training split.
    """
    seed = check_seed(seed)
    spec = file_dataset(name)
    if spec is not None:
        splits = FILE_READERS[spec[0]][0](spec[1], image_size, seed)
    else:
        key = canonical_dataset_name(name)
        size = check_image_size(image_size, _NATIVE_SIZE[key])
        if not isinstance(size, int):
            raise QosError(f"{key}: give one image size (square images), got {size[0]}x{size[1]}")
        splits = _load_builtin(key, data_dir, size, seed)
    if normalize is not None:
        splits = with_normalization(splits, normalize[0], normalize[1], what="--normalize")
    return splits


def _load_builtin(key: str, data_dir: str | Path | None, size: int, seed: int) -> DatasetSplits:
    if key == "digits":
        from .digits import load_digits_splits

        return load_digits_splits(size, seed)
    base = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if key in ("cifar10", "cifar100"):
        from .cifar import load_cifar

        return load_cifar(key, base, size, seed)
    from .tinyimagenet import load_tinyimagenet

    return load_tinyimagenet(base, size, seed)


__all__ = ["DATASET_NAMES", "DATA_DIR_ENV", "FILE_READERS", "DatasetSplits", "ImageDataset", "Loaders", "SafeUnpickler",
           "canonical_dataset_name", "check_normalization", "dataset_fingerprint", "dataset_names", "default_data_dir",
           "file_dataset", "load_dataset", "safe_load", "stratified_split"]
