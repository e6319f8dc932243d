"""Utility metrics agree with scikit-learn; privacy metrics agree with brute force and expose a copied release."""
import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from src.metrics import accuracy, auroc, balanced_accuracy, k_nearest_neighbours, nearest_neighbours, privacy_metrics


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
    result = privacy_metrics(*(torch.tensor(x, dtype=torch.float32) for x in (released, train, test)), block_size=16)

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
    copied = privacy_metrics(train, train, test)
    assert copied["average_mindistance"] == 0.0 and copied["dcr_p5"] == 0.0 and copied["dcr_p50"] == 0.0
    assert copied["share_closer_than_real_nn"] == 100.0
    assert copied["mia_auc"] > 95.0

    fresh = privacy_metrics(5 + 3 * torch.randn(400, 32, generator=generator), train, test)
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
