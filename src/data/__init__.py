"""Dataset registry: a name (as on the command line) maps to a loader of one split.

A loader takes (root, split, options) and returns an ImageSplit. Adding a dataset
is one module with a loader and one line in DATASETS. `imagefolder:<path>` names a
user's own `<path>/{train,val,test}/<class>/` tree instead of a registered dataset.
"""
from __future__ import annotations

from pathlib import Path

from src.data.base import SPLITS, DatasetOptions, ImageSplit, Loader
from src.data.digits import load_digits_split
from src.data.fashionmnist import SMALL_SIZES, fashionmnist_loader
from src.data.imagefolder import load_imagefolder_split
from src.data.medimeta import MEDIMETA_TASKS, medimeta_loader
from src.data.medmnist import MEDMNIST_FLAGS, medmnist_loader
from src.data.octdl import load_octdl_split
from src.data.torchvision_sets import (load_aircraft_split, load_dtd_split, load_oxford_pets_split,
                                       load_stl10_split)
from src.cli import UserError

IMAGEFOLDER_PREFIX = "imagefolder:"

DATASETS: dict[str, Loader] = {
    "digits": load_digits_split,
    **{flag: medmnist_loader(flag) for flag in MEDMNIST_FLAGS},  # breastmnist, pathmnist, ... (2D only)
    **{dataset_id: medimeta_loader(dataset_id) for dataset_id in MEDIMETA_TASKS},  # organs_axial, skinl_derm
    "octdl": load_octdl_split,
    "dtd": load_dtd_split,
    "aircraft": load_aircraft_split,
    "stl10": load_stl10_split,
    "oxford-pets": load_oxford_pets_split,
    "fashionmnist": fashionmnist_loader(None),
    "fashionmnist-10k": fashionmnist_loader(SMALL_SIZES),  # stratified 10,000 / 1,000 / 2,000
}


def dataset_names() -> list[str]:
    return sorted(DATASETS)


def load_split(name: str, root: Path, split: str, options: DatasetOptions | None = None) -> ImageSplit:
    """Load one split of a named dataset; unknown names and splits are user errors."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    options = options or DatasetOptions()
    if name.startswith(IMAGEFOLDER_PREFIX):
        return load_imagefolder_split(Path(name[len(IMAGEFOLDER_PREFIX):]), split, options)
    if name not in DATASETS:
        raise UserError(f"unknown --dataset {name!r}; choose one of {', '.join(dataset_names())} "
                        f"or {IMAGEFOLDER_PREFIX}<path>")
    return DATASETS[name](Path(root), split, options)


__all__ = ["DATASETS", "IMAGEFOLDER_PREFIX", "SPLITS", "DatasetOptions", "ImageSplit", "load_split", "dataset_names"]
