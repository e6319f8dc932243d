"""Embedding databases, result files, fingerprints and atomic writes.

Stages talk only through `.npz` files with the keys `embeddings` (float32, N x D)
and `labels` (int64, N), as the paper's code reads them. We add a `meta` key (a
JSON string) recording the settings and versions that produced the file. Every
write goes to a temporary file in the same folder and is renamed into place, so a
failed run never leaves a half-written or clobbered output behind.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

import numpy as np

from src.cli import UserError


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour shapes the numbers we write."""
    versions = {"python": sys.version.split()[0]}
    for name in ("torch", "torchvision", "timm", "numpy", "scikit-learn", "medmnist"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


REPO_ROOT = Path(__file__).resolve().parents[1]
STAGE_SCRIPTS = ("create_db.py", "anonymize.py", "probing.py", "probing_noise.py", "probing_noise_cvae.py")


@functools.cache  # one answer per process: the code does not change under a running stage
def code_version() -> str:
    """The code that made an output: `git:<commit>[-dirty]`, or `src:<hash>` of src/ and the stage
    scripts where there is no git checkout (an unpacked archive, a copied tree)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT,
                                    capture_output=True, text=True, timeout=10)
            dirty = "-dirty" if status.returncode != 0 or status.stdout.strip() else ""
            return f"git:{commit.stdout.strip()[:12]}{dirty}"
    except (OSError, subprocess.SubprocessError):
        pass
    digest = hashlib.sha256()
    for path in sorted([*REPO_ROOT.glob("src/**/*.py"), *(REPO_ROOT / name for name in STAGE_SCRIPTS)]):
        if path.is_file():
            digest.update(str(path.relative_to(REPO_ROOT)).encode())
            digest.update(path.read_bytes())
    return f"src:{digest.hexdigest()[:16]}"


def provenance() -> dict[str, object]:
    """What every output records about the software that made it."""
    return {"versions": package_versions(), "code_version": code_version()}


def file_fingerprint(path: Path) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits): identifies the data a result came from.

    Remembered per (path, inode, size, modification time) within a run, so a multi-GB
    weights file named in several places is read once, while a rewritten file is read again.
    """
    stat = os.stat(path)
    return _hash_file(str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.cache  # one entry per file version seen: a sweep checks hundreds of inputs, repeatedly
def _hash_file(path: str, inode: int, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def array_fingerprint(*arrays: np.ndarray) -> str:
    """SHA-256 over arrays' shapes, dtypes and bytes (first 16 hex digits)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def current_umask() -> int:
    """The process umask, for giving mkstemp / mkdtemp outputs the usual permissions (reading sets it back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def settings_key(settings: dict) -> str:
    """SHA-256 of settings as sorted JSON (first 16 hex digits): names a checkpoint by what made it."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise UserError(f"cannot write to {path.parent}: {err.strerror}; choose a writable folder") from err
    os.close(handle)
    tmp = Path(tmp_name)
    tmp.chmod(0o666 & ~current_umask())  # mkstemp makes 0600; outputs should get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_database(path: Path, embeddings: np.ndarray, labels: np.ndarray, meta: dict) -> None:
    """Write an embedding database atomically (keys embeddings, labels, meta)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
        raise ValueError(f"bad database shapes: embeddings {embeddings.shape}, labels {labels.shape}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, embeddings=embeddings, labels=labels, meta=np.array(json.dumps(meta)))


def load_database(path: Path, hint: str = "") -> tuple[np.ndarray, np.ndarray, dict]:
    """Read and validate an embedding database: (embeddings float32 N x D, labels int64 N, meta).

    `hint` says which command makes the file, for the error when it is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing database {path}" + (f"; create it with: {hint}" if hint else ""))
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "embeddings" not in npz or "labels" not in npz:
                raise UserError(f"{path} lacks the keys 'embeddings' and 'labels'; recreate it")
            embeddings = np.asarray(npz["embeddings"], dtype=np.float32)
            labels = npz["labels"]
            meta = json.loads(str(npz["meta"])) if "meta" in npz else {}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"cannot read database {path} ({err}); delete it and recreate it") from err
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise UserError(f"{path}: embeddings must be a non-empty N x D array, got shape {embeddings.shape}")
    if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
        raise UserError(f"{path}: {labels.shape[0] if labels.ndim == 1 else labels.shape} labels "
                        f"for {embeddings.shape[0]} embeddings; recreate it")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: labels must be integers, got {labels.dtype}; recreate it")
    if labels.min() < 0:
        raise UserError(f"{path}: negative class labels; labels must be 0..C-1, recreate it")
    if not np.isfinite(embeddings).all():
        raise UserError(f"{path}: embeddings contain NaN or infinite values; recreate it")
    return embeddings, labels.astype(np.int64), meta


def write_json(path: Path, payload: dict) -> None:
    """Write a result file atomically, pretty-printed so it reads as a simple file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def dataset_dirname(dataset: str) -> str:
    """A dataset name as one folder or file name part (imagefolder:<path> holds ':' and '/')."""
    return dataset.replace(":", "_").replace("/", "_")


def database_dir(database_root: Path, dataset: str, backbone: str) -> Path:
    """Folder of one dataset's embeddings for one backbone: <root>/<dataset>/<backbone>/."""
    return Path(database_root) / dataset_dirname(dataset) / backbone


SPLITS = ("train", "val", "test")  # the databases of one dataset and backbone, as create_db.py writes them


def database_paths(database_root: Path, dataset: str, backbone: str) -> dict[str, Path]:
    """The real train / val / test databases: <root>/<dataset>/<backbone>/<split>.npz."""
    folder = database_dir(database_root, dataset, backbone)
    return {split: folder / f"{split}.npz" for split in SPLITS}
