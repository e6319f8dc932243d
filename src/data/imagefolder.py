"""Folders of image files: the `imagefolder:<path>` dataset and the pieces other loaders share.

`ImageFiles` is the `samples` form of an ImageSplit for datasets stored as one image
file per sample (OCTDL, DTD, FGVC-Aircraft, Oxford-IIIT Pet, a user's own tree). It
holds only paths, so DataLoader workers can pickle it cheaply.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from src.data.base import SPLITS, DatasetOptions, ImageSplit
from src.cli import UserError


class ImageFiles(Dataset):
    """Item i is the image at paths[i] as an RGB PIL image (grey scans are repeated to 3 channels)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [Path(path) for path in paths]
        missing = [path for path in self.paths if not path.is_file()]
        if missing:
            raise UserError(f"{len(missing)} image file(s) missing, first {missing[0]}; "
                            "restore them or re-extract the dataset")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise UserError(f"cannot read image {path} ({err}); replace or delete it") from err


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name so the order never depends on the filesystem."""
    return sorted(path for path in folder.iterdir()
                  if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMG_EXTENSIONS)


def class_folders(split_dir: Path) -> list[str]:
    """Names of the class sub-folders of one split folder (hidden folders skipped)."""
    return sorted(path.name for path in split_dir.iterdir() if path.is_dir() and not path.name.startswith("."))


def scan_class_tree(split_dir: Path, class_names: list[str]) -> tuple[list[Path], np.ndarray]:
    """Paths and labels of `<split_dir>/<class>/<image>`; label = index in `class_names`, fixed by the caller."""
    unknown = sorted(set(class_folders(split_dir)) - set(class_names))
    if unknown:
        raise UserError(f"{split_dir} has class folder(s) {', '.join(unknown)} outside the known classes "
                        f"{', '.join(class_names)}; remove or rename them")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        folder = split_dir / name
        if folder.is_dir():
            images = list_images(folder)
            paths += images
            labels += [label] * len(images)
    if not paths:
        raise UserError(f"no images in {split_dir}/<class>/; expected files ending in {', '.join(IMG_EXTENSIONS)}")
    return paths, np.asarray(labels, dtype=np.int64)


def load_imagefolder_split(path: Path, split: str, options: DatasetOptions) -> ImageSplit:
    """A user's `<path>/{train,val,test}/<class>/*` tree.

    Classes are the sorted union of the class folders of all three splits, so a class
    missing from one split keeps the same label id in the others.
    """
    path = Path(path)
    missing = [name for name in SPLITS if not (path / name).is_dir()]
    if missing:
        raise UserError(f"--dataset imagefolder:{path} needs the folders {', '.join(SPLITS)} "
                        f"(each holding <class>/<image> files); missing: {', '.join(missing)}")
    class_names = sorted(set().union(*(class_folders(path / name) for name in SPLITS)))
    paths, labels = scan_class_tree(path / split, class_names)
    return ImageSplit(labels=labels, class_names=class_names, samples=ImageFiles(paths),
                      source={"name": "imagefolder", "path": str(path.resolve()), "split": split})
