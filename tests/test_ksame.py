"""k-Same against a plain N x N implementation of the reference procedure."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from src.cli import UserError
from src import ksame as ksame_module
from src.ksame import _cells, _CellSums, ksame, ksame_clusters
from src.runtime import cpu_threads

CPU = torch.device("cpu")


def reference_clusters(embeddings: np.ndarray, k: int) -> np.ndarray:
    """The reference procedure, literally: full float64 distance matrix, sums rescanned each step."""
    n = len(embeddings) - len(embeddings) % k
    x = embeddings[:n].astype(np.float64)
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    unassigned = np.ones(n, dtype=bool)
    clusters = []
    while unassigned.any():
        rows = np.flatnonzero(unassigned)
        pivot = rows[np.argmax(dist[np.ix_(rows, rows)].sum(1))]  # argmax: first (lowest) index on ties
        others = rows[rows != pivot]
        neighbours = others[np.argsort(dist[pivot, others], kind="stable")[:k - 1]]
        clusters.append([pivot, *neighbours])
        unassigned[clusters[-1]] = False
    return np.array(clusters, dtype=np.int64)


def small_blocks(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Our clustering with tiny blocks, tiers and lists, so every code path runs on small data."""
    return ksame_clusters(embeddings, k, CPU, block_size=16, top_size=8, list_length=4, cells=3)


def mixture(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(4, 12))
    return (centres[rng.integers(0, 4, n)] + rng.normal(size=(n, 12)) + 5.0).astype(np.float32)


@pytest.mark.parametrize("n, k", [(40, 2), (61, 2), (75, 3), (101, 5), (123, 10), (200, 5), (203, 3)])
def test_clusters_match_reference_on_random_data(n: int, k: int) -> None:
    embeddings = mixture(n, seed=n * 100 + k)
    expected = reference_clusters(embeddings, k)
    np.testing.assert_array_equal(small_blocks(embeddings, k), expected)
    np.testing.assert_array_equal(ksame_clusters(torch.from_numpy(embeddings), k, CPU), expected)


@pytest.mark.parametrize("n, k", [(101, 5), (203, 3)])
def test_one_thread_gives_the_same_clusters(n: int, k: int) -> None:
    """On one CPU thread every product runs on it, the large ones included (as on a GPU)."""
    embeddings = mixture(n, seed=n * 100 + k)
    with cpu_threads(1):
        np.testing.assert_array_equal(small_blocks(embeddings, k), reference_clusters(embeddings, k))


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_duplicates_and_equal_distances_go_to_the_lowest_index(k: int) -> None:
    rng = np.random.default_rng(k)
    distinct = rng.normal(size=(30, 6)).astype(np.float32)
    embeddings = distinct[rng.integers(0, 30, 97)]  # many exact copies
    np.testing.assert_array_equal(small_blocks(embeddings, k), reference_clusters(embeddings, k))
    # Points on a line at integer positions: many equal distances and equal sums.
    line = np.repeat(rng.integers(0, 7, 83)[:, None], 5, axis=1).astype(np.float32)
    np.testing.assert_array_equal(small_blocks(line, k), reference_clusters(line, k))


def test_all_points_identical() -> None:
    embeddings = np.ones((11, 4), dtype=np.float32)
    np.testing.assert_array_equal(small_blocks(embeddings, 3), np.arange(9).reshape(3, 3))


@pytest.mark.parametrize("n, k", [(50, 2), (53, 5), (99, 10)])
def test_ksame_replaces_rows_by_cluster_means_and_keeps_labels(n: int, k: int) -> None:
    rng = np.random.default_rng(n)
    embeddings = rng.normal(size=(n, 9)).astype(np.float32)
    labels = rng.integers(0, 3, n)
    anonymized, kept_labels = ksame(embeddings, labels, k, CPU)
    kept = n - n % k
    assert anonymized.dtype == np.float32 and anonymized.shape == (kept, 9)
    np.testing.assert_array_equal(kept_labels, labels[:kept])  # the last n mod k rows are dropped
    for cluster in reference_clusters(embeddings, k):
        mean = embeddings[cluster].astype(np.float64).mean(0)
        np.testing.assert_allclose(anonymized[cluster], np.broadcast_to(mean, (k, 9)), rtol=1e-6, atol=1e-6)
    assert len(np.unique(anonymized, axis=0)) == kept // k


@pytest.mark.parametrize("k, n", [(1, 10), (0, 10), (11, 10)])
def test_bad_k_is_a_user_error_naming_the_flag(k: int, n: int) -> None:
    embeddings = np.zeros((n, 3), dtype=np.float32)
    with pytest.raises(UserError, match="--k" if k < 2 else "--k 11 .* N = 10"):
        ksame(embeddings, np.zeros(n, dtype=np.int64), k, CPU)


def test_k_equal_to_n_makes_one_cluster() -> None:
    embeddings = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    anonymized, _ = ksame(embeddings, np.arange(7), 7, CPU)
    np.testing.assert_allclose(anonymized, np.broadcast_to(embeddings.mean(0), (7, 3)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("perturbation", [0.0, 1e-5])
def test_sums_closer_than_the_bounds_can_tell_follow_the_reference(k: int, perturbation: float) -> None:
    """Points at integer positions on one axis: many exactly equal distance sums and copies, or,
    after a perturbation of 1e-5, sums about 1e-5 apart, far below what the cell bounds can
    tell; the exact tier must settle them as the reference does, with tiers of every size."""
    rng = np.random.default_rng(k)
    embeddings = np.zeros((61, 12))
    embeddings[:, 0] = rng.integers(0, 9, 61)
    embeddings[rng.integers(0, 61, 8), 0] += perturbation
    expected = reference_clusters(embeddings, k)
    for top_size in (2, 8, 128):
        np.testing.assert_array_equal(
            ksame_clusters(embeddings, k, CPU, block_size=8, top_size=top_size, list_length=2), expected)


@pytest.mark.parametrize("seed", [0, 3, 8, 12, 15, 18])
@pytest.mark.parametrize("k", [2, 3])
def test_copies_of_few_vectors_follow_the_reference_with_tiny_tiers(seed: int, k: int) -> None:
    """120 rows that are copies of 12 vectors, with tiers of two groups: groups whose first row was
    assigned and packed away while copies are left re-enter the tiers, and late in the run two
    vectors with m copies each have equal sums (m d(A, B)), which must go to the lowest index."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(12, 6)).astype(np.float32)[rng.integers(0, 12, 120)]
    np.testing.assert_array_equal(ksame_clusters(embeddings, k, CPU, block_size=8, top_size=2, list_length=2),
                                  reference_clusters(embeddings, k))


@pytest.mark.parametrize("cells", [1, 2, 7, 64])
def test_clusters_do_not_depend_on_the_cells(cells: int) -> None:
    """The cells only make the bounds tighter or looser: one cell, a few, and more cells than points."""
    embeddings = mixture(61, seed=cells)
    np.testing.assert_array_equal(ksame_clusters(embeddings, 3, CPU, top_size=2, list_length=2, cells=cells),
                                  reference_clusters(embeddings, 3))


def true_sums(x: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Each row's summed distance to the live rows, from float64 differences (no Gram form)."""
    rows = torch.from_numpy(x)
    return torch.cdist(rows, rows[live], compute_mode="donot_use_mm_for_euclid_dist").sum(1).numpy()


def cell_sums(x: np.ndarray, count: int, cell: np.ndarray | None = None) -> tuple[_CellSums, np.ndarray]:
    """The rows' cell sums, built from tensors as k-Same builds them (cells from `_cells` unless given), and
    their squared norms."""
    rows = torch.from_numpy(x)
    sq_norms = rows.square().sum(1)
    cell_t = _cells(rows, sq_norms, count) if cell is None else torch.from_numpy(cell)
    return _CellSums(rows, sq_norms, cell_t, count), sq_norms.numpy()


@pytest.mark.parametrize(("dim", "scale", "offset"), [(4, 1e-3, 0.0), (4, 1.0, 1e4), (16, 1e-3, 1e4),
                                                     (768, 1e-3, 0.0), (768, 1.0, 1e3), (768, 1e-3, 1e4)])
def test_cell_bounds_hold_at_every_scale(dim: int, scale: float, offset: float) -> None:
    """`_CellSums` bounds every row's distance sum from above: fresh, from terms taken before points left
    (with the counts of now), and from dot products kept up to date by subtraction (the warm rows), with
    norms up to 10^7 times the spread (where n |x|^2 - 2 x.s + q cancels), copies and near copies, and
    cells of every size; the oracle takes each distance from float64 differences. The dot products kept
    up to date stay within the class's rounding bound of fresh ones (each within e_dot |x| of the truth)."""
    rng = np.random.default_rng(dim)
    x = rng.normal(size=(150, dim)) * scale + offset * rng.normal(size=dim)
    x[1::7] = x[0::7][:len(x[1::7])] + rng.normal(size=x[1::7].shape) * 1e-6 * scale  # near copies
    x[2::9] = x[0]  # copies
    for count in (1, 5, 40):
        cells, sq_norms = cell_sums(x, count)
        live = np.ones(len(x), dtype=bool)
        dots = cells.dots(x)
        stale = cells.terms(dots, sq_norms)
        for leaving in (np.arange(3, 150, 4), np.arange(0, 150, 5), np.arange(1, 150, 3)):
            leaving = leaving[live[leaving]]
            cells.leave(x[leaving], sq_norms[leaving], leaving)
            cells.update_dots(dots, x, x[leaving], leaving)
            live[leaving] = False
            truth = true_sums(x, live)
            for terms in (cells.terms(cells.dots(x), sq_norms), stale, cells.terms(dots, sq_norms)):
                assert (cells.bounds(terms) >= truth).all()
            assert (np.abs(dots - cells.dots(x)) <= 2.0 * cells.dot_error * np.sqrt(sq_norms)[:, None]).all()


def test_cell_bounds_are_tight_where_distances_concentrate() -> None:
    """Cauchy-Schwarz per cell loses little when the distances to a cell's points are nearly equal, as in
    high dimensions: on a 768-dimensional mixture, within 0.1% of every row's sum; with a single cell (a
    mixture's distances spread more) within 3%, and never less than the sum."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 768))[rng.integers(0, 5, 600)] + rng.normal(size=(600, 768))
    x -= x.mean(0)
    truth = true_sums(x, np.ones(len(x), dtype=bool))
    for count, within in ((16, 1e-3), (1, 3e-2)):
        cells, sq_norms = cell_sums(x, count)
        excess = cells.bounds(cells.terms(cells.dots(x), sq_norms)) / truth - 1.0
        assert (excess >= 0).all() and excess.max() < within


@pytest.mark.parametrize(("dim", "offset"), [(16, 1e4), (768, 1e3)])
def test_cell_bounds_cover_their_rounding_where_cauchy_schwarz_is_exact(dim: int, offset: float) -> None:
    """Copies of six vectors 1e-3 apart, 10^6 to 10^7 times further from the origin, one cell each: every
    distance from a row to a cell's points is the same, so Cauchy-Schwarz is exact and only the rounding
    of n |x|^2 - 2 x.s + q (and of the updates as rows leave) separates the bound from the sum. Without
    the rounding bound, some bounds fall below the sums here (its parts overlap: each alone covers what
    this data errs)."""
    rng = np.random.default_rng(dim)
    distinct = offset * rng.normal(size=dim) + 1e-3 * rng.normal(size=(6, dim))
    which = rng.permutation(np.repeat(np.arange(6), 40))
    x = distinct[which]
    cells, sq_norms = cell_sums(x, 6, which)
    live = np.ones(len(x), dtype=bool)
    dots = cells.dots(x)
    for leaving in (np.arange(0, 240, 3), np.arange(1, 240, 3)):
        cells.leave(x[leaving], sq_norms[leaving], leaving)
        cells.update_dots(dots, x, x[leaving], leaving)
        live[leaving] = False
        truth = true_sums(x, live)
        for terms in (cells.terms(cells.dots(x), sq_norms), cells.terms(dots, sq_norms)):
            assert (cells.bounds(terms) >= truth).all()


class CheckedSums(ksame_module._DistanceSums):
    """`_DistanceSums` that checks its invariants after every step, and its bounds and neighbour lists
    against distances from float64 differences of the input."""

    def remove(self, members: np.ndarray, member_groups: np.ndarray, dead_groups: list[int]) -> None:
        super().remove(members, member_groups, dead_groups)
        self.check_invariants()
        p = self.packed
        unassigned = np.zeros(self.first_copy.size, dtype=bool)
        unassigned[p.rows[p.alive]] = True
        if not unassigned.any():
            return
        x = self.host_points.astype(np.float64)
        outside = np.isfinite(self.bounds.values)
        assert (self.bounds.values[outside] >= true_sums(x, unassigned)[outside]).all()
        for group, (listed, _, below) in self.tier.lists.items():
            unlisted = unassigned.copy()
            unlisted[listed] = False
            unlisted[group] = False
            assert (np.square(x[unlisted] - x[group]).sum(1) >= below).all()


@pytest.mark.parametrize("k", [2, 3])
def test_invariants_hold_at_every_step(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    """Tiny tiers, lists and warm rows, with copies, so that members are dropped, warm rows pushed out and
    groups die in the tier; the clusters stay the reference's."""
    monkeypatch.setattr(ksame_module, "_DistanceSums", CheckedSums)
    rng = np.random.default_rng(k)
    copies = rng.normal(size=(8, 12)).astype(np.float32)[rng.integers(0, 8, 30)]
    embeddings = np.concatenate([mixture(90, seed=k), copies])
    for top_size in (2, 8):
        np.testing.assert_array_equal(
            ksame_clusters(embeddings, k, CPU, block_size=8, top_size=top_size, list_length=2, cells=3),
            reference_clusters(embeddings, k))
