"""MedMNIST+ 2D datasets (breastmnist, pathmnist, ...), read from the official `.npz` files.

On disk: `<root>/medmnist/<flag>_<size>.npz` (`<flag>.npz` for size 28) with the keys
`<split>_images` (N x H x W grey or N x H x W x 3 RGB, uint8) and `<split>_labels`
(N x 1). We read the file with numpy rather than through `medmnist`'s dataset class:
the class asserts the official sample counts in `len()` and yields one PIL image at a
time, while extraction wants the whole uint8 array. The class is still used to
download, so its URL and MD5 check stay the package's.
"""
from __future__ import annotations

import zipfile
from functools import partial
from pathlib import Path

import medmnist
import numpy as np
from medmnist import INFO

from src.data.base import DatasetOptions, ImageSplit, Loader
from src.cli import UserError, brief_reason
from src.io import check_npz

MEDMNIST_FLAGS = [flag for flag, info in INFO.items()
                  if issubclass(getattr(medmnist, info["python_class"]), medmnist.dataset.MedMNIST2D)]


def medmnist_file_name(flag: str, size: int) -> str:
    """The official file name: size 28 has no suffix, larger sizes end in `_<size>`."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def size_key(prefix: str, size: int) -> str:
    """Key of a per-size entry (url, MD5) in medmnist.INFO."""
    return prefix if size == 28 else f"{prefix}_{size}"


def download_medmnist(flag: str, folder: Path, size: int, split: str) -> None:
    """Fetch the npz through the medmnist package (it verifies the MD5)."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset_class = getattr(medmnist, INFO[flag]["python_class"])
    try:
        dataset_class(split=split, root=str(folder), size=size, download=True)
    except RuntimeError as err:
        raise UserError(f"download of {medmnist_file_name(flag, size)} failed; fetch "
                        f"{INFO[flag][size_key('url', size)]} by hand into {folder}/") from err


def load_medmnist_split(flag: str, root: Path, split: str, options: DatasetOptions) -> ImageSplit:
    info = INFO[flag]
    if "multi-label" in info["task"]:
        raise UserError(f"--dataset {flag} is multi-label ({info['task']}); the probe needs one label "
                        "per image, so choose a single-label MedMNIST+ dataset")
    if options.size not in medmnist.dataset.MedMNIST2D.available_sizes:
        raise UserError(f"MedMNIST+ size {options.size} does not exist; use one of "
                        f"{', '.join(map(str, medmnist.dataset.MedMNIST2D.available_sizes))}")
    folder = Path(root) / "medmnist"
    path = folder / medmnist_file_name(flag, options.size)
    if not path.is_file() and options.download:
        download_medmnist(flag, folder, options.size, split)
    if not path.is_file():
        raise UserError(f"missing {path.name} in {folder}/: download it from the MedMNIST+ Zenodo record "
                        f"({info[size_key('url', options.size)]}) into that folder, or pass --download")
    check_npz(path, "delete it and download it again")
    try:
        with np.load(path, allow_pickle=False) as npz:
            images = np.asarray(npz[f"{split}_images"])
            labels = np.asarray(npz[f"{split}_labels"])
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise UserError(f"cannot read {path} ({brief_reason(err)}); delete it and download it again") from err
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8 or labels.shape not in {(len(images),), (len(images), 1)}:
        raise UserError(f"{path}: {split}_images must be uint8 N x H x W [x 3] and {split}_labels N x 1, "
                        f"got {images.dtype} {images.shape} and {labels.shape}; download it again")
    class_names = [info["label"][str(index)] for index in range(len(info["label"]))]
    return ImageSplit(labels=labels.reshape(-1).astype(np.int64), class_names=class_names, images=images,
                      source={"name": f"MedMNIST+ {flag}", "file": str(path.resolve()), "size": options.size})


def medmnist_loader(flag: str) -> Loader:
    return partial(load_medmnist_split, flag)
