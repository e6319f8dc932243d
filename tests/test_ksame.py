"""k-Same against a plain N x N implementation of the reference procedure."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from src.cli import UserError
from src.ksame import BoundedSums, _bounded_sums, _float32_copy, float32_error_factor, ksame, ksame_clusters
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
    """Our clustering with tiny blocks and frequent refreshes, so every code path runs on small data."""
    return ksame_clusters(embeddings, k, CPU, block_size=16, top_size=8, list_length=4)


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
    """On one CPU thread there are no row blocks side by side: each update is one product over all
    its rows (the path a GPU takes)."""
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


@pytest.mark.parametrize(("dim", "scale", "offset"), [(4, 1e-3, 0.0), (4, 1.0, 1000.0), (4, 1e3, 10.0),
                                                     (16, 1.0, 100.0),
                                                     (768, 1e-3, 0.0), (768, 1.0, 1000.0), (768, 1e3, 10.0)])
def test_float32_sum_bounds_hold_at_every_scale(dim: int, scale: float, offset: float) -> None:
    """The bounds of `gram_error_factor` and `_bounded_sums`, which carry no spare factor, hold where the
    float32 pass errs most: short and embedding-length rows, norms up to 1,000x the spread (where the
    Gram form cancels), copies and near copies (where the square root amplifies), on the diagonal and
    off it, both sides; the oracle takes each distance from the differences in float64 (no Gram form).
    Each row's nearest-distance bound lies below the true nearest distance, by at most two distance
    errors (a bound that gave up, say 0 everywhere, fails where points are apart)."""
    rng = np.random.default_rng(dim)
    x = rng.normal(size=(120, dim)) * scale + offset * rng.normal(size=dim)
    near = x[0::7][:len(x[1::7])]
    x[1::7] = near + rng.normal(size=near.shape) * 1e-6 * np.abs(x).max()  # near copies
    x[2::9] = x[0]  # copies
    x = torch.from_numpy(x)
    x32, sq, slack = _float32_copy(x, 32)
    factor = float32_error_factor(dim)

    def check(side: BoundedSums, a: slice, b: slice, diagonal: bool = False) -> None:
        distances = torch.cdist(x[a], x[b], compute_mode="donot_use_mm_for_euclid_dist")
        np.testing.assert_array_less((side.sums - distances.sum(1)).abs(), side.bounds)
        if diagonal:
            distances.fill_diagonal_(torch.inf)
        nearest = distances.min(1).values
        assert (side.nearest <= nearest).all()
        assert (nearest - side.nearest <= 2.0 * side.bounds / distances.shape[1]).all()

    everything, top, bottom = slice(None), slice(0, 50), slice(50, 120)
    check(*_bounded_sums(x32, sq, slack, x32, sq, slack, factor, True, False), everything, everything, diagonal=True)
    rows, cols = _bounded_sums(x32[top], sq[top], slack[top], x32[bottom], sq[bottom], slack[bottom], factor, False,
                               True)
    check(rows, top, bottom)
    check(cols, bottom, top)
    few = slice(113, 120)  # fewer rows than FEW_ROWS: the product runs with them on the left
    rows, cols = _bounded_sums(x32, sq, slack, x32[few], sq[few], slack[few], factor, False, True)
    check(rows, everything, few)
    check(cols, few, everything)


def test_float32_sum_bounds_are_within_2x_of_errors_that_occur() -> None:
    """One row against 50 copies of one vector: each copy's distance carries the same rounding error, so
    the sum's error is 50 times one distance's. With one coordinate, norms 1e3 to 1e5 and distances
    about 10 sqrt(e) (where the bound is e / 2d, proportional to `gram_error_factor`), some pair reaches
    over 0.3 of its bound (about 0.5 seen): a factor 4x too small fails here, and so does a bound
    loosened beyond what the data can reach."""
    rng = np.random.default_rng(1)
    factor = float32_error_factor(1)
    worst = 0.0
    for offset in (1e3, 1e4, 1e5):
        a = rng.normal(size=(500, 1)) + offset
        b = a + rng.normal(size=(500, 1)) * 10.0 * np.sqrt(factor * 2.0 * offset ** 2)
        a32, b32 = _float32_copy(torch.from_numpy(a), 512), _float32_copy(torch.from_numpy(b), 512)
        for i in range(len(a)):
            copies = (values[i:i + 1].expand(50, *values.shape[1:]) for values in b32)
            total, bound, _ = _bounded_sums(*(values[i:i + 1] for values in a32), *copies, factor, False, False)[0]
            error = abs(total.item() - 50 * abs(a[i, 0] - b[i, 0]))
            assert error <= bound.item()
            worst = max(worst, error / bound.item())
    assert worst > 0.3


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("perturbation", [0.0, 1e-5])
def test_sums_closer_than_float32_can_tell_follow_the_reference(k: int, perturbation: float) -> None:
    """Points at integer positions on one axis: many exactly equal distance sums and copies, or,
    after a perturbation of 1e-5, sums about 1e-5 apart, far below what the float32 bounds can
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
