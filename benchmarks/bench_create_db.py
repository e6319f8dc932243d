"""create_db throughput: the full extraction pipeline next to the model alone, same run.

Synthetic 224 px uint8 RGB images (an array dataset, like MedMNIST+), so only speed is
measured. Three numbers, images/s:
- model alone: normalised batches already on the device, forward only (bf16 on CUDA);
- pipeline: src.extract.extract_embeddings on the uint8 array (our create_db path);
- reference-style: PIL transforms in the main process, fp32 (what the authors' code does).

    python benchmarks/bench_create_db.py                      # CPU: offline default, ViT-S/14 at 224 px
    python benchmarks/bench_create_db.py --backbone vit_base_patch14_dinov2 --img_size 518 --num_images 4096
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.backbones import create_backbone  # noqa: E402
from src.data.base import ImageSplit  # noqa: E402
from src.extract import extract_embeddings  # noqa: E402
from src.runtime import resolve_device  # noqa: E402
from timing import synchronize  # noqa: E402  (benchmarks/timing.py, next to this script)


@torch.inference_mode()
def model_alone(backbone, device: torch.device, num_images: int, batch_size: int) -> float:
    batch = torch.randn(batch_size, *backbone.data_config["input_size"], device=device)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        backbone.model(batch)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(max(1, num_images // batch_size)):
        with autocast:
            backbone.model(batch)
    synchronize(device)
    return max(1, num_images // batch_size) * batch_size / (time.perf_counter() - start)


def pipeline(backbone, device: torch.device, images: np.ndarray, batch_size: int) -> float:
    split = ImageSplit(labels=np.zeros(len(images)), class_names=["x"], images=images)
    warm = ImageSplit(labels=np.zeros(batch_size), class_names=["x"], images=images[:batch_size])
    extract_embeddings(backbone, warm, device, batch_size)
    synchronize(device)
    start = time.perf_counter()
    extract_embeddings(backbone, split, device, batch_size)
    synchronize(device)
    return len(images) / (time.perf_counter() - start)


@torch.inference_mode()
def reference_style(backbone, device: torch.device, images: np.ndarray, batch_size: int) -> float:
    transform = timm.data.create_transform(**backbone.data_config, is_training=False)
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        batch = torch.stack([transform(Image.fromarray(image)) for image in images[first:first + batch_size]])
        backbone.model(batch.to(device)).cpu()
    synchronize(device)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_small_patch14_dinov2")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--reference_images", type=int, default=None, help="fewer images for the slow baseline")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    backbone = create_backbone(args.backbone, img_size=args.img_size, pretrained=False)  # speed only
    backbone.model.to(device)
    images = np.random.default_rng(0).integers(0, 256, size=(args.num_images, 224, 224, 3), dtype=np.uint8)
    alone = model_alone(backbone, device, args.num_images, args.batch_size)
    ours = pipeline(backbone, device, images, args.batch_size)
    reference = reference_style(backbone, device, images[:args.reference_images or args.num_images], args.batch_size)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.backbone} at {args.img_size} px, {args.num_images} uint8 224 px images, "
          f"batch {args.batch_size}, {name}")
    print(f"model alone ({'bf16' if device.type == 'cuda' else 'fp32'}): {alone:8.1f} images/s")
    print(f"create_db pipeline:        {ours:8.1f} images/s  ({ours / alone:.0%} of model alone)")
    print(f"reference-style (PIL, fp32): {reference:6.1f} images/s  (pipeline is {ours / reference:.1f}x faster)")


if __name__ == "__main__":
    main()
