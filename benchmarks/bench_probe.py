"""Linear probe speed: our tensor-on-device loop vs the per-sample DataLoader loop the reference uses.

Both train the same nn.Linear (same init, Adam, ReduceLROnPlateau, early stopping on
validation loss, best weights restored) on Gaussian-mixture embeddings shaped like
DINOv2 features (D = 768), and both visit the batches in the same order, so they take
the same steps: only the data pipeline and the gradient code differ. We report the
fastest wall time of a few interleaved runs, the speed ratio, the epochs run and the
test AUROC of both.

    python benchmarks/bench_probe.py [--sizes 546 5000 20000] [--device auto] [--repeats 3]
"""
from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.metrics import auroc  # noqa: E402
from src.probe import (EARLY_STOPPING_PATIENCE, LR_PATIENCE, MIN_LR, WEIGHT_DECAY, predict_proba,  # noqa: E402
                       seeded_linear, train_probe, zscore, zscore_stats)
from src.settings import ProbeTraining  # noqa: E402
from src.runtime import resolve_device  # noqa: E402
from timing import race  # noqa: E402  (benchmarks/timing.py, next to this script)


def gaussian_mixture(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping class blobs in a random low-rank subspace plus isotropic noise, like backbone features."""
    basis = np.random.default_rng(0).normal(size=(32, dim)) / np.sqrt(32)
    centres = np.random.default_rng(1).normal(size=(classes, 32)) * 0.35
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = (centres[labels] + rng.normal(size=(n, 32))) @ basis + 0.5 * rng.normal(size=(n, dim))
    return x.astype(np.float32), labels


class EpochPermutations(Sampler[int]):
    """One torch.randperm per epoch from a seeded generator: the order src.probe draws its batches in.
    (torch's RandomSampler draws a second permutation each epoch, so its order drifts from ours.)"""

    def __init__(self, size: int, seed: int):
        self.size, self.generator = size, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.size, generator=self.generator).tolist())


def dataloader_probe(train: TensorDataset, val: TensorDataset, num_classes: int, config: ProbeTraining,
                     device: torch.device, seed: int) -> tuple[torch.nn.Linear, int]:
    """The reference's way: per-sample DataLoader batches moved to the device every step; (probe, epochs run)."""
    model = seeded_linear(train.tensors[0].shape[1], num_classes, seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=LR_PATIENCE, min_lr=MIN_LR)
    train_loader = DataLoader(train, batch_size=config.batch_size, sampler=EpochPermutations(len(train), seed))
    val_loader = DataLoader(val, batch_size=config.batch_size)
    best_loss, best_state, best_epoch = float("inf"), None, -1
    for epoch in range(config.epochs):
        model.train()
        for x, y in train_loader:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = sum(F.cross_entropy(model(x.to(device)), y.to(device), reduction="sum").item()
                           for x, y in val_loader) / len(val)
        scheduler.step(val_loss)
        if val_loss < best_loss:
            best_loss, best_state, best_epoch = val_loss, copy.deepcopy(model.state_dict()), epoch
        if epoch - best_epoch >= EARLY_STOPPING_PATIENCE:
            break
    model.load_state_dict(best_state)
    return model.eval(), epoch + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[546, 5000, 20000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for the DataLoader loop (ours always trains on one CPU thread)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds, ours and the baseline interleaved; the fastest is reported")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, config = resolve_device(args.device), ProbeTraining()
    print(f"device {device}, torch threads {torch.get_num_threads()}, D = {args.dim}, {args.classes} classes, "
          f"fastest of {args.repeats} runs")
    warm_x, warm_y = torch.randn(256, args.dim), torch.randint(0, args.classes, (256,))
    train_probe((warm_x.to(device), warm_y.to(device)), warm_x.to(device), warm_y.to(device), args.classes,
                ProbeTraining(epochs=2), device, args.seed)  # first-call library set-up stays out of the timings
    print(f"{'N':>6} | {'ours: s':>8} {'epochs':>6} | {'DataLoader: s':>13} {'epochs':>6} | {'speed-up':>8} | "
          f"{'AUC ours':>8} {'loader':>7}")
    for n in args.sizes:
        (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
            gaussian_mixture(size, args.dim, args.classes, seed) for size, seed in
            [(n, 10), (max(n // 5, 100), 11), (max(n // 2, 500), 12)])
        mean, std = zscore_stats(train_x)
        train_t, val_t, test_t = (torch.from_numpy(zscore(x, mean, std)) for x in (train_x, val_x, test_x))
        train_y_t, val_y_t = torch.from_numpy(train_y), torch.from_numpy(val_y)
        timings = race({
            "ours": lambda: train_probe((train_t.to(device), train_y_t.to(device)), val_t.to(device),
                                        val_y_t.to(device), args.classes, config, device, args.seed),
            "loader": lambda: dataloader_probe(TensorDataset(train_t, train_y_t), TensorDataset(val_t, val_y_t),
                                               args.classes, config, device, args.seed),
        }, device, args.repeats)
        (ours_s, (ours, history)), (loader_s, (baseline, loader_epochs)) = timings["ours"], timings["loader"]
        ours_auc = auroc(test_y, predict_proba(ours, test_t))
        loader_auc = auroc(test_y, predict_proba(baseline, test_t))
        print(f"{n:>6} | {ours_s:>8.3f} {len(history['val_loss']):>6} | {loader_s:>13.3f} {loader_epochs:>6} | "
              f"{loader_s / ours_s:>7.1f}x | {ours_auc:>8.2f} {loader_auc:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
