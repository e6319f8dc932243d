"""anonymize.py from the command line: outputs, and one-line exit-2 errors that write nothing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from src.io import load_database, save_database
from cli_checks import assert_one_line_error  # tests/cli_checks.py

ROOT = Path(__file__).resolve().parents[1]


def run_anonymize(database_root: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "anonymize.py", "--dataset", "toy", "--backbone", "tiny", "--device", "cpu",
               "--database_root", str(database_root), "--ckpt_root", str(database_root / "ckpts"), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)


@pytest.fixture
def database(tmp_path) -> Path:
    """Real-format train/val databases: two separated Gaussian classes, D = 8."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "toy" / "tiny"
    for split, count in (("train", 53), ("val", 20)):
        labels = np.arange(count) % 2
        embeddings = rng.normal(size=(count, 8)) + 3.0 * labels[:, None]
        save_database(folder / f"{split}.npz", embeddings, labels, {"split": split})
    return tmp_path


def test_ksame_writes_cluster_means_with_metadata(database):
    result = run_anonymize(database, "--anonymizer", "ksame", "--k", "5")
    assert result.returncode == 0, result.stderr
    embeddings, labels, meta = load_database(database / "toy" / "tiny" / "train_ksame-5.npz")
    real_x, real_y, _ = load_database(database / "toy" / "tiny" / "train.npz")
    assert embeddings.shape == (50, 8)  # 53 - 53 mod 5
    np.testing.assert_array_equal(labels, real_y[:50])
    assert len(np.unique(embeddings.round(5), axis=0)) == 10  # ten clusters of five
    np.testing.assert_allclose(embeddings.mean(0), real_x[:50].mean(0), atol=1e-5)  # means preserve the mean
    assert meta["settings"]["k"] == 5 and str(database / "toy" / "tiny" / "train.npz") in meta["inputs"]


@pytest.mark.slow
def test_cvae_writes_per_class_samples_and_reuses_its_checkpoint(database):
    first = run_anonymize(database, "--anonymizer", "cvae", "--seed", "3", "--max_epochs", "30")
    assert first.returncode == 0, first.stderr
    embeddings, labels, meta = load_database(database / "toy" / "tiny" / "train_cvae-s3.npz")
    _, real_y, _ = load_database(database / "toy" / "tiny" / "train.npz")
    assert embeddings.shape == (53, 8)
    np.testing.assert_array_equal(np.bincount(labels), np.bincount(real_y))
    assert Path(meta["checkpoint"]).is_file() and meta["settings"]["seed"] == 3
    stamp = Path(meta["checkpoint"]).stat().st_mtime_ns
    second = run_anonymize(database, "--anonymizer", "cvae", "--seed", "3", "--max_epochs", "30")
    assert second.returncode == 0, second.stderr
    assert Path(meta["checkpoint"]).stat().st_mtime_ns == stamp  # reused, not retrained
    np.testing.assert_array_equal(load_database(database / "toy" / "tiny" / "train_cvae-s3.npz")[0], embeddings)


def corrupt(folder: Path, case: str) -> None:
    """Damage the databases in one of the ways a user's files go wrong."""
    train = folder / "train.npz"
    if case == "missing":
        train.unlink()
    elif case == "corrupt":
        train.write_bytes(b"PK\x03\x04 truncated")
    else:
        with np.load(train) as npz:
            embeddings, labels = npz["embeddings"], npz["labels"]
        if case == "nan":
            embeddings[3, 2] = np.nan
        elif case == "infinite":
            embeddings[0, 0] = np.inf
        elif case == "count_mismatch":
            labels = labels[:-1]
        elif case == "one_class":
            labels = np.zeros_like(labels)
        elif case == "negative_labels":
            labels = labels - 1
        np.savez(train, embeddings=embeddings, labels=labels)


@pytest.mark.parametrize("args, case, fragments", [
    (["--anonymizer", "ksame", "--k", "1"], None, ["--k", "at least 2"]),
    (["--anonymizer", "ksame", "--k", "54"], None, ["--k", "53"]),
    (["--anonymizer", "ksame", "--k", "5"], "missing", ["train.npz", "create_db.py"]),
    (["--anonymizer", "ksame", "--k", "5"], "corrupt", ["train.npz"]),
    (["--anonymizer", "ksame", "--k", "5"], "nan", ["train.npz", "NaN"]),
    (["--anonymizer", "ksame", "--k", "5"], "infinite", ["train.npz", "infinite"]),
    (["--anonymizer", "ksame", "--k", "5"], "count_mismatch", ["train.npz", "labels"]),
    (["--anonymizer", "cvae"], "val_dimension", ["val.npz", "dimension"]),
    (["--anonymizer", "cvae"], "one_class", ["train.npz", "one class"]),
    (["--anonymizer", "cvae"], "negative_labels", ["train.npz", "negative"]),
    (["--anonymizer", "cvae", "--seed", "-1"], None, ["--seed -1"]),
])
def test_bad_input_exits_2_and_writes_nothing(database, args, case, fragments):
    folder = database / "toy" / "tiny"
    if case == "val_dimension":
        save_database(folder / "val.npz", np.zeros((20, 5)), np.arange(20) % 2, {})
    elif case is not None:
        corrupt(folder, case)
    before = sorted(p.name for p in folder.iterdir())
    assert_one_line_error(run_anonymize(database, *args), *fragments)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert not (database / "ckpts").exists()
