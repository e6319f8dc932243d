"""Conditional VAE that learns each class's embedding distribution, and sampling from it.

The paper replaces the real training embeddings with vectors decoded from a CVAE
trained on them: offline (one synthetic set the size of the training set) or online
(10 x N fresh vectors every probe epoch). Architecture, normalisation and
hyperparameters follow the reference; the objective is the correct ELBO by default,
with the reference's defective one (sigma = exp(log_var) and its KL) kept as an option
for comparison. All data live on the device as tensors and are batched by slicing, so
training does no per-sample Python work and a generation is a handful of decoder calls.
Everything stays float32: these small networks are bound by launches, not arithmetic, so
bf16 would save little and would coarsen the generated embeddings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from src.anonymizers.cvae import CVAEMaking, CVAERelease
from src.cli import UserError, brief_reason
from src.defaults import ONLINE_FACTOR, SAMPLING_VARIANCE
from src.io import array_fingerprint, atomic_path, provenance, settings_key
from src.runtime import seed_everything

# Rows per decoder call. A chunk's activations (1024 x 768 floats, 3 MB) stay in cache while the
# sigmoid and the un-normalisation run over them: twice as fast on a CPU as one big call, and on a
# GPU the 50 calls of a 50,000-vector epoch cost about a millisecond of launches.
GENERATION_CHUNK = 1024


@dataclass
class MinMaxScaler:
    """Per-feature min-max map onto [0, 1], the range of the decoder's sigmoid.

    Constant features divide by 1 instead of 0 and map back with their true span of 0,
    so they come out of the decoder exactly at their single training value.
    """

    minimum: torch.Tensor
    span: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> MinMaxScaler:
        minimum = x.min(dim=0).values
        return cls(minimum=minimum, span=x.max(dim=0).values - minimum)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.minimum) / torch.where(self.span > 0, self.span, torch.ones_like(self.span))

    def inverse(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.addcmul(self.minimum, x, self.span, out=out)

    def to(self, device: torch.device) -> MinMaxScaler:
        return MinMaxScaler(minimum=self.minimum.to(device), span=self.span.to(device))


class CVAE(nn.Module):
    """Encoder q(z | x, y) and decoder p(x | z, y); labels enter one-hot on both sides."""

    def __init__(self, input_dim: int, num_classes: int, hidden_dim: int = 256, latent_dim: int = 50):
        super().__init__()
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Linear(input_dim + num_classes, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 2 * latent_dim))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim + num_classes, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, input_dim),
            nn.Sigmoid())

    def encode(self, x: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.encoder(torch.cat([x, onehot], dim=1)).chunk(2, dim=1)
        return mean, log_var

    def decode(self, z: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, onehot], dim=1))


def reparameterize(mean: torch.Tensor, log_var: torch.Tensor, noise: torch.Tensor,
                   reference_objective: bool = False) -> torch.Tensor:
    """z = mean + std * noise with std = exp(0.5 log_var); the reference uses exp(log_var)."""
    std = log_var.exp() if reference_objective else (0.5 * log_var).exp()
    return mean + std * noise


def kl_divergence(mean: torch.Tensor, log_var: torch.Tensor, reference_objective: bool = False) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) per latent dimension of each record (records x latent):
    summed over a row, one record's KL.

    The reference's term, sum(sigma^2 + mean^2 - log_var - 0.5) with sigma = exp(log_var),
    is not a KL divergence (it is 0.5 per dimension at the prior itself) but is kept to
    reproduce that code.
    """
    if reference_objective:
        return (2 * log_var).exp() + mean.pow(2) - log_var - 0.5
    return 0.5 * (log_var.exp() + mean.pow(2) - 1 - log_var)


def loss_terms(model: CVAE, x: torch.Tensor, onehot: torch.Tensor, noise: torch.Tensor,
               release: CVAERelease) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss's two parts before any sum: squared reconstruction errors (records x features) and KL
    terms (records x latent). Summed whole they are a batch's loss, by row each record's."""
    mean, log_var = model.encode(x, onehot)
    z = reparameterize(mean, log_var, noise, release.reference_objective)
    return (model.decode(z, onehot) - x).pow(2), kl_divergence(mean, log_var, release.reference_objective)


def batch_loss(model: CVAE, x: torch.Tensor, onehot: torch.Tensor, noise: torch.Tensor,
               release: CVAERelease, making: CVAEMaking) -> torch.Tensor:
    """Summed squared reconstruction error + beta * KL over one batch (the reference's loss)."""
    squared_error, kl = loss_terms(model, x, onehot, noise, release)
    return squared_error.sum() + making.cvae_beta * kl.sum()


def record_losses(model: CVAE, x: torch.Tensor, onehot: torch.Tensor, noise: torch.Tensor,
                  release: CVAERelease, making: CVAEMaking) -> torch.Tensor:
    """Each record's term of `batch_loss`: the statistic of a membership attack on the released model."""
    squared_error, kl = loss_terms(model, x, onehot, noise, release)
    return squared_error.sum(dim=1) + making.cvae_beta * kl.sum(dim=1)


@torch.no_grad()
def mean_loss(model: CVAE, x: torch.Tensor, onehot: torch.Tensor, noise: torch.Tensor,
              release: CVAERelease, making: CVAEMaking) -> float:
    """Loss per sample over a whole (scaled) set, evaluated in chunks of the batch size."""
    total = torch.zeros((), device=x.device)
    for start in range(0, len(x), making.cvae_batch_size):
        rows = slice(start, start + making.cvae_batch_size)
        total += batch_loss(model, x[rows], onehot[rows], noise[rows], release, making)
    return total.item() / len(x)


@torch.no_grad()
def set_losses(model: CVAE, x: torch.Tensor, onehot: torch.Tensor, noise: torch.Tensor,
               release: CVAERelease, making: CVAEMaking) -> torch.Tensor:
    """Each record's loss over a whole (scaled) set, evaluated in chunks of the batch size."""
    size = making.cvae_batch_size
    return torch.cat([record_losses(model, x[start:start + size], onehot[start:start + size],
                                    noise[start:start + size], release, making) for start in range(0, len(x), size)])


def fixed_noise(num_samples: int, latent_dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """Noise drawn once from its own generator: a loss evaluated with it depends only on the weights,
    so validation losses are comparable across epochs and the restored model reproduces its own."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(num_samples, latent_dim, device=device, generator=generator)


@dataclass
class CVAEBundle:
    """A trained CVAE with what generation needs (scaler, class count), the settings that made it,
    and how training went.

    `checkpoint` is the file it was saved to or loaded from (None when trained without one),
    so callers can record it without hashing the data again.
    """

    model: CVAE
    scaler: MinMaxScaler
    num_classes: int
    release: CVAERelease
    making: CVAEMaking
    history: dict[str, list[float]]
    best_epoch: int
    checkpoint: Path | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device) -> CVAEBundle:
        """Move model and scaler in place (generation runs where the model is)."""
        self.model.to(device)
        self.scaler = self.scaler.to(device)
        return self


def scaled_tensors(scaler: MinMaxScaler, x: np.ndarray, y: np.ndarray, num_classes: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings scaled to [0, 1] and one-hot labels, as tensors on the device."""
    x_scaled = scaler.transform(torch.as_tensor(x, dtype=torch.float32, device=device))
    onehot = F.one_hot(torch.as_tensor(y, dtype=torch.int64, device=device), num_classes).float()
    return x_scaled, onehot


def train_cvae(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
               num_classes: int, release: CVAERelease, making: CVAEMaking, device: torch.device,
               seed: int) -> CVAEBundle:
    """Train with early stopping on validation loss; return the best epoch's weights in eval mode.

    Losses in `history` are per sample. The validation loss uses `fixed_noise(len(val_x),
    latent_dim, seed)` every epoch (see `evaluate_loss`). On CPU the same seed gives the
    same model; on CUDA, kernels may differ in the last bits.
    """
    if val_x.shape[1] != train_x.shape[1]:
        raise UserError(f"validation embeddings have dimension {val_x.shape[1]} but training embeddings "
                        f"{train_x.shape[1]}; embed both splits with the same backbone")
    seed_everything(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    scaler = MinMaxScaler.fit(torch.as_tensor(train_x, dtype=torch.float32, device=device))
    x, onehot = scaled_tensors(scaler, train_x, train_y, num_classes, device)
    val, val_onehot = scaled_tensors(scaler, val_x, val_y, num_classes, device)
    val_noise = fixed_noise(len(val), making.cvae_latent_dim, seed, device)

    model = CVAE(x.shape[1], num_classes, making.cvae_hidden_dim, making.cvae_latent_dim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=making.cvae_lr)
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
    best_loss, best_epoch, best_state = float("inf"), 0, None
    progress = tqdm(range(1, making.max_epochs + 1), desc="cvae", leave=False, disable=None)
    for epoch in progress:
        model.train()
        order = torch.randperm(len(x), device=device, generator=generator)
        noise = torch.randn(len(x), making.cvae_latent_dim, device=device, generator=generator)
        epoch_loss = torch.zeros((), device=device)
        batch_size = making.cvae_batch_size
        for start in range(0, len(x), batch_size):
            rows = order[start:start + batch_size]
            loss = batch_loss(model, x[rows], onehot[rows], noise[start:start + batch_size], release, making)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.detach()
        model.eval()
        val_loss = mean_loss(model, val, val_onehot, val_noise, release, making)
        history["train_loss"].append(epoch_loss.item() / len(x))
        history["val_loss"].append(val_loss)
        if math.isfinite(val_loss) and val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        progress.set_postfix(val=f"{val_loss:.4g}", best_epoch=best_epoch)
        if epoch - best_epoch >= making.cvae_patience:
            break
    if best_state is None:
        raise UserError(f"CVAE validation loss was never finite (last {val_loss:g}) with --cvae_lr {making.cvae_lr:g}; "
                        "lower it or check the embeddings for extreme values")
    model.load_state_dict(best_state)
    model.eval()
    return CVAEBundle(model, scaler, num_classes, release, making, history, best_epoch)


def evaluation_inputs(bundle: CVAEBundle, x: np.ndarray, y: np.ndarray,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw embeddings scaled, their one-hot labels, and `fixed_noise` from `seed` for the latent draws."""
    x_scaled, onehot = scaled_tensors(bundle.scaler, x, y, bundle.num_classes, bundle.device)
    return x_scaled, onehot, fixed_noise(len(x_scaled), bundle.model.latent_dim, seed, bundle.device)


def evaluate_losses(bundle: CVAEBundle, x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Each raw embedding's loss under the bundle, with `fixed_noise` from `seed` (training's validation
    noise for its own seed): one noise draw shared by every bundle, so losses differ by weights alone."""
    return set_losses(bundle.model, *evaluation_inputs(bundle, x, y, seed), bundle.release,
                      bundle.making).cpu().numpy()


def evaluate_loss(bundle: CVAEBundle, x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """Per-sample loss of raw embeddings under the bundle, as training's validation loss measures it."""
    return mean_loss(bundle.model, *evaluation_inputs(bundle, x, y, seed), bundle.release, bundle.making)


def training_settings(release: CVAERelease, making: CVAEMaking) -> dict:
    """The settings that shape non-DP training, under the names checkpoint keys have always used
    (so checkpoints saved before these settings became flags are still found)."""
    return {"lr": making.cvae_lr, "batch_size": making.cvae_batch_size, "max_epochs": making.max_epochs,
            "patience": making.cvae_patience, "beta": making.cvae_beta, "hidden_dim": making.cvae_hidden_dim,
            "latent_dim": making.cvae_latent_dim, "reference_objective": release.reference_objective}


def checkpoint_path(ckpt_dir: Path, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                    val_y: np.ndarray, num_classes: int, release: CVAERelease, making: CVAEMaking, seed: int) -> Path:
    """`<ckpt_dir>/cvae-<key>.pt`, the key hashing settings, seed and the train and val data,
    so a checkpoint is only ever reused for exactly what produced it."""
    settings = {"config": training_settings(release, making), "seed": seed, "num_classes": num_classes,
                "data": array_fingerprint(train_x, train_y, val_x, val_y)}
    return Path(ckpt_dir) / f"cvae-{settings_key(settings)}.pt"


def load_or_train_cvae(ckpt_dir: Path, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                       val_y: np.ndarray, num_classes: int, release: CVAERelease, making: CVAEMaking,
                       device: torch.device, seed: int) -> CVAEBundle:
    """Reuse the checkpoint for these data and settings if there is one, else train and save it."""
    path = checkpoint_path(ckpt_dir, train_x, train_y, val_x, val_y, num_classes, release, making, seed)
    if path.is_file():
        try:
            saved = torch.load(path, map_location=device, weights_only=True)
            model = CVAE(train_x.shape[1], num_classes, making.cvae_hidden_dim, making.cvae_latent_dim).to(device)
            model.load_state_dict(saved["state_dict"])
            scaler = MinMaxScaler(minimum=saved["scaler_minimum"], span=saved["scaler_span"])
            history, best_epoch = saved["history"], saved["best_epoch"]
            best_loss = history["val_loss"][best_epoch - 1]
        except Exception as err:  # a damaged file can fail inside the unpickler with almost any type
            raise UserError(f"cannot read CVAE checkpoint {path} ({brief_reason(err)}); delete it to retrain") from err
        if best_epoch < 1 or not math.isfinite(best_loss):  # written before non-finite losses were refused
            raise UserError(f"CVAE checkpoint {path} holds a model whose validation loss was never finite; "
                            "delete it to retrain")
        return CVAEBundle(model.eval(), scaler, num_classes, release, making, history, best_epoch, checkpoint=path)

    bundle = train_cvae(train_x, train_y, val_x, val_y, num_classes, release, making, device, seed)
    bundle.checkpoint = path
    with atomic_path(path) as tmp:
        torch.save({
            "settings": {"config": training_settings(release, making), "seed": seed, "num_classes": num_classes,
                         "input_dim": int(train_x.shape[1]),
                         "train_fingerprint": array_fingerprint(train_x, train_y),
                         "val_fingerprint": array_fingerprint(val_x, val_y)},
            "state_dict": bundle.model.state_dict(),
            "scaler_minimum": bundle.scaler.minimum, "scaler_span": bundle.scaler.span,
            "history": bundle.history, "best_epoch": bundle.best_epoch, **provenance(),
        }, tmp)
    return bundle


@torch.no_grad()
def generate(bundle: CVAEBundle, labels: torch.Tensor, variance: float,
             generator: torch.Generator) -> torch.Tensor:
    """Decode z = variance * N(0, I) for each label and map back to embedding space.

    `variance` keeps the reference's name but multiplies the standard deviation of z
    (the variance of z is variance**2). The generator must live on the bundle's device.
    """
    labels = labels.to(bundle.device)
    z = variance * torch.randn(len(labels), bundle.model.latent_dim, device=bundle.device, generator=generator)
    onehot = F.one_hot(labels, bundle.num_classes).float()
    vectors = torch.empty(len(labels), len(bundle.scaler.minimum), device=bundle.device)
    for start in range(0, len(labels), GENERATION_CHUNK):
        rows = slice(start, start + GENERATION_CHUNK)
        bundle.scaler.inverse(bundle.model.decode(z[rows], onehot[rows]), out=vectors[rows])
    return vectors


def class_counts(train_labels: np.ndarray, num_classes: int, total: int | None = None) -> np.ndarray:
    """Samples per class: the training counts, or `total` split in the same proportions."""
    counts = np.bincount(train_labels, minlength=num_classes)
    return counts if total is None else proportional_counts(counts, total)


def proportional_counts(weights: np.ndarray, total: int) -> np.ndarray:
    """`total` split in proportion to non-negative `weights` (largest remainders, so the
    counts add up to exactly `total`)."""
    exact = weights * total / weights.sum()
    scaled = np.floor(exact).astype(np.int64)
    scaled[np.argsort(scaled - exact)[:total - scaled.sum()]] += 1
    return scaled


def generate_offline(bundle: CVAEBundle, train_labels: np.ndarray, variance: float, seed: int,
                     count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic training set with the real one's class counts (or `count` vectors in its proportions)."""
    labels = np.repeat(np.arange(bundle.num_classes), class_counts(train_labels, bundle.num_classes, count))
    generator = torch.Generator(device=bundle.device).manual_seed(seed)
    embeddings = generate(bundle, torch.from_numpy(labels), variance, generator)
    return embeddings.cpu().numpy().astype(np.float32), labels.astype(np.int64)


class OnlineSampler:
    """Fresh synthetic training data for every probe epoch (the paper's online CVAE).

    Each call draws factor x N labels from the training label distribution and decodes
    one vector for each. Epoch e uses a generator seeded from (seed, e), so an epoch's
    data do not depend on which epochs were drawn before. Moves the bundle to `device`.
    """

    def __init__(self, bundle: CVAEBundle, train_labels: np.ndarray, *, factor: int = ONLINE_FACTOR,
                 variance: float = SAMPLING_VARIANCE, seed: int, device: torch.device):
        self.bundle = bundle.to(device)
        self.device = torch.device(device)
        self.num_samples = factor * len(train_labels)
        self.variance = variance
        self.seed = seed
        frequencies = class_counts(train_labels, bundle.num_classes) / len(train_labels)
        self.class_probabilities = torch.as_tensor(frequencies, dtype=torch.float32, device=self.device)

    def __call__(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        generator = torch.Generator(device=self.device).manual_seed(epoch_seed)
        labels = torch.multinomial(self.class_probabilities, self.num_samples, replacement=True,
                                   generator=generator)
        return generate(self.bundle, labels, self.variance, generator), labels
