"""Embedding databases, result files, fingerprints and atomic writes.

Stages talk only through `.npz` files with the keys `embeddings` (float32, N x D)
and `labels` (int64, N), as the paper's code reads them. We add a `meta` key (a
JSON string) recording the settings and versions that produced the file. Every
write goes to a temporary file in the same folder and is renamed into place, so a
failed run never leaves a half-written or clobbered output behind. A temporary is
named after its writer (host and process id), so a run killed mid-write leaves one
that the next write into that folder recognises as dead and removes.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

import numpy as np

from src.cli import UserError, brief_reason


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour shapes the numbers we write."""
    versions = {"python": sys.version.split()[0]}
    for name in ("torch", "torchvision", "timm", "numpy", "scikit-learn", "medmnist"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


REPO_ROOT = Path(__file__).resolve().parents[1]  # the stage scripts, src/ and the relative default folders
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


def _host_tag() -> str:
    """This machine's name as a file name part: temporaries of other hosts sharing a folder are never touched."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())


def _process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host; a zombie or a reused pid counts as alive, so we err on keeping."""
    if os.name == "nt":  # os.kill would terminate the process there; keep everything
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_dead_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries of atomic_path in `folder` whose writer, a process on this host, is gone
    (killed during its write); a live writer's temporary is left alone. Returns what was removed."""
    pattern = re.compile(rf"^\..+\.{re.escape(_host_tag())}-(?P<pid>\d+)\.[a-z0-9_]+\.tmp$")
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for name in names:
        match = pattern.match(name)
        if match and not _process_alive(int(match["pid"])):
            try:
                (Path(folder) / name).unlink()
            except FileNotFoundError:  # another run removed it first
                continue
            removed.append(Path(folder) / name)
    return removed


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary is `.<name>.<host>-<pid>.<random>.tmp`; dead writers' temporaries in the folder go first.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(path.parent)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_host_tag()}-{os.getpid()}.",
                                            suffix=".tmp")
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


def check_output_folder(folder: Path, flag: str) -> None:
    """Prove, before any work starts, that outputs can be written into `folder`, and clear dead writers'
    temporaries there. Creates nothing: a folder still to be made passes if the nearest existing
    folder above it takes files, since atomic_path makes the rest when it writes."""
    folder = Path(folder)
    existing = folder.absolute()
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {folder} is not writable ({existing} is not a folder); choose another {flag}")
    try:
        with tempfile.TemporaryFile(dir=existing):  # an unnamed file on Linux: nothing shows, nothing stays
            pass
    except OSError as err:
        raise UserError(f"{flag} {folder} is not writable ({err.strerror} in {existing}); "
                        f"choose another {flag}") from err
    remove_dead_temporaries(folder)


def save_database(path: Path, embeddings: np.ndarray, labels: np.ndarray, meta: dict) -> None:
    """Write an embedding database atomically (keys embeddings, labels, meta)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
        raise ValueError(f"bad database shapes: embeddings {embeddings.shape}, labels {labels.shape}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, embeddings=embeddings, labels=labels, meta=np.array(json.dumps(meta)))


def check_npz(path: Path, remedy: str) -> None:
    """Refuse a file that is not a zip archive before np.load reads it: np.load returns a bare array
    for an .npy under an .npz name, and fails deep inside the zip reader for a damaged one."""
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not an .npz archive (damaged, or an .npy under an .npz name); {remedy}")


def load_database(path: Path, hint: str = "") -> tuple[np.ndarray, np.ndarray, dict]:
    """Read and validate an embedding database: (embeddings float32 N x D, labels int64 N, meta).

    `hint` says which command makes the file, for the errors that a rerun of it fixes. Labels
    must be the class ids 0..C-1; C is bounded by the data (at most N, and at most the number of
    class names the meta records), so a corrupt label cannot make a stage allocate N x label memory.
    """
    path = Path(path)
    recreate = f"recreate it with: {hint}" if hint else "recreate it"
    if not path.is_file():
        raise UserError(f"missing database {path}" + (f"; create it with: {hint}" if hint else ""))
    check_npz(path, recreate)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "embeddings" not in npz.files or "labels" not in npz.files:
                raise UserError(f"{path} lacks the keys 'embeddings' and 'labels'; {recreate}")
            embeddings, labels = npz["embeddings"], npz["labels"]
            meta = json.loads(str(npz["meta"])) if "meta" in npz.files else {}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"cannot read database {path} ({brief_reason(err)}); {recreate}") from err
    if not isinstance(meta, dict):
        raise UserError(f"{path}: 'meta' is not a JSON object; {recreate}")
    if embeddings.dtype.kind not in "fiu" or embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise UserError(f"{path}: embeddings must be a non-empty N x D array of numbers, "
                        f"got {embeddings.dtype} {embeddings.shape}; {recreate}")
    if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
        raise UserError(f"{path}: {labels.shape[0] if labels.ndim == 1 else labels.shape} labels "
                        f"for {embeddings.shape[0]} embeddings; {recreate}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: labels must be integers, got {labels.dtype}; {recreate}")
    if labels.min() < 0:
        raise UserError(f"{path}: negative class labels; labels must be 0..C-1, {recreate}")
    names = meta.get("class_names")
    limit, counted = ((len(names), "class names in its meta") if isinstance(names, list) and len(names) < len(labels)
                      else (len(labels), "rows"))
    if labels.max() >= limit:
        raise UserError(f"{path}: label {labels.max()} is out of range; labels must be 0..C-1 with C at most "
                        f"{limit}, its number of {counted}; {recreate}")
    embeddings = embeddings.astype(np.float32)
    if not np.isfinite(embeddings).all():
        raise UserError(f"{path}: embeddings contain NaN or infinite values (or exceed float32); {recreate}")
    return embeddings, labels.astype(np.int64), meta


def declared_classes(meta: dict, path: Path, *labels: np.ndarray) -> int:
    """The number of classes the dataset declares (create_db.py records its class names), never the count the
    labels happen to show; a database without them (made by hand) falls back to the largest label + 1."""
    largest = max(int(y.max()) for y in labels if len(y))
    if "class_names" not in meta:
        return largest + 1
    if largest >= len(meta["class_names"]):
        raise UserError(f"{path} has label {largest} but declares {len(meta['class_names'])} classes; "
                        "recreate it with create_db.py")
    return len(meta["class_names"])


def write_json(path: Path, payload: dict) -> None:
    """Write a result file atomically, pretty-printed so it reads as a simple file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
