"""Natural-image datasets of the paper that torchvision knows: DTD, FGVC-Aircraft, STL-10, Oxford-IIIT Pet.

Each lives under `<root>/<name>/` in torchvision's own layout, so `--download` (which
hands over to torchvision) and a manual download end up in the same place:
  dtd          <root>/dtd/dtd/{images,labels}/             (torchvision appends dtd/dtd)
  aircraft     <root>/aircraft/fgvc-aircraft-2013b/data/
  stl10        <root>/stl10/stl10_binary/{train,test}_{X,y}.bin
  oxford-pets  <root>/oxford-pets/oxford-iiit-pet/{images,annotations}/
torchvision parses the annotation files; we keep its image paths and labels and read
images ourselves (`ImageFiles`), since its datasets yield (image, label) pairs. STL-10
is read with numpy straight from its binary files: torchvision's class checks the MD5 of
all of them, the 2.6 GB unlabeled file included, on every load.
DTD and FGVC-Aircraft have official val splits. STL-10 and Oxford-IIIT Pet have none:
as in the paper's code, val is a stratified 10 % of the official train (trainval) set,
drawn with random_state 12345 so it is the same for every seed; test is official.
"""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from sklearn.model_selection import train_test_split
from torchvision import datasets

from src.data.base import DatasetOptions, ImageSplit
from src.data.imagefolder import ImageFiles
from src.cli import UserError

VAL_FRACTION = 0.1
VAL_SEED = 12345
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
STL10_SIDE = 96


def ensure_present(marker: Path, url: str, options: DatasetOptions, download: Callable[[], object]) -> None:
    """Refuse early when `marker` is missing, or fetch it through torchvision when --download is on.

    Checking ourselves keeps torchvision's long message and any network attempt out of an offline run.
    """
    if marker.exists():
        return
    if not options.download:
        raise UserError(f"missing {marker}: download {url} and extract it so that this path exists, "
                        "or pass --download")
    try:
        download()
    except (OSError, RuntimeError, tarfile.TarError) as err:
        raise UserError(f"download of {url} failed ({err}); fetch it by hand and extract it so that "
                        f"{marker} exists") from err
    if not marker.exists():
        raise UserError(f"{url} was downloaded but {marker} is still missing; extract it by hand")


def validation_carve(labels: np.ndarray, split: str) -> np.ndarray:
    """Sorted indices of `split` ("train" or "val") within an official train set that has no val split."""
    index = np.arange(len(labels))
    train, val = train_test_split(index, test_size=VAL_FRACTION, stratify=labels, random_state=VAL_SEED)
    return np.sort(train if split == "train" else val)


def file_split(paths: Sequence[Path | str], labels: Sequence[int], class_names: list[str], name: str,
               folder: Path, split: str) -> ImageSplit:
    return ImageSplit(labels=np.asarray(labels, dtype=np.int64), class_names=list(class_names),
                      samples=ImageFiles(paths), source={"name": name, "path": str(folder.resolve()), "split": split})


def load_dtd_split(root: Path, split: str, options: DatasetOptions) -> ImageSplit:
    """DTD, partition 1; class = the image's folder, classes = the sorted image folders."""
    data = Path(root) / "dtd" / "dtd"
    ensure_present(data / "labels" / f"{split}1.txt", datasets.DTD._URL, options,
                   lambda: datasets.DTD(str(root), split=split, download=True))
    dataset = datasets.DTD(str(root), split=split)
    class_names = sorted(path.name for path in (data / "images").iterdir() if path.is_dir())
    labels = [class_names.index(Path(path).parent.name) for path in dataset._image_files]
    return file_split(dataset._image_files, labels, class_names, "DTD partition 1", data, split)


def load_aircraft_split(root: Path, split: str, options: DatasetOptions) -> ImageSplit:
    """FGVC-Aircraft at the variant level (100 classes), official train / val / test."""
    folder = Path(root) / "aircraft"
    ensure_present(folder / "fgvc-aircraft-2013b" / "data" / f"images_variant_{split}.txt",
                   datasets.FGVCAircraft._URL, options,
                   lambda: datasets.FGVCAircraft(str(folder), split=split, download=True))
    dataset = datasets.FGVCAircraft(str(folder), split=split, annotation_level="variant")
    return file_split(dataset._image_files, dataset._labels, dataset.classes, "FGVC-Aircraft variant",
                      folder, split)


def read_stl10(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images N x 96 x 96 x 3 and 0-based labels of `<part>_X.bin` / `<part>_y.bin`."""
    images_path, labels_path = folder / f"{part}_X.bin", folder / f"{part}_y.bin"
    raw = np.fromfile(images_path, dtype=np.uint8)
    labels = np.fromfile(labels_path, dtype=np.uint8).astype(np.int64) - 1
    if raw.size != len(labels) * 3 * STL10_SIDE * STL10_SIDE or labels.min(initial=0) < 0:
        raise UserError(f"{images_path} ({raw.size} bytes) and {labels_path} ({len(labels)} labels from 1) "
                        "do not match; download STL-10 again")
    # stored channel-major and column-major per image: N x C x W x H on disk
    images = raw.reshape(-1, 3, STL10_SIDE, STL10_SIDE).transpose(0, 3, 2, 1)
    return np.ascontiguousarray(images), labels


def load_stl10_split(root: Path, split: str, options: DatasetOptions) -> ImageSplit:
    folder = Path(root) / "stl10"
    binary = folder / datasets.STL10.base_folder
    part = "test" if split == "test" else "train"
    for suffix in ("X", "y"):
        ensure_present(binary / f"{part}_{suffix}.bin", datasets.STL10.url, options,
                       lambda: datasets.STL10(str(folder), split="test", download=True))
    images, labels = read_stl10(binary, part)
    if split != "test":
        chosen = validation_carve(labels, split)
        images, labels = images[chosen], labels[chosen]
    names_file = binary / datasets.STL10.class_names_file
    class_names = names_file.read_text().split() if names_file.is_file() else STL10_CLASSES
    return ImageSplit(labels=labels, class_names=class_names, images=images,
                      source={"name": "STL-10", "path": str(binary.resolve()), "split": split})


def load_oxford_pets_split(root: Path, split: str, options: DatasetOptions) -> ImageSplit:
    """Oxford-IIIT Pet, 37 breeds; train / val carved from the official trainval set."""
    folder = Path(root) / "oxford-pets"
    base = folder / "oxford-iiit-pet"
    for part in ("trainval", "test"):
        ensure_present(base / "annotations" / f"{part}.txt", datasets.OxfordIIITPet._RESOURCES[1][0], options,
                       lambda: datasets.OxfordIIITPet(str(folder), download=True))
    ensure_present(base / "images", datasets.OxfordIIITPet._RESOURCES[0][0], options,
                   lambda: datasets.OxfordIIITPet(str(folder), download=True))
    trainval = datasets.OxfordIIITPet(str(folder), split="trainval")
    if split == "test":
        test = datasets.OxfordIIITPet(str(folder), split="test")
        return file_split(test._images, test._labels, trainval.classes, "Oxford-IIIT Pet", base, split)
    labels = np.asarray(trainval._labels, dtype=np.int64)
    chosen = validation_carve(labels, split)
    return file_split([trainval._images[i] for i in chosen], labels[chosen], trainval.classes,
                      "Oxford-IIIT Pet", base, split)
