"""OCTDL retinal OCT scans: the train/val/test split of the raw download, and its loader.

The raw OCTDL release is one folder of JPEGs per disease plus `OCTDL_labels.csv`
(columns include file_name, disease, patient_id) and no official split. The paper's
code splits it once into an ImageFolder tree `dataset_1/{train,val,test}/<class>/`,
per disease by that disease's patients (val 0.15, test 0.25, seed 42): `authors_split`
draws that split exactly, so results compare with theirs; `patient_split` is the
leak-free alternative in which every patient is in one split only.
`assets/data/octdl/preprocess_octdl.py` builds the tree with `build_octdl_tree`, which
records the method in `dataset_1/partition.json`, and `load_octdl_split` reads both.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from src.data.base import SPLITS, DatasetOptions, ImageSplit
from src.data.imagefolder import ImageFiles, scan_class_tree
from src.cli import UserError
from src.io import current_umask, write_json

# fixed order, so label ids never depend on which class folders a split happens to hold
OCTDL_CLASSES = ["AMD", "DME", "ERM", "NO", "RAO", "RVO", "VID"]
TREE_NAME = "dataset_1"
PARTITION_FILE = "partition.json"  # beside split.csv: which split method, seed and fractions built the tree
SPLIT_METHODS = ("authors", "patient")
PREPROCESS_HINT = "python assets/data/octdl/preprocess_octdl.py --raw <OCTDL download> --out <root>/octdl"


def load_octdl_split(root: Path, split: str, options: DatasetOptions) -> ImageSplit:
    split_dir = Path(root) / "octdl" / TREE_NAME / split
    if not split_dir.is_dir():
        raise UserError(f"missing {split_dir}; build the split tree from the raw OCTDL download with: "
                        f"{PREPROCESS_HINT}")
    paths, labels = scan_class_tree(split_dir, OCTDL_CLASSES)
    return ImageSplit(labels=labels, class_names=list(OCTDL_CLASSES), samples=ImageFiles(paths),
                      source={"name": "OCTDL", "path": str(split_dir.resolve()),
                              "partition": read_partition(split_dir.parent)})


def read_partition(tree: Path) -> dict:
    """How the tree was split, from partition.json; trees built without one say "unrecorded"."""
    path = tree / PARTITION_FILE
    if not path.is_file():
        return {"method": "unrecorded"}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}); rebuild the tree with: {PREPROCESS_HINT}") from err


def read_octdl_labels(raw_dir: Path) -> list[dict[str, str]]:
    """Rows of OCTDL_labels.csv, each with the image path resolved under `<raw_dir>/<disease>/`."""
    csv_path = raw_dir / "OCTDL_labels.csv"
    if not csv_path.is_file():
        raise UserError(f"missing {csv_path}; --raw must be the unpacked OCTDL download "
                        "(disease folders of JPEGs and OCTDL_labels.csv)")
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    needed = {"file_name", "disease", "patient_id"}
    if not rows or not needed <= set(rows[0]):
        raise UserError(f"{csv_path} must have rows with the columns {', '.join(sorted(needed))}")
    for row in rows:
        if row["disease"] not in OCTDL_CLASSES:
            raise UserError(f"{csv_path}: unknown disease {row['disease']!r} for {row['file_name']}; "
                            f"expected one of {', '.join(OCTDL_CLASSES)}")
        name = row["file_name"] if Path(row["file_name"]).suffix else f"{row['file_name']}.jpg"
        row["path"] = str(raw_dir / row["disease"] / name)
        if not Path(row["path"]).is_file():
            raise UserError(f"{csv_path} lists {row['path']}, which does not exist; re-extract the download")
    return rows


def patient_split(diseases: list[str], patients: list[str], val_fraction: float, test_fraction: float,
                  seed: int) -> np.ndarray:
    """Split name per image, with every patient's images in exactly one split.

    Patients are grouped by their most frequent disease and shuffled with `seed`; within
    each group they fill test, then val, then train, in order, so each disease gets about
    the requested fraction of its images in each split.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise UserError(f"--val {val_fraction} and --test {test_fraction} must be >= 0 and sum to less than 1")
    diseases_of: dict[str, list[str]] = {}
    for disease, patient in zip(diseases, patients):
        diseases_of.setdefault(patient, []).append(disease)
    image_count = {patient: len(found) for patient, found in diseases_of.items()}
    group_of = {patient: max(sorted(set(found)), key=found.count) for patient, found in diseases_of.items()}
    rng = np.random.default_rng(seed)
    split_of: dict[str, str] = {}
    for disease in OCTDL_CLASSES:
        members = sorted(patient for patient, group in group_of.items() if group == disease)
        members = [members[i] for i in rng.permutation(len(members))]
        total = sum(image_count[patient] for patient in members)
        assigned = 0
        for patient in members:
            if assigned < test_fraction * total:
                split_of[patient] = "test"
            elif assigned < (test_fraction + val_fraction) * total:
                split_of[patient] = "val"
            else:
                split_of[patient] = "train"
            assigned += image_count[patient]
    return np.asarray([split_of[patient] for patient in patients])


def authors_split(diseases: list[str], patients: list[str], val_fraction: float, test_fraction: float,
                  seed: int) -> np.ndarray:
    """Split name per image, drawn exactly as the paper's OCTDL preprocessing script draws it.

    For each disease in OCTDL_CLASSES order, that disease's patients (in order of first
    appearance) go through scikit-learn's train_test_split twice: test_size 1 - train
    fraction, then test / (test + val) of the rest. The reference calls np.random.seed(seed)
    once and passes no random_state, so every call draws from the one global RandomState;
    one explicit RandomState(seed) shared by all calls draws the identical permutations.
    A patient with images of two diseases is split once per disease, so can land in two splits.
    A disease with no images is skipped (it would draw nothing; the reference stops there).
    """
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise UserError(f"--val {val_fraction} and --test {test_fraction} must be > 0 and sum to less than 1 "
                        "for --split authors")
    train_ratio = 1 - val_fraction - test_fraction  # the reference's arithmetic, so ceil() rounds the same way
    rng = np.random.RandomState(seed)
    split_of: dict[tuple[str, str], str] = {}
    for disease in OCTDL_CLASSES:
        members = list(dict.fromkeys(patient for found, patient in zip(diseases, patients) if found == disease))
        if not members:
            continue
        try:
            train, rest = train_test_split(members, test_size=1 - train_ratio, random_state=rng)
            val, test = train_test_split(rest, test_size=test_fraction / (test_fraction + val_fraction),
                                         random_state=rng)
        except ValueError as err:
            raise UserError(f"{disease} has only {len(members)} patients, too few for --split authors with "
                            f"--val {val_fraction} --test {test_fraction}; use --split patient") from err
        for split, chosen in (("train", train), ("val", val), ("test", test)):
            split_of.update({(disease, patient): split for patient in chosen})
    return np.asarray([split_of[disease, patient] for disease, patient in zip(diseases, patients)])


def copy_image(source: Path, target: Path, size: int | None) -> None:
    """Copy the JPEG as is, or resize it so its shorter side is `size` pixels (aspect kept)."""
    if size is None:
        shutil.copyfile(source, target)
        return
    with Image.open(source) as image:
        scale = size / min(image.size)
        resized = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                              Image.Resampling.BICUBIC)
    resized.save(target, quality=95)


def build_octdl_tree(raw_dir: Path, out_dir: Path, val_fraction: float = 0.15, test_fraction: float = 0.25,
                     seed: int = 42, size: int | None = None, method: str = "authors") -> dict[str, int]:
    """Write `<out_dir>/dataset_1/{train,val,test}/<disease>/`, `split.csv` and `partition.json`;
    return images per split. `method` is "authors" (`authors_split`) or "patient" (`patient_split`).

    The tree is built in a temporary folder beside it and renamed into place at the end,
    so an interrupted run leaves no half-filled tree that the loader would accept.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    target = out_dir / TREE_NAME
    if target.exists():
        raise UserError(f"{target} already exists; delete it to rebuild the split")
    if size is not None and size < 1:
        raise UserError(f"--size {size} must be a positive number of pixels")
    if method not in SPLIT_METHODS:
        raise UserError(f"--split {method!r} is not a split method; use one of {', '.join(SPLIT_METHODS)}")
    rows = read_octdl_labels(raw_dir)
    split_images = authors_split if method == "authors" else patient_split
    splits = split_images([row["disease"] for row in rows], [row["patient_id"] for row in rows],
                          val_fraction, test_fraction, seed)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{TREE_NAME}."))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; the tree should get the usual permissions
    except OSError as err:
        raise UserError(f"cannot write to {out_dir}: {err.strerror}; choose a writable --out") from err
    try:
        for split in SPLITS:
            for disease in OCTDL_CLASSES:
                (staging / split / disease).mkdir(parents=True)
        with open(staging / "split.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "disease", "patient_id", "split"])
            for row, split in zip(tqdm(rows, desc="OCTDL", leave=False), splits):
                name = Path(row["path"]).name
                copy_image(Path(row["path"]), staging / split / row["disease"] / name, size)
                writer.writerow([f"{split}/{row['disease']}/{name}", row["disease"], row["patient_id"], split])
        write_json(staging / PARTITION_FILE, {"method": method, "seed": seed, "val_fraction": val_fraction,
                                              "test_fraction": test_fraction})
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {split: int((splits == split).sum()) for split in SPLITS}
