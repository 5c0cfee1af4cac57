"""scikit-learn's bundled handwritten digits (no download): 1,797 grey 8x8 images, 10 classes."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import QosError
from .core import DatasetSplits, make_splits, resize

DEFAULT_SIZE = 16          # 8x8 upsampled to 16x16: big enough for LeNet-5 (>= 12) and cheap to emulate
FRACTIONS = (0.15, 0.15)   # val, test; the remaining 70 % trains


def load_digits_splits(image_size: int, seed: int) -> DatasetSplits:
    """Digits scaled to [0, 1] (pixel/16), bilinearly resized to ``image_size``, split 70/15/15 stratified."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise QosError(f"digits: scikit-learn is needed for the bundled digits ({exc})") from None
    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None]
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    images = resize(images, image_size)
    return make_splits("digits", (images, labels), None, FRACTIONS, seed, [str(d) for d in range(10)],
                       source="sklearn.datasets.load_digits (bundled with scikit-learn)",
                       notes={"split": "70/15/15 stratified", "native_size": 8})
