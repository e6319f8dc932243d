"""Differentially private CVAE: DP-SGD training whose (epsilon, delta) covers every use of the private data.

The guarantee is for one neighbouring relation, add or remove one record (`src.ledger.ADJACENCY`), and
nothing in a release depends on the private data except through the accounted mechanisms, N included:

- Class counts: a Laplace histogram (L1 sensitivity 1) with a share of epsilon (`--dp_count_share`, > 0).
  Its noisy counts set the release's size and class counts, and their total N~ stands in for N wherever
  the training needs a size: the Poisson rate q = 1 / ceil(N~ / batch_size) (an epoch visits each record
  about once), the steps epochs / q, the gradient divisor (the expected batch q N~) and the default delta.
- Gradients: DP-SGD. Each step draws a Poisson batch at rate q, clips each record's gradient to L2 norm C,
  sums, adds N(0, (sigma C)^2) noise and divides by q N~. sigma is calibrated by bisection on the ledger's
  own composition of the histogram and exactly the steps run, so the release spends its target.
- Scaling: the decoder's [0, 1] is mapped onto fixed public bounds (`--dp_bounds`), and embeddings are
  clipped to them; how many were clipped is not recorded. A non-finite record is refused before training.
- No early stopping or model selection on private data: a fixed number of epochs.
- Noise: from OS entropy that is never stored, unless `--dp_seeded_noise_not_private` seeds it from --seed
  (reproducible runs; anyone who knows the seed can regenerate the noise, so such a release is not private).

The recorded spent epsilon is `src.ledger.spent_epsilon` of the mechanisms run, the same function that
composes all releases of a split in the ledger.

Per-sample clipping uses the closed form for Linear layers applied to one row per record
("ghost clipping"): a layer with input a_i and output gradient b_i has per-record weight gradient
b_i a_i^T, whose squared norm is |a_i|^2 |b_i|^2, and the clipped sum over the batch is
(c * B)^T A for clip factors c. Autograd supplies only B, the gradient of the summed loss with respect
to each layer's outputs, so per-record gradients are never materialised.
"""
from __future__ import annotations

import math
import secrets
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import numpy as np
import torch
from torch import nn

from src.anonymizers.cvae import CVAEMaking, CVAERelease
from src.cli import UserError
from src.cvae import CVAE, CVAEBundle, MinMaxScaler, batch_loss, scaled_tensors
from src.ledger import ADJACENCY, noise_multiplier, spent_epsilon
from src.runtime import one_cpu_thread, seed_everything

INSTALL_HINT = "differentially private training needs opacus: pip install opacus"


# The default delta is 1 / (10 N+) rounded down to a power of ten, where N+ is the noisy total plus a bound
# its Laplace noise exceeds with probability at most DELTA_COUNT_MISS (a union bound over the classes):
# so delta <= 1 / (10 N) except with that probability, and computed from the accounted count alone.
DELTA_COUNT_MISS = 1e-6


def default_delta(noisy_total: float, num_classes: int, count_epsilon: float) -> float:
    """1 / (10 N+) rounded down to a power of ten, N+ = the noisy total plus the largest Laplace error (scale
    1/count_epsilon on each of the class counts) to expect except with probability DELTA_COUNT_MISS."""
    margin = num_classes / count_epsilon * math.log(num_classes / DELTA_COUNT_MISS)
    return 10.0 ** -math.ceil(math.log10(10 * max(noisy_total + margin, 1.0)))


def require_opacus() -> None:
    """DP runs need opacus's accountant; say how to install it instead of an ImportError traceback."""
    try:
        import opacus  # noqa: F401
    except ImportError as err:
        raise UserError(INSTALL_HINT) from err


def public_scaler(bounds: tuple[float, float], dim: int, device: torch.device) -> MinMaxScaler:
    """The decoder's [0, 1] mapped onto the public bounds, for every feature alike."""
    low, high = bounds
    return MinMaxScaler(minimum=torch.full((dim,), float(low), device=device),
                        span=torch.full((dim,), float(high - low), device=device))


def dp_class_counts(train_labels: np.ndarray, num_classes: int, epsilon: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The release's class counts from an epsilon-DP histogram, and the histogram's noisy total.

    Adding or removing one record changes one count by 1 (L1 sensitivity 1), so Laplace noise of
    scale 1/epsilon on each count is epsilon-DP; rounding and clipping at 0 are post-processing.
    Call it once per release: every call spends epsilon again.
    """
    noisy = np.bincount(train_labels, minlength=num_classes) + rng.laplace(scale=1 / epsilon, size=num_classes)
    return np.clip(np.round(noisy), 0, None).astype(np.int64), float(noisy.sum())


def released_labels(class_counts: np.ndarray) -> np.ndarray:
    """Labels with the released class counts: pass them where the non-DP path passes the training
    labels (generate_offline, OnlineSampler), so that generation never reads the private labels."""
    return np.repeat(np.arange(len(class_counts)), class_counts)


@lru_cache(maxsize=64)
def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int, count_epsilon: float) -> float:
    """The smallest noise multiplier (to 0.1 %) with which `steps` Poisson-sampled steps at `sample_rate` and the
    class histogram (pure `count_epsilon`) spend at most `epsilon` at `delta` in the ledger's composition.
    Cached: runs that differ only in their seed share it."""
    try:
        return noise_multiplier(epsilon, delta, lambda z: mechanisms(z, sample_rate, steps, count_epsilon)[1],
                                fixed=mechanisms(1.0, sample_rate, steps, count_epsilon)[:1])
    except ValueError as err:  # out of reach below a noise multiplier of 1e6
        raise UserError(f"--dp_epsilon {epsilon:g} is too small to run even one step at any noise with "
                        f"delta = {delta:g}; raise --dp_epsilon or --dp_delta") from err


def mechanisms(multiplier: float, sample_rate: float, steps: int, count_epsilon: float) -> list[dict]:
    """What reads the private split, in the ledger's format (src.ledger)."""
    return [{"mechanism": "laplace", "epsilon": count_epsilon},
            {"mechanism": "subsampled_gaussian", "noise_multiplier": multiplier, "sample_rate": sample_rate,
             "steps": steps}]


@contextmanager
def recorded_linear_calls(model: nn.Module) -> Iterator[list[tuple[nn.Linear, torch.Tensor, torch.Tensor]]]:
    """(layer, input, output) of every Linear call inside the block, in call order."""
    calls: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
    handles = [module.register_forward_hook(lambda layer, inputs, output: calls.append((layer, inputs[0], output)))
               for module in model.modules() if isinstance(module, nn.Linear)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def clipped_gradient_sum(model: CVAE, x: torch.Tensor, onehot: torch.Tensor, noise: torch.Tensor,
                         release: CVAERelease, making: CVAEMaking) -> dict[nn.Parameter, torch.Tensor]:
    """Sum over the batch of each record's loss gradient clipped to L2 norm `making.max_grad_norm`, per parameter.

    Each record's loss depends only on its own rows of every layer's input and output, so the
    gradient of the summed loss with respect to layer outputs holds every record's b_i at once.
    """
    with recorded_linear_calls(model) as calls:
        loss = batch_loss(model, x, onehot, noise, release, making)
    layers = [layer for layer, _, _ in calls]
    covered = {parameter for layer in layers for parameter in layer.parameters()}
    if len(set(layers)) != len(layers) or covered != set(model.parameters()):
        raise RuntimeError("ghost clipping needs every parameter in a Linear layer called once per forward")
    output_grads = torch.autograd.grad(loss, [output for _, _, output in calls])
    squared_norms = torch.zeros(len(x), device=x.device)
    for (_, inputs, _), grad in zip(calls, output_grads):
        squared_norms += inputs.pow(2).sum(1) * grad.pow(2).sum(1) + grad.pow(2).sum(1)  # weight + bias
    factors = (making.max_grad_norm / (squared_norms.sqrt() + 1e-6)).clamp(max=1.0)
    sums: dict[nn.Parameter, torch.Tensor] = {}
    for (layer, inputs, _), grad in zip(calls, output_grads):
        weighted = grad * factors[:, None]
        sums[layer.weight] = weighted.T @ inputs
        sums[layer.bias] = weighted.sum(0)
    return sums


def train_cvae_dp(train_x: np.ndarray, train_y: np.ndarray, num_classes: int, release: CVAERelease,
                  making: CVAEMaking, device: torch.device, seed: int) -> tuple[CVAEBundle, dict]:
    """Train a CVAE with DP-SGD to `release.dp_epsilon`; return it with its accounting.

    The accounting (plain types, for .npz meta and result files) holds the relation, the mechanisms run,
    the target and spent epsilon, delta, the released class counts (use them through `released_labels`),
    the public settings that shaped the run, and where the noise came from. Nothing else computed from the
    private split leaves this function: the bundle's history is empty (per-epoch losses are statistics of
    the private data outside the mechanism). With `making.dp_seeded_noise_not_private` the same seed gives
    the same model on the CPU.
    """
    require_opacus()
    if not np.isfinite(train_x).all():
        raise UserError("the training embeddings hold NaN or infinite values, which no clipping bounds; "
                        "recreate the database with create_db.py")
    epsilon, count_epsilon = release.dp_epsilon, making.dp_count_share * release.dp_epsilon
    secret = not making.dp_seeded_noise_not_private
    noise_seed = secrets.randbits(63) if secret else seed
    class_counts, noisy_total = dp_class_counts(train_y, num_classes, count_epsilon, np.random.default_rng(noise_seed))
    if making.dp_delta is not None and making.dp_delta >= 1 / len(train_x):  # the curator's check: never released
        raise UserError(f"--dp_delta {making.dp_delta:g}: delta must be below 1/N for N = {len(train_x)} training "
                        "records, or a single record could be released")
    delta = making.dp_delta if making.dp_delta is not None else default_delta(noisy_total, num_classes, count_epsilon)
    batches_per_epoch = max(1, math.ceil(noisy_total / making.cvae_batch_size))  # from N~: an epoch visits each once
    sample_rate, steps = 1 / batches_per_epoch, making.dp_epochs * batches_per_epoch
    multiplier = calibrate_noise(epsilon, delta, sample_rate, steps, count_epsilon)
    expected_batch = sample_rate * max(noisy_total, 1.0)

    seed_everything(seed)  # weight initialisation
    generator = torch.Generator(device=device).manual_seed(noise_seed)
    scaler = public_scaler(tuple(making.dp_bounds), train_x.shape[1], device)
    x, onehot = scaled_tensors(scaler, train_x, train_y, num_classes, device)
    x.clamp_(0, 1)
    model = CVAE(x.shape[1], num_classes, making.cvae_hidden_dim, making.cvae_latent_dim).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=making.cvae_lr)
    noise_std = multiplier * making.max_grad_norm
    with one_cpu_thread():  # a step is some 40 small ops: on a busy CPU a second thread costs more than it gives
        for _ in range(steps):
            rows = torch.rand(len(x), device=device, generator=generator) < sample_rate
            latent_noise = torch.randn(int(rows.sum()), making.cvae_latent_dim, device=device, generator=generator)
            sums = clipped_gradient_sum(model, x[rows], onehot[rows], latent_noise, release, making)
            for parameter in model.parameters():
                noise = torch.randn(parameter.shape, device=device, generator=generator)
                parameter.grad = (sums[parameter] + noise_std * noise) / expected_batch
            optimizer.step()
    model.eval()

    run = mechanisms(multiplier, sample_rate, steps, count_epsilon)
    accounting = {
        "relation": ADJACENCY, "mechanisms": run, "accountant": "rdp (src.ledger)",
        "target_epsilon": epsilon, "spent_epsilon": spent_epsilon(run, delta), "delta": delta,
        "delta_from": "--dp_delta" if making.dp_delta is not None else "the noisy count (1 / (10 N+))",
        "class_count_epsilon": count_epsilon, "noise_multiplier": multiplier, "sample_rate": sample_rate,
        "steps": steps, "epochs": making.dp_epochs, "max_grad_norm": making.max_grad_norm,
        "batch_size": making.cvae_batch_size, "bounds": [float(bound) for bound in making.dp_bounds],
        "noise": "secret (OS entropy, not stored)" if secret else "seeded from --seed: NOT PRIVATE",
        "class_counts": class_counts.tolist(),
    }
    bundle = CVAEBundle(model, scaler, num_classes, release, making, history={}, best_epoch=making.dp_epochs)
    return bundle, accounting
