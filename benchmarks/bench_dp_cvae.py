"""Benchmark: DP-CVAE training against the non-DP CVAE, and ghost clipping against opacus's per-sample gradients.

(a) Time per epoch: `train_cvae_dp` (Poisson batches, per-record clipping, noise) against
    `train_cvae` (plain shuffled batches) on the same data, model and batch size. The non-DP run
    gets a 64-row validation set so that its time is nearly all training; the DP run's noise
    calibration is cached by a warm-up call and not timed (it is paid once per setting).
(b) One step's clipped gradient sum over a batch of `batch_size` records: our closed form for
    Linear layers against opacus's GradSampleModule, which materialises every record's gradient
    (batch x 256 x 818 floats for the first layer). Both results are compared.

    python benchmarks/bench_dp_cvae.py --size 5000 --epochs 3 --device auto [--threads 1]

On a shared 2-core machine two torch threads make every small op wait for a descheduled thread
(tens of ms a step, varying run to run); `--threads 1` gives steadier numbers there.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_cvae import DIM, NUM_CLASSES, gaussian_mixture  # noqa: E402  (benchmarks/, next to this script)
from src.cvae import CVAE, batch_loss, train_cvae  # noqa: E402
from src.anonymizers.cvae import CVAEMaking, CVAERelease  # noqa: E402
from src.dp_cvae import clipped_gradient_sum, train_cvae_dp  # noqa: E402
from src.runtime import resolve_device  # noqa: E402
from timing import race  # noqa: E402


def opacus_clipped_sum(model: CVAE, x: torch.Tensor, onehot: torch.Tensor, noise: torch.Tensor,
                       release: CVAERelease, making: CVAEMaking) -> dict[torch.nn.Parameter, torch.Tensor]:
    """The usual opacus route: materialised per-sample gradients, their norms, clip, sum."""
    from opacus import GradSampleModule

    wrapped = GradSampleModule(model, loss_reduction="sum")
    try:
        batch_loss(model, x, onehot, noise, release, making).backward()
        parameters = list(model.parameters())
        norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in parameters]).norm(dim=0)
        factors = (making.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        return {p: torch.einsum("i,i...->...", factors, p.grad_sample) for p in parameters}
    finally:
        wrapped.remove_hooks()
        for parameter in model.parameters():
            parameter.grad_sample = None
        model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, interleaved; the fastest is reported")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for everything timed (train_cvae_dp uses one for its steps anyway)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Optimal order")  # opacus's note on its alpha grid
    warnings.filterwarnings("ignore", message="Full backward hook")  # opacus's hooks on input-free layers
    device = resolve_device(args.device)
    making = CVAEMaking(max_epochs=args.epochs, cvae_patience=args.epochs + 1, dp_epochs=args.epochs,
                        dp_seeded_noise_not_private=True)
    dp = (CVAERelease(dp_epsilon=1.0), making)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, N={args.size}, "
          f"D={DIM}, {NUM_CLASSES} classes, batch {making.cvae_batch_size}, {args.epochs} epochs, "
          f"fastest of {args.repeats} runs")

    train_x, train_y = gaussian_mixture(args.size, seed=0)
    val_x, val_y = gaussian_mixture(64, seed=1)
    train_cvae_dp(train_x, train_y, NUM_CLASSES, *dp, device, seed=0)  # warm-up, caches the calibration
    training = race({
        "dp": lambda: train_cvae_dp(train_x, train_y, NUM_CLASSES, *dp, device, 0),
        "non-dp": lambda: train_cvae(train_x, train_y, val_x, val_y, NUM_CLASSES, CVAERelease(), making, device, 0),
    }, device, args.repeats)
    dp_s, plain_s = training["dp"][0] / args.epochs, training["non-dp"][0] / args.epochs
    print(f"per epoch: DP-CVAE {dp_s:7.3f} s, CVAE {plain_s:7.3f} s, DP / non-DP {dp_s / plain_s:5.2f}x "
          f"(noise multiplier {training['dp'][1][1]['noise_multiplier']:.3f})")

    model = CVAE(DIM, NUM_CLASSES, making.cvae_hidden_dim, making.cvae_latent_dim).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    batch = making.cvae_batch_size
    x = torch.rand(batch, DIM, device=device, generator=generator)
    onehot = F.one_hot(torch.as_tensor(train_y[:batch], device=device), NUM_CLASSES).float()
    noise = torch.randn(batch, making.cvae_latent_dim, device=device, generator=generator)
    step = race({
        "ghost": lambda: clipped_gradient_sum(model, x, onehot, noise, *dp),
        "opacus": lambda: opacus_clipped_sum(model, x, onehot, noise, *dp),
    }, device, args.repeats)
    (ghost_s, ghost), (opacus_s, materialised) = step["ghost"], step["opacus"]
    difference = max((ghost[p] - materialised[p]).abs().max().item() for p in model.parameters())
    print(f"clipped sum of {batch} records: ghost {ghost_s * 1e3:7.1f} ms, opacus per-sample "
          f"{opacus_s * 1e3:7.1f} ms, speed-up {opacus_s / ghost_s:5.1f}x, largest difference {difference:.2e}")


if __name__ == "__main__":
    main()
