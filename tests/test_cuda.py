"""The CUDA paths against the CPU ones; skipped where no GPU is present (as in CI).

Run on a GPU machine with `python -m pytest -q -m cuda`. Each test computes the same
thing on both devices and compares: k-Same clusters exactly (float64 on both), the
probe's AUC, CVAE samples by their distribution, backbone features by cosine (the GPU
runs bf16 autocast), and a probing CLI run with --device auto.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from src.backbones import create_backbone
from src.anonymizers.cvae import CVAEMaking, CVAERelease
from src.cvae import OnlineSampler, train_cvae
from src.data.base import ImageSplit
from src.extract import extract_embeddings
from src.ksame import ksame_clusters
from src.metrics import auroc
from src.probe import predict_proba, train_probe
from src.settings import ProbeTraining
from src.runtime import resolve_device
from test_ksame import reference_clusters  # tests/test_ksame.py
from test_probe import common_args, gaussian_classes, run_script, tensors, write_databases  # tests/test_probe.py

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_auto_picks_the_gpu():
    assert resolve_device("auto") == GPU


def test_ksame_clusters_on_gpu_equal_the_reference():
    rng = np.random.default_rng(0)
    embeddings = (rng.normal(scale=3.0, size=(5, 24))[rng.integers(0, 5, 403)] + rng.normal(size=(403, 24)))
    embeddings = embeddings.astype(np.float32)
    expected = reference_clusters(embeddings, 5)
    np.testing.assert_array_equal(ksame_clusters(embeddings, 5, GPU, block_size=64, top_size=16, list_length=8),
                                  expected)
    np.testing.assert_array_equal(ksame_clusters(embeddings, 5, GPU), expected)


def test_probe_on_gpu_matches_cpu():
    train, val, test = (gaussian_classes(n, spread=2.0, seed=s) for n, s in [(600, 1), (200, 2), (1000, 3)])
    aucs = []
    for device in (CPU, GPU):
        train_t, val_t = tensors(*train), tensors(*val)
        model, history = train_probe((train_t[0].to(device), train_t[1].to(device)), val_t[0].to(device),
                                     val_t[1].to(device), 3, ProbeTraining(), device, seed=0)
        assert next(model.parameters()).device.type == device.type
        aucs.append(auroc(test[1], predict_proba(model, torch.from_numpy(test[0]).to(device))))
    assert abs(aucs[0] - aucs[1]) < 0.5


def test_online_samples_on_gpu_stay_in_range_and_change_every_epoch():
    x, y = gaussian_classes(300, dim=16, spread=1.0, seed=4)
    val_x, val_y = gaussian_classes(100, dim=16, spread=1.0, seed=5)
    bundle = train_cvae(x, y, val_x, val_y, 3, CVAERelease(), CVAEMaking(max_epochs=5, cvae_lr=1e-2), GPU,
                        seed=0)
    sampler = OnlineSampler(bundle, y, factor=4, variance=1.0, seed=0, device=GPU)
    (first, first_labels), (second, _) = sampler(0), sampler(1)
    assert first.device.type == "cuda" and first.shape == (1200, 16)
    assert not torch.equal(first, second)
    low, high = torch.from_numpy(x.min(0)).to(GPU), torch.from_numpy(x.max(0)).to(GPU)
    assert bool(((first >= low - 1e-4) & (first <= high + 1e-4)).all())
    shares = torch.bincount(first_labels, minlength=3).cpu().numpy() / 1200
    np.testing.assert_allclose(shares, np.bincount(y, minlength=3) / 300, atol=0.06)


@pytest.mark.parametrize("form", ["images", "samples"])
def test_gpu_features_match_cpu_features(form):
    images = np.random.default_rng(0).integers(0, 256, size=(6, 40, 48, 3), dtype=np.uint8)
    if form == "images":
        split = ImageSplit(labels=np.zeros(6), class_names=["x"], images=images)
    else:
        split = ImageSplit(labels=np.zeros(6), class_names=["x"], samples=[Image.fromarray(i) for i in images])
    torch.manual_seed(0)
    backbone = create_backbone("vit_small_patch14_dinov2", img_size=56, pretrained=False)
    cpu = extract_embeddings(backbone, split, CPU, batch_size=4, num_workers=0)
    gpu = extract_embeddings(backbone, split, GPU, batch_size=4, num_workers=2)
    cosine = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cosine.min() > 0.99, cosine


def test_probing_cli_runs_on_the_gpu(tmp_path):
    write_databases(tmp_path / "db")
    result = run_script("probing.py", *common_args(tmp_path), "--device", "auto")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "logs" / "toy" / "toy_identity-s42.json").read_text())
    assert record["auc"] > 70 and record["device"] == "cuda"
