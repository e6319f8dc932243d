"""Dataset registry: a name (as on the command line) maps to a loader of one split.

A loader takes (root, split, options) and returns an ImageSplit. Adding a dataset
is one module with a loader and one line in DATASETS.
"""
from __future__ import annotations

from pathlib import Path

from src.data.base import SPLITS, DatasetOptions, ImageSplit, Loader
from src.data.digits import load_digits_split
from src.io import UserError

DATASETS: dict[str, Loader] = {
    "digits": load_digits_split,
}


def dataset_names() -> list[str]:
    return sorted(DATASETS)


def load_split(name: str, root: Path, split: str, options: DatasetOptions | None = None) -> ImageSplit:
    """Load one split of a named dataset; unknown names and splits are user errors."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    options = options or DatasetOptions()
    if name not in DATASETS:
        raise UserError(f"unknown --dataset {name!r}; choose one of {', '.join(dataset_names())}")
    return DATASETS[name](Path(root), split, options)


__all__ = ["DATASETS", "SPLITS", "DatasetOptions", "ImageSplit", "load_split", "dataset_names"]
