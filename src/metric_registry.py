"""The metric registry: every metric a result file records, the table it goes in, and how a release's
privacy and fidelity metrics follow from its neighbour distances.

Tables (src.aggregate) are made from it: PAPER, the paper's utility and privacy table; KNOWN, the privacy
and fidelity metrics users of synthcity, SDMetrics, prdc and DOMIAS know; RECORDED, in summary.csv only;
TIMING, seconds (summary.csv and the DP curve's tables), which no two runs share.
A new release metric is a function of `ReleaseNeighbours` and one line in METRICS: the probes compute and
record it (src.metrics.privacy_metrics) and the aggregate tables it, with no other edit. A metric without
a function is recorded by the probe itself (utility) or by the release's accounting (DP).

numpy only, so the sweep and the aggregate read it without torch. All distances are in the real train
z-score space; shares and AUCs are in percent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

PAPER, KNOWN, RECORDED, TIMING = "paper", "known", "recorded", "timing"


@dataclass(frozen=True)
class ReleaseNeighbours:
    """What every release metric reads, computed once by src.metrics.release_neighbours: members are the real
    train records, non-members the real test records, k the neighbours of the k-NN metrics."""

    k: int
    dcr: np.ndarray  # each released vector's distance to its closest real train vector (N_released)
    real_nn: np.ndarray  # each real train vector's k nearest other real train vectors (N_train x k)
    member_nn: np.ndarray  # each real train vector's k nearest released vectors (N_train x k)
    non_member_nn: np.ndarray  # each real test vector's k nearest released vectors (N_test x k)
    member_val_nn: np.ndarray  # each real train vector's k nearest real val vectors
    non_member_val_nn: np.ndarray  # each real test vector's k nearest real val vectors
    dcr_train: np.ndarray  # each released vector's distance to a train subset as large as the holdout
    dcr_holdout: np.ndarray  # ... and to the holdout (real test), both subsampled to one size with the seed
    real_hits: np.ndarray  # per released vector: real train vectors whose k-NN ball holds it
    released_hits: np.ndarray  # per real train vector: released vectors whose k-NN ball holds it
    sdmetrics_dcr_train: np.ndarray  # each released vector's SDMetrics distance to the whole real train set
    sdmetrics_dcr_holdout: np.ndarray  # ... and to the whole holdout (real test)

    @property
    def is_member(self) -> np.ndarray:
        return np.r_[np.ones(len(self.member_nn), bool), np.zeros(len(self.non_member_nn), bool)]


@dataclass(frozen=True)
class Metric:
    name: str
    table: str  # PAPER, KNOWN or RECORDED
    compute: Callable[[ReleaseNeighbours], float] | None = None  # None: the probe or the accounting records it


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..N, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank_per_group = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank_per_group, ends - starts)
    return ranks


def binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """AUC in percent: the chance a positive outscores a negative, ties counting one half."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative samples")
    ranks = average_ranks(np.asarray(scores, dtype=np.float64))
    mann_whitney_u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return 100.0 * mann_whitney_u / (n_pos * n_neg)


def average_mindistance(n: ReleaseNeighbours) -> float:
    """The paper's privacy measure: mean distance of a released vector to its closest real train vector."""
    return float(n.dcr.mean())


def dcr_p5(n: ReleaseNeighbours) -> float:
    """5th percentile of the distance to closest record (DCR)."""
    return float(np.percentile(n.dcr, 5))


def dcr_p50(n: ReleaseNeighbours) -> float:
    """Median distance to closest record."""
    return float(np.percentile(n.dcr, 50))


def real_nn_p50(n: ReleaseNeighbours) -> float:
    """Median distance of a real train vector to its nearest other one: the yardstick for the DCRs."""
    return float(np.median(n.real_nn[:, 0]))


def share_closer_than_real_nn(n: ReleaseNeighbours) -> float:
    """Percent of released vectors closer to a real train vector than the median real one is to its nearest."""
    return 100.0 * float(np.mean(n.dcr < real_nn_p50(n)))


def mia_auc(n: ReleaseNeighbours) -> float:
    """A membership attack that calls a record a member when a released vector lies close to it: AUC of real
    train (members) against real test (non-members); 50 = no signal."""
    return binary_auroc(n.is_member, -np.r_[n.member_nn[:, 0], n.non_member_nn[:, 0]])


def exact_copy_share(n: ReleaseNeighbours) -> float:
    """Percent of released vectors equal to a real train vector element by element (DCR exactly 0)."""
    return 100.0 * float(np.mean(n.dcr == 0.0))


def identifiability(n: ReleaseNeighbours) -> float:
    """Percent of real train records whose nearest released vector is strictly closer than their nearest other
    real record: synthcity's IdentifiabilityScore "score" (its entropy weights are all set to 1 in its code),
    not its default "score_OC". A record with a twin has its twin, at distance 0, as nearest other record."""
    return 100.0 * float(np.mean(n.member_nn[:, 0] < n.real_nn[:, 0]))


def dcr_holdout_share(n: ReleaseNeighbours) -> float:
    """Percent of released vectors strictly closer (Euclidean, z-space) to real train than to a real holdout
    (test) of the same size, ties counted as closer to the holdout; 50 = no overfitting whatever the split
    sizes. Our own metric, modelled on SDMetrics' but not SDMetrics' (see the next one)."""
    return 100.0 * float(np.mean(n.dcr_train < n.dcr_holdout))


def sdmetrics_dcr_closer_to_training(n: ReleaseNeighbours) -> float:
    """SDMetrics' DCROverfittingProtection "closer_to_training" in percent, computed as SDMetrics computes it
    (src.metrics.sdmetrics_dcr: column mean of min(|difference| / range, 1), ranges of each whole reference
    set); ties count as closer to the holdout. Its no-overfitting value depends on the split sizes."""
    return 100.0 * float(np.mean(n.sdmetrics_dcr_train < n.sdmetrics_dcr_holdout))


def precision(n: ReleaseNeighbours) -> float:
    """Naeem et al. 2020 (prdc), k = 5: percent of released vectors inside the real train manifold (strictly
    closer to a real record than that record's k-th nearest other record). Low precision means "off the
    data", not "private"."""
    return 100.0 * float(np.mean(n.real_hits > 0))


def recall(n: ReleaseNeighbours) -> float:
    """prdc recall: percent of real train vectors inside the released set's manifold."""
    return 100.0 * float(np.mean(n.released_hits > 0))


def density(n: ReleaseNeighbours) -> float:
    """prdc density: a ratio, above 1 when released vectors crowd where real ones are dense."""
    return float(n.real_hits.mean()) / n.k


def coverage(n: ReleaseNeighbours) -> float:
    """prdc coverage: percent of real train vectors with a released vector inside their k-NN ball."""
    return 100.0 * float(np.mean(n.member_nn[:, 0] < n.real_nn[:, -1]))


def mia_auc_density(n: ReleaseNeighbours) -> float:
    """A DOMIAS-style density-ratio attack (van Breugel et al. 2023), real val as its reference set: a record
    scores log(k-NN distance to real val) - log(k-NN distance to the release), which ranks records as the
    k-NN estimate of p_release / p_reference does. AUC of real train against real test; 50 = no signal."""
    reference_kth = np.r_[n.member_val_nn[:, -1], n.non_member_val_nn[:, -1]].astype(np.float64)
    released_kth = np.r_[n.member_nn[:, -1], n.non_member_nn[:, -1]].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # a k-NN distance of 0 (k copies) scores +-inf, still ranked
        scores = np.log(reference_kth) - np.log(released_kth)
    scores[(reference_kth == 0) & (released_kth == 0)] = 0.0  # k copies in both sets: equal densities, not NaN
    return binary_auroc(n.is_member, scores)


# Order is column order within a table.
METRICS = (
    Metric("auc", PAPER),  # the probe's macro one-vs-rest AUROC on the real test split
    Metric("average_mindistance", PAPER, average_mindistance),
    Metric("dcr_p5", PAPER, dcr_p5),
    Metric("dcr_p50", PAPER, dcr_p50),
    Metric("mia_auc", PAPER, mia_auc),
    Metric("exact_copy_share", KNOWN, exact_copy_share),
    Metric("identifiability", KNOWN, identifiability),
    Metric("dcr_holdout_share", KNOWN, dcr_holdout_share),
    Metric("sdmetrics_dcr_closer_to_training", KNOWN, sdmetrics_dcr_closer_to_training),
    Metric("mia_auc_density", KNOWN, mia_auc_density),
    Metric("precision", KNOWN, precision),
    Metric("recall", KNOWN, recall),
    Metric("density", KNOWN, density),
    Metric("coverage", KNOWN, coverage),
    Metric("dp_spent_epsilon", KNOWN),  # DP releases: the accountant's epsilon
    Metric("accuracy", RECORDED),
    Metric("balanced_accuracy", RECORDED),
    Metric("share_closer_than_real_nn", RECORDED, share_closer_than_real_nn),
    Metric("real_nn_p50", RECORDED, real_nn_p50),
    Metric("average_mindistance_reference_space", RECORDED),  # the paper's distance as the reference computes it
    Metric("release_s", TIMING),  # seconds to make the release (its meta, or a DP release's private sidecar)
    Metric("probe_train_s", TIMING),  # seconds to train (or fit) the probe
)


def table_metrics(table: str) -> tuple[str, ...]:
    """The names of the metrics of one table, in column order."""
    return tuple(metric.name for metric in METRICS if metric.table == table)
