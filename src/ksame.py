"""k-Same anonymization: the reference's exact greedy clustering without an N x N matrix.

The reference procedure (label-blind): drop the last N mod k rows; then, while points
are left, take the unassigned point whose summed Euclidean distance to all unassigned
points is largest (the pivot), join it with its k-1 nearest unassigned points, and mark
the k points assigned. Every member is replaced by its cluster mean and keeps its label.
Ties go to the lowest row index.

The reference materialises the N x N distance matrix and rescans it every step. Here
memory is one float64 and one float32 copy of the centred points (packed again as points
are assigned), and the work is close to two float32 passes over all pairs:

- One blocked float32 pass over all pairs gives each point's distance sum with a certified
  error bound (`_bounded_sums`); estimate + bound is an upper bound of the sum, which only
  shrinks as points are assigned.
- `_DistanceSums` keeps three tiers: a small top tier with exact float64 sums updated every
  step, a middle tier of float32 estimates updated every few steps, and the rest updated in
  one wide float32 product every few dozen steps, except a tail of estimates far below the
  maximum, updated only when one of them may come near it, in one product as wide as all the
  rows it has missed. A tier is brought up to date only when the one above can no longer
  certify the maximum.
- The first pass also gives each point a certified lower bound of the distance to its nearest
  other point. A sum that still lacks some assigned rows is above the truth by at least their
  summed nearest distances, so a stale tier's largest bound less that drop still bounds it:
  most of the staleness is covered without a product.
- On a CPU, the float32 products run as blocks of rows side by side, one per thread, so that
  each block's result stays in cache through the elementwise passes that follow the product.
- A group entering the top tier gets its exact sum and its list of nearest points from one
  float64 pass over the unassigned points; the pivot's neighbours come from that list while
  it still holds enough unassigned points provably nearer than anything outside it, else from
  one scan of all rows.

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

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Iterator, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from src.cli import UserError
from src.runtime import cpu_threads, one_cpu_thread

SUM_MARGIN = 1e-10  # relative; float64 sums of N distances err by ~1e-13, far below this
F64_UNIT, F32_UNIT = 2.0 ** -53, 2.0 ** -24  # unit roundoff
PARALLEL_PRODUCT = 2 ** 27  # multiply-adds from which a product gets every CPU thread; all else runs on one
TAIL_GAP = 0.02  # estimates this far (relative) below the largest exact sum are updated less often ...
TAIL_DUE = 0.005  # ... until one of them may come this close to it
FEW_ROWS = 64  # a product with fewer rows than this on one side runs with them on the left
SUM_CHUNK = 64  # float32 distances are added in runs of this many, and the runs' sums in float64


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


def float32_error_factor(dim: int) -> float:
    """`gram_error_factor` of the float32 rows, whose squared norms are summed in float64 and then
    rounded to float32."""
    return gram_error_factor(dim, F32_UNIT, norm_error=F32_UNIT + dim * F64_UNIT)


def squared_distances(a: torch.Tensor, a_sq_norms: torch.Tensor, b: torch.Tensor, b_sq_norms: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances between the rows of a and b by the Gram form, clamped at 0
    (the product added in place onto the summed norms: one tensor the size of the result, taken
    from the front of `out` when given). When b has few rows, the product runs with them on the
    left and the result comes back transposed: a product with few rows on the left reads the other
    operand once, about twice as fast for 5-10 rows against 1,024 on one CPU thread."""
    if b.shape[0] < min(a.shape[0], FEW_ROWS):
        return squared_distances(b, b_sq_norms, a, a_sq_norms, out).T
    total = a_sq_norms[:, None] + b_sq_norms[None, :] if out is None else \
        torch.add(a_sq_norms[:, None], b_sq_norms[None, :], out=out[:a.shape[0] * b.shape[0]].view(a.shape[0], -1))
    return total.addmm_(a, b.T, alpha=-2.0).clamp_(min=0.0)


@contextmanager
def _full_float32_products() -> Iterator[None]:
    """Keep float32 products in full float32 inside (no TF32 or bfloat16 shortcuts), since the
    certified error bounds assume a 24-bit mantissa."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


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


def _float64_sums(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Sums of float32 values along `dim` in float64, within SUM_CHUNK u of the sum of their sizes: float32
    sums of SUM_CHUNK values at a time, added in float64 (no float64 copy of the values, which a
    `sum(dtype=torch.float64)` makes, and which kept 1.1 GB in the pool threads' arenas at N = 100,000)."""
    size = values.shape[dim]
    whole = size - size % SUM_CHUNK
    total = values.narrow(dim, whole, size - whole).sum(dim, dtype=torch.float64)
    if whole:
        runs = values.narrow(dim, 0, whole).unflatten(dim, (whole // SUM_CHUNK, SUM_CHUNK)).sum(dim + 1)
        total += runs.sum(dim, dtype=torch.float64)
    return total


class BoundedSums(NamedTuple):
    """One side of `_bounded_sums`, in float64: each row's distance sum, a bound on that sum's error, and
    a lower bound of the row's distance to its nearest row on the other side."""
    sums: torch.Tensor
    bounds: torch.Tensor
    nearest: torch.Tensor


def _bounded_sums(a: torch.Tensor, a_sq: torch.Tensor, a_slack: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor,
                  b_slack: torch.Tensor, factor: float, diagonal: bool, both_sides: bool,
                  threads: int = 1, out: torch.Tensor | None = None) -> list[BoundedSums]:
    """Float32 distance sums between the rows of a and b, with rigorous bounds on their error.

    Returns the rows' side and, with `both_sides`, the columns' side (`BoundedSums`).
    The Gram form errs by at most e = factor (|a|^2 + |b|^2) on each squared distance, so a distance
    computed as d errs by at most |d^2 - t^2| / (d + t) <= e / (d + sqrt(d^2 - e)) (t the true one) where
    d^2 >= e, and by at most sqrt(e) elsewhere; this is bounded per row through the row's largest e and
    smallest d, which also makes it a bound of every distance in the row, the nearest included.
    `*_slack` hold each row's float32 rounding distance |x32 - x| (covering the cast from the float64
    data); a final (SUM_CHUNK + 2) u of the sum covers the rounding of the square roots
    (u each) and of the sums (`_float64_sums`).
    With `diagonal`, a and b are the same rows, and self distances count as exactly 0. `out`, when
    given, is a float32 buffer of at least len(a) x len(b) elements that holds the distances.
    """
    with cpu_threads(threads if a.shape[0] * b.shape[0] * a.shape[1] >= PARALLEL_PRODUCT else 1):
        d = squared_distances(a, a_sq.float(), b, b_sq.float(), out).sqrt_()
        if diagonal:
            d.fill_diagonal_(torch.inf)
        sides = [(d.amin(1), a_sq, b_sq.max(), a_slack, b_slack.max(), d.shape[1])]
        if both_sides:
            sides.append((d.amin(0), b_sq, a_sq.max(), b_slack, a_slack.max(), d.shape[0]))
        if diagonal:
            d.fill_diagonal_(0.0)
        sums = [_float64_sums(d, 1)] + ([_float64_sums(d, 0)] if both_sides else [])
    result = []
    for total, (nearest, own_sq, other_sq, own_slack, other_slack, count) in zip(sums, sides):
        gram = factor * (own_sq + other_sq)
        nearest = nearest.double() * (1.0 - 4.0 * F32_UNIT)  # below the square root before its rounding
        denominator = torch.maximum(nearest + (nearest.square() - gram).clamp_(min=0.0).sqrt_(), gram.sqrt())
        each = gram / denominator.clamp_(min=torch.finfo(torch.float64).tiny) + own_slack + other_slack
        bound = count * each + (SUM_CHUNK + 2) * F32_UNIT * total
        result.append(BoundedSums(total, bound, (nearest - each).clamp_(min=0.0)))
    return result


def _float32_copy(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows in float32, their squared norms, and their distances to the float64 rows they round
    (by row blocks, so that no second float64 copy of the matrix is made)."""
    x32 = x.float()
    sq32 = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    slack32 = torch.empty_like(sq32)
    for start in range(0, x.shape[0], block_size):
        rows = slice(start, start + block_size)
        as64 = x32[rows].double()
        sq32[rows] = as64.square().sum(1)
        slack32[rows] = (as64 - x[rows]).square_().sum(1).sqrt_()
    return x32, sq32, slack32


def _compacted(values: torch.Tensor, keep: torch.Tensor, block_size: int) -> torch.Tensor:
    """values[keep] written over the front of `values` itself, by blocks (keep is increasing, so no
    block reads a row that an earlier block overwrote): no second copy of the matrix is made."""
    for start in range(0, keep.numel(), block_size):
        chunk = keep[start:start + block_size]
        values[start:start + chunk.numel()] = values[chunk]
    return values[:keep.numel()]


class _LivePoints:
    """The unassigned points packed together (the only float64 and float32 copies of the centred
    points), for the products over all of them.

    The float64 rows keep the input order; the float32 rows are sorted by decreasing distance sum
    whenever they are packed, so that the rows far below the maximum form a tail that can be
    updated less often, in wider products. Both are packed again when a sixth of the rows have
    been assigned, so that products read few dead rows and the memory stays near one copy of each.
    """

    def __init__(self, x64: torch.Tensor, sq64: torch.Tensor, float32: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 block_size: int) -> None:
        self.rows = torch.arange(x64.shape[0], device=x64.device)  # original row index of each float64 row
        self.x64, self.sq64 = x64, sq64
        self.x32, self.sq32, self.slack32 = float32  # float32 rows, their squared norms, |x32 - x|
        self.sq32_of, self.slack32_of = self.sq32, self.slack32  # the same by original row index
        self.rows32 = self.rows.clone()  # original row index of each float32 row
        self.alive = torch.ones(x64.shape[0], dtype=torch.bool, device=x64.device)
        self.position = self.rows.clone()  # float64 position of each original row; -1 once packed away
        self.position32 = self.rows.clone()  # float32 position of each original row; -1 once packed away
        self.block_size = block_size

    def sparse(self) -> bool:
        return int(self.alive.sum()) <= 5 * self.alive.numel() // 6

    def compact(self, keys: torch.Tensor) -> None:
        """Drop the assigned rows, in place; the float32 rows sorted again by decreasing `keys`."""
        keep = self.alive.nonzero().squeeze(1)
        self.x64, self.sq64, self.rows = (_compacted(values, keep, self.block_size)
                                          for values in (self.x64, self.sq64, self.rows))
        self.alive = torch.ones(keep.numel(), dtype=torch.bool, device=keep.device)
        self.position.fill_(-1)
        self.position[self.rows] = torch.arange(keep.numel(), device=keep.device)
        self.sort_float32(keys)

    def sort_float32(self, keys: torch.Tensor) -> None:
        """The float32 rows of the packed float64 rows (all unassigned: called when packed), by
        decreasing key (ties: by row index), cast again from the float64 rows into the same buffer
        (the same values bit for bit, and no second copy)."""
        order = self.rows[keys[self.rows].argsort(descending=True, stable=True)]
        x32 = self.x32[:order.numel()]
        for start in range(0, order.numel(), self.block_size):
            rows = order[start:start + self.block_size]
            x32[start:start + rows.numel()] = self.x64[self.position[rows]]
        self.x32, self.rows32 = x32, order
        self.sq32, self.slack32 = self.sq32_of[order], self.slack32_of[order]
        self.position32.fill_(-1)
        self.position32[order] = torch.arange(order.numel(), device=order.device)


def _beats(value: float, bound: float) -> bool:
    """Whether an exact sum is certainly larger than every sum bounded by `bound`."""
    return bound == -np.inf or value > bound + SUM_MARGIN * abs(bound)


class _DistanceSums:
    """Each live group's summed distance to the unassigned points, for picking the pivot.

    Three tiers, each brought up to date only when the one above can no longer certify the maximum:
    - top: the largest sums, exact in float64, updated every step (top x k distances);
    - middle (mid_factor x larger): float32 estimates with certified error bounds, updated together
      (one product with the rows assigned since) every few steps;
    - all others: the same estimates, updated in one wide float32 product every few dozen steps,
      except a tail far below the maximum (`_set_tail_aside`), updated only when it may reach it.
    An estimate + its bound is an upper bound of the true sum, since sums only shrink. Groups
    entering the top tier get their exact sum from one float64 pass over the unassigned points,
    which also gives their list of nearest points for the neighbour search.
    """

    def __init__(self, points: torch.Tensor, first_copy: torch.Tensor, top_size: int, list_length: int,
                 block_size: int, threads: int, pool: ThreadPoolExecutor | None, mid_factor: int = 4) -> None:
        self.points, self.first_copy = points, first_copy
        x = points.to(torch.float64, copy=True)
        self.mean = x.mean(0)
        x -= self.mean  # centring shrinks the norms, and with them the Gram rounding error
        self.sq_norms = torch.cat([x[start:start + block_size].square().sum(1)  # by blocks: no second copy of x
                                   for start in range(0, x.shape[0], block_size)])
        self.top_size = top_size
        self.default_mid_size = self.mid_size = mid_factor * top_size
        self.threads = threads  # for the large products; everything else runs on one
        self.pool = pool  # CPU threads for the float32 row blocks, one block each (None: one product on all)
        self.thread_buffers = threading.local()  # each pool thread's buffer for its products' results
        self.list_length, self.block_size = list_length, block_size
        self.min_newcomers = max(1, top_size // 4)
        # float64 rows' norms: summed in float64. Their bound serves the neighbour choices, which compare with
        # the input's own distances: the centring rounds each coordinate of x - mean (u relative), which moves
        # a distance by at most u (|a| + |b|), and so its square by at most (4 + 2 u) u S.
        self.error64 = gram_error_factor(x.shape[1], F64_UNIT, norm_error=x.shape[1] * F64_UNIT) + 4.01 * F64_UNIT
        self.error32 = float32_error_factor(x.shape[1])
        n = x.shape[0]
        self.device = x.device
        self.product_size = 8 * block_size * block_size  # elements of a product's result, to bound the memory
        self.packed = _LivePoints(x, self.sq_norms.clone(), _float32_copy(x, block_size), block_size)
        self.sums, self.bounds, self.nearest = self._initial_sums()
        self.sums[first_copy != torch.arange(n, device=self.device)] = -torch.inf  # copies: kept at the first
        self.live = int(torch.isfinite(self.sums).sum())
        self.packed.sort_float32(self.sums + self.bounds)
        # The float32 rows from tail_start on are the tail: their estimates still lack the rows
        # assigned since it was set aside (tail_pending), and none is above tail_outside.
        self.tail_start = self.packed.rows32.numel()
        self.tail_pending: list[torch.Tensor] = []
        self.tail_outside = -np.inf
        self.pending: list[torch.Tensor] = []  # assigned since the last update of all estimates
        self.mid_pending: list[torch.Tensor] = []  # assigned since the last update of the middle tier
        # Each assigned row j is at least nearest[j] from every other point, so a sum that still lacks the
        # rows of a pending list is at least their summed `nearest` (its drop) above the truth: the largest
        # stale bound of a tier, less its drop, still bounds every sum in it.
        self.drop = self.mid_drop = self.tail_drop = 0.0
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        self.top, self.mid = empty, empty
        self.top_exact = torch.zeros(0, dtype=torch.float64, device=self.device)
        self.lists: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
        self.slots: dict[int, int] = {}
        self.outside = self.mid_outside = np.inf  # largest bound outside the tiers and the tail / in the middle tier

    def centred(self, rows: torch.Tensor | list[int]) -> torch.Tensor:
        """Centred float64 rows by original index, bit for bit as in the packed copy (which has
        dropped assigned rows, and holds each group's vector at its first row only while it lives)."""
        return self.points[rows].to(torch.float64) - self.mean

    def _initial_sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float32 sums over all pairs with their bounds, and lower bounds of each point's distance to its
        nearest other point, each pair of row blocks visited once."""
        p = self.packed
        n = p.rows.numel()
        sums = torch.zeros(n, dtype=torch.float64, device=self.device)
        bounds = torch.zeros_like(sums)
        nearest = torch.full_like(sums, torch.inf)
        pairs = [(i0, j0) for i0 in range(0, n, self.block_size) for j0 in range(i0, n, self.block_size)]
        # With a CPU pool, two blocks run side by side, one per thread (as in the bulk updates).
        run, threads = (map, self.threads) if self.pool is None else (self.pool.map, 1)

        def block_sums(pair: tuple[int, int]) -> list[BoundedSums]:
            rows, cols = (slice(start, start + self.block_size) for start in pair)
            out = self._thread_buffer(self.block_size ** 2) if self.pool else None
            return _bounded_sums(p.x32[rows], p.sq32[rows], p.slack32[rows], p.x32[cols], p.sq32[cols],
                                 p.slack32[cols], self.error32, pair[0] == pair[1], pair[0] != pair[1], threads, out)

        for (i0, j0), block in tqdm(zip(pairs, run(block_sums, pairs)), total=len(pairs),
                                    desc="k-Same distance sums", leave=False, disable=None):
            for span, side in zip((slice(i0, i0 + self.block_size), slice(j0, j0 + self.block_size)), block):
                sums[span] += side.sums
                bounds[span] += side.bounds
                torch.minimum(nearest[span], side.nearest, out=nearest[span])
        return sums, bounds, nearest

    def _thread_buffer(self, size: int) -> torch.Tensor:
        """This thread's float32 buffer of at least `size` elements. Reused, so that the pool's threads
        do not leave freed results scattered over their own malloc arenas (at N = 100,000 that kept
        about 0.65 GB resident)."""
        buffer = getattr(self.thread_buffers, "buffer", None)
        if buffer is None or buffer.numel() < size:
            buffer = self.thread_buffers.buffer = torch.empty(size, dtype=torch.float32, device=self.device)
        return buffer

    def _best(self) -> float:
        """The largest exact sum in the top tier (-inf when it is empty)."""
        return self.top_exact.max().item() if self.top.numel() else -np.inf

    def _tail_due(self, best: float) -> bool:
        """Whether a tail estimate may come within TAIL_DUE of the largest exact sum."""
        return self.tail_start < self.packed.rows32.numel() and not _beats(best * (1.0 - TAIL_DUE), self._tail_bound())

    def _tail_bound(self) -> float:
        """An upper bound of every tail sum: its rows miss both the tail's pending rows and the others'."""
        return self.tail_outside - self.tail_drop - self.drop

    def _outside_bound(self) -> float:
        """An upper bound of every sum outside the top and middle tiers, the tail's included."""
        return max(self.outside - self.drop, self._tail_bound())

    def best_groups(self) -> list[int]:
        """Groups whose sums are within rounding of the largest (usually one)."""
        while True:
            best = self._best()
            beaten_inside = not _beats(best, self.mid_outside - self.mid_drop)
            if _beats(best, self._outside_bound()) and not beaten_inside:
                return self.top[self.top_exact >= best - SUM_MARGIN * abs(best)].tolist()
            if beaten_inside and self.top.numel():
                if self.mid_pending:  # the middle tier's bounds may just be stale
                    self._update_mid()
                    self.mid_outside = (self.sums[self.mid] + self.bounds[self.mid]).max().item() \
                        if self.mid.numel() else -np.inf
                else:
                    self._choose_top()
            else:
                if self.pending or self._tail_due(best):
                    self.mid_size = self.default_mid_size
                elif self.top.numel():  # below a bound outside the middle tier: widen it
                    self.mid_size *= 2
                self._update_all()
                self._choose_mid()
                self._choose_top()

    def neighbour_list(self, group: int) -> tuple[np.ndarray, np.ndarray, float]:
        """The group's listed nearest points, their squared distances, and a squared distance
        below which no unlisted point lies (all taken when it entered the top set)."""
        return self.lists[group]

    def scan(self, pivot: int) -> tuple[np.ndarray, np.ndarray]:
        """The other unassigned rows and their squared distances to the pivot (from the packed copy)."""
        p = self.packed
        d2 = squared_distances(self.centred([pivot]), self.sq_norms[[pivot]], p.x64, p.sq64)[0]
        alive = (p.alive & (p.rows != pivot)).nonzero().squeeze(1)
        return p.rows[alive].cpu().numpy(), d2[alive].cpu().numpy()

    def remove(self, members: np.ndarray, member_groups: np.ndarray, dead_groups: list[int]) -> None:
        """Account for newly assigned rows; `dead_groups` have no unassigned copy left."""
        rows = torch.as_tensor(members, device=self.device)
        distances = squared_distances(self.top_x, self.top_sq_norms, self.centred(rows), self.sq_norms[rows]).sqrt_()
        for column, group in enumerate(member_groups.tolist()):
            if group in self.slots:  # a copy of a top-tier vector: exactly 0
                distances[self.slots[group], column] = 0.0
        self.top_exact -= distances.sum(1)
        if dead_groups:
            self.sums[torch.tensor(dead_groups, device=self.device)] = -torch.inf
            dead_slots = [self.slots[group] for group in dead_groups if group in self.slots]
            self.top_exact[torch.tensor(dead_slots, dtype=torch.long, device=self.device)] = -torch.inf
            self.live -= len(dead_groups)
        self.packed.alive[self.packed.position[rows]] = False
        self.pending.append(rows)
        self.mid_pending.append(rows)
        drop = self.nearest[rows].sum().item()
        self.drop += drop
        self.mid_drop += drop

    def _float32_of(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float32 copies, squared norms and rounding distances of rows, by original index. A group's
        first row may have been assigned and packed away while copies of it are left: that one is
        cast again from the float64 rows (the same vector, so the same float32 copy)."""
        at = self.packed.position32[rows]
        x32 = self.packed.x32[at.clamp(min=0)]
        absent = at < 0
        if bool(absent.any()):
            x32[absent] = self.centred(rows[absent]).float()
        return x32, self.packed.sq32_of[rows], self.packed.slack32_of[rows]

    def _subtract_from_mid(self, assigned: torch.Tensor) -> None:
        """The middle tier's float32 estimates lose their distances to the `assigned` rows."""
        total, bound, _ = _bounded_sums(self.mid_x32, self.mid_sq32, self.mid_slack32, *self._float32_of(assigned),
                                        self.error32, False, False)[0]
        self.sums[self.mid] -= total
        self.bounds[self.mid] += bound

    def _update_mid(self) -> None:
        if self.mid_pending:
            self._subtract_from_mid(torch.cat(self.mid_pending))
        self.mid_pending, self.mid_drop = [], 0.0

    def _update_all(self) -> None:
        """All estimates up to date, or else certainly below TAIL_DUE of the largest exact sum: the
        middle tier from its own pending rows, the rest in wide products over the packed points."""
        self._update_mid()
        if self.pending or self._tail_due(self._best()):
            self._subtract_from_all()

    def _subtract_from_all(self) -> None:
        """The estimates outside the middle tier lose their distances to the rows assigned since:
        the float32 rows before the tail at every call, the tail only when due (or before the rows
        are packed again), in one product as wide as all the rows it has missed. Then, if there is
        no tail, the float32 rows whose estimates are far below the largest exact sum become one."""
        p = self.packed
        end = p.rows32.numel()
        if self.pending:
            assigned = torch.cat(self.pending)
            self._subtract_rows(slice(0, self.tail_start), assigned)
            if self.tail_start < end:
                self.tail_pending.append(assigned)
                self.tail_drop += self.drop
        self.pending, self.drop = [], 0.0
        sparse, best = p.sparse(), self._best()
        if self.tail_start < end and (sparse or self._tail_due(best)):
            self._subtract_rows(slice(self.tail_start, end), torch.cat(self.tail_pending))
            self.tail_start, self.tail_pending, self.tail_outside, self.tail_drop = end, [], -np.inf, 0.0
        if sparse:
            p.compact(self._keys())
            self.tail_start = p.rows32.numel()
        if self.tail_start == p.rows32.numel() and self.top.numel():
            self._set_tail_aside(best)

    def _subtract_rows(self, span: slice, assigned: torch.Tensor) -> None:
        """The estimates of the float32 rows in `span` lose their distances to the `assigned` rows, except
        those that nothing reads: dead groups' (-inf), and the top and middle tiers' (their own sums
        replace them). At N = 20,000 they were a fifth of the products, mostly assigned rows not yet packed
        away (a live group's first row among them: its sum lives there)."""
        p = self.packed
        rows = p.rows32[span]
        in_tiers = torch.zeros(self.sq_norms.numel(), dtype=torch.bool, device=self.device)
        in_tiers[self.mid] = True
        in_tiers[self.top] = True
        at = (torch.isfinite(self.sums[rows]) & ~in_tiers[rows]).nonzero().squeeze(1) + span.start
        cols = p.position32[assigned]
        total, bound = self._float32_sums(at, (p.x32[cols], p.sq32[cols], p.slack32[cols]))
        rows = p.rows32[at]
        self.sums[rows] -= total
        self.bounds[rows] += bound

    def _float32_sums(self, at: torch.Tensor, cols: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounded float32 distance sums from each float32 row at positions `at` to `cols` (float32 vectors,
        their squared norms and rounding distances). With a CPU pool, blocks of rows run side by side, one
        per thread, each gathering its own rows, so that each result stays in cache through the elementwise
        passes; else products as large as the memory budget allows, on every thread."""
        p = self.packed
        count = at.numel()
        if count == 0:
            return p.sq32[:0], p.sq32[:0]
        if self.pool is None:
            chunk, threads, run = max(1, self.product_size // cols[0].shape[0]), self.threads, map
        else:
            pieces = self.threads * -(-count // (self.threads * self.block_size))  # a multiple of the threads
            chunk, threads, run = -(-count // pieces), 1, self.pool.map

        def block_sums(start: int) -> BoundedSums:
            out = self._thread_buffer(chunk * cols[0].shape[0]) if self.pool else None
            rows = at[start:start + chunk]
            return _bounded_sums(p.x32[rows], p.sq32[rows], p.slack32[rows], *cols, self.error32, False, False,
                                 threads, out)[0]

        blocks = list(run(block_sums, range(0, count, chunk)))
        return torch.cat([block.sums for block in blocks]), torch.cat([block.bounds for block in blocks])

    def _set_tail_aside(self, best: float) -> None:
        """The longest run of float32 rows at the end whose estimates are TAIL_GAP below the largest
        exact sum becomes the tail (the top and middle tiers are never in it)."""
        p = self.packed
        keys = self._keys()
        keys[self.top] = torch.inf
        keys[self.mid] = torch.inf
        keys = keys[p.rows32]
        above = (keys >= best * (1.0 - TAIL_GAP)).nonzero()
        start = int(above[-1]) + 1 if above.numel() else 0
        if p.rows32.numel() - start >= self.block_size:
            self.tail_start, self.tail_outside = start, keys[start:].max().item()

    def _keys(self) -> torch.Tensor:
        """Upper bounds of every group's current sum (exact for the top tier; -inf when dead)."""
        keys = self.sums + self.bounds
        live_top = torch.isfinite(self.top_exact)
        keys[self.top] = -torch.inf
        keys[self.top[live_top]] = self.top_exact[live_top]
        return keys

    def _choose_mid(self) -> None:
        """The middle tier: the largest bounds outside the top tier and the tail (all estimates but the
        tail's up to date)."""
        keys = self._keys()
        keys[self.top] = -torch.inf
        keys[self.packed.rows32[self.tail_start:]] = -torch.inf  # the tail stays out (its estimates lag)
        self.mid = keys.topk(min(self.mid_size, self.live)).indices
        self.mid = self.mid[torch.isfinite(keys[self.mid])]
        keys[self.mid] = -torch.inf
        self.outside = keys.max().item() if keys.numel() else -np.inf

    def _choose_top(self) -> None:
        """Admit to the top tier the middle-tier groups whose bounds reach its largest exact sum, at
        least `min_newcomers` at a time (each batch reads all unassigned points once) and at most
        `top_size`; both tiers up to date. Members stay; newcomers get exact sums and lists."""
        keys = self._keys()
        members = self.top[torch.isfinite(self.top_exact)]
        member_exact = keys[members]
        best = member_exact.max().item() if members.numel() else -np.inf
        if members.numel() > 2 * self.top_size:  # too many to update every step: the lowest go back
            kept = member_exact >= min(member_exact.topk(self.top_size).values[-1].item(),
                                       best - SUM_MARGIN * abs(best))  # never one tied with the best
            dropped = members[~kept]
            self.sums[dropped], self.bounds[dropped] = keys[dropped], 0.0
            self.mid = torch.cat([self.mid, dropped])
            members, member_exact = members[kept], member_exact[kept]
        mid_keys = keys[self.mid]
        needed = int((torch.isfinite(mid_keys) & (mid_keys >= best - SUM_MARGIN * abs(best))).sum())
        count = min(max(needed, self.min_newcomers), self.top_size, mid_keys.numel()) if needed else 0
        newcomers = self.mid[mid_keys.topk(count).indices]
        newcomers = newcomers[torch.isfinite(keys[newcomers])]
        self.mid = self.mid[~torch.isin(self.mid, newcomers)]
        self.mid_x32, self.mid_sq32, self.mid_slack32 = self._float32_of(self.mid)
        self.mid_outside = keys[self.mid].max().item() if self.mid.numel() else -np.inf
        newcomer_exact, lists = self._exact_sums_and_lists(newcomers)
        self.top, self.top_exact = torch.cat([members, newcomers]), torch.cat([member_exact, newcomer_exact])
        self.lists = {group: self.lists[group] for group in members.tolist()}
        self.lists.update(zip(newcomers.tolist(), lists))
        self.slots = {group: slot for slot, group in enumerate(self.top.tolist())}
        self.top_x, self.top_sq_norms = self.centred(self.top), self.sq_norms[self.top]

    def _exact_sums_and_lists(self, groups: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Float64 sums over the unassigned points and sorted lists of the nearest ones (self excluded).

        Reads the packed rows in place (a gather of the live ones would cost as much as the product).
        """
        p = self.packed
        alive_count = int(p.alive.sum())
        length = min(self.list_length, alive_count - 1)
        sums = torch.empty(groups.numel(), dtype=torch.float64, device=self.device)
        list_idx = torch.empty((groups.numel(), length), dtype=torch.long, device=self.device)
        list_d2 = torch.empty((groups.numel(), length), dtype=torch.float64, device=self.device)
        packed_groups, dead = self.first_copy[p.rows], (~p.alive).nonzero().squeeze(1)
        chunk = max(1, self.product_size // p.rows.numel())
        for start in range(0, groups.numel(), chunk):
            chosen = groups[start:start + chunk]
            # The elementwise passes over the product are as long as it is wide: all threads for them too.
            with cpu_threads(self.threads if chosen.numel() * p.x64.numel() >= PARALLEL_PRODUCT else 1):
                d2 = squared_distances(self.centred(chosen), self.sq_norms[chosen], p.x64, p.sq64)
                # copies of a chosen vector (itself included) are at exactly 0
                copies = torch.isin(packed_groups, chosen).nonzero().squeeze(1)
                same = packed_groups[copies][None, :] == chosen[:, None]
                d2[:, copies] = torch.where(same, 0.0, d2[:, copies])
                own = p.position[chosen]  # -1 where the group's first row was assigned and packed away
                chosen_at, own = (own >= 0).nonzero().squeeze(1), own[own >= 0]
                d2[:, dead] = torch.inf  # neither dead rows nor itself in the lists
                d2[chosen_at, own] = torch.inf
                nearest = d2.topk(length, dim=1, largest=False)
                list_d2[start:start + chunk], list_idx[start:start + chunk] = nearest.values, p.rows[nearest.indices]
                d2[:, dead] = 0.0  # dead rows count 0 in the sums, and so does itself
                d2[chosen_at, own] = 0.0
                sums[start:start + chunk] = d2.sqrt_().sum(1)
        if length == alive_count - 1:
            outside = torch.full((groups.numel(),), torch.inf, dtype=torch.float64, device=self.device)
        else:
            outside = list_d2[:, -1] - self.error64 * (self.sq_norms[groups] + p.sq64.max())
        return sums, list(zip(list_idx.cpu().numpy(), list_d2.cpu().numpy(), outside.tolist()))


def ksame_clusters(embeddings: torch.Tensor | np.ndarray, k: int, device: torch.device,
                   block_size: int = 1024, top_size: int = 256, list_length: int = 64) -> np.ndarray:
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
    host_points = embeddings[:n]
    unassigned = np.ones(n, dtype=bool)
    clusters = np.empty((n // k, k), dtype=np.int64)
    threads = torch.get_num_threads()
    # Small ops: a second thread costs more than it gains, above all on a busy machine.
    pool = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) \
        if device.type == "cpu" and threads > 1 else None
    with one_cpu_thread(), _full_float32_products(), pool or nullcontext():
        pivot_sums = _DistanceSums(points, torch.as_tensor(first_copy, device=device), top_size,
                                   min(max(list_length, 2 * k), n - 1), block_size, threads, pool)
        host_sq_norms, error = pivot_sums.sq_norms.cpu().numpy(), pivot_sums.error64
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
