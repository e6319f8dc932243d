"""Utility metrics of a probe; privacy and fidelity metrics of a released embedding set.

Utility: AUROC (the paper's number), accuracy and balanced accuracy, all in percent,
written out in numpy so their tie handling is visible (average ranks, as sklearn).

Privacy and fidelity: the neighbour distances between released vectors and the real ones, in
the real train z-score space, from which every release metric of src.metric_registry follows
exactly. Neighbours are found in blocks on the device, so no N x M matrix
is ever held whole; the distances that decide a result are then recomputed directly, because
the matmul form |a|^2 + |b|^2 - 2ab loses the exact zero of a copied record to float32 cancellation.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from src.cli import UserError
from src.metric_registry import METRICS, ReleaseNeighbours, binary_auroc


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


# Every k-nearest-neighbour metric uses k = 5: prdc's recommended value; DOMIAS estimates densities with
# KDE or flows and has no k of its own, so its k-NN stand-in takes the same.
NEIGHBOURS = 5
# Each split must hold more than NEIGHBOURS rows: prdc radii need the 5th nearest *other* row of a set.
MIN_SPLIT_ROWS = NEIGHBOURS + 1
# Band around a radius where the matmul-form squared distance is not trusted and the pair is recomputed directly:
# its float32 error is ~2e-7 of |q|^2 + |r|^2 in practice, below the worst case d * 6e-8 up to d = 1,600.
MATMUL_TOLERANCE = 1e-4
# Query x reference x feature differences held at once by sdmetrics_dcr (float64: 64 MiB each)
PAIRWISE_ELEMENTS = 2 ** 23


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


@torch.no_grad()
def count_within_radius(queries: torch.Tensor, reference: torch.Tensor, radii: torch.Tensor,
                        block_size: int = 4096) -> torch.Tensor:
    """For each query, how many reference vectors r lie strictly inside their own radius: |q - r| < radii[r].

    The test of prdc's precision, recall and density. Pairs whose matmul-form distance lies within float32
    rounding of the radius are recomputed directly, so a tie with a directly computed radius (a copied
    record at exactly the k-th neighbour distance) is decided as prdc decides it, by the strict <.
    """
    queries, reference, radii = queries.float(), reference.float(), radii.float()
    queries_sq, reference_sq, radii_sq = queries.square().sum(dim=1), reference.square().sum(dim=1), radii.square()
    counts = torch.zeros(len(queries), dtype=torch.long, device=queries.device)
    for q_start, r_start, squared in squared_distance_tiles(queries, reference, block_size):
        rows, columns = slice(q_start, q_start + len(squared)), slice(r_start, r_start + squared.shape[1])
        # one margin per column, from the block's largest query norm: a slightly wider band, no extra tile
        margin = MATMUL_TOLERANCE * (queries_sq[rows].max() + reference_sq[columns])
        inside = squared < radii_sq[columns] - margin
        counts[rows] += inside.sum(dim=1)
        near_rows, near_columns = torch.nonzero((squared <= radii_sq[columns] + margin) ^ inside, as_tuple=True)
        near_rows, near_columns = near_rows + q_start, near_columns + r_start
        for start in range(0, len(near_rows), block_size):
            query_index, reference_index = near_rows[start:start + block_size], near_columns[start:start + block_size]
            direct = (queries[query_index] - reference[reference_index]).norm(dim=1)
            counts.index_add_(0, query_index, (direct < radii[reference_index]).long())
    return counts


def neighbour_distances(queries: torch.Tensor, reference: torch.Tensor, k: int, block_size: int,
                        exclude_self: bool = False) -> np.ndarray:
    """k_nearest_neighbours' distances as a numpy array (N, k) on the CPU."""
    return k_nearest_neighbours(queries, reference, k, block_size, exclude_self)[0].cpu().numpy()


def random_rows(rows: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """`size` rows drawn without replacement by a seeded permutation; all rows, in order, when size is len(rows)."""
    if size == len(rows):
        return rows
    keep = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:size]
    return rows[keep.to(rows.device)]


def require_rows(sets: dict[str, tuple[object, str]]) -> None:
    """Raise UserError for a set too small for the k-NN metrics, saying what to do about it."""
    for name, (rows, remedy) in sets.items():
        if len(rows) < MIN_SPLIT_ROWS:
            raise UserError(f"the {name} has {len(rows)} rows but the privacy and fidelity metrics need at least "
                            f"{MIN_SPLIT_ROWS}; {remedy}")


def check_sizes(released: object, real_train: object, real_test: object, real_val: object) -> None:
    """Every set large enough for the k-NN metrics (arrays or tensors), checked by the probes before training."""
    require_rows({"released set": (released, f"release at least {MIN_SPLIT_ROWS} vectors"),
                  **{f"real {split} split": (rows, f"use a dataset whose {split} split holds more records")
                     for split, rows in (("train", real_train), ("test", real_test), ("val", real_val))}})


def release_neighbours(released: torch.Tensor, real_train: torch.Tensor, real_test: torch.Tensor,
                       real_val: torch.Tensor, seed: int, block_size: int = 4096) -> ReleaseNeighbours:
    """The neighbour distances every release metric reads (see ReleaseNeighbours), each search run once. The
    train-holdout comparison subsamples the larger of real train and real test to the smaller's size without
    replacement, with `seed`, so that 50 % means no overfitting whatever the split sizes."""
    k = NEIGHBOURS
    real_nn = neighbour_distances(real_train, real_train, k, block_size, exclude_self=True)
    released_nn = neighbour_distances(released, released, k, block_size, exclude_self=True)
    dcr = neighbour_distances(released, real_train, 1, block_size)[:, 0].astype(np.float64)
    holdout_size = min(len(real_train), len(real_test))
    holdout_train, holdout = (random_rows(rows, holdout_size, seed) for rows in (real_train, real_test))
    real_radii, released_radii = (torch.from_numpy(nn[:, -1]).to(released.device) for nn in (real_nn, released_nn))
    return ReleaseNeighbours(
        k=k, dcr=dcr, real_nn=real_nn,
        member_nn=neighbour_distances(real_train, released, k, block_size),
        non_member_nn=neighbour_distances(real_test, released, k, block_size),
        member_val_nn=neighbour_distances(real_train, real_val, k, block_size),
        non_member_val_nn=neighbour_distances(real_test, real_val, k, block_size),
        dcr_train=dcr if holdout_train is real_train else neighbour_distances(released, holdout_train, 1,
                                                                             block_size)[:, 0],
        dcr_holdout=neighbour_distances(released, holdout, 1, block_size)[:, 0],
        real_hits=count_within_radius(released, real_train, real_radii, block_size).cpu().numpy(),
        released_hits=count_within_radius(real_train, released, released_radii, block_size).cpu().numpy(),
        sdmetrics_dcr_train=sdmetrics_dcr(released, real_train),
        sdmetrics_dcr_holdout=sdmetrics_dcr(released, real_test))


def privacy_metrics(released: torch.Tensor, real_train: torch.Tensor, real_test: torch.Tensor,
                    real_val: torch.Tensor, seed: int, block_size: int = 4096) -> dict[str, float]:
    """Every release metric of the registry (src.metric_registry.METRICS), from inputs z-scored with the real
    train statistics. Every set needs at least MIN_SPLIT_ROWS rows, else UserError."""
    check_sizes(released, real_train, real_test, real_val)
    neighbours = release_neighbours(released, real_train, real_test, real_val, seed, block_size)
    return {metric.name: metric.compute(neighbours) for metric in METRICS if metric.compute is not None}


@torch.no_grad()
def sdmetrics_dcr(queries: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """SDMetrics' distance to closest record (sdmetrics.single_table.privacy.dcr_utils, numerical columns):
    min over reference rows of the column mean of min(|q - r| / range, 1), each column's range max - min of
    `reference`. A column of range 0 gives 0 / 0 = NaN where values agree, which pandas' mean skips, and 1
    where they differ; so here.

    Exact, without materialising queries x references x columns: the columns of range 0 add a count that
    depends on the query alone; the others are shifted and scaled so that the reference spans [0, 1] in each.
    Inside that range a query coordinate adds |q - r| (torch.cdist). Outside it, q - r has the same sign s
    for every reference, so min(|q - r|, 1) = (s (q - r) + 1 - |q - s - r|) / 2: a part linear in r (a
    matrix product) and an L1 distance to q - s (a second cdist). In each cdist, the coordinates that belong
    to the other stand at the range's top edge h, where |h - r| = h - r is linear too and taken out by the
    same product. A release far outside the data (large DP noise) thus costs two cdists, not a pass over
    every reference for each outside coordinate."""
    queries, reference = queries.double(), reference.double()
    low, high = reference.min(dim=0).values, reference.max(dim=0).values
    constant = high == low
    differing = (queries[:, constant] != low[constant]).sum(dim=1).double()  # range-0 columns counting 1
    counted = (int((~constant).sum()) + differing).clamp(min=1)  # the columns pandas' mean does not skip
    offset, spread = low[~constant], (high - low)[~constant]
    scaled_queries, scaled_reference = ((x[:, ~constant] - offset) / spread for x in (queries, reference))
    if not scaled_queries.shape[1]:  # every column of range 0: only the count differs
        return (differing / counted).cpu().numpy()
    inside_low, inside_high = scaled_reference.min(dim=0).values, scaled_reference.max(dim=0).values
    nearest = torch.empty(len(queries), dtype=torch.float64, device=queries.device)
    rows_per_block = max(1, PAIRWISE_ELEMENTS // max(1, len(reference)))
    for start in range(0, len(queries), rows_per_block):
        block = scaled_queries[start:start + rows_per_block]
        side = (block > inside_high).double() - (block < inside_low).double()  # s outside the range, 0 inside
        outside = side != 0
        sums = torch.cdist(torch.where(outside, inside_high, block), scaled_reference, p=1)
        rows = outside.any(dim=1).nonzero(as_tuple=True)[0]  # the others (copies among them) stay exact
        if len(rows):
            block, side, outside = block[rows], side[rows], outside[rows]
            to_distance = torch.where(outside, block - side, inside_high)
            edge = inside_high.expand_as(block)
            constant_part = torch.where(outside, (side * block + 1) / 2 - edge, edge / 2).sum(dim=1, keepdim=True)
            linear_part = torch.where(outside, 1 - side / 2, torch.full_like(block, -0.5)) @ scaled_reference.T
            sums[rows] += constant_part + linear_part - torch.cdist(to_distance, scaled_reference, p=1) / 2
        nearest[start:start + rows_per_block] = sums.min(dim=1).values
    return ((nearest + differing) / counted).cpu().numpy()
