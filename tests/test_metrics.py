"""Utility metrics agree with scikit-learn; privacy and fidelity metrics agree with brute force (full distance
matrices, prdc's definitions written out) and expose a copied release."""
import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from src.cli import UserError
from src.metric_registry import KNOWN, table_metrics
from src.metrics import (MIN_SPLIT_ROWS, NEIGHBOURS, accuracy, auroc, balanced_accuracy, k_nearest_neighbours,
                         nearest_neighbours, privacy_metrics, sdmetrics_dcr)


def test_binary_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    positive_prob = np.round(rng.random(300) * 0.6 + 0.3 * labels, 1)  # coarse values: many ties
    probs = np.stack([1 - positive_prob, positive_prob], axis=1)
    assert len(np.unique(positive_prob)) < 15
    assert auroc(labels, probs) == pytest.approx(100 * roc_auc_score(labels, positive_prob), abs=1e-9)


def test_multiclass_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 400)
    candidate_rows = rng.dirichlet(np.ones(4), size=12)  # few distinct rows: ties in every column
    rows = np.where(rng.random(400) < 0.5, labels, rng.integers(0, 12, 400)) % 12
    probs = candidate_rows[rows]
    expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert auroc(labels, probs) == pytest.approx(100 * expected, abs=1e-9)


def test_accuracy_and_balanced_accuracy_match_sklearn():
    rng = np.random.default_rng(2)
    labels = rng.choice(5, 500, p=[0.5, 0.2, 0.15, 0.1, 0.05])  # imbalanced, so the two differ
    predictions = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 5, 500))
    assert accuracy(labels, predictions) == pytest.approx(100 * accuracy_score(labels, predictions))
    assert balanced_accuracy(labels, predictions) == pytest.approx(100 * balanced_accuracy_score(labels, predictions))
    assert abs(accuracy(labels, predictions) - balanced_accuracy(labels, predictions)) > 0.1


def brute_force_nearest(queries: np.ndarray, reference: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    distances = np.linalg.norm(queries[:, None, :] - reference[None, :, :], axis=2)
    if exclude_self:
        np.fill_diagonal(distances, np.inf)
    return distances.min(axis=1)


def test_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(3)
    queries, reference = rng.normal(size=(37, 12)), rng.normal(size=(53, 12))
    distances, index = nearest_neighbours(torch.tensor(queries), torch.tensor(reference), block_size=8)
    np.testing.assert_allclose(distances.numpy(), brute_force_nearest(queries, reference), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(queries - reference[index.numpy()], axis=1), distances.numpy(), rtol=1e-5)
    self_distances, self_index = nearest_neighbours(torch.tensor(reference), torch.tensor(reference), block_size=8,
                                                    exclude_self=True)
    np.testing.assert_allclose(self_distances.numpy(), brute_force_nearest(reference, reference, True), rtol=1e-5)
    assert (self_index.numpy() != np.arange(len(reference))).all()


def test_blocked_equals_unblocked_on_larger_data():
    generator = torch.Generator().manual_seed(4)
    queries, reference = torch.randn(700, 64, generator=generator), torch.randn(1000, 64, generator=generator)
    for exclude_self, (q, r) in [(False, (queries, reference)), (True, (reference, reference))]:
        blocked = nearest_neighbours(q, r, block_size=300, exclude_self=exclude_self)
        whole = nearest_neighbours(q, r, block_size=4096, exclude_self=exclude_self)
        assert torch.equal(blocked[1], whole[1])
        torch.testing.assert_close(blocked[0], whole[0])


def test_privacy_metrics_match_brute_force():
    rng = np.random.default_rng(5)
    train, test = rng.normal(size=(60, 10)), rng.normal(size=(40, 10))
    released = train[:30] + rng.normal(scale=0.5, size=(30, 10))
    val = rng.normal(size=(20, 10))
    result = privacy_metrics(*(torch.tensor(x, dtype=torch.float32) for x in (released, train, test, val)), seed=0,
                             block_size=16)

    dcr = brute_force_nearest(released, train)
    real_nn_median = np.median(brute_force_nearest(train, train, exclude_self=True))
    member_score, non_member_score = -brute_force_nearest(train, released), -brute_force_nearest(test, released)
    expected_mia = np.mean([(m > n) + 0.5 * (m == n) for m in member_score for n in non_member_score])
    assert result["average_mindistance"] == pytest.approx(dcr.mean(), rel=1e-5)
    assert result["dcr_p5"] == pytest.approx(np.percentile(dcr, 5), rel=1e-5)
    assert result["dcr_p50"] == pytest.approx(np.median(dcr), rel=1e-5)
    assert result["real_nn_p50"] == pytest.approx(real_nn_median, rel=1e-5)
    assert result["share_closer_than_real_nn"] == pytest.approx(100 * np.mean(dcr < real_nn_median))
    assert result["mia_auc"] == pytest.approx(100 * expected_mia, abs=1e-6)


def test_identity_release_shows_the_leak_and_fresh_samples_do_not():
    generator = torch.Generator().manual_seed(6)
    train, test = 5 + 3 * torch.randn(400, 32, generator=generator), 5 + 3 * torch.randn(400, 32, generator=generator)
    val = 5 + 3 * torch.randn(200, 32, generator=generator)
    copied = privacy_metrics(train, train, test, val, seed=0)
    assert copied["average_mindistance"] == 0.0 and copied["dcr_p5"] == 0.0 and copied["dcr_p50"] == 0.0
    assert copied["share_closer_than_real_nn"] == 100.0
    assert copied["mia_auc"] > 95.0

    fresh = privacy_metrics(5 + 3 * torch.randn(400, 32, generator=generator), train, test, val, seed=0)
    assert fresh["average_mindistance"] > 0.5 * fresh["real_nn_p50"]
    assert 40.0 < fresh["mia_auc"] < 60.0


def test_k_nearest_neighbours_match_brute_force_for_several_k_and_blocks():
    rng = np.random.default_rng(7)
    queries, reference = rng.normal(size=(37, 12)), rng.normal(size=(53, 12))
    reference[10] = reference[3]  # a twin: exclude_self must skip only the row itself, keeping the twin at 0
    for k in (1, 2, 5):
        for block_size in (8, 16, 4096):
            for q, exclude_self in [(queries, False), (reference, True)]:
                distances, index = k_nearest_neighbours(torch.tensor(q), torch.tensor(reference), k, block_size,
                                                        exclude_self)
                full = cdist(q, reference)
                if exclude_self:
                    np.fill_diagonal(full, np.inf)
                np.testing.assert_allclose(distances.numpy(), np.sort(full, axis=1)[:, :k], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(np.take_along_axis(full, index.numpy(), axis=1), distances.numpy(),
                                           rtol=1e-5, atol=1e-6)
    twin_distances, _ = k_nearest_neighbours(torch.tensor(reference), torch.tensor(reference), 1, 8, exclude_self=True)
    assert twin_distances[3, 0] == 0.0 and twin_distances[10, 0] == 0.0
    with pytest.raises(ValueError):
        k_nearest_neighbours(torch.tensor(queries), torch.tensor(reference[:4]), 5)


def random_rows_oracle(rows: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The documented holdout rule: a seeded torch permutation's first `size` rows, or all rows if none to drop."""
    if size == len(rows):
        return rows
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:size].numpy()]


def brute_force_new_metrics(released, train, test, val, seed, k=NEIGHBOURS):
    """The new keys from full float64 distance matrices, prdc written out as its reference code does."""
    released_to_train = cdist(released, train)
    train_to_train, released_to_released = cdist(train, train), cdist(released, released)
    real_radii = np.sort(train_to_train, axis=1)[:, k]  # prdc: k-th value of k + 1 smallest, the row's own 0 included
    released_radii = np.sort(released_to_released, axis=1)[:, k]
    np.fill_diagonal(train_to_train, np.inf)
    size = min(len(train), len(test))
    train_holdout, holdout = random_rows_oracle(train, size, seed), random_rows_oracle(test, size, seed)

    def kth(queries, reference):
        return np.sort(cdist(queries, reference), axis=1)[:, k - 1]

    members = np.r_[np.ones(len(train)), np.zeros(len(test))]
    log_ratio = np.log(np.r_[kth(train, val), kth(test, val)]) - np.log(np.r_[kth(train, released),
                                                                                kth(test, released)])
    inside_real = released_to_train < real_radii[None, :]
    return {
        "exact_copy_share": 100 * np.mean(released_to_train.min(axis=1) == 0),
        "identifiability": 100 * np.mean(released_to_train.min(axis=0) < train_to_train.min(axis=1)),
        "dcr_holdout_share": 100 * np.mean(cdist(released, train_holdout).min(axis=1)
                                           < cdist(released, holdout).min(axis=1)),
        "precision": 100 * inside_real.any(axis=1).mean(),
        "recall": 100 * (released_to_train.T < released_radii[None, :]).any(axis=1).mean(),
        "density": inside_real.sum(axis=1).mean() / k,
        "coverage": 100 * np.mean(released_to_train.min(axis=0) < real_radii),
        "mia_auc_density": 100 * roc_auc_score(members, log_ratio),
        "sdmetrics_dcr_closer_to_training": 100 * np.mean(sdmetrics_dcr_oracle(released, train)
                                                          < sdmetrics_dcr_oracle(released, test)),
    }


def as_tensors(*arrays):
    return [torch.tensor(a, dtype=torch.float32) for a in arrays]


@pytest.mark.parametrize("test_rows", [90, 70, 130])  # equal to train, smaller (train cut), larger (test cut)
def test_new_metrics_match_brute_force_with_copies_and_twins(test_rows):
    rng = np.random.default_rng(8)
    train, test, val = (rng.normal(size=(n, 16)).astype(np.float32) for n in (90, test_rows, 50))
    train[1] = train[2]  # twin records: identifiability's tie, a released copy at distance 0 from both
    test[0] = train[5]  # a record in both splits: a copy of it ties between train and holdout
    copies, near, fresh = train[:30], train[30:40] + 0.05, rng.normal(size=(40, 16)).astype(np.float32)
    released = np.concatenate([copies, copies[:8], near, fresh])  # duplicates in the release tie at its own radii
    result = privacy_metrics(*as_tensors(released, train, test, val), seed=3, block_size=32)
    expected = brute_force_new_metrics(*(a.astype(np.float64) for a in (released, train, test, val)), seed=3)
    assert set(table_metrics(KNOWN)) - {"dp_spent_epsilon"} == set(expected)  # every known metric has its oracle
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key


def test_new_metrics_on_a_lattice_where_distances_tie_everywhere():
    rng = np.random.default_rng(9)  # small integer coordinates: float32 is exact, so ties are ties for both sides
    train, test, val, released = (rng.integers(0, 5, size=(n, 4)).astype(np.float32) for n in (120, 120, 60, 100))
    result = privacy_metrics(*as_tensors(released, train, test, val), seed=0, block_size=16)
    expected = brute_force_new_metrics(*(a.astype(np.float64) for a in (released, train, test, val)), seed=0)
    for key in ("exact_copy_share", "identifiability", "dcr_holdout_share", "precision", "recall", "density",
                "coverage"):
        assert result[key] == pytest.approx(expected[key], abs=1e-9), key


def test_copied_release_scores_full_and_a_far_set_scores_nothing():
    generator = torch.Generator().manual_seed(10)
    train, test, val = (torch.randn(n, 24, generator=generator) for n in (300, 200, 100))
    copied = privacy_metrics(train, train, test, val, seed=0)
    assert copied["exact_copy_share"] == 100.0 and copied["identifiability"] == 100.0
    assert copied["precision"] == copied["recall"] == copied["coverage"] == 100.0
    assert copied["density"] == 1.0  # each record's k-th neighbour sits exactly on its radius: not counted
    far = privacy_metrics(train + 100.0, train, test, val, seed=0)
    assert far["exact_copy_share"] == 0.0 and far["identifiability"] == 0.0
    assert far["precision"] == far["recall"] == far["coverage"] == far["density"] == 0.0


def test_dcr_holdout_share_is_seeded_and_near_half_for_an_independent_release():
    generator = torch.Generator().manual_seed(11)
    train, test, val, released = (torch.randn(n, 16, generator=generator) for n in (800, 400, 100, 400))
    first = privacy_metrics(released, train, test, val, seed=4)["dcr_holdout_share"]
    assert privacy_metrics(released, train, test, val, seed=4)["dcr_holdout_share"] == first
    assert 40.0 < first < 60.0
    assert privacy_metrics(train[:400], train, test, val, seed=4)["dcr_holdout_share"] > 60.0  # half of it copied


def test_density_attack_finds_records_the_release_crowds_around():
    generator = torch.Generator().manual_seed(12)
    train, test, val = (torch.randn(n, 16, generator=generator) for n in (200, 200, 200))
    crowded = train.repeat(NEIGHBOURS, 1) + 0.05 * torch.randn(NEIGHBOURS * 200, 16, generator=generator)
    assert privacy_metrics(crowded, train, test, val, seed=0)["mia_auc_density"] > 95.0
    fresh = torch.randn(1000, 16, generator=generator)
    assert 40.0 < privacy_metrics(fresh, train, test, val, seed=0)["mia_auc_density"] < 60.0


@pytest.mark.parametrize("too_small", ["released", "train", "test", "val"])
def test_a_split_too_small_for_the_neighbour_metrics_is_a_user_error(too_small):
    generator = torch.Generator().manual_seed(13)
    sets = {name: torch.randn(40, 8, generator=generator) for name in ("released", "train", "test", "val")}
    sets[too_small] = sets[too_small][:MIN_SPLIT_ROWS - 1]
    with pytest.raises(UserError, match=too_small):
        privacy_metrics(sets["released"], sets["train"], sets["test"], sets["val"], seed=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_privacy_metrics_on_gpu_equal_cpu():
    generator = torch.Generator().manual_seed(14)
    train, test, val = (torch.randn(n, 64, generator=generator) for n in (3000, 1500, 1000))
    released = torch.cat([train[:500], torch.randn(2500, 64, generator=generator)])  # copies: exact zeros and ties
    cpu = privacy_metrics(released, train, test, val, seed=0, block_size=1024)
    gpu = privacy_metrics(*(x.cuda() for x in (released, train, test, val)), seed=0, block_size=1024)
    for key, value in cpu.items():
        assert gpu[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


def sdmetrics_dcr_oracle(synthetic: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """SDMetrics' calculate_dcr for numerical columns, row by row and value by value as its code reads."""
    ranges = reference.max(axis=0) - reference.min(axis=0)
    result = []
    for row in synthetic:
        per_record = []
        for record in reference:
            values = []
            for a, b, spread in zip(row, record, ranges):
                with np.errstate(divide="ignore", invalid="ignore"):
                    distance = abs(a - b) / spread
                values.append(min(distance, 1.0) if not np.isnan(distance) else np.nan)  # min(nan, 1) is nan
            per_record.append(np.nanmean(values))  # pandas' mean skips NaN
        result.append(min(per_record))
    return np.array(result)


def test_sdmetrics_dcr_overfitting_protection_as_sdmetrics_computes_it():
    rng = np.random.default_rng(14)
    train, test, val = (rng.normal(size=(n, 5)) for n in (30, 20, 12))
    train[:, 4] = test[:, 4] = 1.0  # a constant column: 0 / 0 where values agree
    released = np.concatenate([train[:10], rng.normal(size=(10, 5))])
    released[3, 4] = 2.0
    for reference in (train, test):
        np.testing.assert_allclose(sdmetrics_dcr(torch.tensor(released), torch.tensor(reference)),
                                   sdmetrics_dcr_oracle(released, reference), rtol=1e-12)
    far = 4 * rng.normal(size=(15, 5))  # most coordinates outside the reference's range: the clip acts often
    far[:5, 4] = 1.0
    constant = np.ones((6, 5))  # every column of range 0
    very_far = far * np.array([1.0, 10.0, 100.0, 0.3, 1.0])  # whole ranges outside, near, and inside
    for queries, reference in ((far, train), (far, constant), (very_far, train)):
        np.testing.assert_allclose(sdmetrics_dcr(torch.tensor(queries), torch.tensor(reference)),
                                   sdmetrics_dcr_oracle(queries, reference), rtol=1e-12)
    expected = 100 * np.mean(sdmetrics_dcr_oracle(released, train) < sdmetrics_dcr_oracle(released, test))
    scaled = [torch.tensor(a * 3.0 + 1.0, dtype=torch.float32) for a in (released, train, test, val)]
    result = privacy_metrics(*scaled, seed=0)["sdmetrics_dcr_closer_to_training"]
    assert result == pytest.approx(expected)  # per-column scaling leaves it unchanged
    assert privacy_metrics(*as_tensors(train, train, test, val), seed=0)["sdmetrics_dcr_closer_to_training"] == 100.0


def test_density_attack_scores_copies_in_both_sets_as_a_tie():
    generator = torch.Generator().manual_seed(15)
    train, test, val = (torch.randn(n, 8, generator=generator).double() for n in (60, 60, 60))
    duplicated = train[0].repeat(NEIGHBOURS, 1)  # 5 copies of member 0 in the reference and in the release
    val, released = torch.cat([val, duplicated]), torch.cat([train[1:], duplicated])
    score = privacy_metrics(*(t.float() for t in (released, train, test, val)), seed=0)["mia_auc_density"]

    def kth(queries, reference):
        return np.sort(cdist(queries.numpy(), reference.numpy()), axis=1)[:, NEIGHBOURS - 1]

    reference_kth, released_kth = (np.r_[kth(train, ref), kth(test, ref)] for ref in (val, released))
    assert reference_kth[0] == released_kth[0] == 0.0  # the tie: log(0) - log(0)
    with np.errstate(divide="ignore"):
        log_ratio = np.log(reference_kth[1:]) - np.log(released_kth[1:])
    members = np.r_[np.ones(60), np.zeros(60)]
    expected = 100 * roc_auc_score(members, np.r_[0.0, log_ratio])  # equal densities: log ratio 0
    assert score == pytest.approx(expected)
