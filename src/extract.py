"""Embedding extraction: a frozen backbone over one dataset split.

Two input paths, chosen by the split's form (src/data/base.py):
- uint8 arrays (MedMNIST, MedIMeta, STL10, digits): whole batches go to the device as
  uint8 and are resized, cropped and normalised there, so the CPU never becomes the
  bottleneck in front of a fast GPU;
- PIL samples (variable-sized images): timm's eval transform in DataLoader workers.
"""
from __future__ import annotations

import math

import numpy as np
import timm
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from src.backbones import Backbone
from src.data.base import ImageSplit


class DeviceTransform:
    """timm's eval transform (resize, center crop, normalise) on uint8 NHWC tensors on any device.

    Same steps as `timm.data.create_transform(is_training=False)` for crop_mode 'center' and
    'squash', through torchvision's tensor functions; tensor interpolation stands in for PIL's,
    so values differ slightly.
    """

    def __init__(self, data_config: dict, device: torch.device) -> None:
        _, height, width = data_config["input_size"]
        self.crop_size = [height, width]
        crop_pct = data_config.get("crop_pct") or 1.0
        scale = [math.floor(height / crop_pct), math.floor(width / crop_pct)]
        # one int resizes the shorter side keeping the aspect ratio; 'squash' resizes to the box
        self.resize_size = scale if data_config.get("crop_mode") == "squash" or height != width else scale[0]
        self.interpolation = InterpolationMode(data_config.get("interpolation", "bicubic"))
        self.mean = torch.tensor(data_config["mean"], device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(data_config["std"], device=device).view(1, 3, 1, 1) * 255

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.permute(0, 3, 1, 2).float()  # N x C x H x W, 0..255
        if images.shape[1] == 1:  # grey -> RGB, as the backbones expect
            images = images.expand(-1, 3, -1, -1)
        images = TF.resize(images, self.resize_size, interpolation=self.interpolation, antialias=True)
        images = TF.center_crop(images.clamp_(0, 255), self.crop_size)
        return (images - self.mean) / self.std


class TransformedSamples(Dataset):
    """PIL samples -> transformed tensors, run inside DataLoader workers."""

    def __init__(self, samples: Dataset, transform) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.samples[index].convert("RGB"))


def _array_batches(images: np.ndarray, batch_size: int, device: torch.device, data_config: dict):
    transform = DeviceTransform(data_config, device)
    pin = device.type == "cuda"
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        if pin:
            batch = batch.pin_memory()
        yield transform(batch.to(device, non_blocking=True))


def _sample_batches(samples: Dataset, batch_size: int, device: torch.device, data_config: dict,
                    num_workers: int):
    transform = timm.data.create_transform(**data_config, is_training=False)
    loader = DataLoader(TransformedSamples(samples, transform), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if num_workers > 0 else None)
    for batch in loader:
        yield batch.to(device, non_blocking=True)


@torch.inference_mode()
def extract_embeddings(backbone: Backbone, split: ImageSplit, device: torch.device, batch_size: int = 128,
                       num_workers: int = 4, description: str = "extract") -> np.ndarray:
    """Pooled backbone features of every image in the split, float32 N x D, in split order."""
    model = backbone.model.to(device)
    if split.images is not None:
        batches = _array_batches(split.images, batch_size, device, backbone.data_config)
    else:
        batches = _sample_batches(split.samples, batch_size, device, backbone.data_config, num_workers)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    features = []
    with tqdm(total=len(split), desc=description, unit="img") as bar:
        for batch in batches:
            with autocast:
                output = model(batch)
            features.append(output.float())  # stays on the device: no sync per batch
            bar.update(len(batch))
    return torch.cat(features).cpu().numpy()
