"""Noisy sufficient statistics of labelled embeddings: the Gaussian mechanisms that the DP
class-conditional Gaussian release (src/anonymizers/dp_gaussian.py) and the DP least-squares
probe (src/anonymizers/dp_probe.py) are built from.

Both read the private train split in three rounds, under add/remove-one adjacency (`src.ledger`):
0. per-class counts (sensitivity 1) and the sum of all rows clipped to L2 norm `center_clip`
   (sensitivity `center_clip`): their ratio is a centre c. Embeddings share a large common part
   (DINOv2-S rows have norms near 40, their class means differ by far less), which clipping
   around c instead of 0 keeps out of the next round's noise;
1. per-class sums of (row - c) clipped to `mean_clip` (one record changes one class's sum by at
   most `mean_clip`): class means c + sum / count;
2. around the released class means (public after round 1), each record's residual clipped
   to `residual_clip`, and the pooled sum of their outer products (Frobenius sensitivity
   `residual_clip`^2; the whole matrix is noised, then symmetrised: `symmetric_noise`).
Each round depends on the earlier ones only through their output, so the rounds compose adaptively.
The budget is split by fixed shares of one Gaussian mechanism's mu^2 (`noise_multipliers`), and
the ledger composes exactly what ran: four Gaussian mechanisms are exactly one (`src.ledger`, GDP).
Nothing released depends on N but through the noisy counts (only the refusal of a delta >= 1/N
reads N, and it releases nothing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from src.anonymizers.dp_gaussian import GaussMaking
from src.cli import UserError
from src.ledger import ADJACENCY, gaussian_noise_multiplier, spent_epsilon

STATISTICS = ("counts", "centre", "sums", "scatter")
COVARIANCE_FLOOR = 0.25  # share of the noise's spectral norm; chosen on the digits (python -m src.dp_tune)


@dataclass(frozen=True)
class NoisyStatistics:
    """What a release or probe may use: noisy counts C, class means C x D and pooled residual scatter D x D.

    `dp` is the accounting for meta["dp"] (None for the exact statistics of the non-private versions);
    `scatter_noise_std` the std of the scatter's noise (0 when exact).
    """

    counts: np.ndarray
    means: np.ndarray
    scatter: np.ndarray
    scatter_noise_std: float = 0.0
    dp: dict | None = None

    def class_sizes(self) -> np.ndarray:
        """Noisy counts rounded to records, at least 0: the release's per-class sizes."""
        return np.maximum(np.rint(self.counts), 0).astype(np.int64)

    def covariance(self, floor_share: float = COVARIANCE_FLOOR) -> np.ndarray:
        """Pooled within-class covariance: the noisy scatter over the noisy total count, made positive
        definite by raising every eigenvalue to `floor_share` of the noise's spectral norm sqrt(2 D) std
        (public: it depends only on the noise multiplier, the clip and D), which the noise would
        otherwise push below 0."""
        total = max(float(self.counts.sum()), 1.0)
        values, vectors = np.linalg.eigh(self.scatter / total)
        floor = floor_share * self.scatter_noise_std * math.sqrt(2 * len(values)) / total
        return (vectors * np.maximum(values, floor)) @ vectors.T


def statistics_of(x: np.ndarray, y: np.ndarray, num_classes: int, epsilon: float | None, making: GaussMaking,
                  seed: int) -> NoisyStatistics:
    """The exact statistics (epsilon None) or the noisy ones at (epsilon, making.dpg_delta), with making's
    public clipping radii and shares; non-finite or too few records are user errors."""
    if not np.isfinite(x).all():
        raise UserError("the train embeddings hold non-finite values (NaN or inf); recreate them with create_db.py")
    if epsilon is None:
        return exact_statistics(x, y, num_classes)
    if making.dpg_delta >= 1 / len(x):
        raise UserError(f"DP delta {making.dpg_delta:g} must be below 1/N for N = {len(x)} training records, "
                        "or a single record could be released; give a smaller delta")
    rng = noise_rng(seed if making.dpg_seeded_noise_not_private else None)
    return noisy_statistics(x, y, num_classes, epsilon, making, rng)


def clip_rows(x: np.ndarray, radius: float) -> np.ndarray:
    """Each row scaled down to L2 norm at most `radius` (rows inside are unchanged)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, radius / np.maximum(norms, 1e-300))


def noise_multipliers(epsilon: float, delta: float, shares: dict[str, float]) -> dict[str, float]:
    """One noise multiplier per statistic: Gaussian mechanisms with z_i = z / sqrt(share_i) compose to
    sum_i share_i / z^2 = 1 / z^2, exactly one mechanism with multiplier z, calibrated to (epsilon, delta)."""
    z = gaussian_noise_multiplier(epsilon, delta)
    return {name: z / math.sqrt(share) for name, share in shares.items()}


def noise_rng(seed: int | None) -> np.random.Generator:
    """Privacy noise: from OS entropy (never stored) unless a seed is given, which voids the guarantee."""
    return np.random.default_rng(seed)


def symmetric_noise(dim: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """(G + G^T) / 2 for G of iid N(0, std^2): the Gaussian mechanism on the whole D x D matrix (its
    Frobenius sensitivity), then symmetrised, which is post-processing. The diagonal keeps std, the
    off-diagonal gets std / sqrt(2): half the variance of noising the upper triangle alone and
    mirroring it, at the same sensitivity and budget."""
    full = rng.normal(0.0, std, (dim, dim))
    return (full + full.T) / 2


def class_sums(x: np.ndarray, onehot: np.ndarray, mean_clip: float) -> np.ndarray:
    """Per-class sums of rows clipped to `mean_clip`: L2 sensitivity `mean_clip` (one row, one class)."""
    return onehot.T @ clip_rows(x, mean_clip)


def residual_scatter(x: np.ndarray, y: np.ndarray, means: np.ndarray, residual_clip: float) -> np.ndarray:
    """Pooled sum of r r^T over records, r = row minus its class's (released) mean, clipped to
    `residual_clip`: Frobenius sensitivity `residual_clip`^2 for fixed means."""
    residuals = clip_rows(x - means[y], residual_clip)
    return residuals.T @ residuals


def exact_statistics(x: np.ndarray, y: np.ndarray, num_classes: int) -> NoisyStatistics:
    """The same statistics without clipping or noise: the non-private versions of both methods."""
    x = np.asarray(x, dtype=np.float64)
    onehot = np.eye(num_classes)[y]
    counts = onehot.sum(axis=0)
    means = (onehot.T @ x) / np.maximum(counts, 1.0)[:, None]
    residuals = x - means[y]
    return NoisyStatistics(counts, means, residuals.T @ residuals)


def noisy_statistics(x: np.ndarray, y: np.ndarray, num_classes: int, epsilon: float, making: GaussMaking,
                     rng: np.random.Generator) -> NoisyStatistics:
    """The rounds of the module docstring at (epsilon, making.dpg_delta), with their accounting
    (GaussMaking has checked the shares: four, positive, summing to 1)."""
    shares = dict(zip(STATISTICS, making.dpg_shares))
    delta, center_clip = making.dpg_delta, making.dpg_center_clip
    mean_clip, residual_clip = making.dpg_mean_clip, making.dpg_residual_clip
    x = np.asarray(x, dtype=np.float64)
    z = noise_multipliers(epsilon, delta, shares)
    onehot = np.eye(num_classes)[y]
    counts = onehot.sum(axis=0) + rng.normal(0.0, z["counts"], num_classes)
    total = clip_rows(x, center_clip).sum(axis=0) + rng.normal(0.0, z["centre"] * center_clip, x.shape[1])
    centre = total / max(float(counts.sum()), 1.0)
    sums = (class_sums(x - centre, onehot, mean_clip)
            + rng.normal(0.0, z["sums"] * mean_clip, (num_classes, x.shape[1])))
    means = centre + sums / np.maximum(counts, 1.0)[:, None]
    scatter_std = z["scatter"] * residual_clip ** 2
    scatter = residual_scatter(x, y, means, residual_clip) + symmetric_noise(x.shape[1], scatter_std, rng)
    mechanisms = [{"mechanism": "gaussian", "noise_multiplier": z[name], "count": 1} for name in STATISTICS]
    dp = {"relation": ADJACENCY, "mechanisms": mechanisms, "target_epsilon": epsilon,
          "spent_epsilon": spent_epsilon(mechanisms, delta), "delta": delta,
          "statistics": {name: {"noise_multiplier": z[name], "share": shares[name]} for name in STATISTICS},
          "center_clip": center_clip, "mean_clip": mean_clip, "residual_clip": residual_clip,
          "seeded_noise_not_private": making.dpg_seeded_noise_not_private}
    return NoisyStatistics(counts, means, scatter, scatter_std, dp)
