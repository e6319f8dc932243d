"""Fashion-MNIST: 70,000 real labelled 28 x 28 grey images (10 classes) that install offline.

Read from the four IDX `.gz` files of torchvision's raw layout, `<root>/FashionMNIST/raw/`,
else from Debian's `dataset-fashion-mnist` package (`/usr/share/datasets/fashion-mnist/`, the
same files); `--download` hands over to torchvision, which writes the first. Test is the
official 10,000; val is a stratified 10 % of the official train set, fixed across seeds as
for STL-10 (`validation_carve`).

`fashionmnist-10k` is the same data cut to what a CPU can embed in minutes: stratified
10,000 train, 1,000 val and 2,000 test records, each drawn from the full split above with
a fixed random_state, so every run sees the same records.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split
from torchvision import datasets

from src.cli import UserError
from src.data.base import DatasetOptions, ImageSplit, Loader
from src.data.torchvision_sets import VAL_SEED, validation_carve

SYSTEM_FOLDER = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
IDX_UBYTE = 0x08
SMALL_SIZES = {"train": 10_000, "val": 1_000, "test": 2_000}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes with `ndim` dimensions (LeCun's MNIST format)."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise UserError(f"{path} is not a readable .gz file ({err}); download it again") from err
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:3] != bytes([0, 0, IDX_UBYTE]) or raw[3] != ndim:
        raise UserError(f"{path} is not an IDX file of {ndim}-d unsigned bytes; download it again")
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(shape)):
        raise UserError(f"{path} holds {len(raw) - header} bytes of data but its header says {shape}; "
                        "download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def raw_folder(root: Path, options: DatasetOptions) -> Path:
    """The first folder holding all four files; fetched through torchvision under --download."""
    local = Path(root) / "FashionMNIST" / "raw"
    names = [name for pair in FILES.values() for name in pair]
    for folder in (local, SYSTEM_FOLDER):
        if all((folder / name).is_file() for name in names):
            return folder
    if not options.download:
        raise UserError(f"Fashion-MNIST is missing: put {', '.join(names)} in {local} "
                        f"(apt-get install dataset-fashion-mnist, or pass --download)")
    try:
        datasets.FashionMNIST(str(root), download=True)
    except (OSError, RuntimeError) as err:
        raise UserError(f"download of Fashion-MNIST failed ({err}); fetch {', '.join(names)} from "
                        f"{datasets.FashionMNIST.mirrors[0]} into {local}") from err
    return local


def read_part(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images N x 28 x 28 x 1 and labels of the official train or test part."""
    images_name, labels_name = FILES[part]
    images, labels = read_idx(folder / images_name, 3), read_idx(folder / labels_name, 1)
    if len(images) != len(labels) or labels.max(initial=0) >= len(datasets.FashionMNIST.classes):
        raise UserError(f"{folder / images_name} ({len(images)} images) and {folder / labels_name} "
                        f"({len(labels)} labels) do not match; download them again")
    return images[..., None], labels.astype(np.int64)


def fashionmnist_loader(sizes: dict[str, int] | None) -> Loader:
    """A loader of the full splits, or of stratified subsets of `sizes` records per split."""

    def load(root: Path, split: str, options: DatasetOptions) -> ImageSplit:
        folder = raw_folder(root, options)
        images, labels = read_part(folder, "test" if split == "test" else "train")
        chosen = np.arange(len(labels)) if split == "test" else validation_carve(labels, split)
        if sizes is not None and sizes[split] < len(chosen):
            chosen, _ = train_test_split(chosen, train_size=sizes[split], stratify=labels[chosen],
                                         random_state=VAL_SEED)
            chosen = np.sort(chosen)
        return ImageSplit(labels=labels[chosen], class_names=list(datasets.FashionMNIST.classes),
                          images=np.ascontiguousarray(images[chosen]),
                          source={"name": "Fashion-MNIST", "path": str(folder.resolve()), "split": split,
                                  "subset": sizes})

    return load
