"""Utility metrics of a probe and privacy metrics of a released embedding set.

Utility: AUROC (the paper's number), accuracy and balanced accuracy, all in percent,
written out in numpy so their tie handling is visible (average ranks, as sklearn).

Privacy: distances between released vectors and the real ones, in the real train
z-score space. Nearest neighbours are found in blocks on the device, so no N x M
matrix is ever held whole; the distance to the neighbour found is then recomputed
directly, because the matmul form |a|^2 + |b|^2 - 2ab loses the exact zero of a
copied record to float32 cancellation.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


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


def auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUROC in percent over the classes present in `labels`.

    With two probability columns it is the positive class's AUC (as sklearn's binary case).
    A class absent from `labels` has no AUC and is left out of the mean.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[1] == 2:
        return binary_auroc(labels == 1, probs[:, 1])
    present = np.unique(labels)
    if len(present) < 2:
        raise ValueError("AUROC needs at least two classes in the labels")
    return float(np.mean([binary_auroc(labels == c, probs[:, c]) for c in present]))


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Share of correct predictions, in percent."""
    return 100.0 * float(np.mean(np.asarray(labels) == np.asarray(predictions)))


def balanced_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean recall over the classes present in `labels`, in percent."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    recalls = [np.mean(predictions[labels == c] == c) for c in np.unique(labels)]
    return 100.0 * float(np.mean(recalls))


def squared_distance_tiles(queries: torch.Tensor, reference: torch.Tensor, block_size: int,
                           exclude_self: bool = False) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(query offset, reference offset, squared distances) for each block_size x block_size tile, row by row.

    Uses the matmul form |q|^2 + |r|^2 - 2qr, fast but off by float32 rounding, so callers recompute the
    distances that decide a result directly. `exclude_self` (queries is reference) sets each vector's
    distance to itself to infinity; the two share one tile grid, so that is the diagonal of diagonal tiles.
    """
    reference_sq = reference.square().sum(dim=1)
    for q_start in range(0, len(queries), block_size):
        query_block = queries[q_start:q_start + block_size]
        query_sq = query_block.square().sum(dim=1, keepdim=True)
        for r_start in range(0, len(reference), block_size):
            reference_block = reference[r_start:r_start + block_size]
            squared = query_sq + reference_sq[r_start:r_start + block_size] - 2.0 * query_block @ reference_block.T
            if exclude_self and q_start == r_start:
                squared.fill_diagonal_(float("inf"))
            yield q_start, r_start, squared


@torch.no_grad()
def k_nearest_neighbours(queries: torch.Tensor, reference: torch.Tensor, k: int, block_size: int = 4096,
                         exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances (N, k) from each query to its k nearest reference vectors, and their indices.

    Neighbours are ranked by the matmul-form distances of the search and their distances then recomputed
    directly, which keeps the exact zero of a copied record; columns are therefore ascending except between
    neighbours within float32 rounding of each other. nearest_neighbours is its k = 1 case. Memory stays
    at one tile plus N x k, so N can reach 100,000. `exclude_self` (queries is reference) skips each vector's
    own row, giving real-to-real neighbour distances.
    """
    queries, reference = queries.float(), reference.float()
    if len(reference) - int(exclude_self) < k:
        raise ValueError(f"{k} neighbours asked of a reference set of {len(reference)} rows")
    best_sq = torch.full((len(queries), k), float("inf"), device=queries.device)
    best_index = torch.zeros((len(queries), k), dtype=torch.long, device=queries.device)
    for q_start, r_start, squared in squared_distance_tiles(queries, reference, block_size, exclude_self):
        rows = slice(q_start, q_start + len(squared))
        tile_sq, tile_index = squared.topk(min(k, squared.shape[1]), dim=1, largest=False)
        merged_sq = torch.cat([best_sq[rows], tile_sq], dim=1)  # earlier tiles first: a stable sort keeps them on ties
        merged_index = torch.cat([best_index[rows], tile_index + r_start], dim=1)
        order = merged_sq.argsort(dim=1, stable=True)[:, :k]
        best_sq[rows], best_index[rows] = merged_sq.gather(1, order), merged_index.gather(1, order)
    distances = torch.empty((len(queries), k), device=queries.device)
    for start in range(0, len(queries), block_size):
        rows = slice(start, start + block_size)
        distances[rows] = (queries[rows, None, :] - reference[best_index[rows]]).norm(dim=2)
    return distances, best_index


def nearest_neighbours(queries: torch.Tensor, reference: torch.Tensor, block_size: int = 4096,
                       exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance from each query to its nearest reference vector, and that vector's index."""
    distances, index = k_nearest_neighbours(queries, reference, 1, block_size, exclude_self)
    return distances[:, 0], index[:, 0]


def privacy_metrics(released: torch.Tensor, real_train: torch.Tensor, real_test: torch.Tensor,
                    block_size: int = 4096) -> dict[str, float]:
    """How close the released set sits to the real training records (all inputs z-scored with real train stats).

    - average_mindistance: mean distance of a released vector to its closest real train vector.
    - dcr_p5, dcr_p50: 5th and 50th percentiles of that distance to closest record (DCR).
    - share_closer_than_real_nn: percent of released vectors closer to a real train vector than
      the median real train vector is to its nearest other real train vector.
    - real_nn_p50: that median real-to-real distance, the yardstick for the DCRs.
    - mia_auc: a membership attack that calls a record a member when a released vector lies close
      to it; AUC in percent of real train (members) vs real test (non-members), 50 = no signal.
    """
    dcr = nearest_neighbours(released, real_train, block_size)[0].cpu().numpy().astype(np.float64)
    real_nn = nearest_neighbours(real_train, real_train, block_size, exclude_self=True)[0].cpu().numpy()
    real_nn_median = float(np.median(real_nn))
    member_distance = nearest_neighbours(real_train, released, block_size)[0].cpu().numpy()
    non_member_distance = nearest_neighbours(real_test, released, block_size)[0].cpu().numpy()
    is_member = np.r_[np.ones(len(member_distance), bool), np.zeros(len(non_member_distance), bool)]
    return {
        "average_mindistance": float(dcr.mean()),
        "dcr_p5": float(np.percentile(dcr, 5)),
        "dcr_p50": float(np.percentile(dcr, 50)),
        "share_closer_than_real_nn": 100.0 * float(np.mean(dcr < real_nn_median)),
        "real_nn_p50": real_nn_median,
        "mia_auc": binary_auroc(is_member, -np.r_[member_distance, non_member_distance]),
    }
