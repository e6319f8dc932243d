"""create_db.py end to end on a tiny randomly initialised timm model, and its failure modes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from src.backbones import create_backbone
from src.data import load_split
from src.extract import DeviceTransform, extract_embeddings
from src.io import load_database, save_database
from cli_checks import assert_one_line_error  # tests/cli_checks.py

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "test_vit", "--img_size", "64", "--num_workers", "0", "--device", "cpu"]


def run_create_db(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "create_db.py", *args], cwd=ROOT, capture_output=True, text=True)


def save_tiny_weights(path: Path, name: str = "test_vit") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def test_device_transform_matches_timm_pil_transform():
    """The on-device path reproduces timm's PIL eval transform (resize, crop, normalise) closely."""
    config = {"input_size": (3, 64, 64), "interpolation": "bicubic", "mean": (0.5, 0.4, 0.3),
              "std": (0.2, 0.25, 0.3), "crop_pct": 0.875, "crop_mode": "center"}
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, size=(12, 15, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 96 x 120
    expected = timm.data.create_transform(**config, is_training=False)(Image.fromarray(smooth))
    actual = DeviceTransform(config, torch.device("cpu"))(torch.from_numpy(smooth)[None])[0]
    assert actual.shape == expected.shape == (3, 64, 64)
    assert torch.nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0) > 0.99
    assert (actual - expected).abs().mean() < 0.05


def test_array_and_sample_paths_give_the_same_embeddings_for_the_same_images():
    """Grey uint8 arrays go through the device transform; PIL samples through timm's: same features."""
    split = load_split("digits", ROOT / "assets/data", "val")
    backbone = create_backbone("test_vit", img_size=64, pretrained=False)
    from_arrays = extract_embeddings(backbone, split, torch.device("cpu"), batch_size=64, num_workers=0)
    as_pil = [Image.fromarray(image[..., 0]).convert("RGB") for image in split.images]
    samples_split = type(split)(labels=split.labels, class_names=split.class_names, samples=as_pil)
    from_samples = extract_embeddings(backbone, samples_split, torch.device("cpu"), batch_size=64, num_workers=0)
    assert from_arrays.shape == from_samples.shape == (len(split), backbone.num_features)
    cosine = ((from_arrays * from_samples).sum(1) / np.linalg.norm(from_arrays, axis=1)
              / np.linalg.norm(from_samples, axis=1))
    assert cosine.min() > 0.98


@pytest.mark.slow
def test_create_db_writes_all_splits_and_reuses_them(tmp_path):
    result = run_create_db("--dataset", "digits", "--random_init", "--database_root", str(tmp_path), *TINY)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "digits" / "test_vit"
    counts = {}
    for split in ("train", "val", "test"):
        embeddings, labels, meta = load_database(folder / f"{split}.npz")
        assert embeddings.dtype == np.float32 and labels.dtype == np.int64
        assert embeddings.shape == (len(labels), 64)
        np.testing.assert_array_equal(labels, load_split("digits", tmp_path, split).labels)
        assert meta["settings"]["backbone"] == "test_vit" and meta["split"] == split
        assert meta["weights"]["kind"] == "random-init" and meta["data_config"]["input_size"] == [3, 64, 64]
        assert meta["versions"]["torch"] == torch.__version__.split("+")[0] or meta["versions"]["torch"]
        counts[split] = len(labels)
    assert sum(counts.values()) == 1797
    with np.load(folder / "train.npz") as npz:  # the paper's code reads exactly these keys
        assert set(npz.files) >= {"embeddings", "labels"}
    stamp = (folder / "train.npz").stat().st_mtime_ns
    again = run_create_db("--dataset", "digits", "--random_init", "--database_root", str(tmp_path), *TINY)
    assert again.returncode == 0 and again.stdout.count("reusing") == 3
    assert (folder / "train.npz").stat().st_mtime_ns == stamp


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_is_loaded(tmp_path, suffix):
    weights = tmp_path / f"tiny{suffix}"
    state = save_tiny_weights(weights)
    backbone = create_backbone("test_vit", weights=weights)
    for key, tensor in backbone.model.state_dict().items():
        torch.testing.assert_close(tensor, state[key])
    assert backbone.weights["kind"] == "file" and len(backbone.weights["sha256"]) == 16


@pytest.fixture
def existing_database(tmp_path) -> Path:
    """A database folder with a train.npz that a failing run must leave untouched."""
    folder = tmp_path / "db" / "digits" / "test_vit"
    folder.mkdir(parents=True)
    (folder / "train.npz").write_bytes(b"earlier output")
    return tmp_path / "db"


@pytest.mark.parametrize("case", ["unknown_dataset", "unknown_backbone", "unreadable_weights",
                                  "other_architecture", "missing_weights"])
def test_bad_input_exits_2_and_leaves_outputs(tmp_path, existing_database, case):
    args = ["--dataset", "digits", "--database_root", str(existing_database), *TINY]
    if case == "unknown_dataset":
        args[1], fragments = "no_such_set", ["--dataset", "no_such_set"]
    elif case == "unknown_backbone":
        args[args.index("test_vit")], fragments = "test_vitt", ["--backbone", "test_vitt"]
    elif case == "unreadable_weights":
        (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
        args, fragments = args + ["--weights", str(tmp_path / "bad.pth")], ["--weights", "bad.pth"]
    elif case == "other_architecture":
        save_tiny_weights(tmp_path / "resnet.safetensors", "test_resnet")
        args, fragments = args + ["--weights", str(tmp_path / "resnet.safetensors")], ["does not fit", "test_vit"]
    else:
        args, fragments = args + ["--weights", str(tmp_path / "absent.pth")], ["absent.pth"]
    assert_one_line_error(run_create_db(*args), *fragments)
    assert (existing_database / "digits" / "test_vit" / "train.npz").read_bytes() == b"earlier output"


def test_missing_weights_file_is_an_error_even_when_pretrained_databases_are_current(tmp_path):
    """A --weights typo must not fall back to reusing databases made with other weights."""
    settings = {"dataset": "digits", "backbone": "test_vit", "weights": "timm-pretrained", "img_size": 64, "size": 224}
    for split in ("train", "val", "test"):
        save_database(tmp_path / "digits" / "test_vit" / f"{split}.npz", np.zeros((2, 4)), np.zeros(2),
                      {"settings": settings})
    result = run_create_db("--dataset", "digits", "--database_root", str(tmp_path), *TINY,
                           "--weights", str(tmp_path / "absent.pth"))
    assert_one_line_error(result, "--weights", "absent.pth")


def test_paper_backbone_without_cache_or_network_explains_how_to_get_weights(tmp_path):
    import socket

    try:
        socket.getaddrinfo("huggingface.co", 443)
        pytest.skip("the hub is reachable here: the offline message cannot be shown")
    except OSError:
        pass
    result = subprocess.run([sys.executable, "create_db.py", "--dataset", "digits", "--database_root",
                             str(tmp_path), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                            env={**__import__("os").environ, "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(result, "vit_base_patch14_dinov2.lvd142m", "no network", "--weights")
    assert not any(tmp_path.glob("**/*.npz"))
