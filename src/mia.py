"""Membership inference against a released embedding set, as the field measures it.

Threat model (Stadler et al. 2022; TAPAS): the attacker knows the anonymizer and its settings,
holds an auxiliary pool of real records disjoint from the targets, sees the release, and trains
shadow releases with the same anonymizer. The experiment (`draw_split`) draws targets from the
real records; a random half of them, with a private filler the attacker never sees, make the
private training set of the attacked release. Shadows are shared across targets as in LiRA
(Carlini et al. 2022): shadow s trains on the auxiliary pool plus the targets of column s of a
balanced membership matrix, so every target is IN for exactly half of the shadows and S shadows
cost S trainings.

Attacks (higher score = more member-like):
- distance: minus the distance to the nearest released row (the existing `mia_auc` attack);
- knn_density: log 5-NN distance to the auxiliary pool minus log 5-NN distance to the release
  (the existing `mia_auc_density`);
- domias: DOMIAS (van Breugel et al. 2023) with Gaussian kernel density estimates, log p_release -
  log p_aux, isotropic kernels with Scott's bandwidth in the pool's z-space;
- lira_distance, lira_domias: the likelihood ratio of a target's statistic (log nearest distance,
  DOMIAS log ratio) under Gaussians fitted to its IN and OUT shadows (per-target means, variances
  pooled over targets, LiRA's "fixed variance" for few shadows).

Attacks on a released model (the online CVAE ships its trained encoder and decoder, not a set):
- model_loss: minus the target's loss under the model (its training objective, the negative ELBO up to
  the KL weight; Yeom et al. 2018's loss attack);
- lira_model_loss: the likelihood ratio of the target's log loss under its IN and OUT shadow models.

Reports: AUC with a 95 % interval (Hanley-McNeil), TPR at FPR 1 % and 0.1 % on all targets and on
the 5 % most exposed (largest mean distance to their 5 nearest real records in the attacker's pool,
Meeus et al. 2023), and an empirical epsilon lower bound (Jagielski et al. 2020; Nasr et al. 2021):
the threshold is chosen on one half of the targets, Clopper-Pearson bounds at 95 % on the other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from scipy.stats import beta as beta_distribution

from src.metrics import NEIGHBOURS, binary_auroc, neighbour_distances, squared_distance_tiles

FPR_LEVELS = (0.01, 0.001)
EXPOSED_SHARE = 0.05
CONFIDENCE = 0.95
ATTACKS = ("distance", "knn_density", "domias", "lira_distance", "lira_domias")
LIRA_STATISTICS = {"lira_distance": "log_distance", "lira_domias": "domias"}
MODEL_ATTACKS = ("model_loss", "lira_model_loss")  # on a released model rather than a released set
# a distance of exactly 0 (a copied record) has no logarithm; this floor is far below any real distance
DISTANCE_FLOOR = 1e-6


def floored_log(values: np.ndarray) -> np.ndarray:
    """log(max(values, DISTANCE_FLOOR)): a statistic's log that a zero distance or loss cannot make infinite."""
    return np.log(np.maximum(values, DISTANCE_FLOOR))


@dataclass(frozen=True)
class Split:
    """Row indices into the real records: targets (half members), the attacker's auxiliary pool, the
    private filler; and the shadows' membership matrix (shadows x targets)."""

    targets: np.ndarray
    members: np.ndarray  # bool per target: in the attacked release's training set
    aux: np.ndarray
    filler: np.ndarray
    shadow_in: np.ndarray  # bool (S, targets)

    def private_rows(self) -> np.ndarray:
        """The attacked release's training rows."""
        return np.sort(np.r_[self.filler, self.targets[self.members]])

    def shadow_rows(self, shadow: int) -> np.ndarray:
        """Shadow `shadow`'s training rows: the auxiliary pool and its IN targets."""
        return np.sort(np.r_[self.aux, self.targets[self.shadow_in[shadow]]])


def draw_split(num_records: int, num_targets: int, num_shadows: int, seed: int) -> Split:
    """Targets, pool and filler drawn with `seed`; the pool and filler equal in size so a shadow trains
    on as many records as the attacked release (give or take the balance of its column)."""
    if num_targets % 2 or num_shadows % 2:
        raise ValueError("targets and shadows must be even, so that exactly half are IN")
    rest = num_records - num_targets
    if rest < 2:
        raise ValueError(f"{num_records} records leave nothing besides {num_targets} targets")
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_records)
    targets, rest_rows = order[:num_targets], order[num_targets:]
    aux, filler = rest_rows[:rest // 2], rest_rows[rest // 2:2 * (rest // 2)]
    members = np.zeros(num_targets, dtype=bool)
    members[rng.permutation(num_targets)[:num_targets // 2]] = True
    # LiRA's balanced design: per target, a random half of the shadows hold it
    ranks = rng.random((num_shadows, num_targets)).argsort(axis=0).argsort(axis=0)
    return Split(targets, members, aux, filler, ranks < num_shadows // 2)


def exposed_targets(targets_x: torch.Tensor, pool_x: torch.Tensor, block_size: int = 4096) -> np.ndarray:
    """Bool mask of the EXPOSED_SHARE of targets (at least one) with the largest mean distance to their
    NEIGHBOURS nearest other records of the pool (targets are rows of the pool)."""
    distances = neighbour_distances(targets_x, pool_x, NEIGHBOURS + 1, block_size)[:, 1:].mean(axis=1)
    count = max(1, int(round(EXPOSED_SHARE * len(targets_x))))
    mask = np.zeros(len(targets_x), dtype=bool)
    mask[np.argsort(-distances, kind="stable")[:count]] = True
    return mask


@torch.no_grad()
def kde_log_density(queries: torch.Tensor, reference: torch.Tensor, block_size: int = 4096) -> np.ndarray:
    """Log density at each query of a Gaussian KDE on `reference` with isotropic kernels of Scott's
    bandwidth h = n^(-1/(d+4)) (features z-scored, so unit spread). An isotropic kernel, not scipy's
    full-covariance one: with fewer records than dimensions that covariance is singular."""
    n, d = reference.shape
    bandwidth = n ** (-1.0 / (d + 4))
    log_norm = math.log(n) + 0.5 * d * math.log(2 * math.pi * bandwidth ** 2)
    result = torch.full((len(queries),), -float("inf"), dtype=torch.float64, device=queries.device)
    for q_start, _, squared in squared_distance_tiles(queries.float(), reference.float(), block_size):
        rows = slice(q_start, q_start + len(squared))
        tile = torch.logsumexp(-squared.clamp_min(0).double() / (2 * bandwidth ** 2), dim=1)
        result[rows] = torch.logaddexp(result[rows], tile)
    return (result - log_norm).cpu().numpy()


def release_statistics(release_x: torch.Tensor, targets_x: torch.Tensor, aux_x: torch.Tensor,
                       aux_log_density: np.ndarray, block_size: int = 4096) -> dict[str, np.ndarray]:
    """Per-target statistics of one release (all in the pool's z-space): log nearest distance, the
    k-NN and KDE density log ratios against the auxiliary pool (`aux_log_density` at the targets)."""
    nearest = neighbour_distances(targets_x, release_x, NEIGHBOURS, block_size).astype(np.float64)
    aux_nearest = neighbour_distances(targets_x, aux_x, NEIGHBOURS, block_size)[:, -1].astype(np.float64)
    knn = floored_log(aux_nearest) - floored_log(nearest[:, -1])
    return {"log_distance": np.log(nearest[:, 0] + DISTANCE_FLOOR), "knn_density": knn,
            "domias": kde_log_density(targets_x, release_x, block_size) - aux_log_density}


def gaussian_log_likelihood(values: np.ndarray, mean: np.ndarray, std: float) -> np.ndarray:
    return -0.5 * ((values - mean) / std) ** 2 - math.log(std)


def lira_scores(observed: np.ndarray, shadow_values: np.ndarray, shadow_in: np.ndarray) -> np.ndarray:
    """LiRA's score log N(x; mu_in, s_in) - log N(x; mu_out, s_out) per target: per-target means over its
    IN and OUT shadows, standard deviations pooled over all targets and floored at 1e-3 of the
    statistic's overall spread (a verbatim copy makes every IN value identical)."""
    floor = 1e-3 * max(float(shadow_values.std()), DISTANCE_FLOOR)
    scores = np.zeros(len(observed))
    for part in (True, False):
        mask = shadow_in == part
        counts = mask.sum(axis=0)
        mean = np.where(mask, shadow_values, 0).sum(axis=0) / counts
        std = max(float(np.sqrt((np.where(mask, shadow_values - mean, 0) ** 2).sum() / max(mask.sum() - 1, 1))),
                  floor)
        scores += (1 if part else -1) * gaussian_log_likelihood(observed, mean, std)
    return scores


def tpr_at_fpr(members: np.ndarray, scores: np.ndarray, level: float) -> float:
    """The largest true-positive rate (percent) of a threshold `score >= t` whose FPR is at most `level`;
    tied scores are called together, so a tie cannot buy a positive cheaply."""
    members = np.asarray(members, dtype=bool)
    thresholds = np.unique(scores)[::-1]
    positives = scores[None, :] >= thresholds[:, None]
    tpr = (positives & members).sum(axis=1) / members.sum()
    fpr = (positives & ~members).sum(axis=1) / (~members).sum()
    allowed = fpr <= level
    return 100.0 * float(tpr[allowed].max()) if allowed.any() else 0.0


def roc_curve(members: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) over every threshold `score >= t`, from (0, 0) to (1, 1)."""
    members = np.asarray(members, dtype=bool)
    thresholds = np.r_[np.inf, np.unique(scores)[::-1]]
    positives = scores[None, :] >= thresholds[:, None]
    return (positives & ~members).sum(axis=1) / (~members).sum(), (positives & members).sum(axis=1) / members.sum()


def auc_interval(auc: float, n_pos: int, n_neg: int) -> tuple[float, float]:
    """95 % interval of an AUC (percent) from Hanley and McNeil's 1982 standard error."""
    a = auc / 100.0
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    half = 1.959964 * math.sqrt(max(var, 0.0))
    return 100.0 * max(0.0, a - half), 100.0 * min(1.0, a + half)


def clopper_pearson(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of a binomial proportion."""
    alpha = 1 - confidence
    low = 0.0 if successes == 0 else float(beta_distribution.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta_distribution.ppf(1 - alpha / 2, successes + 1,
                                                                        trials - successes))
    return low, high


def epsilon_from_rates(tpr_low: float, fpr_high: float, delta: float) -> float:
    """The epsilon an (epsilon, delta)-DP mechanism must have for an attack with these rates (both
    directions of the hypothesis test); 0 when the rates prove nothing."""
    bounds = [0.0]
    if tpr_low - delta > 0 and fpr_high > 0:
        bounds.append(math.log((tpr_low - delta) / fpr_high))
    if 1 - fpr_high - delta > 0 and 1 - tpr_low > 0:
        bounds.append(math.log((1 - fpr_high - delta) / (1 - tpr_low)))
    return max(bounds)


def _counts(members: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    called = scores >= threshold
    return int((called & members).sum()), int(members.sum()), int((called & ~members).sum()), int((~members).sum())


def epsilon_lower_bound(scores_by_attack: dict[str, np.ndarray], members: np.ndarray, delta: float,
                        seed: int) -> dict[str, Any]:
    """Empirical epsilon lower bound: the attack and threshold with the best point estimate on a random
    half of the targets (chosen without looking at the other half), then Clopper-Pearson bounds on the
    other half, so that picking the best of many thresholds does not inflate the bound."""
    rng = np.random.default_rng(seed)
    choose = np.zeros(len(members), dtype=bool)
    choose[rng.permutation(len(members))[:len(members) // 2]] = True
    best = ("", math.inf, -1.0)
    for name, scores in scores_by_attack.items():
        for threshold in np.unique(scores[choose]):
            tp, pos, fp, neg = _counts(members[choose], scores[choose], threshold)
            estimate = epsilon_from_rates(tp / pos, max(fp, 0.5) / neg, delta)  # half a false positive for none
            if estimate > best[2]:
                best = (name, float(threshold), estimate)
    name, threshold, _ = best
    tp, pos, fp, neg = _counts(members[~choose], scores_by_attack[name][~choose], threshold)
    tpr_low, _ = clopper_pearson(tp, pos)
    _, fpr_high = clopper_pearson(fp, neg)
    return {"epsilon_lower_bound": epsilon_from_rates(tpr_low, fpr_high, delta), "attack": name,
            "threshold": threshold, "delta": delta, "true_positives": tp, "members": pos, "false_positives": fp,
            "non_members": neg, "tpr_low": tpr_low, "fpr_high": fpr_high, "confidence": CONFIDENCE}


def attack_summary(members: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUC (percent) with its interval and TPR (percent) at each FPR level."""
    auc = binary_auroc(members, scores)
    low, high = auc_interval(auc, int(members.sum()), int((~members).sum()))
    summary = {"auc": auc, "auc_low": low, "auc_high": high}
    for level in FPR_LEVELS:
        summary[f"tpr_at_fpr_{level:g}"] = tpr_at_fpr(members, scores, level)
    return summary


def report(scores_by_attack: dict[str, np.ndarray], members: np.ndarray, exposed: np.ndarray) -> dict[str, Any]:
    """Every attack's summary on all targets and on the exposed ones (when they hold both classes)."""
    result: dict[str, Any] = {}
    for name, scores in scores_by_attack.items():
        result[name] = {"all": attack_summary(members, scores)}
        if members[exposed].any() and (~members[exposed]).any():
            result[name]["exposed"] = attack_summary(members[exposed], scores[exposed])
    return result


class ZSpace:
    """The attacker's feature scaling: z-scores with the statistics of its own pool (aux and targets)."""

    def __init__(self, pool: np.ndarray, device: torch.device) -> None:
        self.mean, self.std = pool.mean(axis=0), pool.std(axis=0) + 1e-8
        self.device = device

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((x - self.mean) / self.std, dtype=torch.float32, device=self.device)


def run_attack(records_x: np.ndarray, split: Split, release_x: np.ndarray,
               shadow_releases: Callable[[], Any], device: torch.device, seed: int,
               delta: float = 0.0) -> dict[str, Any]:
    """Every attack on one release. `shadow_releases()` yields the shadows' released embeddings in
    shadow order (made by the caller, perhaps in parallel). Returns the report, the scores, the
    membership and exposure masks, and the epsilon lower bound."""
    zspace = ZSpace(records_x[np.r_[split.aux, split.targets]], device)
    targets_x, aux_x = zspace(records_x[split.targets]), zspace(records_x[split.aux])
    aux_density = kde_log_density(targets_x, aux_x)
    observed = release_statistics(zspace(release_x), targets_x, aux_x, aux_density)
    shadow_values: dict[str, list[np.ndarray]] = {name: [] for name in LIRA_STATISTICS.values()}
    for shadow_x in shadow_releases():
        statistics = release_statistics(zspace(shadow_x), targets_x, aux_x, aux_density)
        for name in shadow_values:
            shadow_values[name].append(statistics[name])
    scores = {"distance": -observed["log_distance"], "knn_density": observed["knn_density"],
              "domias": observed["domias"]}
    for attack, statistic in LIRA_STATISTICS.items():
        scores[attack] = lira_scores(observed[statistic], np.stack(shadow_values[statistic]), split.shadow_in)
    return attack_outcome(scores, targets_x, aux_x, split, delta, seed)


def run_model_attack(records_x: np.ndarray, split: Split, losses: np.ndarray, shadow_losses: Callable[[], Any],
                     device: torch.device, seed: int, delta: float = 0.0) -> dict[str, Any]:
    """Every attack on a released model, from the targets' losses under it. `shadow_losses()` yields the
    targets' losses under each shadow model in shadow order. LiRA fits its Gaussians to log losses: a
    loss's spread grows with its size, so one variance pooled over targets fits well and badly
    reconstructed targets alike only on the log scale. Returns what `run_attack` returns."""
    zspace = ZSpace(records_x[np.r_[split.aux, split.targets]], device)
    shadows = floored_log(np.stack(list(shadow_losses())))
    scores = {"model_loss": -losses, "lira_model_loss": lira_scores(floored_log(losses), shadows, split.shadow_in)}
    return attack_outcome(scores, zspace(records_x[split.targets]), zspace(records_x[split.aux]), split, delta, seed)


def attack_outcome(scores: dict[str, np.ndarray], targets_x: torch.Tensor, aux_x: torch.Tensor, split: Split,
                   delta: float, seed: int) -> dict[str, Any]:
    """The report of every attack's scores, the audit, and the membership and exposure masks."""
    exposed = exposed_targets(targets_x, torch.cat([targets_x, aux_x]))
    return {"attacks": report(scores, split.members, exposed),
            "audit": epsilon_lower_bound(scores, split.members, delta, seed),
            "scores": scores, "members": split.members, "exposed": exposed}
