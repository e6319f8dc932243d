"""scikit-learn's handwritten digits: real labelled images that ship with a package.

The built-in offline default. 1,797 grey 8 x 8 images, 10 classes, split once into
train / val / test (60 / 15 / 25 %, stratified, fixed random_state) so that the
split never depends on --seed, as with the paper's fixed validation splits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from src.data.base import DatasetOptions, ImageSplit

SPLIT_SEED = 12345


def load_digits_split(root: Path, split: str, options: DatasetOptions) -> ImageSplit:
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # N x 8 x 8 x 1
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    train_val, test = train_test_split(index, test_size=0.25, stratify=labels, random_state=SPLIT_SEED)
    train, val = train_test_split(train_val, test_size=0.2, stratify=labels[train_val], random_state=SPLIT_SEED)
    chosen = {"train": train, "val": val, "test": test}[split]
    chosen = np.sort(chosen)
    return ImageSplit(labels=labels[chosen], class_names=[str(c) for c in range(10)],
                      images=images[chosen], source={"name": "sklearn.datasets.load_digits"})
