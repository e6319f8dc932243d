"""Benchmark: CVAE training and one online-CVAE epoch, ours against reference-style loops.

(a) Training for a fixed number of epochs: `train_cvae` (data as tensors on the device,
    batches by slicing) against the reference's pattern, a DataLoader over a
    TensorDataset that collates each batch sample by sample on the CPU and copies it to
    the device. Both use the same model and loss, so only the data pipeline differs.
(b) One online epoch of 10 x N vectors: `OnlineSampler` (a few batched decoder calls)
    against the reference's one decoder call per vector.

    python benchmarks/bench_cvae.py --sizes 546 5000 --epochs 20 --device auto
    python benchmarks/bench_cvae.py --device cuda --skip-reference-above 5000   # the per-vector loop is slow
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.anonymizers.cvae import CVAEMaking, CVAERelease  # noqa: E402
from src.cvae import CVAE, CVAEBundle, MinMaxScaler, OnlineSampler, batch_loss, train_cvae  # noqa: E402
from src.runtime import resolve_device, seed_everything  # noqa: E402
from timing import race  # noqa: E402  (benchmarks/timing.py, next to this script)

NUM_CLASSES = 10
DIM = 768


def gaussian_mixture(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten classes around fixed random centres (shared across calls), unit noise: embedding-like data."""
    centres = np.random.default_rng(1234).normal(size=(NUM_CLASSES, DIM))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, num_samples)
    return (centres[labels] + rng.normal(size=(num_samples, DIM))).astype(np.float32), labels


def train_reference_style(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                          making: CVAEMaking, device: torch.device, seed: int) -> CVAE:
    """The reference's loop: CPU DataLoader with per-sample collation, per-batch copies and .item()."""
    seed_everything(seed)
    scaler = MinMaxScaler.fit(torch.from_numpy(train_x))

    def dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(scaler.transform(torch.from_numpy(x)), F.one_hot(torch.from_numpy(y), NUM_CLASSES).float())

    train_loader = DataLoader(dataset(train_x, train_y), batch_size=making.cvae_batch_size, shuffle=True)
    val_loader = DataLoader(dataset(val_x, val_y), batch_size=making.cvae_batch_size)
    model = CVAE(DIM, NUM_CLASSES, making.cvae_hidden_dim, making.cvae_latent_dim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=making.cvae_lr)
    for _ in range(making.max_epochs):
        model.train()
        for x, onehot in train_loader:
            x, onehot = x.to(device), onehot.to(device)
            noise = torch.randn(len(x), making.cvae_latent_dim, device=device)
            loss = batch_loss(model, x, onehot, noise, CVAERelease(), making)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()
        model.eval()
        with torch.no_grad():
            for x, onehot in val_loader:
                x, onehot = x.to(device), onehot.to(device)
                noise = torch.randn(len(x), making.cvae_latent_dim, device=device)
                batch_loss(model, x, onehot, noise, CVAERelease(), making).item()
    return model


@torch.no_grad()
def generate_per_vector(bundle: CVAEBundle, labels: torch.Tensor, variance: float) -> torch.Tensor:
    """The reference's online generation: one latent draw and one decoder call per vector."""
    vectors = []
    for label in labels.tolist():
        z = variance * torch.randn(1, bundle.model.latent_dim, device=bundle.device)
        onehot = F.one_hot(torch.tensor([label], device=bundle.device), bundle.num_classes).float()
        vectors.append(bundle.scaler.inverse(bundle.model.decode(z, onehot)))
    return torch.cat(vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[546, 5000, 20000])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds, ours and the baseline interleaved; the fastest is reported")
    parser.add_argument("--skip-reference-above", type=int, default=None,
                        help="time the per-vector online baseline only up to this N (it is linear in N and slow)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    making = CVAEMaking(max_epochs=args.epochs, cvae_patience=args.epochs + 1)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, D={DIM}, "
          f"{NUM_CLASSES} classes, {args.epochs} epochs, val set N/4, fastest of {args.repeats} runs")

    warmup = gaussian_mixture(64, seed=0) + gaussian_mixture(16, seed=1)  # first-call library set-up, untimed
    train_cvae(*warmup, NUM_CLASSES, CVAERelease(), CVAEMaking(max_epochs=1), device, seed=0)
    train_reference_style(*warmup, CVAEMaking(max_epochs=1), device, seed=0)

    for size in args.sizes:
        train_x, train_y = gaussian_mixture(size, seed=0)
        val_x, val_y = gaussian_mixture(max(size // 4, 1), seed=1)
        training = race({
            "ours": lambda: train_cvae(train_x, train_y, val_x, val_y, NUM_CLASSES, CVAERelease(), making, device, 0),
            "reference": lambda: train_reference_style(train_x, train_y, val_x, val_y, making, device, 0),
        }, device, args.repeats)
        (ours_s, bundle), (reference_s, _) = training["ours"], training["reference"]
        print(f"N={size:>6} train {args.epochs} epochs: ours {ours_s:8.2f} s, reference-style DataLoader "
              f"{reference_s:8.2f} s, speed-up {reference_s / ours_s:6.1f}x")

        sampler = OnlineSampler(bundle, train_y, factor=10, variance=1.0, seed=0, device=device)
        vectors, labels = sampler(1)
        runs = {"ours": lambda: sampler(1)}
        if args.skip_reference_above is None or size <= args.skip_reference_above:
            runs["per-vector"] = lambda: generate_per_vector(bundle, labels, 1.0)
        generation = race(runs, device, args.repeats)
        batched_s = generation["ours"][0]
        baseline = (f"per-vector not timed (--skip-reference-above {args.skip_reference_above})"
                    if "per-vector" not in generation else
                    f"per-vector {generation['per-vector'][0] * 1e3:9.1f} ms, "
                    f"speed-up {generation['per-vector'][0] / batched_s:7.1f}x")
        print(f"N={size:>6} online epoch of {len(vectors)} vectors: ours {batched_s * 1e3:8.1f} ms, {baseline}")

if __name__ == "__main__":
    main()
