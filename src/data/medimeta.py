"""MedIMeta datasets, read from their on-disk release format.

On disk, `<root>/medimeta/<dataset_id>/` holds `info.yaml` (`input_size` [C, H, W] and
`tasks`: task_name, task_target, labels), `task_labels/<task_name>.npy` (one label per
image index), `splits/<split>.txt` (one image path per line; the file stem is the image
index) and the images, either all in `images.hdf5` (dataset `images`, indexed by image
index) or one `images/<index:06d>.tiff` each. The hdf5 file is used when h5py is
installed, since one read beats thousands of file opens. All images of a dataset share
`input_size`, so the split comes back as one uint8 array.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from src.data.base import DatasetOptions, ImageSplit, Loader
from src.cli import UserError

try:
    import h5py
except ImportError:  # optional: without it the per-image TIFFs are read
    h5py = None

# dataset id -> task used as the label; a new MedIMeta dataset or task is one more line
MEDIMETA_TASKS = {
    "organs_axial": "organ label",
    "skinl_derm": "Diagnosis grouped",
}


def read_info(folder: Path) -> dict:
    path = folder / "info.yaml"
    if not path.is_file():
        raise UserError(f"missing {path}: download the MedIMeta dataset '{folder.name}' (Zenodo, linked "
                        f"from the MedIMeta paper) and unpack it so that {folder}/info.yaml exists")
    try:
        info = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"cannot parse {path} ({err}); download the dataset again") from err
    if not isinstance(info, dict) or len(info.get("input_size", [])) != 3 or "tasks" not in info:
        raise UserError(f"{path} needs the keys input_size ([C, H, W]) and tasks; download the dataset again")
    return info


def task_class_names(info: dict, task_name: str, folder: Path) -> list[str]:
    """Class names of a single-label task, ordered by label id."""
    tasks = {task["task_name"]: task for task in info["tasks"]}
    if task_name not in tasks:
        raise UserError(f"{folder}/info.yaml has no task {task_name!r}; it lists {', '.join(tasks) or 'none'}")
    task = tasks[task_name]
    if "MULTILABEL" in str(task.get("task_target", "")).upper():
        raise UserError(f"MedIMeta task {task_name!r} of {folder.name} is multi-label; choose a single-label task")
    labels = task["labels"]
    if isinstance(labels, dict):
        return [str(labels[key]) for key in sorted(labels, key=int)]
    return [str(label) for label in labels]


def split_indices(folder: Path, split: str) -> np.ndarray:
    path = folder / "splits" / f"{split}.txt"
    if not path.is_file():
        raise UserError(f"missing {path}; download the MedIMeta dataset again")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{path} lists no images; download the MedIMeta dataset again")
    try:
        return np.asarray([int(Path(line).stem) for line in lines], dtype=np.int64)
    except ValueError as err:
        raise UserError(f"{path}: every line must be an image path whose stem is the image index ({err})") from err


def to_hwc(images: np.ndarray, input_size: list[int], source: Path) -> np.ndarray:
    """Bring N images to N x H x W x C, whatever axis order the file stores (HW, HWC or CHW)."""
    channels, height, width = input_size
    if images.shape[1:] == (height, width):
        images = images[..., None]
    elif images.shape[1:] == (channels, height, width) and channels != width:
        images = images.transpose(0, 2, 3, 1)
    if images.shape[1:3] != (height, width) or images.shape[3:] not in {(1,), (3,)} or images.dtype != np.uint8:
        raise UserError(f"{source}: images are {images.dtype} {images.shape[1:]}, "
                        f"expected uint8 grey or RGB of input_size {input_size} from info.yaml")
    return images


def read_tiff(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def read_images(folder: Path, indices: np.ndarray, input_size: list[int]) -> np.ndarray:
    hdf5_path = folder / "images.hdf5"
    if h5py is not None and hdf5_path.is_file():
        try:
            with h5py.File(hdf5_path, "r") as handle:
                stored = handle["images"]
                if indices.max() >= len(stored):
                    raise UserError(f"{hdf5_path} holds {len(stored)} images but a split names "
                                    f"index {indices.max()}; download the dataset again")
                # one contiguous read: h5py's per-index selection is slow for thousands of indices
                first, last = int(indices.min()), int(indices.max()) + 1
                images = stored[first:last][indices - first]
        except (OSError, KeyError) as err:
            raise UserError(f"cannot read {hdf5_path} ({err}); download it again") from err
        return to_hwc(images, input_size, hdf5_path)
    paths = [folder / "images" / f"{index:06d}.tiff" for index in indices]
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) missing, first {missing[0]}; unpack images/ "
                        f"or put images.hdf5 in {folder}/ (and install h5py)")
    return to_hwc(np.stack([read_tiff(path) for path in paths]), input_size, folder / "images")


def load_medimeta_split(dataset_id: str, task_name: str, root: Path, split: str,
                        options: DatasetOptions) -> ImageSplit:
    folder = Path(root) / "medimeta" / dataset_id
    info = read_info(folder)
    class_names = task_class_names(info, task_name, folder)
    labels_path = folder / "task_labels" / f"{task_name}.npy"
    if not labels_path.is_file():
        raise UserError(f"missing {labels_path}; download the MedIMeta dataset again")
    all_labels = np.load(labels_path, allow_pickle=False).reshape(-1)
    indices = split_indices(folder, split)
    if indices.max() >= len(all_labels):
        raise UserError(f"{folder}/splits/{split}.txt names image {indices.max()} but {labels_path.name} "
                        f"has {len(all_labels)} labels; download the dataset again")
    images = read_images(folder, indices, list(info["input_size"]))
    return ImageSplit(labels=all_labels[indices].astype(np.int64), class_names=class_names, images=images,
                      source={"name": f"MedIMeta {dataset_id}", "task": task_name, "path": str(folder.resolve())})


def medimeta_loader(dataset_id: str) -> Loader:
    return partial(load_medimeta_split, dataset_id, MEDIMETA_TASKS[dataset_id])
