"""k-Same anonymization: the reference's exact greedy clustering without an N x N matrix.

The reference procedure (label-blind): drop the last N mod k rows; then, while points
are left, take the unassigned point whose summed Euclidean distance to all unassigned
points is largest (the pivot), join it with its k-1 nearest unassigned points, and mark
the k points assigned. Every member is replaced by its cluster mean and keeps its label.
Ties go to the lowest row index.

The reference materialises the N x N distance matrix and rescans it every step. Here memory
is one float64 copy of the centred points (packed again as points are assigned), and the
work is about one float64 pass over the unassigned points per step, for the one group that
becomes the pivot:

- The points are split once into a few cells (`_cells`, 16 by default). From each cell's count n,
  vector sum s and summed squared norm q over its unassigned points, a point x has summed
  squared distance n |x|^2 - 2 x.s + q to them, and by Cauchy-Schwarz its summed distance to
  them is at most the square root of n times that. Added over the cells, this bounds a
  point's distance sum from above for the price of a product with a few vectors
  (`_CellSums`). Where distances concentrate, as in high dimensions, the bound lies within a
  few 1e-4 of the sum.
- These bounds only shrink as points are assigned (each term loses points), so a stale bound
  still holds, and each step looks only at the bounds that reach the largest exact sum: first
  from each one's stored per-cell terms with the cells' counts of now (no product), then, if
  that is not enough, from a fresh product (`_Bounds`). Groups refreshed so become warm
  (`_WarmRows`): their dot products with the cells' sums are updated every step, which keeps
  their bounds fresh.
- A group whose refreshed bound still reaches it enters a small exact tier (`_ExactTier`), with
  its float64 sum from one pass over the unassigned points (`_LivePoints`), updated every step
  after that; `_DistanceSums` ties the parts together. The same pass
  gives its list of nearest points: the pivot's neighbours come from that list while it still
  holds enough unassigned points provably nearer than anything outside it, else from one scan
  of all rows.

Float64 distances use the Gram form |a|^2 + |b|^2 - 2 a.b on mean-centred vectors, with a
rigorous rounding bound. Neighbour choices within that bound of each other are settled by
exact differences of the input vectors, and sums within 1e-10 of the maximum by exact
sums (each point's distances sorted before they are added, so that equal multisets of
distances give equal sums), so duplicates are at distance 0 and ties go to the lowest index
as in the reference.
Identical vectors share one distance sum (kept at the first copy), so the first unassigned
copy becomes the pivot whatever the matrix-product rounding.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from src.cli import UserError
from src.runtime import cpu_threads, one_cpu_thread

SUM_MARGIN = 1e-10  # relative; float64 sums of N distances err by ~1e-13, far below this
F64_UNIT = 2.0 ** -53  # unit roundoff
PARALLEL_PRODUCT = 2 ** 27  # multiply-adds from which a product gets every CPU thread; all else runs on one
FEW_ROWS = 64  # a product with fewer rows than this on one side runs with them on the left
CELL_ITERATIONS = 6  # Lloyd iterations that shape the cells


def gram_error_factor(dim: int, unit: float, norm_error: float) -> float:
    """Bound factor c with |computed - true| <= c S, S = |a|^2 + |b|^2, for a Gram squared distance
    (`squared_distances`) whose squared norms are each within `norm_error` (relative) of the truth,
    u the unit roundoff, whatever order the matrix product sums in:
    - the summed norms, rounded once: within (norm_error + u (1 + norm_error)) S = n S of S;
    - addmm adds -2 a.b (size <= 2|a||b| <= S) onto them: D + 1 terms of total size <= (2 + n) S, so
      at most gamma_(D+1) (2 + n) S, gamma_m = m u / (1 - m u) (Higham, Accuracy and Stability, 3.1);
    - the clamp at 0 only moves it towards the true value, which is >= 0.
    We take 1% more, for the rounding of this bound itself."""
    norms = norm_error + unit * (1.0 + norm_error)
    gamma = (dim + 1) * unit / (1.0 - (dim + 1) * unit)
    return 1.01 * (norms + gamma * (2.0 + norms))


def squared_distances(a: torch.Tensor, a_sq_norms: torch.Tensor, b: torch.Tensor,
                      b_sq_norms: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of a and b by the Gram form, clamped at 0
    (the product added in place onto the summed norms: one tensor the size of the result). When b
    has few rows, the product runs with them on the left and the result comes back transposed: a
    product with few rows on the left reads the other operand once, about twice as fast for 5-10
    rows against 1,024 on one CPU thread."""
    if b.shape[0] < min(a.shape[0], FEW_ROWS):
        return squared_distances(b, b_sq_norms, a, a_sq_norms).T
    return (a_sq_norms[:, None] + b_sq_norms[None, :]).addmm_(a, b.T, alpha=-2.0).clamp_(min=0.0)


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


def _closest(points: np.ndarray, sq_norms: np.ndarray, error: float, pivot: int, rows: np.ndarray,
             approx_d2: np.ndarray, count: int, outside_d2: float) -> np.ndarray | None:
    """The `count` rows nearest to the pivot, by (exact distance, index), among `rows`.

    `approx_d2` are Gram squared distances with error at most error * (|p|^2 + |r|^2); every
    point not in `rows` is at true squared distance >= outside_d2. Exact distances are taken
    from the input `points`. Returns None when the rows cannot be shown to hold the answer.
    Host arrays: a few dozen rows per step, where numpy's per-call cost is lowest.
    """
    if rows.size < count:
        return None
    slack = error * (sq_norms[pivot] + sq_norms[rows])
    upper = np.partition(approx_d2 + slack, count - 1)[count - 1]
    if upper >= outside_d2:
        return None
    near = np.sort(rows[approx_d2 - slack <= upper])
    exact_d2 = np.square(points[near].astype(np.float64) - points[pivot].astype(np.float64)).sum(1)
    return near[np.argsort(exact_d2, kind="stable")[:count]]


def _exact_sums(points: torch.Tensor, chosen: torch.Tensor, rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sums of exact distances from a few chosen points to `rows` (distances in chunks).

    Each point's distances are sorted before they are summed, so that two points with the same
    multiset of distances (say, m copies of A and m of B left: A and B both sum m d(A, B)) get the
    same sum, whatever the rows' order; a position-dependent summation could split such a tie.
    """
    chosen_points = points[chosen].double()[:, None, :]
    distances = torch.empty((chosen.numel(), rows.numel()), dtype=torch.float64, device=points.device)
    for start in range(0, rows.numel(), block_size):
        chunk = points[rows[start:start + block_size]].double()
        distances[:, start:start + block_size] = (chunk[None, :, :] - chosen_points).square_().sum(2).sqrt_()
    return distances.sort(dim=1).values.sum(1)


def _cells(x: torch.Tensor, sq_norms: torch.Tensor, count: int) -> torch.Tensor:
    """Each row's cell, out of `count`: a few Lloyd (k-means) iterations from rows drawn by a fixed generator.
    Only the speed depends on the cells: any partition gives valid bounds, one of nearby points tight ones."""
    drawn = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:count]
    centres = x[drawn.to(x.device)]
    for _ in range(CELL_ITERATIONS):
        cell = squared_distances(x, sq_norms, centres, centres.square().sum(1)).argmin(1)
        sizes = torch.bincount(cell, minlength=count)[:, None]
        sums = torch.zeros_like(centres).index_add_(0, cell, x)
        centres = torch.where(sizes > 0, sums / sizes.clamp(min=1), centres)  # an empty cell keeps its centre
    return squared_distances(x, sq_norms, centres, centres.square().sum(1)).argmin(1)


class _CellSums:
    """For each cell, the count, vector sum and summed squared norm of its unassigned points, which bound
    every point's distance sum from above (`bounds`). Host arrays (numpy, float64), built once from the
    points on the device: they change by k rows a step, where numpy's per-call cost is lowest.

    Rounding. Every partial sum of a cell's vectors has a norm at most the sum A of their norms. The vector
    sum s sees at most 2 n_0 additions and subtractions (n_0 the cell's initial count), each within u A in
    norm. A row's dot product x.s, whether from one product with s (within (D + 2) u |x| A) or kept up to
    date from an earlier one by subtracting x.y for each assigned y (each within (D + 2) u |x| |y|, plus
    u |x| A for the subtraction), is then within (2 (D + 2) + 3.03 n_0) u |x| A of the true one. The sum
    of squared norms, whose terms each err by at most D u relative, stays within (2.03 n_0 + 1.01 D) u
    of their total.
    """

    def __init__(self, x: torch.Tensor, sq_norms: torch.Tensor, cell: torch.Tensor, count: int) -> None:
        initial = torch.bincount(cell, minlength=count).to(torch.float64)
        vectors = torch.zeros((count, x.shape[1]), dtype=torch.float64, device=x.device).index_add_(0, cell, x)
        squares = torch.zeros(count, dtype=torch.float64, device=x.device).index_add_(0, cell, sq_norms)
        norm_sums = torch.zeros_like(squares).index_add_(0, cell, sq_norms.sqrt())
        self.cell, initial, self.vectors, self.squares, norm_sums = (
            values.cpu().numpy() for values in (cell, initial, vectors, squares, norm_sums))
        self.sizes = initial.copy()
        self.dot_error = 1.01 * (2.0 * (x.shape[1] + 2) + 3.03 * initial) * F64_UNIT * norm_sums  # per unit |x|
        self.square_error = (2.03 * initial + 1.01 * x.shape[1]) * F64_UNIT * self.squares
        self.gamma = 1.01 * (x.shape[1] + 7) * F64_UNIT  # |x|^2 itself, and the three terms put together
        self.constants: tuple[np.ndarray, np.ndarray] | None = None  # for `terms`; None when stale

    def leave(self, x: np.ndarray, sq_norms: np.ndarray, rows: np.ndarray) -> None:
        """The assigned `rows` (centred vectors x, squared norms) leave their cells."""
        cell = self.cell[rows]
        np.subtract.at(self.sizes, cell, 1.0)
        np.subtract.at(self.vectors, cell, x)
        np.subtract.at(self.squares, cell, sq_norms)
        self.constants = None

    def dots(self, x: np.ndarray) -> np.ndarray:
        """Each row's dot products with the cells' vector sums (rows x cells)."""
        return x @ self.vectors.T

    def update_dots(self, dots: np.ndarray, x: np.ndarray, left: np.ndarray, rows: np.ndarray) -> None:
        """Keep the dot products of rows x up to date, in place, as the `rows` (centred vectors `left`) leave:
        x.y comes off the column of y's cell."""
        np.subtract.at(dots.T, self.cell[rows], left @ x.T)

    def terms(self, dots: np.ndarray, sq_norms: np.ndarray) -> np.ndarray:
        """Upper bounds of the summed squared distance from each row (its dot products with the cells' vector
        sums, its squared norm) to each cell's unassigned points: t = n |x|^2 - 2 x.s + q, plus its rounding
        (see the class), gamma (n |x|^2 + 2 |x.s| + q) + 2 |x| e_dot + e_q with |x.s| <= |x| (|s| + e_dot).
        They hold for as long as the row lives, since points only leave the cells."""
        if self.constants is None:  # per cell: the factors of |x|^2 and |x|, and the rest
            factors = np.stack([self.sizes * (1.0 + self.gamma),
                                1.01 * (2.0 * self.gamma * np.linalg.norm(self.vectors, axis=1)
                                        + (2.0 * self.gamma + 2.0) * self.dot_error)])
            self.constants = factors, self.squares * (1.0 + self.gamma) + self.square_error
        factors, rest = self.constants
        per_row = np.stack([sq_norms, np.sqrt(sq_norms)], 1)
        return np.maximum(per_row @ factors + rest - 2.0 * dots, 0.0)

    def bounds(self, terms: np.ndarray) -> np.ndarray:
        """Upper bounds of each row's summed distance to the unassigned points from its `terms`, taken now or
        earlier: by Cauchy-Schwarz, the sum over cells of sqrt(n t) with the cells' current counts n, times a
        final (cells + 4) u for the roots and the sum over cells."""
        return np.sqrt(self.sizes * terms).sum(1) * (1.0 + (self.sizes.size + 4) * F64_UNIT)


def _largest(values: np.ndarray, count: int) -> np.ndarray:
    """Positions of the `count` largest values, in no particular order (all when there are no more)."""
    if count <= 0 or count >= values.size:
        return np.arange(min(max(count, 0), values.size))
    return np.argpartition(values, -count)[-count:]


def _host_squared_distances(a: np.ndarray, a_sq_norms: np.ndarray, b: np.ndarray,
                            b_sq_norms: np.ndarray) -> np.ndarray:
    """`squared_distances` for host arrays of a few rows: the same Gram form, the same rounding bound."""
    return np.maximum(a_sq_norms[:, None] + b_sq_norms[None, :] - 2.0 * (a @ b.T), 0.0)


def _compacted(values: torch.Tensor, keep: torch.Tensor, block_size: int) -> torch.Tensor:
    """values[keep] written over the front of `values` itself, by blocks (keep is increasing, so no
    block reads a row that an earlier block overwrote): no second copy of the matrix is made."""
    for start in range(0, keep.numel(), block_size):
        chunk = keep[start:start + block_size]
        values[start:start + chunk.numel()] = values[chunk]
    return values[:keep.numel()]


class _LivePoints:
    """The unassigned points, centred, packed together in float64 on the device (the only copy), for the passes
    over all of them; which rows they are is kept on the host. Packed again when a sixth of the rows have been
    assigned, so that the passes read few dead rows and the memory stays near one copy."""

    def __init__(self, x64: torch.Tensor, sq64: torch.Tensor, block_size: int) -> None:
        self.rows = np.arange(x64.shape[0])  # original row index of each packed row
        self.x64, self.sq64 = x64, sq64
        self.alive = np.ones(x64.shape[0], dtype=bool)
        self.position = self.rows.copy()  # packed position of each original row; -1 once packed away
        self.block_size = block_size

    def on_device(self, values: np.ndarray) -> torch.Tensor:
        """A host array as a tensor on the device of the passes (no copy on the CPU)."""
        return torch.as_tensor(values, device=self.x64.device)

    def leave(self, rows: np.ndarray) -> None:
        self.alive[self.position[rows]] = False

    def sparse(self) -> bool:
        return np.count_nonzero(self.alive) <= 5 * self.alive.size // 6

    def compact(self) -> None:
        """Drop the assigned rows, in place."""
        keep = np.flatnonzero(self.alive)
        self.x64, self.sq64 = (_compacted(values, self.on_device(keep), self.block_size)
                               for values in (self.x64, self.sq64))
        self.rows = self.rows[keep]
        self.alive = np.ones(keep.size, dtype=bool)
        self.position.fill(-1)
        self.position[self.rows] = np.arange(keep.size)

    def sums_and_nearest(self, groups: np.ndarray, x: np.ndarray, sq_norms: np.ndarray, first_copy: np.ndarray,
                         length: int, product_size: int, threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each group (its centred vector and squared norm): its float64 summed distance to the unassigned
        points, and the original rows and squared distances of its `length` nearest ones (itself excluded).
        Reads the packed rows in place (a gather of the live ones would cost as much as the product)."""
        sums = np.empty(groups.size)
        list_idx = np.empty((groups.size, length), dtype=np.int64)
        list_d2 = np.empty((groups.size, length))
        packed_groups, dead = first_copy[self.rows], self.on_device(np.flatnonzero(~self.alive))
        chunk = max(1, product_size // self.rows.size)
        for start in range(0, groups.size, chunk):
            part = slice(start, start + chunk)
            chosen = groups[part]
            # copies of a chosen vector (itself included) are at exactly 0
            copies = np.flatnonzero(np.isin(packed_groups, chosen))
            same = self.on_device(packed_groups[copies][None, :] == chosen[:, None])
            own = self.position[chosen]  # -1 where the group's first row was assigned and packed away
            chosen_at, own = self.on_device(np.flatnonzero(own >= 0)), self.on_device(own[own >= 0])
            copies = self.on_device(copies)
            # The elementwise passes over the product are as long as it is wide: all threads for them too.
            with cpu_threads(threads if chosen.size * self.x64.numel() >= PARALLEL_PRODUCT else 1):
                d2 = squared_distances(self.on_device(x[part]), self.on_device(sq_norms[part]), self.x64, self.sq64)
                d2[:, copies] = torch.where(same, 0.0, d2[:, copies])
                d2[:, dead] = torch.inf  # neither dead rows nor itself in the lists
                d2[chosen_at, own] = torch.inf
                nearest = d2.topk(length, dim=1, largest=False)
                list_d2[part] = nearest.values.cpu().numpy()
                list_idx[part] = self.rows[nearest.indices.cpu().numpy()]
                d2[:, dead] = 0.0  # dead rows count 0 in the sums, and so does itself
                d2[chosen_at, own] = 0.0
                sums[part] = d2.sqrt_().sum(1).cpu().numpy()
        return sums, list_idx, list_d2


class _Bounds:
    """Upper bounds of the live groups' sums outside the exact tier, from each one's per-cell terms
    (`_CellSums.terms`) with the cells' counts of now; -inf for every other row: copies (a group's sum is
    kept at its first row), dead groups and the tier's members. Points only leave the cells, so a bound
    taken earlier still holds: each is only ever lowered, and most are left stale."""

    def __init__(self, cells: _CellSums, groups: np.ndarray, n: int) -> None:
        self.cells = cells
        self.values = np.full(n, -np.inf)
        self.values[groups] = np.inf
        self.terms = np.empty((n, cells.sizes.size))  # each group's, when last taken

    def take(self, groups: np.ndarray, dots: np.ndarray, sq_norms: np.ndarray) -> None:
        """New terms for the groups from their dot products with the cells' sums, and their bounds from them."""
        self.terms[groups] = self.cells.terms(dots, sq_norms)
        self.age(groups)

    def age(self, groups: np.ndarray) -> None:
        """The groups' bounds from their stored terms and the cells' counts of now (where lower): no product."""
        self.values[groups] = np.minimum(self.values[groups], self.cells.bounds(self.terms[groups]))

    def reaching(self, best: float, groups: np.ndarray | None = None) -> np.ndarray:
        """Groups (of `groups`, else of all) whose bounds the largest exact sum `best` does not certainly
        exceed: bound (1 + SUM_MARGIN) >= best (sums and bounds are never negative)."""
        threshold = best / (1.0 + SUM_MARGIN)
        if groups is None:
            return np.flatnonzero(self.values >= threshold)
        return groups[self.values[groups] >= threshold]

    def outside(self) -> int:
        """How many groups have a bound."""
        return np.count_nonzero(np.isfinite(self.values))


class _WarmRows:
    """Groups with bounds that have reached the tier's largest sum: their dot products with the cells' sums
    are updated every step (warm rows x k), which keeps their bounds fresh without a product. Fixed slots,
    so that the update is one product; `slot` gives each group's (-1 when cold)."""

    def __init__(self, size: int, dim: int, cells: int, n: int) -> None:
        self.size = size
        self.group = np.zeros(size, dtype=np.int64)
        self.x = np.zeros((size, dim))
        self.sq_norms = np.zeros(size)
        self.dots = np.zeros((size, cells))
        self.live = np.zeros(size, dtype=bool)  # slots in use
        self.slot = np.full(n, -1, dtype=np.int64)

    def groups(self) -> np.ndarray:
        return self.group[self.live]

    def add(self, groups: np.ndarray, x: np.ndarray, sq_norms: np.ndarray, dots: np.ndarray,
            bounds: np.ndarray) -> None:
        """Cold groups become warm (just refreshed: centred vectors, squared norms, dot products); when the slots
        run out, the warm groups with the lowest `bounds` go cold (their bounds stay, stale but valid)."""
        if groups.size > self.size:  # only the largest can be warm
            keep = _largest(bounds[groups], self.size)
            groups, x, sq_norms, dots = groups[keep], x[keep], sq_norms[keep], dots[keep]
        free = np.flatnonzero(~self.live)
        if free.size < groups.size:
            live = np.flatnonzero(self.live)
            lowest = live[_largest(-bounds[self.group[live]], groups.size - free.size)]
            self.drop(self.group[lowest])
            free = np.concatenate([free, lowest])
        slots = free[:groups.size]
        self.group[slots], self.x[slots], self.sq_norms[slots], self.dots[slots] = groups, x, sq_norms, dots
        self.live[slots], self.slot[groups] = True, slots

    def drop(self, groups: np.ndarray) -> None:
        """The groups stop being warm, if they were."""
        slots = self.slot[groups]
        self.live[slots[slots >= 0]] = False
        self.slot[groups] = -1

    def check_invariants(self, centred: np.ndarray, sq_norms: np.ndarray, cells: _CellSums) -> None:
        slots = np.flatnonzero(self.live)
        assert np.array_equal(self.slot[self.group[slots]], slots), "slots and groups disagree"
        assert np.count_nonzero(self.slot >= 0) == slots.size, "a group points at a free slot"
        assert np.array_equal(self.x[slots], centred) and np.array_equal(self.sq_norms[slots], sq_norms)
        assert (np.abs(self.dots[slots] - cells.dots(centred))  # each within e_dot |x| of the truth
                <= 2.0 * cells.dot_error * np.sqrt(sq_norms)[:, None]).all(), "dot products drifted"


class _ExactTier:
    """The groups that may have the largest sum: their float64 sums over the unassigned points, updated every
    step (tier x k distances; -inf once dead), and the list of nearest points each one got on entering."""

    def __init__(self, dim: int) -> None:
        self.groups, self.sums = np.zeros(0, dtype=np.int64), np.zeros(0)
        self.x, self.sq_norms = np.zeros((0, dim)), np.zeros(0)  # centred vectors, for the updates
        self.lists: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
        self.slot: dict[int, int] = {}  # each member's position

    def best(self) -> float:
        """The largest sum (-inf when no member lives)."""
        return float(self.sums.max()) if self.sums.size else -np.inf

    def tied(self, best: float) -> list[int]:
        """Members whose sums are within rounding of `best` (usually one)."""
        return self.groups[self.sums >= best - SUM_MARGIN * abs(best)].tolist()

    def admit(self, groups: np.ndarray, sums: np.ndarray, lists: list, x: np.ndarray, sq_norms: np.ndarray,
              size: int) -> tuple[np.ndarray, np.ndarray]:
        """Add the groups. The dead members go; when more than twice `size` live ones are left, the lowest
        go too (never one tied with the best), and are returned with their sums, which bound them from then on."""
        keep = np.isfinite(self.sums)
        if np.count_nonzero(keep) > 2 * size:
            live = self.sums[keep]
            best = live.max()
            keep &= self.sums >= min(np.partition(live, live.size - size)[-size], best - SUM_MARGIN * abs(best))
        dropped = np.isfinite(self.sums) & ~keep
        returned = self.groups[dropped], self.sums[dropped]
        self.groups, self.sums = np.concatenate([self.groups[keep], groups]), np.concatenate([self.sums[keep], sums])
        self.x, self.sq_norms = np.concatenate([self.x[keep], x]), np.concatenate([self.sq_norms[keep], sq_norms])
        self.lists = {group: self.lists[group] for group in self.groups[:np.count_nonzero(keep)].tolist()}
        self.lists.update(zip(groups.tolist(), lists))
        self.slot = {group: slot for slot, group in enumerate(self.groups.tolist())}
        return returned

    def leave(self, x: np.ndarray, sq_norms: np.ndarray, member_groups: np.ndarray) -> None:
        """Newly assigned rows (centred vectors, squared norms, groups) leave every member's sum."""
        distances = np.sqrt(_host_squared_distances(self.x, self.sq_norms, x, sq_norms))
        for column, group in enumerate(member_groups.tolist()):
            if group in self.slot:  # a copy of a member's vector: exactly 0
                distances[self.slot[group], column] = 0.0
        self.sums -= distances.sum(1)

    def kill(self, dead_groups: list[int]) -> None:
        self.sums[np.array([self.slot[group] for group in dead_groups if group in self.slot], dtype=np.int64)] = -np.inf

    def check_invariants(self, centred: np.ndarray, sq_norms: np.ndarray) -> None:
        assert np.unique(self.groups).size == self.groups.size == self.sums.size, "a member twice"
        assert self.slot == {group: slot for slot, group in enumerate(self.groups.tolist())}
        assert set(self.lists) == set(self.slot), "members and lists disagree"
        assert np.array_equal(self.x, centred) and np.array_equal(self.sq_norms, sq_norms)


class _DistanceSums:
    """Each live group's summed distance to the unassigned points, for picking the pivot: the exact sums
    of the `_ExactTier`, and `_Bounds` for all other live groups, fresh for the `_WarmRows`.

    A group enters the tier when its fresh bound still reaches the tier's largest sum, with one pass over
    the unassigned points (`_LivePoints`) for its exact sum and its list of nearest points. Those passes
    run on the device; everything else (a few hundred values a step) in host arrays, where a small
    operation costs a few microseconds rather than a torch call's ten.
    """

    def __init__(self, points: torch.Tensor, host_points: np.ndarray, first_copy: np.ndarray, top_size: int,
                 list_length: int, block_size: int, threads: int, cells: int) -> None:
        self.host_points, self.first_copy = host_points, first_copy
        x = points.to(torch.float64, copy=True)
        mean = x.mean(0)
        x -= mean  # centring shrinks the norms, and with them the Gram rounding error
        sq_norms = torch.cat([x[start:start + block_size].square().sum(1)  # by blocks: no second copy of x
                              for start in range(0, x.shape[0], block_size)])
        # host copies (a copy of the norms: the packed ones are compacted in place)
        self.mean, self.sq_norms = mean.cpu().numpy(), sq_norms.cpu().numpy().copy()
        self.top_size, self.min_newcomers = top_size, max(1, top_size // 4)
        self.threads = threads  # for the large products; everything else runs on one
        self.list_length = list_length
        # float64 rows' norms: summed in float64. Their bound serves the neighbour choices, which compare with
        # the input's own distances: the centring rounds each coordinate of x - mean (u relative), which moves
        # a distance by at most u (|a| + |b|), and so its square by at most (4 + 2 u) u S.
        self.error64 = gram_error_factor(x.shape[1], F64_UNIT, norm_error=x.shape[1] * F64_UNIT) + 4.01 * F64_UNIT
        n = x.shape[0]
        self.product_size = 8 * block_size * block_size  # elements of a product's result, to bound the memory
        cells = min(cells, n)
        with cpu_threads(threads):
            self.cells = _CellSums(x, sq_norms, _cells(x, sq_norms, cells), cells)
        self.packed = _LivePoints(x, sq_norms, block_size)
        groups = np.flatnonzero(first_copy == np.arange(n))
        self.bounds = _Bounds(self.cells, groups, n)
        for start in range(0, groups.size, block_size):
            self._refresh(groups[start:start + block_size])
        self.warm = _WarmRows(2 * top_size, x.shape[1], cells, n)
        self.tier = _ExactTier(x.shape[1])

    def centred(self, rows: np.ndarray | list[int]) -> np.ndarray:
        """Centred float64 rows by original index, bit for bit as in the packed copy (which has
        dropped assigned rows, and holds each group's vector at its first row only while it lives)."""
        return self.host_points[rows].astype(np.float64) - self.mean

    def best_groups(self) -> list[int]:
        """Groups whose sums are within rounding of the largest (usually one)."""
        while True:
            best = self.tier.best()
            if best == -np.inf:  # no live group in the tier
                self._admit(np.zeros(0, dtype=np.int64))
                continue
            reaching = self.bounds.reaching(best)
            if reaching.size == 0:
                return self.tier.tied(best)
            self._tighten(reaching)  # their bounds may just be stale
            cold = self.bounds.reaching(best, reaching[self.warm.slot[reaching] < 0])
            if cold.size:
                self._warm_up(cold)
            reaching = self.bounds.reaching(best, reaching)
            if reaching.size:
                self._admit(reaching)

    def _refresh(self, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The groups' bounds from a product with the cells' sums; returns their centred vectors, squared norms
        and dot products with those sums."""
        x, sq_norms = self.centred(groups), self.sq_norms[groups]
        dots = self.cells.dots(x)
        self.bounds.take(groups, dots, sq_norms)
        return x, sq_norms, dots

    def _warm_up(self, groups: np.ndarray) -> None:
        self.warm.add(groups, *self._refresh(groups), self.bounds.values)

    def _tighten(self, groups: np.ndarray) -> None:
        """The groups' bounds with no pass over the data: fresh for the warm ones (from their dot products),
        from the stored terms and the cells' counts of now for the cold ones."""
        slots = self.warm.slot[groups]
        warm = slots >= 0
        self.bounds.take(groups[warm], self.warm.dots[slots[warm]], self.warm.sq_norms[slots[warm]])
        self.bounds.age(groups[~warm])

    def _admit(self, needed: np.ndarray) -> None:
        """Bring into the exact tier the groups `needed` (the largest `top_size` of them, all with fresh bounds),
        topped up to `min_newcomers` with the largest fresh bounds outside: one pass over the unassigned points
        costs about as much for dozens of groups as for one."""
        needed = needed[_largest(self.bounds.values[needed], self.top_size)]
        self._leave_bounds(needed)
        extra = min(self.min_newcomers - needed.size, self.bounds.outside())
        if extra > 0:
            picked = self._largest_fresh(extra)
            self._leave_bounds(picked)
            needed = np.concatenate([needed, picked])
        if self.packed.sparse():
            self.packed.compact()
        x, sq_norms = self.centred(needed), self.sq_norms[needed]
        p = self.packed
        alive_count = np.count_nonzero(p.alive)
        length = min(self.list_length, alive_count - 1)
        sums, list_idx, list_d2 = p.sums_and_nearest(needed, x, sq_norms, self.first_copy, length,
                                                     self.product_size, self.threads)
        if length == alive_count - 1:  # every other point is listed
            outside = np.full(needed.size, np.inf)
        else:  # a squared distance below which no unlisted point lies
            outside = list_d2[:, -1] - self.error64 * (sq_norms + p.sq64.max().item())
        dropped, dropped_sums = self.tier.admit(needed, sums, list(zip(list_idx, list_d2, outside.tolist())), x,
                                                sq_norms, self.top_size)
        self.bounds.values[dropped] = dropped_sums  # exact sums only shrink: they bound from then on

    def _leave_bounds(self, groups: np.ndarray) -> None:
        self.bounds.values[groups] = -np.inf
        self.warm.drop(groups)

    def _largest_fresh(self, count: int) -> np.ndarray:
        """The `count` groups with the largest fresh bounds: the warm ones, and if too few, the largest stale
        ones refreshed."""
        pool = self.warm.groups()
        self._tighten(pool)
        if pool.size < count:
            pool = _largest(self.bounds.values, min(4 * count, self.bounds.outside()))
            cold = pool[self.warm.slot[pool] < 0]
            if cold.size:
                self._warm_up(cold)
        return pool[_largest(self.bounds.values[pool], count)]

    def neighbour_list(self, group: int) -> tuple[np.ndarray, np.ndarray, float]:
        """The group's listed nearest points, their squared distances, and a squared distance
        below which no unlisted point lies (all taken when it entered the exact tier)."""
        return self.tier.lists[group]

    def scan(self, pivot: int) -> tuple[np.ndarray, np.ndarray]:
        """The other unassigned rows and their squared distances to the pivot (from the packed copy)."""
        p = self.packed
        d2 = squared_distances(p.on_device(self.centred([pivot])), p.on_device(self.sq_norms[[pivot]]),
                               p.x64, p.sq64)[0].cpu().numpy()
        alive = np.flatnonzero(p.alive & (p.rows != pivot))
        return p.rows[alive], d2[alive]

    def remove(self, members: np.ndarray, member_groups: np.ndarray, dead_groups: list[int]) -> None:
        """Account for newly assigned rows; `dead_groups` have no unassigned copy left."""
        x, sq_norms = self.centred(members), self.sq_norms[members]
        self.tier.leave(x, sq_norms, member_groups)
        self.cells.leave(x, sq_norms, members)
        self.cells.update_dots(self.warm.dots, self.warm.x, x, members)
        if dead_groups:
            dead = np.array(dead_groups, dtype=np.int64)
            self._leave_bounds(dead)
            self.tier.kill(dead_groups)
        self.packed.leave(members)

    def check_invariants(self) -> None:
        """For tests, O(N D): every live group is in the tier or has a bound, never both; warm groups have
        bounds; every copy of a row's vector, norm and position agrees with the points."""
        p = self.packed
        live = np.zeros(self.first_copy.size, dtype=bool)
        live[self.first_copy[p.rows[p.alive]]] = True
        in_tier = np.zeros_like(live)
        in_tier[self.tier.groups[np.isfinite(self.tier.sums)]] = True
        assert not (in_tier & ~live).any(), "a dead group's sum is still finite"
        assert np.array_equal(np.isfinite(self.bounds.values), live & ~in_tier), "a live group is lost or counted twice"
        assert (self.bounds.values[live & ~in_tier] >= 0).all()
        assert np.isfinite(self.bounds.values[self.warm.groups()]).all(), "a warm group has no bound"
        self.tier.check_invariants(self.centred(self.tier.groups), self.sq_norms[self.tier.groups])
        warm = self.warm.groups()
        self.warm.check_invariants(self.centred(warm), self.sq_norms[warm], self.cells)
        assert np.array_equal(p.position[p.rows], np.arange(p.rows.size))
        assert np.count_nonzero(p.position >= 0) == p.rows.size, "a row packed away still has a position"
        assert np.array_equal(p.x64.cpu().numpy()[p.alive], self.centred(p.rows[p.alive]))
        assert np.array_equal(p.sq64.cpu().numpy()[p.alive], self.sq_norms[p.rows[p.alive]])


def ksame_clusters(embeddings: torch.Tensor | np.ndarray, k: int, device: torch.device,
                   block_size: int = 1024, top_size: int = 128, list_length: int = 64, cells: int = 16) -> np.ndarray:
    """Row indices of the k-Same clusters (num_clusters x k, int64), in the order they are formed.

    Each row lists the pivot first, then its neighbours by increasing distance (ties: lowest
    index). The last N mod k rows are left out, as in the reference. `block_size`, `top_size`,
    `list_length` and `cells` trade memory for speed; the result does not depend on them.
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

    host_points = np.ascontiguousarray(embeddings[:n])  # for exact distances, and the rows of each step
    points = torch.as_tensor(host_points, device=device)
    unassigned = np.ones(n, dtype=bool)
    clusters = np.empty((n // k, k), dtype=np.int64)
    threads = torch.get_num_threads()
    with one_cpu_thread():  # small ops: a second thread costs more than it gains, above all on a busy machine
        pivot_sums = _DistanceSums(points, host_points, first_copy, top_size, min(max(list_length, 2 * k), n - 1),
                                   block_size, threads, cells)
        host_sq_norms, error = pivot_sums.sq_norms, pivot_sums.error64
        for step in tqdm(range(n // k), desc=f"k-Same (k={k})", leave=False, disable=None):
            # Sums this close may be equal in exact arithmetic (always so when two points are
            # left): settle them with exact sums, then by the lowest row index.
            tied = pivot_sums.best_groups()
            if len(tied) > 1:
                tied_t = torch.tensor(tied, device=device)
                exact = _exact_sums(points, tied_t, torch.as_tensor(np.flatnonzero(unassigned), device=device),
                                    block_size)
                tied = tied_t[exact == exact.max()].tolist()
            pivot = min(next(row for row in copies[group] if unassigned[row]) if group in copies else group
                        for group in tied)
            unassigned[pivot] = False

            listed, listed_d2, outside_d2 = pivot_sums.neighbour_list(int(first_copy[pivot]))
            still = unassigned[listed]
            neighbours = _closest(host_points, host_sq_norms, error, pivot, listed[still], listed_d2[still], k - 1,
                                  outside_d2)
            if neighbours is None:  # the list ran out: scan every unassigned row
                rows, approx_d2 = pivot_sums.scan(pivot)
                neighbours = _closest(host_points, host_sq_norms, error, pivot, rows, approx_d2, k - 1, np.inf)
            clusters[step, 0], clusters[step, 1:] = pivot, neighbours
            unassigned[neighbours] = False

            member_groups = first_copy[clusters[step]]
            dead_groups = []
            for group in member_groups.tolist():
                group_left[group] -= 1
                if group_left[group] == 0:
                    dead_groups.append(group)
            pivot_sums.remove(clusters[step], member_groups, dead_groups)
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
