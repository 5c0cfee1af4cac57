"""Shared pieces of the dataset loaders: the image dataset, the splits object, splitting and resizing."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from ..errors import QosError

DATA_DIR_ENV = "QOS_DATA_DIR"
MAX_BYTES_ENV = "QOS_MAX_DATA_BYTES"
#: user data sets (npz, image folders) larger than this in memory are refused before loading
DEFAULT_MAX_DATA_BYTES = 8 << 30


def max_data_bytes() -> int:
    """The in-memory size limit of a user data set: ``$QOS_MAX_DATA_BYTES`` or 8 GiB."""
    text = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_DATA_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise QosError(f"${MAX_BYTES_ENV} must be a positive number of bytes, got {text!r}")
    return value


def default_data_dir() -> Path:
    """``$QOS_DATA_DIR`` if set, else ``./data``."""
    return Path(os.environ.get(DATA_DIR_ENV) or "data")


class ImageDataset(Dataset):
    """Images kept compact (uint8 0..255, or float in [0, 1]) and normalised when indexed.

    ``ds[i]`` gives ``(x, y)``: float32 (C, H, W) and an int64 scalar tensor; ``ds[list]``,
    ``ds[slice]`` or ``ds[tensor]`` give a whole batch ``(x (B, C, H, W), y (B,))``.
    ``x = (image/255 - mean) / std`` per channel (no /255 for float images).
    ``source_indices`` are the positions in the original set the items came from.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 source_indices: np.ndarray | None = None) -> None:
        if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"images (N, C, H, W) and labels (N,) expected, got {tuple(images.shape)}, "
                             f"{tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.source_indices = source_indices

    def __len__(self) -> int:
        return len(self.labels)

    def _normalise(self, img: torch.Tensor) -> torch.Tensor:
        x = img.to(torch.float32)
        if img.dtype == torch.uint8:
            x = x / 255.0
        return (x - self.mean) / self.std

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(index, (list, tuple, np.ndarray)):
            index = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return self._normalise(self.images[index]), self.labels[index]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All items as two tensors, like ``TensorDataset.tensors`` (materialises the normalised images)."""
        return self[:]


class Loaders(NamedTuple):
    """Data loaders for the three splits."""

    train: DataLoader
    val: DataLoader
    test: DataLoader


@dataclass
class DatasetSplits:
    """A dataset split three ways, with the facts a model needs (classes, channels, size, normalisation)."""

    name: str
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()
    source: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    def loaders(self, batch_size: int, shuffle: bool = True, seed: int = 0, num_workers: int = 0,
                drop_last: bool = False, eval_batch_size: int | None = None) -> Loaders:
        """Batched loaders; the training order is shuffled reproducibly from ``seed``, val/test are in order.

        Each batch is fetched with one indexing call (``batch_size=None`` + a batch sampler), so
        a batch is one gather and one normalisation, not ``batch_size`` separate items.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise QosError(f"batch size must be a positive integer, got {batch_size!r}")
        eval_bs = eval_batch_size or batch_size

        def make(ds: ImageDataset, bs: int, train: bool) -> DataLoader:
            if train and shuffle:
                sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
            else:
                sampler = SequentialSampler(ds)
            batches = BatchSampler(sampler, bs, drop_last=drop_last and train)
            return DataLoader(ds, sampler=batches, batch_size=None, num_workers=num_workers)

        return Loaders(make(self.train, batch_size, True), make(self.val, eval_bs, False),
                       make(self.test, eval_bs, False))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Per-sample model input (C, H, W), from the stored images (H may differ from W)."""
        return self.in_channels, int(self.train.images.shape[-2]), int(self.train.images.shape[-1])

    def __repr__(self) -> str:
        return (f"DatasetSplits({self.name!r}, train={len(self.train)}, val={len(self.val)}, test={len(self.test)}, "
                f"classes={self.num_classes}, {'x'.join(map(str, self.input_shape))})")


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices per class into len(fractions) + 1 parts: the given fractions, then the rest.

    Deterministic across runs, machines and NumPy versions: it uses only the legacy
    ``np.random.RandomState`` stream (frozen by NEP 19), classes in sorted order, and
    rounds half up. Each returned index array is sorted.
    """
    rs = np.random.RandomState(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    labels = np.asarray(labels)
    for c in np.unique(labels):
        idx = rs.permutation(np.flatnonzero(labels == c))
        start = 0
        for p, frac in enumerate(fractions):
            take = int(np.floor(len(idx) * frac + 0.5))
            parts[p].append(idx[start:start + take])
            start += take
        parts[-1].append(idx[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def check_seed(seed: Any) -> int:
    """A split seed must be an int in 0..2**32-1 (the RandomState range)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise QosError(f"seed must be an integer in 0..2**32-1, got {seed!r}")
    return int(seed)


def check_image_size(size: Any, default: Any) -> Any:
    """Resolve ``image_size`` (None -> ``default``, the dataset's native size) and check it:
    one int (square) or (height, width), each in 4..1024. A square (H, W) comes back as one int."""
    if size is None:
        return default
    sides = list(size) if isinstance(size, (tuple, list)) else [size]
    if len(sides) not in (1, 2) or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                                       or not 4 <= v <= 1024 for v in sides):
        raise QosError(f"image_size must be an integer in 4..1024 or (height, width) of such, got {size!r}")
    if len(sides) == 1 or sides[0] == sides[1]:
        return int(sides[0])
    return int(sides[0]), int(sides[1])


def check_normalization(mean: Sequence[float], std: Sequence[float], channels: int,
                        what: str = "normalization") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``mean``/``std`` for ``channels`` channels (one value is used for every channel);
    finite, std > 0. QosError otherwise."""
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) == 1:
        mean *= channels
    if len(std) == 1:
        std *= channels
    if len(mean) != channels or len(std) != channels:
        raise QosError(f"{what}: {len(mean)} mean and {len(std)} std values for images with {channels} "
                       f"channel(s); give one value or one per channel")
    if not all(np.isfinite(v) for v in mean) or not all(np.isfinite(v) and v > 0 for v in std):
        raise QosError(f"{what}: mean must be finite and std positive, got mean {list(mean)}, std {list(std)}")
    return mean, std


def with_normalization(splits: "DatasetSplits", mean: Sequence[float], std: Sequence[float],
                       what: str = "normalization") -> "DatasetSplits":
    """``splits`` normalised with the given per-channel mean/std instead of the training split's."""
    m, s = check_normalization(mean, std, splits.in_channels, what)

    def ds(d: ImageDataset) -> ImageDataset:
        return ImageDataset(d.images, d.labels, m, s, d.source_indices)

    return dataclasses.replace(splits, train=ds(splits.train), val=ds(splits.val), test=ds(splits.test),
                               mean=m, std=s, notes={**splits.notes, "normalization": "given"})


def size_hw(size: "int | Sequence[int]") -> tuple[int, int]:
    """``16`` -> (16, 16); ``(12, 16)`` -> (12, 16) (height, width)."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def resize(images: torch.Tensor, size: "int | Sequence[int]", chunk: int = 2048) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) images to ``size`` (one side, or (H, W)), antialiased when
    shrinking; keeps the dtype."""
    hw = size_hw(size)
    if tuple(images.shape[-2:]) == hw:
        return images
    shrink = hw[1] < images.shape[-1] or hw[0] < images.shape[-2]
    out = []
    for part in torch.split(images, chunk):
        y = F.interpolate(part.to(torch.float32), size=hw, mode="bilinear", align_corners=False,
                          antialias=shrink)
        if images.dtype == torch.uint8:
            y = y.round().clamp_(0, 255).to(torch.uint8)
        out.append(y)
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], *hw))


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of images scaled to [0, 1] (float64 accumulation, chunked)."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for part in torch.split(images, chunk):
        x = part.to(torch.float64)
        if images.dtype == torch.uint8:
            x = x / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if count == 0:
        return (0.0,) * c, (1.0,) * c
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def make_splits(name: str, train_pool: tuple[torch.Tensor, torch.Tensor],
                test: tuple[torch.Tensor, torch.Tensor] | None,
                fractions: Sequence[float], seed: int, classes: Sequence[str], source: str,
                notes: dict[str, Any] | None = None) -> DatasetSplits:
    """Split ``train_pool`` stratified (train + val [+ test when ``test`` is None]) and normalise by train stats.

    ``fractions`` are the held-out fractions: (val,) when a test set is given, else (val, test).
    """
    images, labels = train_pool
    parts = stratified_split(labels.numpy(), fractions, seed)
    if test is None:
        val_idx, test_idx, train_idx = parts
        test_images, test_labels = images[torch.as_tensor(test_idx)], labels[torch.as_tensor(test_idx)]
    else:
        val_idx, train_idx = parts
        test_images, test_labels = test
        test_idx = np.arange(len(test_labels))
    train_images = images[torch.as_tensor(train_idx)]
    mean, std = channel_stats(train_images)

    def ds(img: torch.Tensor, lab: torch.Tensor, idx: np.ndarray) -> ImageDataset:
        return ImageDataset(img, lab, mean, std, idx)

    return DatasetSplits(
        name=name,
        train=ds(train_images, labels[torch.as_tensor(train_idx)], train_idx),
        val=ds(images[torch.as_tensor(val_idx)], labels[torch.as_tensor(val_idx)], val_idx),
        test=ds(test_images, test_labels, test_idx),
        num_classes=len(classes),
        in_channels=int(images.shape[1]),
        image_size=int(images.shape[-1]),
        mean=mean,
        std=std,
        classes=tuple(classes),
        source=source,
        notes=dict(notes or {}),
    )


#: share of a user data set's training samples held out (stratified) as the validation split
USER_VAL_FRACTION = 0.1


def user_splits(name: str, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                classes: Sequence[str], image_size: Any, seed: int, source: str,
                notes: dict[str, Any] | None = None) -> DatasetSplits:
    """Splits of a user data set (npz, image folder): ``train`` split 90/10 into train/val
    (stratified by ``seed``), ``test`` as given, both resized to ``image_size`` when given.

    Images are (N, C, H, W) uint8 (0..255) or float32; labels int64 in 0..len(classes)-1.
    QosError when the two sets disagree in channels or size (without ``image_size``) or the
    validation split would be empty.
    """
    (x_tr, y_tr), (x_te, y_te) = train, test
    if x_tr.shape[1] != x_te.shape[1]:
        raise QosError(f"{name}: training images have {x_tr.shape[1]} channel(s), test images {x_te.shape[1]}")
    if x_tr.dtype != x_te.dtype:
        raise QosError(f"{name}: training images are {x_tr.dtype}, test images {x_te.dtype}; use one type")
    size = check_image_size(image_size, None)
    if size is None and tuple(x_tr.shape[-2:]) != tuple(x_te.shape[-2:]):
        raise QosError(f"{name}: training images are {x_tr.shape[-2]}x{x_tr.shape[-1]}, test images "
                       f"{x_te.shape[-2]}x{x_te.shape[-1]}; give --input-size to resize both")
    if size is not None:
        x_tr, x_te = resize(x_tr, size), resize(x_te, size)
    elif not all(4 <= int(v) <= 1024 for v in x_tr.shape[-2:]):
        raise QosError(f"{name}: images are {x_tr.shape[-2]}x{x_tr.shape[-1]}; models take 4..1024 pixels a side, "
                       f"give --input-size to resize")
    splits = make_splits(name, (x_tr, y_tr), (x_te, y_te), (USER_VAL_FRACTION,), seed, classes, source, notes)
    if len(splits.val) == 0:
        raise QosError(f"{name}: too few training samples to hold out a validation split ({len(y_tr)} samples; "
                       f"{USER_VAL_FRACTION:.0%} of each class is held out, so a class needs at least 5)")
    return splits
