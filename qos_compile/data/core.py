"""Shared pieces of the dataset loaders: the image dataset, the splits object, splitting and resizing."""
from __future__ import annotations

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

    def __repr__(self) -> str:
        return (f"DatasetSplits({self.name!r}, train={len(self.train)}, val={len(self.val)}, test={len(self.test)}, "
                f"classes={self.num_classes}, {self.in_channels}x{self.image_size}x{self.image_size})")


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


def check_image_size(size: Any, default: int) -> int:
    """Resolve ``image_size`` (None -> the dataset's native size) and check it."""
    if size is None:
        return default
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 4 <= size <= 1024:
        raise QosError(f"image_size must be an integer in 4..1024, got {size!r}")
    return int(size)


def resize(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) images to size x size (antialiased when shrinking); keeps the dtype."""
    if images.shape[-2:] == (size, size):
        return images
    shrink = size < images.shape[-1] or size < images.shape[-2]
    out = []
    for part in torch.split(images, chunk):
        y = F.interpolate(part.to(torch.float32), size=(size, size), mode="bilinear", align_corners=False,
                          antialias=shrink)
        if images.dtype == torch.uint8:
            y = y.round().clamp_(0, 255).to(torch.uint8)
        out.append(y)
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], size, size))


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
