"""Every dataset loader, on tiny files written in each dataset's real on-disk layout."""
from __future__ import annotations

import csv
from functools import partial
import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.model_selection import train_test_split
from medmnist import INFO as MEDMNIST_INFO
from torchvision import datasets

from src.data import DATASETS, SPLITS, DatasetOptions, load_split
from src.data.fashionmnist import SYSTEM_FOLDER
from src.data.medimeta import MEDIMETA_TASKS
from src.data.medmnist import MEDMNIST_FLAGS
from src.data.octdl import OCTDL_CLASSES, build_octdl_tree
from src.cli import UserError

REPO = Path(__file__).resolve().parents[1]
SPLIT_SIZES = {"train": 6, "val": 3, "test": 4}


def write_image(path: Path, value: int, size: tuple[int, int] = (10, 8), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=(value, 255 - value, 7) if mode == "RGB" else value).save(path)


def split_of(split) -> list[str]:
    return [str(path) for path in split.samples.paths]


# ---------------------------------------------------------------- registry

def test_registry_has_every_paper_dataset_and_only_2d_medmnist():
    for name in ("breastmnist", "pathmnist", "organs_axial", "skinl_derm", "octdl", "dtd", "aircraft",
                 "stl10", "oxford-pets", "digits", "fashionmnist", "fashionmnist-10k"):
        assert name in DATASETS
    assert not any(name.endswith("3d") for name in DATASETS)
    with pytest.raises(UserError, match="imagefolder:<path>"):
        load_split("no-such-set", Path("."), "train")


# ---------------------------------------------------------------- MedMNIST+

def write_medmnist(folder: Path, name: str, shape: tuple[int, ...], classes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in SPLIT_SIZES.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, classes, (count, 1)).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / name, **arrays)
    return arrays


def test_medmnist_reads_grey_and_rgb_npz_of_each_size(tmp_path):
    grey = write_medmnist(tmp_path / "medmnist", "breastmnist_64.npz", (64, 64), classes=2)
    rgb = write_medmnist(tmp_path / "medmnist", "pathmnist.npz", (28, 28, 3), classes=9, seed=1)
    for split in SPLIT_SIZES:
        loaded = load_split("breastmnist", tmp_path, split, DatasetOptions(size=64))
        assert loaded.images.shape == (SPLIT_SIZES[split], 64, 64, 1) and loaded.images.dtype == np.uint8
        np.testing.assert_array_equal(loaded.images[..., 0], grey[f"{split}_images"])
        np.testing.assert_array_equal(loaded.labels, grey[f"{split}_labels"][:, 0])
        assert loaded.labels.dtype == np.int64
        assert loaded.class_names == ["malignant", "normal, benign"]
    loaded = load_split("pathmnist", tmp_path, "val", DatasetOptions(size=28))
    assert loaded.images.shape == (3, 28, 28, 3)
    np.testing.assert_array_equal(loaded.images, rgb["val_images"])
    assert len(loaded.class_names) == 9


def test_medmnist_refuses_missing_corrupt_multilabel_and_bad_size(tmp_path):
    with pytest.raises(UserError, match=r"breastmnist_224\.npz.*zenodo.*--download"):
        load_split("breastmnist", tmp_path, "train")
    (tmp_path / "medmnist").mkdir()
    (tmp_path / "medmnist" / "breastmnist_224.npz").write_bytes(b"not a zip file")
    with pytest.raises(UserError, match=r"breastmnist_224\.npz"):
        load_split("breastmnist", tmp_path, "train")
    write_medmnist(tmp_path / "medmnist", "chestmnist_224.npz", (8, 8), classes=2)
    with pytest.raises(UserError, match="multi-label"):
        load_split("chestmnist", tmp_path, "train")
    with pytest.raises(UserError, match="size 100"):
        load_split("breastmnist", tmp_path, "train", DatasetOptions(size=100))


def test_medmnist_refuses_a_label_count_that_differs_from_the_images(tmp_path):
    arrays = write_medmnist(tmp_path / "medmnist", "breastmnist_224.npz", (8, 8), classes=2)
    arrays["train_labels"] = arrays["train_labels"][:-1]
    np.savez_compressed(tmp_path / "medmnist" / "breastmnist_224.npz", **arrays)
    with pytest.raises(UserError, match=r"breastmnist_224\.npz: train_images .* \(5, 1\)"):
        load_split("breastmnist", tmp_path, "train")


# ---------------------------------------------------------------- MedIMeta

def write_medimeta(folder: Path, task: str, channels: int, side: int, count: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """A MedIMeta dataset folder with TIFF images; returns all images (N x H x W x C) and labels."""
    rng = np.random.default_rng(channels)
    images = rng.integers(0, 256, (count, side, side, channels), dtype=np.uint8)
    labels = np.arange(count) % 3
    info = {"id": folder.name, "name": folder.name, "input_size": [channels, side, side],
            "tasks": [{"task_name": task, "task_target": "MULTICLASS_CLASSIFICATION",
                       "labels": {0: "first", 1: "second", 2: "third"}},
                      {"task_name": "findings", "task_target": "MULTILABEL_CLASSIFICATION",
                       "labels": {0: "a", 1: "b"}}]}
    (folder / "task_labels").mkdir(parents=True)
    (folder / "splits").mkdir()
    (folder / "images").mkdir()
    (folder / "info.yaml").write_text(yaml.safe_dump(info))
    np.save(folder / "task_labels" / f"{task}.npy", labels)
    order = rng.permutation(count)  # splits list images out of index order
    for split, members in zip(("train", "val", "test"), np.split(order, [6, 9])):
        (folder / "splits" / f"{split}.txt").write_text("".join(f"images/{i:06d}.tiff\n" for i in members))
    for index, image in enumerate(images):
        Image.fromarray(image[..., 0] if channels == 1 else image).save(folder / "images" / f"{index:06d}.tiff")
    return images, labels


def expected_members(folder: Path, split: str) -> np.ndarray:
    return np.asarray([int(Path(line).stem) for line in (folder / "splits" / f"{split}.txt").read_text().split()])


@pytest.mark.parametrize("dataset_id,task,channels", [("organs_axial", "organ label", 1),
                                                       ("skinl_derm", "Diagnosis grouped", 3)])
def test_medimeta_reads_tiff_and_hdf5_alike(tmp_path, dataset_id, task, channels):
    tiff_root, hdf5_root = tmp_path / "tiff", tmp_path / "hdf5"
    folder = tiff_root / "medimeta" / dataset_id
    images, labels = write_medimeta(folder, task, channels, side=16)
    hdf5_folder = hdf5_root / "medimeta" / dataset_id
    shutil.copytree(folder, hdf5_folder, ignore=shutil.ignore_patterns("images"))
    with h5py.File(hdf5_folder / "images.hdf5", "w") as handle:
        handle.create_dataset("images", data=images[..., 0] if channels == 1 else images)
    for split in ("train", "val", "test"):
        members = expected_members(folder, split)
        from_tiff = load_split(dataset_id, tiff_root, split)
        from_hdf5 = load_split(dataset_id, hdf5_root, split)
        for loaded in (from_tiff, from_hdf5):
            assert loaded.images.shape == (len(members), 16, 16, channels) and loaded.images.dtype == np.uint8
            np.testing.assert_array_equal(loaded.images, images[members])
            np.testing.assert_array_equal(loaded.labels, labels[members])
            assert loaded.class_names == ["first", "second", "third"]


def test_medimeta_refuses_missing_files(tmp_path):
    with pytest.raises(UserError, match=r"organs_axial/info\.yaml"):
        load_split("organs_axial", tmp_path, "train")
    folder = tmp_path / "medimeta" / "organs_axial"
    write_medimeta(folder, "organ label", 1, side=8)
    missing = folder / "images" / f"{expected_members(folder, 'test')[0]:06d}.tiff"
    missing.unlink()
    with pytest.raises(UserError, match=missing.name):
        load_split("organs_axial", tmp_path, "test")
    (folder / "task_labels" / "organ label.npy").unlink()
    with pytest.raises(UserError, match=r"organ label\.npy"):
        load_split("organs_axial", tmp_path, "train")


# ---------------------------------------------------------------- OCTDL

def write_octdl_download(raw: Path) -> list[dict]:
    """Raw OCTDL layout: <disease>/<file>.jpg and OCTDL_labels.csv; VID is left out on purpose."""
    rng = np.random.default_rng(3)
    rows = []
    for patient in range(90):
        disease = OCTDL_CLASSES[patient % 6]
        for scan in range(int(rng.integers(1, 5))):
            name = f"{disease.lower()}_{patient}_{scan}"
            write_image(raw / disease / f"{name}.jpg", value=patient, size=(12, 9))
            rows.append({"file_name": name, "disease": disease, "subcategory": "", "patient_id": str(1000 + patient),
                         "eye": "OD"})
    write_octdl_labels(raw, rows)
    return rows


def write_octdl_labels(raw: Path, rows: list[dict]) -> None:
    with open(raw / "OCTDL_labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_octdl_download_with_shared_patients(raw: Path) -> list[dict]:
    """All seven diseases; a third of the patients have images of two diseases; ids and rows in shuffled order,
    so a split that sorted patients, or drew per disease from fresh seeds, would differ from the reference."""
    rng = np.random.default_rng(5)
    patient_ids = rng.permutation(np.arange(200, 260))
    rows = []
    for index, patient in enumerate(patient_ids):
        diseases = [OCTDL_CLASSES[index % 7]] + ([OCTDL_CLASSES[(index * 3 + 1) % 7]] if index % 3 == 0 else [])
        for disease in dict.fromkeys(diseases):
            for scan in range(int(rng.integers(1, 4))):
                name = f"{disease.lower()}_{patient}_{scan}"
                write_image(raw / disease / f"{name}.jpg", value=int(patient) % 256, size=(12, 9))
                rows.append({"file_name": name, "disease": disease, "patient_id": str(patient), "eye": "OS"})
    rows = [rows[i] for i in rng.permutation(len(rows))]
    write_octdl_labels(raw, rows)
    return rows


def reference_octdl_split(raw: Path, seed: int = 42, val_ratio: float = 0.15, test_ratio: float = 0.25) -> dict:
    """The authors' preprocessing loop (assets/data/octdl/octdl_preprocessing.py of cvae-anonymization), as
    written there: global np.random.seed, pandas unique(), train_test_split without random_state."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        train_ratio = 1 - val_ratio - test_ratio
        df = pd.read_csv(raw / "OCTDL_labels.csv")
        split_of = {}
        for label in OCTDL_CLASSES:
            df_label = df[df["disease"] == label][["file_name", "disease", "patient_id"]]
            patients_list = df_label.patient_id.unique()
            train_patients, test_patients = train_test_split(patients_list, test_size=1 - train_ratio)
            val_patients, test_patients = train_test_split(test_patients,
                                                           test_size=test_ratio / (test_ratio + val_ratio))
            for split, chosen in (("train", train_patients), ("val", val_patients), ("test", test_patients)):
                split_of.update({name: split for name in df_label[df_label["patient_id"].isin(chosen)].file_name})
    finally:
        np.random.set_state(saved)
    return split_of


def read_split_csv(tree: Path) -> list[dict]:
    with open(tree / "split.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_octdl_split_is_patient_disjoint_and_loader_reads_the_tree(tmp_path):
    rows = write_octdl_download(tmp_path / "raw")
    counts = build_octdl_tree(tmp_path / "raw", tmp_path / "data" / "octdl", size=6)
    records = read_split_csv(tmp_path / "data" / "octdl" / "dataset_1")
    assert len(records) == len(rows) == sum(counts.values())
    patients = {split: {r["patient_id"] for r in records if r["split"] == split} for split in ("train", "val", "test")}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    fractions = {split: counts[split] / len(records) for split in patients}
    assert abs(fractions["test"] - 0.25) < 0.05 and abs(fractions["val"] - 0.15) < 0.05

    seen = []
    for split in ("train", "val", "test"):
        loaded = load_split("octdl", tmp_path / "data", split)
        assert loaded.class_names == OCTDL_CLASSES
        assert len(loaded) == counts[split]
        folders = [Path(path).parent.name for path in split_of(loaded)]
        np.testing.assert_array_equal(loaded.labels, [OCTDL_CLASSES.index(name) for name in folders])
        assert OCTDL_CLASSES.index("VID") not in loaded.labels and OCTDL_CLASSES.index("RVO") in loaded.labels
        image = loaded.samples[0]
        assert image.mode == "RGB" and min(image.size) == 6
        seen += [Path(path).stem for path in split_of(loaded)]
    assert sorted(seen) == sorted(row["file_name"] for row in rows)


@pytest.mark.slow
def test_octdl_script_builds_the_tree_once(tmp_path):
    rows = write_octdl_download(tmp_path / "raw")
    command = [sys.executable, str(REPO / "assets/data/octdl/preprocess_octdl.py"),
               "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "octdl")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(read_split_csv(tmp_path / "octdl" / "dataset_1")) == len(rows)
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_octdl_split_is_fixed_by_seed(tmp_path):
    write_octdl_download(tmp_path / "raw")
    build_octdl_tree(tmp_path / "raw", tmp_path / "a", seed=42)
    build_octdl_tree(tmp_path / "raw", tmp_path / "b", seed=42)
    build_octdl_tree(tmp_path / "raw", tmp_path / "c", seed=7)
    first, second, other = (read_split_csv(tmp_path / name / "dataset_1") for name in "abc")
    assert first == second and first != other
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["dataset_1"]  # no staging folder left


def test_octdl_refuses_missing_inputs(tmp_path):
    with pytest.raises(UserError, match="preprocess_octdl.py"):
        load_split("octdl", tmp_path, "train")
    with pytest.raises(UserError, match="OCTDL_labels.csv"):
        build_octdl_tree(tmp_path, tmp_path / "out")
    rows = write_octdl_download(tmp_path / "raw")
    (tmp_path / "raw" / rows[5]["disease"] / f"{rows[5]['file_name']}.jpg").unlink()
    with pytest.raises(UserError, match=rows[5]["file_name"]):
        build_octdl_tree(tmp_path / "raw", tmp_path / "out")
    assert not (tmp_path / "out" / "dataset_1").exists()


def splits_of_patients(records: list[dict]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for record in records:
        found.setdefault(record["patient_id"], set()).add(record["split"])
    return found


@pytest.mark.parametrize("seed, val, test", [(42, 0.15, 0.25), (7, 0.2, 0.3)])
def test_octdl_default_split_is_the_authors_loop(tmp_path, seed, val, test):
    write_octdl_download_with_shared_patients(tmp_path / "raw")
    build_octdl_tree(tmp_path / "raw", tmp_path / "data" / "octdl", val, test, seed)
    records = read_split_csv(tmp_path / "data" / "octdl" / "dataset_1")
    assert {Path(r["file"]).stem: r["split"] for r in records} == reference_octdl_split(tmp_path / "raw", seed, val,
                                                                                          test)
    for record in records:
        assert Path(record["file"]).parts[:2] == (record["split"], record["disease"])
    partition = {"method": "authors", "seed": seed, "val_fraction": val, "test_fraction": test}
    assert load_split("octdl", tmp_path / "data", "val").source["partition"] == partition


def test_octdl_patients_cross_splits_only_under_the_authors_split(tmp_path):
    write_octdl_download_with_shared_patients(tmp_path / "raw")
    build_octdl_tree(tmp_path / "raw", tmp_path / "authors")
    build_octdl_tree(tmp_path / "raw", tmp_path / "patient" / "octdl", method="patient")
    authors = splits_of_patients(read_split_csv(tmp_path / "authors" / "dataset_1"))
    patient = splits_of_patients(read_split_csv(tmp_path / "patient" / "octdl" / "dataset_1"))
    assert any(len(splits) > 1 for splits in authors.values())
    assert all(len(splits) == 1 for splits in patient.values()) and patient.keys() == authors.keys()
    assert load_split("octdl", tmp_path / "patient", "test").source["partition"]["method"] == "patient"
    (tmp_path / "patient" / "octdl" / "dataset_1" / "partition.json").unlink()  # a tree built before the record
    assert load_split("octdl", tmp_path / "patient", "test").source["partition"] == {"method": "unrecorded"}


def test_octdl_authors_split_refuses_what_it_cannot_draw(tmp_path):
    rows = write_octdl_download(tmp_path / "raw")
    with pytest.raises(UserError, match="--split 'leaky'"):
        build_octdl_tree(tmp_path / "raw", tmp_path / "out", method="leaky")
    with pytest.raises(UserError, match="--val 0.0"):
        build_octdl_tree(tmp_path / "raw", tmp_path / "out", val_fraction=0.0)
    one_erm_patient = [row for row in rows if row["disease"] != "ERM" or row["patient_id"] == "1002"]
    write_octdl_labels(tmp_path / "raw", one_erm_patient)
    with pytest.raises(UserError, match="ERM has only 1 patients"):
        build_octdl_tree(tmp_path / "raw", tmp_path / "out")
    assert not (tmp_path / "out" / "dataset_1").exists()
    build_octdl_tree(tmp_path / "raw", tmp_path / "out", method="patient")  # the patient split has no such limit


@pytest.mark.slow
@pytest.mark.parametrize("raw_name, arguments, message", [("raw", ["--split", "leaky"], "--split 'leaky'"),
                                                          ("raw", ["--split", "patient", "--val", "0.9"], "--val 0.9"),
                                                          (".", [], "OCTDL_labels.csv")])
def test_octdl_script_reports_bad_input_in_one_line(tmp_path, raw_name, arguments, message):
    write_octdl_download(tmp_path / "raw")
    command = [sys.executable, str(REPO / "assets/data/octdl/preprocess_octdl.py"), "--raw", str(tmp_path / raw_name),
               "--out", str(tmp_path / "octdl"), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "octdl" / "dataset_1").exists()


# ---------------------------------------------------------------- torchvision datasets

DTD_MEMBERS = {"train": ["banded", "dotted", "zigzagged", "banded"], "val": ["dotted", "zigzagged"],
               "test": ["zigzagged", "dotted"]}  # banded absent from test


def write_dtd(root: Path) -> None:
    """DTD's layout: images/<class>/<file>.jpg and labels/<split>1.txt listing <class>/<file>."""
    data = root / "dtd" / "dtd"
    for split, names in DTD_MEMBERS.items():
        lines = []
        for i, name in enumerate(names):
            file = f"{name}_{split}_{i:04d}.jpg"
            write_image(data / "images" / name / file, value=i)
            lines.append(f"{name}/{file}\n")
        (data / "labels").mkdir(parents=True, exist_ok=True)
        (data / "labels" / f"{split}1.txt").write_text("".join(lines))


def test_dtd_official_splits_with_stable_class_ids(tmp_path):
    classes = ["banded", "dotted", "zigzagged"]
    write_dtd(tmp_path)
    for split, names in DTD_MEMBERS.items():
        loaded = load_split("dtd", tmp_path, split)
        assert loaded.class_names == classes
        np.testing.assert_array_equal(loaded.labels, [classes.index(name) for name in names])
        assert all(f"_{split}_" in path for path in split_of(loaded))
        assert loaded.samples[1].size == (10, 8)


AIRCRAFT_VARIANTS = ["707-320", "A320", "Cessna 172"]
AIRCRAFT_PICKS = {"train": [0, 1, 2, 2], "val": [1, 0], "test": [2]}


def write_aircraft(root: Path) -> None:
    """FGVC-Aircraft's layout: data/images/<id>.jpg, variants.txt and images_variant_<split>.txt."""
    data = root / "aircraft" / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    (data / "variants.txt").write_text("".join(f"{v}\n" for v in AIRCRAFT_VARIANTS))
    image_id = 1000000
    for split, picks in AIRCRAFT_PICKS.items():
        lines = []
        for pick in picks:
            image_id += 1
            write_image(data / "images" / f"{image_id}.jpg", value=pick)
            lines.append(f"{image_id} {AIRCRAFT_VARIANTS[pick]}\n")
        (data / f"images_variant_{split}.txt").write_text("".join(lines))


def test_aircraft_variant_level_official_splits(tmp_path):
    variants = AIRCRAFT_VARIANTS
    write_aircraft(tmp_path)
    for split, picks in AIRCRAFT_PICKS.items():
        loaded = load_split("aircraft", tmp_path, split)
        assert loaded.class_names == variants
        np.testing.assert_array_equal(loaded.labels, picks)
        assert loaded.samples[0].mode == "RGB"


def write_stl10(binary: Path, part: str, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """STL-10 binaries: uint8 images stored N x C x W x H, labels 1..10."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    images = rng.integers(0, 256, (len(labels), 96, 96, 3), dtype=np.uint8)
    binary.mkdir(parents=True, exist_ok=True)
    images.transpose(0, 3, 2, 1).tofile(binary / f"{part}_X.bin")
    (labels + 1).astype(np.uint8).tofile(binary / f"{part}_y.bin")
    return images, labels


def test_stl10_binaries_match_torchvision_decoding_and_val_is_fixed(tmp_path):
    binary = tmp_path / "stl10" / "stl10_binary"
    with pytest.raises(UserError, match=r"stl10_binary/train_X\.bin"):
        load_split("stl10", tmp_path, "train")
    train_images, train_labels = write_stl10(binary, "train", per_class=10, seed=0)
    test_images, test_labels = write_stl10(binary, "test", per_class=2, seed=1)
    # torchvision decodes these files the same way (its constructor would demand the real MD5s)
    reader = datasets.STL10.__new__(datasets.STL10)
    reader.root, reader.base_folder = str(tmp_path / "stl10"), "stl10_binary"
    decoded, _ = reader._STL10__loadfile("train_X.bin", "train_y.bin")
    np.testing.assert_array_equal(decoded.transpose(0, 2, 3, 1), train_images)

    train, val, test = (load_split("stl10", tmp_path, split) for split in ("train", "val", "test"))
    assert train.images.shape == (90, 96, 96, 3) and val.images.shape == (10, 96, 96, 3)
    assert sorted(val.labels.tolist()) == list(range(10))  # stratified: one per class
    rows = {image.tobytes(): label for image, label in zip(train_images, train_labels)}
    carved = [image.tobytes() for image in np.concatenate([train.images, val.images])]
    assert sorted(carved) == sorted(rows)
    assert [rows[image.tobytes()] for image in val.images] == val.labels.tolist()
    np.testing.assert_array_equal(test.images, test_images)
    np.testing.assert_array_equal(test.labels, test_labels)
    assert train.class_names[0] == "airplane" and len(train.class_names) == 10
    np.testing.assert_array_equal(load_split("stl10", tmp_path, "val").images, val.images)


PET_BREEDS = ["Abyssinian", "american_bulldog", "pug"]


def write_oxford_pets(root: Path) -> None:
    """Oxford-IIIT Pets' layout: images/<breed>_<n>.jpg and annotations/{trainval,test}.txt."""
    base = root / "oxford-pets" / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    for split, count in (("trainval", 12), ("test", 2)):
        lines = []
        for label, breed in enumerate(PET_BREEDS):
            for i in range(count):
                image_id = f"{breed}_{split}{i}"
                write_image(base / "images" / f"{image_id}.jpg", value=10 * i + label)
                lines.append(f"{image_id} {label + 1} {1 + (breed == PET_BREEDS[0])} 1\n")
        (base / "annotations" / f"{split}.txt").write_text("".join(lines))


def test_oxford_pets_val_carved_from_trainval(tmp_path):
    breeds = PET_BREEDS
    write_oxford_pets(tmp_path)
    train, val, test = (load_split("oxford-pets", tmp_path, split) for split in ("train", "val", "test"))
    assert train.class_names == ["Abyssinian", "American Bulldog", "Pug"]
    assert len(val) == 4 and len(train) == 32 and len(test) == 6
    assert set(val.labels) == {0, 1, 2}
    assert not set(split_of(train)) & set(split_of(val))
    assert all("trainval" in path for path in split_of(train) + split_of(val))
    for loaded in (train, val, test):
        names = [Path(path).stem.rsplit("_", 1)[0] for path in split_of(loaded)]
        np.testing.assert_array_equal(loaded.labels, [breeds.index(name) for name in names])


def test_torchvision_sets_name_what_to_fetch_without_network(tmp_path):
    for name, marker in (("dtd", "dtd/dtd/labels/train1.txt"),
                         ("aircraft", "fgvc-aircraft-2013b/data/images_variant_train.txt"),
                         ("oxford-pets", "oxford-iiit-pet/annotations/trainval.txt")):
        with pytest.raises(UserError, match=f"{marker}.*https://"):
            load_split(name, tmp_path, "train")


# ---------------------------------------------------------------- imagefolder:<path>

def test_imagefolder_class_order_is_the_union_of_all_splits(tmp_path):
    tree = {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "emu": 1}, "test": {"dog": 2}}
    for split, counts in tree.items():
        for name, count in counts.items():
            for i in range(count):
                write_image(tmp_path / "mine" / split / name / f"{i}.png", value=40 * i, mode="L")
    (tmp_path / "mine" / "train" / "cat" / "notes.txt").write_text("not an image")
    for split, counts in tree.items():
        loaded = load_split(f"imagefolder:{tmp_path / 'mine'}", Path("unused"), split)
        assert loaded.class_names == ["cat", "dog", "emu"]
        expected = [label for label, name in enumerate(["cat", "dog", "emu"]) for _ in range(counts.get(name, 0))]
        np.testing.assert_array_equal(loaded.labels, expected)
        assert loaded.samples[0].mode == "RGB"
    shutil.rmtree(tmp_path / "mine" / "test")
    with pytest.raises(UserError, match="missing: test"):
        load_split(f"imagefolder:{tmp_path / 'mine'}", Path("unused"), "train")


# ---------------------------------------------------------------- Fashion-MNIST

def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes, gzipped, as LeCun's and Zalando's distributions store them."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as handle:
        handle.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fashionmnist(raw: Path, per_class: dict[str, int], seed: int = 0) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    parts = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class[part])
        rng.shuffle(labels)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)
        parts[part] = (images, labels)
    return parts


def test_fashionmnist_reads_idx_gz_like_torchvision_with_a_fixed_stratified_val(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    parts = write_fashionmnist(raw, {"train": 20, "test": 3})
    # torchvision's own IDX reader is the oracle for the decoding
    from torchvision.datasets.mnist import read_image_file
    for part, prefix in (("train", "train"), ("test", "t10k")):
        with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz") as src, open(tmp_path / "x", "wb") as dst:
            dst.write(src.read())
        np.testing.assert_array_equal(read_image_file(str(tmp_path / "x")).numpy(), parts[part][0])
    test = load_split("fashionmnist", tmp_path, "test")
    np.testing.assert_array_equal(test.images[..., 0], parts["test"][0])
    np.testing.assert_array_equal(test.labels, parts["test"][1])
    assert test.class_names == datasets.FashionMNIST.classes and test.source["path"] == str(raw.resolve())
    train, val = load_split("fashionmnist", tmp_path, "train"), load_split("fashionmnist", tmp_path, "val")
    assert (len(train), len(val)) == (180, 20) and np.bincount(val.labels).tolist() == [2] * 10
    # the two parts are the official train set, disjoint, each row with its own label
    images, labels = parts["train"]
    rows = {image.tobytes(): label for image, label in zip(images, labels)}
    seen = [image.tobytes() for image in np.concatenate([train.images, val.images])[..., 0]]
    assert sorted(seen) == sorted(rows)
    assert [rows[image[..., 0].tobytes()] for image in val.images] == val.labels.tolist()
    again = load_split("fashionmnist", tmp_path, "val")
    np.testing.assert_array_equal(again.images, val.images)


def test_fashionmnist_10k_is_a_stratified_subset_of_the_full_splits(tmp_path):
    write_fashionmnist(tmp_path / "FashionMNIST" / "raw", {"train": 1200, "test": 250})
    for split, size in (("train", 10_000), ("val", 1_000), ("test", 2_000)):
        full, small = load_split("fashionmnist", tmp_path, split), load_split("fashionmnist-10k", tmp_path, split)
        assert len(small) == size and np.bincount(small.labels).tolist() == [size // 10] * 10
        assert {row.tobytes() for row in small.images} <= {row.tobytes() for row in full.images}


def test_fashionmnist_malformed_or_missing_files_are_one_line_errors(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_fashionmnist(raw, {"train": 2, "test": 1})
    labels = raw / "train-labels-idx1-ubyte.gz"
    write_idx(labels, np.zeros((20, 2), dtype=np.uint8))  # 2-d where labels are 1-d
    with pytest.raises(UserError, match=r"train-labels-idx1-ubyte\.gz is not an IDX file") as err:
        load_split("fashionmnist", tmp_path, "train")
    assert "\n" not in str(err.value)
    with gzip.open(labels, "wb") as handle:  # header says 20 labels, 3 bytes follow
        handle.write(bytes([0, 0, 8, 1]) + np.asarray([20], dtype=">u4").tobytes() + bytes(3))
    with pytest.raises(UserError, match=r"header says \(20,\)"):
        load_split("fashionmnist", tmp_path, "train")
    labels.write_bytes(b"not gzip")
    with pytest.raises(UserError, match=r"not a readable \.gz file"):
        load_split("fashionmnist", tmp_path, "train")


@pytest.mark.skipif(SYSTEM_FOLDER.is_dir(), reason="Debian's dataset-fashion-mnist is installed here")
def test_fashionmnist_missing_names_the_files_and_the_package(tmp_path):
    with pytest.raises(UserError, match=r"FashionMNIST/raw \(apt-get install dataset-fashion-mnist"):
        load_split("fashionmnist", tmp_path, "train")


# ---------------------------------------------------------------- the whole registry

def write_octdl(root: Path) -> None:
    write_octdl_download(root / "raw")
    build_octdl_tree(root / "raw", root / "octdl", size=6)


def write_stl10_parts(root: Path) -> None:
    for part, per_class, seed in (("train", 10, 0), ("test", 1, 1)):
        write_stl10(root / "stl10" / "stl10_binary", part, per_class, seed)


def write_medmnist_fixture(flag: str, root: Path) -> None:
    write_medmnist(root / "medmnist", f"{flag}_224.npz", (224, 224), classes=2)


def write_medimeta_fixture(dataset_id: str, root: Path) -> None:
    write_medimeta(root / "medimeta" / dataset_id, MEDIMETA_TASKS[dataset_id], channels=1, side=16)


# name -> a writer of a tiny fixture in the dataset's real on-disk layout under a root (None: nothing to write)
FIXTURES = {
    "digits": None,
    **{flag: partial(write_medmnist_fixture, flag) for flag in MEDMNIST_FLAGS},
    **{dataset_id: partial(write_medimeta_fixture, dataset_id) for dataset_id in MEDIMETA_TASKS},
    "octdl": write_octdl,
    "dtd": write_dtd,
    "aircraft": write_aircraft,
    "stl10": write_stl10_parts,
    "oxford-pets": write_oxford_pets,
    "fashionmnist": lambda root: write_fashionmnist(root / "FashionMNIST" / "raw", {"train": 20, "test": 3}),
    "fashionmnist-10k": lambda root: write_fashionmnist(root / "FashionMNIST" / "raw", {"train": 1200, "test": 250}),
}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_registered_dataset_loads_its_fixture(tmp_path, name):
    """A dataset added to the registry needs a fixture here, in its real on-disk layout: it then gets the checks every
    loader must pass (three splits, int64 labels within the declared classes, images the extraction can read)."""
    assert name in FIXTURES, f"{name} is registered in src/data but has no fixture in FIXTURES"
    if FIXTURES[name] is not None:
        FIXTURES[name](tmp_path)
    if name in MEDMNIST_FLAGS and "multi-label" in MEDMNIST_INFO[name]["task"]:
        with pytest.raises(UserError, match="multi-label"):
            load_split(name, tmp_path, "train")
        return
    for split in SPLITS:
        loaded = load_split(name, tmp_path, split)
        assert len(loaded) > 0 and loaded.labels.dtype == np.int64
        assert 0 <= loaded.labels.min() and loaded.labels.max() < len(loaded.class_names)
        if loaded.images is not None:
            assert loaded.images.dtype == np.uint8 and loaded.images.shape[-1] in (1, 3)
        else:
            assert loaded.samples[0].mode == "RGB"
