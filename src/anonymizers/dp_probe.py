"""DP least-squares probe (as DP-FC, Mehta et al. 2023) on the real train embeddings: not a release,
the ceiling a DP release should approach at the same (epsilon, delta).

Least squares of one-hot labels on the embeddings needs X^T X and X^T Y only. Here they come from
the noisy sufficient statistics of src.dp_stats (rows clipped, Gaussian noise, the same ledger):
with centred X, X^T Y / N has columns pi_c (mu_c - mu), and X^T X / N is the pooled within-class
covariance plus the between-class scatter sum_c pi_c (mu_c - mu)(mu_c - mu)^T. The weights solve
(X^T X / N + ridge I) W = X^T Y / N; the bias is pi - W^T mu. Without --dpp_epsilon the same closed
form runs on the exact statistics (the non-private version). The probe reads raw embeddings: the
usual z-scoring would use the private train statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from src.anonymizers.base import Anonymizer
from src.anonymizers.dp_gaussian import GaussMaking
from src.options import Settings, option

# Public settings, the DP Gaussian's defaults and a ridge, all chosen on the digits (docs/dp-baselines.md);
# the noise is always from OS entropy (tests call the library with their own generator).
RIDGE = 0.01  # on the digits at epsilon 10 (python -m src.dp_tune): 0 and 0.01 alike, 0.1 and 1 worse


@dataclass(frozen=True)
class DPProbeRelease(Settings):
    dpp_epsilon: float | None = option(None, "DP budget of the least-squares probe, at delta 1e-5 (none: exact "
                                       "least squares)", kind=float, above=0)


class DPProbe(Anonymizer):
    name = "lsq"
    Release = DPProbeRelease
    makes_releases = False
    fits_probe = True
    name_format = "lsq[-dp{dpp_epsilon}]"

    def release_name(self, release: Any, seed: int) -> str:
        return "train.npz"  # reads the real training database

    def fit_probe(self, train_x: np.ndarray, train_y: np.ndarray, num_classes: int, release: DPProbeRelease,
                  seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """Weights D x C and bias C of the least-squares probe, and its accounting (empty when exact)."""
        from src.dp_stats import statistics_of

        stats = statistics_of(train_x, train_y, num_classes, release.dpp_epsilon, GaussMaking(), seed)
        weight, bias = least_squares(stats.means, stats.covariance(), stats.class_sizes(), RIDGE)
        return weight, bias, {"dp": stats.dp} if stats.dp else {}


def least_squares(means: np.ndarray, within: np.ndarray, sizes: np.ndarray,
                  ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares of one-hot labels from class means, pooled within-class covariance and class sizes."""
    prior = sizes / max(int(sizes.sum()), 1)
    mean = prior @ means
    centred = means - mean
    total = within + (centred.T * prior) @ centred
    weight = np.linalg.solve(total + ridge * np.eye(len(total)), centred.T * prior)
    return weight, prior - mean @ weight
