"""k-Same anonymization: the reference's exact greedy clustering without an N x N matrix.

The reference procedure (label-blind): drop the last N mod k rows; then, while points
are left, take the unassigned point whose summed Euclidean distance to all unassigned
points is largest (the pivot), join it with its k-1 nearest unassigned points, and mark
the k points assigned. Every member is replaced by its cluster mean and keeps its label.
Ties go to the lowest row index.

The reference materialises the N x N distance matrix and rescans it every step. Here
memory is O(N (D + L)) and the work is about two N x N x D float64 matrix products:

- One blocked pass over all pairs gives each point's distance sum and a list of its L
  nearest points.
- Sums are brought up to date lazily (`_DistanceSums`): a top set of the largest sums is
  kept exact every step; the others only lose the distances to newly assigned points in
  one matrix product when the top set can no longer certify the maximum.
- Neighbours come from the pivot's list while it still holds enough unassigned points
  provably nearer than anything outside the list; otherwise from one scan of all rows.

Distances use the float64 Gram form |a|^2 + |b|^2 - 2 a.b on mean-centred vectors, with a
rigorous rounding bound. Neighbour choices within that bound of each other are settled by
exact differences of the input vectors, and sums within 1e-10 of the maximum by exact
sums, so duplicates are at distance 0 and ties go to the lowest index as in the reference.
Identical vectors share one distance sum (kept at the first copy), so the first unassigned
copy becomes the pivot whatever the matrix-product rounding.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from src.cli import UserError
from src.runtime import one_cpu_thread

SUM_MARGIN = 1e-10  # relative; float64 sums of N distances err by ~1e-13, far below this


def gram_error_factor(dim: int) -> float:
    """Bound factor c with |computed - true| <= c (|a|^2 + |b|^2) for a float64 Gram squared
    distance: dot products of length D err by at most D u |a||b| (u = 2^-53); doubled for safety."""
    return 2.0 * (2 * dim + 8) * 2.0 ** -53


def squared_distances(a: torch.Tensor, a_sq_norms: torch.Tensor, b: torch.Tensor,
                      b_sq_norms: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of a and b by the Gram form, clamped at 0."""
    return (a_sq_norms[:, None] + b_sq_norms[None, :] - 2.0 * (a @ b.T)).clamp_(min=0.0)


def _check_k(k: int, num_points: int) -> None:
    if k < 2:
        raise UserError(f"--k must be at least 2 (got {k})")
    if k > num_points:
        raise UserError(f"--k {k} is larger than the number of embeddings N = {num_points}; use --k <= {num_points}")


def _first_copies(embeddings: np.ndarray) -> np.ndarray:
    """For each row, the lowest index of a row with the identical vector (itself if unique)."""
    rows = np.ascontiguousarray(embeddings + 0.0)  # + 0.0 turns -0.0 into 0.0
    _, first, inverse = np.unique(rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))),
                                  return_index=True, return_inverse=True)
    return first[inverse.ravel()]


def _merge_lists(list_d2: torch.Tensor, list_idx: torch.Tensor, row0: int, block_d2: torch.Tensor,
                 col0: int) -> None:
    """Fold a block of squared distances (rows row0.., columns col0..) into the nearest-point lists."""
    rows = slice(row0, row0 + block_d2.shape[0])
    block_nearest = block_d2.topk(min(list_d2.shape[1], block_d2.shape[1]), dim=1, largest=False)
    nearest = torch.cat([list_d2[rows], block_nearest.values], dim=1).topk(list_d2.shape[1], dim=1, largest=False)
    list_d2[rows] = nearest.values
    list_idx[rows] = torch.cat([list_idx[rows], block_nearest.indices + col0], dim=1).gather(1, nearest.indices)


def _initial_pass(x: torch.Tensor, sq_norms: torch.Tensor, list_length: int,
                  block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distance sums over all points and the sorted lists of nearest points (self excluded).

    Visits each pair of row blocks once (upper triangle) and uses it for both blocks.
    """
    n = x.shape[0]
    sums = torch.zeros(n, dtype=torch.float64, device=x.device)
    list_d2 = torch.full((n, list_length), torch.inf, dtype=torch.float64, device=x.device)
    list_idx = torch.zeros((n, list_length), dtype=torch.long, device=x.device)
    starts = range(0, n, block_size)
    with tqdm(total=len(starts) * (len(starts) + 1) // 2, desc="k-Same distance sums", leave=False,
              disable=None) as progress:
        for i0 in starts:
            rows = slice(i0, min(i0 + block_size, n))
            for j0 in range(i0, n, block_size):
                cols = slice(j0, min(j0 + block_size, n))
                d2 = squared_distances(x[rows], sq_norms[rows], x[cols], sq_norms[cols])
                if i0 == j0:
                    d2.fill_diagonal_(torch.inf)
                _merge_lists(list_d2, list_idx, i0, d2, j0)
                if i0 != j0:
                    _merge_lists(list_d2, list_idx, j0, d2.T.contiguous(), i0)
                distances = d2.sqrt_()
                if i0 == j0:
                    distances.fill_diagonal_(0.0)
                sums[rows] += distances.sum(1)
                if i0 != j0:
                    sums[cols] += distances.sum(0)
                progress.update()
    return sums, list_d2, list_idx


def _closest(points: torch.Tensor, sq_norms: torch.Tensor, error: float, pivot: int, rows: torch.Tensor,
             approx_d2: torch.Tensor, count: int, outside_d2: float) -> torch.Tensor | None:
    """The `count` rows nearest to the pivot, by (exact distance, index), among `rows`.

    `approx_d2` are Gram squared distances with error at most error * (|p|^2 + |r|^2); every
    point not in `rows` is at true squared distance >= outside_d2. Exact distances are taken
    from the input `points`. Returns None when the rows cannot be shown to hold the answer.
    """
    if rows.numel() < count:
        return None
    slack = error * (sq_norms[pivot] + sq_norms[rows])
    upper = (approx_d2 + slack).kthvalue(count).values
    if upper.item() >= outside_d2:
        return None
    near = rows[approx_d2 - slack <= upper].sort().values
    exact_d2 = (points[near].double() - points[pivot].double()).square_().sum(1)
    return near[exact_d2.sort(stable=True).indices[:count]]


def _exact_sums(points: torch.Tensor, chosen: torch.Tensor, rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sums of exact distances from a few chosen points to `rows` (in chunks, to bound the memory)."""
    chosen_points = points[chosen].double()[:, None, :]
    sums = torch.zeros(chosen.numel(), dtype=torch.float64, device=points.device)
    for start in range(0, rows.numel(), block_size):
        chunk = points[rows[start:start + block_size]].double()
        sums += (chunk[None, :, :] - chosen_points).square_().sum(2).sqrt_().sum(1)
    return sums


class _DistanceSums:
    """Each live group's summed distance to the unassigned points, for picking the pivot.

    Sums are refreshed together (one matrix product with the points assigned since the
    last refresh) only when needed. In between, a top set of the largest sums is kept
    exact (top_size x k distances per step) while the others are stale, hence upper
    bounds: the best top sum is certified as the maximum when it beats them all.
    """

    def __init__(self, x: torch.Tensor, sq_norms: torch.Tensor, sums: torch.Tensor, top_size: int,
                 block_size: int) -> None:
        self.x, self.sq_norms, self.sums = x, sq_norms, sums
        self.live = int(torch.isfinite(sums).sum())
        self.default_top_size = self.top_size = top_size
        self.block_size = block_size
        self.pending: list[torch.Tensor] = []
        self.top: torch.Tensor | None = None

    def best_groups(self) -> torch.Tensor:
        """Groups whose sums are within rounding of the largest (usually one)."""
        while True:
            if self.top is None:
                self._refresh()
            best = self.top_sums.max()
            if self.outside == -np.inf or best.item() > self.outside + SUM_MARGIN * abs(self.outside):
                return self.top[self.top_sums >= best - SUM_MARGIN * best.abs()]
            if self.pending:
                self.top_size = self.default_top_size
            else:  # an exact near-tie at the edge of the top set: widen it
                self.top_size *= 2
            self.top = None

    def remove(self, members: torch.Tensor, dead_groups: list[int]) -> None:
        """Account for newly assigned rows; `dead_groups` have no unassigned copy left."""
        distances = squared_distances(self.top_x, self.top_sq_norms, self.x[members], self.sq_norms[members])
        self.top_sums -= distances.sqrt_().sum(1)
        if dead_groups:
            dead = torch.tensor(dead_groups, device=self.x.device)
            self.sums[dead] = -torch.inf
            self.top_sums[torch.isin(self.top, dead)] = -torch.inf
            self.live -= len(dead_groups)
        self.pending.append(members)

    def _refresh(self) -> None:
        if self.pending:
            self._subtract_pending()
        size = min(self.top_size, self.live)
        ranked_sums, ranked = self.sums.topk(min(size + 1, self.live))
        self.top, self.top_sums = ranked[:size], ranked_sums[:size].clone()
        self.top_x, self.top_sq_norms = self.x[self.top], self.sq_norms[self.top]
        self.outside = ranked_sums[size].item() if self.live > size else -np.inf

    def _subtract_pending(self) -> None:
        pending = torch.cat(self.pending)
        pending_x, pending_sq_norms = self.x[pending], self.sq_norms[pending]
        live = torch.isfinite(self.sums).nonzero().squeeze(1)
        for start in range(0, live.numel(), self.block_size):
            rows = live[start:start + self.block_size]
            distances = squared_distances(self.x[rows], self.sq_norms[rows], pending_x, pending_sq_norms)
            self.sums[rows] -= distances.sqrt_().sum(1)
        self.pending = []


def ksame_clusters(embeddings: torch.Tensor | np.ndarray, k: int, device: torch.device,
                   block_size: int = 1024, top_size: int = 512, list_length: int = 128) -> np.ndarray:
    """Row indices of the k-Same clusters (num_clusters x k, int64), in the order they are formed.

    Each row lists the pivot first, then its neighbours by increasing distance (ties: lowest
    index). The last N mod k rows are left out, as in the reference. `block_size`,
    `top_size` and `list_length` trade memory for speed; the result does not depend on them.
    """
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be N x D, got shape {embeddings.shape}")
    _check_k(k, embeddings.shape[0])
    n = embeddings.shape[0] - embeddings.shape[0] % k
    if device.type == "mps":  # no float64 on Apple GPUs
        device = torch.device("cpu")

    first_copy = _first_copies(embeddings[:n])
    copies: dict[int, list[int]] = {}
    for row in np.flatnonzero(first_copy != np.arange(n)):
        copies.setdefault(int(first_copy[row]), [int(first_copy[row])]).append(int(row))
    group_left = np.bincount(first_copy, minlength=n)  # unassigned copies, kept at each group's first row

    points = torch.as_tensor(np.ascontiguousarray(embeddings[:n]), device=device)  # for exact distances
    x = points.to(torch.float64, copy=True)
    x -= x.mean(0)  # centring shrinks the norms, and with them the Gram rounding error
    sq_norms = x.square().sum(1)
    error = gram_error_factor(x.shape[1])
    list_length = min(max(list_length, 2 * k), n - 1)
    sums, list_d2, list_idx = _initial_pass(x, sq_norms, list_length, block_size)
    sums[torch.as_tensor(group_left == 0, device=device)] = -torch.inf  # later copies: sum kept at the first
    # Any point missing from a list is at least this far (squared) from the list's owner.
    list_complete = list_length == n - 1
    outside_d2 = (list_d2[:, -1] - error * (sq_norms + sq_norms.max())).cpu().numpy()

    pivot_sums = _DistanceSums(x, sq_norms, sums, top_size, block_size)
    unassigned = torch.ones(n, dtype=torch.bool, device=device)
    unassigned_host = np.ones(n, dtype=bool)
    clusters = np.empty((n // k, k), dtype=np.int64)
    with one_cpu_thread():
        for step in tqdm(range(n // k), desc=f"k-Same (k={k})", leave=False, disable=None):
            # Sums this close may be equal in exact arithmetic (always so when two points are
            # left): settle them with exact sums, then by the lowest row index.
            tied = pivot_sums.best_groups()
            if tied.numel() > 1:
                exact = _exact_sums(points, tied, unassigned.nonzero().squeeze(1), block_size)
                tied = tied[exact == exact.max()]
            pivot = min(next(row for row in copies[group] if unassigned_host[row]) if group in copies else group
                        for group in tied.tolist())
            unassigned[pivot] = False

            listed = list_idx[pivot]
            still = unassigned[listed]
            neighbours = _closest(points, sq_norms, error, pivot, listed[still], list_d2[pivot][still], k - 1,
                                  np.inf if list_complete else float(outside_d2[pivot]))
            if neighbours is None:  # the list ran out: scan every row (contiguous, cheaper than gathering)
                rows = unassigned.nonzero().squeeze(1)
                approx_d2 = squared_distances(x[[pivot]], sq_norms[[pivot]], x, sq_norms)[0]
                neighbours = _closest(points, sq_norms, error, pivot, rows, approx_d2[rows], k - 1, np.inf)
            members = torch.cat([torch.tensor([pivot], device=device), neighbours])
            unassigned[members] = False
            clusters[step] = members.cpu().numpy()

            unassigned_host[clusters[step]] = False
            dead_groups = []
            for row in clusters[step]:
                group_left[first_copy[row]] -= 1
                if group_left[first_copy[row]] == 0:
                    dead_groups.append(int(first_copy[row]))
            pivot_sums.remove(members, dead_groups)
    return clusters


def ksame(embeddings: np.ndarray, labels: np.ndarray, k: int,
          device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """k-Same anonymized embeddings (float32) and their labels, the last N mod k rows dropped.

    Row i of the output is the mean of row i's cluster; rows keep their order and labels.
    """
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if labels.shape != (embeddings.shape[0],):
        raise ValueError(f"{labels.shape} labels for {embeddings.shape[0]} embeddings")
    clusters = ksame_clusters(embeddings, k, device)
    n = clusters.size
    anonymized = np.empty((n, embeddings.shape[1]), dtype=np.float32)
    anonymized[clusters] = embeddings[clusters].astype(np.float64).mean(1, keepdims=True)
    return anonymized, labels[:n].copy()
