"""What every dataset loader returns, and the options they share."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from src.naming import SPLITS  # noqa: F401 (re-exported: the loaders' split names)



@dataclass
class DatasetOptions:
    download: bool = False  # fetch missing files where the source allows it (never in CI)
    size: int = 224  # MedMNIST+ image size (28, 64, 128 or 224)


@dataclass
class ImageSplit:
    """One split of an image dataset, in one of two forms.

    `images`: uint8 array N x H x W x C (C = 1 or 3), for datasets whose images
    share one size; extraction moves whole batches to the device and resizes and
    normalises them there. `samples`: a map-style dataset whose item i is an RGB
    PIL image, for variable-sized images; extraction runs the backbone's own eval
    transform in DataLoader workers. Exactly one of the two is set.
    """

    labels: np.ndarray  # int64, N
    class_names: list[str]
    images: np.ndarray | None = None
    samples: Dataset | None = None
    source: dict = field(default_factory=dict)  # where the data came from, for the metadata

    def __post_init__(self) -> None:
        if (self.images is None) == (self.samples is None):
            raise ValueError("ImageSplit needs exactly one of images or samples")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        count = len(self.images) if self.images is not None else len(self.samples)
        if count != len(self.labels):
            raise ValueError(f"{count} images but {len(self.labels)} labels")
        if self.images is not None and (self.images.dtype != np.uint8 or self.images.ndim != 4):
            raise ValueError(f"images must be uint8 N x H x W x C, got {self.images.dtype} {self.images.shape}")

    def __len__(self) -> int:
        return len(self.labels)


Loader = Callable[[Path, str, DatasetOptions], ImageSplit]
