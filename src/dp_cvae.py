"""Differentially private CVAE: DP-SGD training whose (epsilon, delta) covers every use of the private data.

The CVAE, its loss and its generation are those of src/cvae.py; this module changes only
what touches the private training set (add/remove-one adjacency, the setting of opacus's accountant):

- Gradients: DP-SGD. Each step draws a Poisson batch (every record independently with rate
  q = 1 / ceil(N / batch_size), the sampling the accountant assumes), clips each record's gradient
  to L2 norm C, sums, adds N(0, (sigma C)^2) noise and divides by the expected batch size q N.
  sigma is calibrated with opacus's RDP accountant for exactly the steps that are run
  (epochs x ceil(N / batch_size)), and the accountant's epsilon after training is recorded.
- Scaling: the decoder's sigmoid range [0, 1] is mapped onto fixed public bounds (`DPSettings.bounds`,
  the same for every feature), and embeddings are clipped to them: nothing is fitted to the data.
- Class counts for generation: a Laplace histogram with a stated share of epsilon (pure DP, added to
  the DP-SGD epsilon by basic composition), or uniform when the share is 0.
- No early stopping or model selection: a fixed number of epochs. A validation loss may be computed
  after training (`evaluate_loss`) for reporting; it is not part of the release.

The dataset size N is treated as public, as in opacus (it sets q) and in the non-DP synthetic set size.
Noise comes from torch's and numpy's ordinary generators, not a cryptographic source (opacus's default too).
By default they are seeded from the run's seed, so experiments are reproducible; but whoever knows
that seed can regenerate the noise and the guarantee is void against them. A real release sets
`secret_noise`: the noise is then seeded from OS entropy that is never stored.

Per-sample clipping uses the closed form for Linear layers applied to one row per record
("ghost clipping"): a layer with input a_i and output gradient b_i has per-record weight gradient
b_i a_i^T, whose squared norm is |a_i|^2 |b_i|^2, and the clipped sum over the batch is
(c * B)^T A for clip factors c. Autograd supplies only B, the gradient of the summed loss with respect
to each layer's outputs, so per-record gradients are never materialised.
"""
from __future__ import annotations

import math
import secrets
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np
import torch
from torch import nn

from src.cli import UserError
from src.defaults import DEFAULT_COUNT_SHARE, DEFAULT_DP_BOUNDS, DEFAULT_DP_EPOCHS, DEFAULT_MAX_GRAD_NORM
from src.cvae import CVAE, CVAEBundle, CVAEConfig, MinMaxScaler, batch_loss, proportional_counts, scaled_tensors
from src.runtime import one_cpu_thread, seed_everything

ACCOUNTANT = "rdp"
INSTALL_HINT = "differentially private training needs opacus: pip install opacus"


@dataclass(frozen=True)
class DPSettings:
    """Budget and mechanism settings of a DP-CVAE run, checked on construction (flag names in messages).

    delta None means `default_delta(N)`. count_share is the share of epsilon spent on the class
    histogram (0 means uniform class counts at no cost); the rest goes to DP-SGD. secret_noise
    draws the privacy noise from unrecorded OS entropy instead of the run's seed.
    """

    epsilon: float
    delta: float | None = None
    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM
    epochs: int = DEFAULT_DP_EPOCHS
    bounds: tuple[float, float] = DEFAULT_DP_BOUNDS
    count_share: float = DEFAULT_COUNT_SHARE
    secret_noise: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise UserError(f"--dp_epsilon {self.epsilon}: the privacy budget must be a positive number")
        if self.delta is not None and not 0 < self.delta < 1:
            raise UserError(f"--dp_delta {self.delta}: delta must lie strictly between 0 and 1 "
                            "(leave it out for 1/N rounded down to a power of ten)")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise UserError(f"--max_grad_norm {self.max_grad_norm}: the clipping norm must be positive")
        if self.epochs < 1:
            raise UserError(f"--dp_epochs {self.epochs}: train at least one epoch")
        low, high = self.bounds
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise UserError(f"--dp_bounds {low} {high}: give two finite numbers, LOW below HIGH")
        if not 0 <= self.count_share < 1:
            raise UserError(f"--dp_count_share {self.count_share}: the class-count share of epsilon must lie "
                            "in [0, 1) (0 for uniform class counts)")

    def delta_for(self, num_samples: int) -> float:
        """The delta of a run on `num_samples` records: the given one, which must be below 1/N, or the default."""
        if self.delta is None:
            return default_delta(num_samples)
        if self.delta >= 1 / num_samples:
            raise UserError(f"--dp_delta {self.delta}: delta must be below 1/N = {1 / num_samples:.3g} for "
                            f"N = {num_samples} training records, or a single record could be released")
        return self.delta


def default_delta(num_samples: int) -> float:
    """1/N rounded down to a power of ten, and strictly below 1/N (N = 1078 gives 1e-4, N = 1000 gives 1e-4)."""
    return 10.0 ** -len(str(num_samples))


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


def dp_class_counts(train_labels: np.ndarray, num_classes: int, epsilon: float, total: int,
                    rng: np.random.Generator) -> np.ndarray:
    """`total` samples split over the classes by an epsilon-DP histogram (uniformly when epsilon is 0).

    Adding or removing one record changes one count by 1 (L1 sensitivity 1), so Laplace noise of
    scale 1/epsilon on each count is epsilon-DP; clipping at 0 and the proportional split are
    post-processing. Call it once per release: every call spends epsilon again.
    """
    if epsilon == 0:
        return proportional_counts(np.ones(num_classes), total)
    noisy = np.bincount(train_labels, minlength=num_classes) + rng.laplace(scale=1 / epsilon, size=num_classes)
    weights = np.clip(noisy, 0, None)
    return proportional_counts(weights if weights.sum() > 0 else np.ones(num_classes), total)


def released_labels(class_counts: np.ndarray) -> np.ndarray:
    """Labels with the released class counts: pass them where the non-DP path passes the training
    labels (generate_offline, OnlineSampler), so that generation never reads the private labels."""
    return np.repeat(np.arange(len(class_counts)), class_counts)


@lru_cache(maxsize=64)
def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to opacus's bisection tolerance) whose RDP epsilon after exactly
    `steps` Poisson-sampled steps is at most `epsilon`. Cached: the bisection takes seconds, and
    runs that differ only in their seed share it."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():  # opacus warns when the best RDP order is the largest it tries:
            warnings.simplefilter("ignore", UserWarning)  # the bound is looser, never wrong, so say nothing
            return get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                        steps=steps, accountant=ACCOUNTANT)
    except ValueError as err:  # opacus gives up above a noise multiplier of 1e6
        raise UserError(f"--dp_epsilon {epsilon:g} (for DP-SGD) is too small to run even one step at any "
                        f"noise with delta = {delta:g}; raise --dp_epsilon or --dp_delta") from err


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
                         config: CVAEConfig, max_grad_norm: float) -> dict[nn.Parameter, torch.Tensor]:
    """Sum over the batch of each record's loss gradient clipped to L2 norm `max_grad_norm`, per parameter.

    Each record's loss depends only on its own rows of every layer's input and output, so the
    gradient of the summed loss with respect to layer outputs holds every record's b_i at once.
    """
    with recorded_linear_calls(model) as calls:
        loss = batch_loss(model, x, onehot, noise, config)
    layers = [layer for layer, _, _ in calls]
    covered = {parameter for layer in layers for parameter in layer.parameters()}
    if len(set(layers)) != len(layers) or covered != set(model.parameters()):
        raise RuntimeError("ghost clipping needs every parameter in a Linear layer called once per forward")
    output_grads = torch.autograd.grad(loss, [output for _, _, output in calls])
    squared_norms = torch.zeros(len(x), device=x.device)
    for (_, inputs, _), grad in zip(calls, output_grads):
        squared_norms += inputs.pow(2).sum(1) * grad.pow(2).sum(1) + grad.pow(2).sum(1)  # weight + bias
    factors = (max_grad_norm / (squared_norms.sqrt() + 1e-6)).clamp(max=1.0)
    sums: dict[nn.Parameter, torch.Tensor] = {}
    for (layer, inputs, _), grad in zip(calls, output_grads):
        weighted = grad * factors[:, None]
        sums[layer.weight] = weighted.T @ inputs
        sums[layer.bias] = weighted.sum(0)
    return sums


def train_cvae_dp(train_x: np.ndarray, train_y: np.ndarray, num_classes: int, config: CVAEConfig,
                  dp: DPSettings, device: torch.device, seed: int) -> tuple[CVAEBundle, dict]:
    """Train a CVAE with DP-SGD for `dp.epochs` epochs; return it with its privacy accounting.

    The accounting dict (plain types, for .npz meta and result files) holds the target and spent
    epsilon, delta, the DP-SGD noise multiplier, sample rate, steps, clipping norm, accountant, the
    public bounds, where the noise came from and the released class counts (use them through
    `released_labels`). The bundle's history is empty: per-epoch training losses are statistics of
    the private data outside the mechanism. On CPU the same seed gives the same model, unless
    `dp.secret_noise`.
    """
    require_opacus()
    from opacus.accountants import create_accountant

    if config.reference_objective:
        raise UserError("--reference_objective cannot be combined with --dp_epsilon: DP training uses the "
                        "correct ELBO only; drop one of the two flags")
    num_samples = len(train_x)
    delta = dp.delta_for(num_samples)
    count_epsilon = dp.count_share * dp.epsilon
    batches_per_epoch = math.ceil(num_samples / config.batch_size)
    sample_rate, steps = 1 / batches_per_epoch, dp.epochs * batches_per_epoch
    noise_multiplier = calibrate_noise(dp.epsilon - count_epsilon, delta, sample_rate, steps)

    seed_everything(seed)  # weight initialisation
    noise_seed = secrets.randbits(63) if dp.secret_noise else seed
    generator = torch.Generator(device=device).manual_seed(noise_seed)
    class_counts = dp_class_counts(train_y, num_classes, count_epsilon, num_samples,
                                   np.random.default_rng(noise_seed))
    scaler = public_scaler(dp.bounds, train_x.shape[1], device)
    x, onehot = scaled_tensors(scaler, train_x, train_y, num_classes, device)
    x.clamp_(0, 1)
    model = CVAE(x.shape[1], num_classes, config.hidden_dim, config.latent_dim).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    accountant = create_accountant(mechanism=ACCOUNTANT)
    noise_std, expected_batch = noise_multiplier * dp.max_grad_norm, sample_rate * num_samples
    with one_cpu_thread():  # a step is some 40 small ops: on a busy CPU a second thread costs more than it gives
        for _ in range(steps):
            rows = torch.rand(num_samples, device=device, generator=generator) < sample_rate
            latent_noise = torch.randn(int(rows.sum()), config.latent_dim, device=device, generator=generator)
            sums = clipped_gradient_sum(model, x[rows], onehot[rows], latent_noise, config, dp.max_grad_norm)
            for parameter in model.parameters():
                noise = torch.randn(parameter.shape, device=device, generator=generator)
                parameter.grad = (sums[parameter] + noise_std * noise) / expected_batch
            optimizer.step()
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    model.eval()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sgd_epsilon = max(0.0, accountant.get_epsilon(delta=delta))  # below 0 the bound says (0, delta)-DP
    accounting = {
        "target_epsilon": dp.epsilon, "spent_epsilon": sgd_epsilon + count_epsilon, "delta": delta,
        "sgd_epsilon": sgd_epsilon, "class_count_epsilon": count_epsilon, "noise_multiplier": noise_multiplier,
        "sample_rate": sample_rate, "steps": steps, "epochs": dp.epochs, "max_grad_norm": dp.max_grad_norm,
        "accountant": ACCOUNTANT, "bounds": [float(bound) for bound in dp.bounds],
        "noise_seed": "secret" if dp.secret_noise else "the run's seed",
        "class_counts": class_counts.tolist(),
    }
    bundle = CVAEBundle(model, scaler, num_classes, config, history={}, best_epoch=dp.epochs)
    return bundle, accounting
