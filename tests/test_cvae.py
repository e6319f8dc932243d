"""CVAE: objective, training, checkpoints and generation on small Gaussian-mixture embeddings."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence as torch_kl

from src.anonymizers.cvae import CVAEMaking, CVAERelease
from src.cvae import (OnlineSampler, checkpoint_path, class_counts, evaluate_loss, generate_offline,
                      kl_divergence, load_or_train_cvae, reparameterize, train_cvae)
from src.cli import UserError

CPU = torch.device("cpu")
NUM_CLASSES = 3
CORRECT = CVAERelease()  # the correct ELBO, no DP
FEW_EPOCHS = CVAEMaking(max_epochs=4, cvae_lr=1e-2)


def mixture(num_samples: int, seed: int, dim: int = 16, proportions=(0.6, 0.3, 0.1)) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated class clusters (one-hot centres of height 6) with unit noise."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(proportions), size=num_samples, p=proportions)
    centres = 6 * np.eye(len(proportions), dim)
    return (centres[labels] + rng.normal(size=(num_samples, dim))).astype(np.float32), labels.astype(np.int64)


@pytest.fixture(scope="module")
def data():
    train_x, train_y = mixture(200, seed=0)
    val_x, val_y = mixture(100, seed=1)
    return train_x, train_y, val_x, val_y


@pytest.fixture(scope="module")
def bundle(data):
    return train_cvae(*data, NUM_CLASSES, CORRECT, FEW_EPOCHS, CPU, seed=0)


def test_kl_equals_closed_form_gaussian_kl():
    generator = torch.Generator().manual_seed(0)
    mean, log_var = torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)
    expected = torch_kl(Normal(mean, (0.5 * log_var).exp()), Normal(0.0, 1.0))  # per latent dimension
    torch.testing.assert_close(kl_divergence(mean, log_var), expected)


def test_reference_objective_differs_as_documented():
    """The reference uses sigma = exp(log_var) and sum(sigma^2 + mean^2 - log_var - 0.5)."""
    zeros = torch.zeros(4, 5)
    assert kl_divergence(zeros, zeros).sum().item() == 0.0  # the prior has no divergence from itself
    assert kl_divergence(zeros, zeros, reference_objective=True).sum().item() == pytest.approx(0.5 * zeros.numel())

    generator = torch.Generator().manual_seed(1)
    mean, log_var, noise = (torch.randn(4, 5, generator=generator) for _ in range(3))
    sigma = log_var.exp()
    torch.testing.assert_close(kl_divergence(mean, log_var, reference_objective=True),
                               sigma**2 + mean**2 - log_var - 0.5)
    torch.testing.assert_close(reparameterize(mean, log_var, noise, reference_objective=True), mean + sigma * noise)
    torch.testing.assert_close(reparameterize(mean, log_var, noise), mean + sigma.sqrt() * noise)


def test_training_reduces_loss(bundle):
    losses = bundle.history["train_loss"]
    assert len(losses) == FEW_EPOCHS.max_epochs
    assert losses[-1] < losses[0]
    assert not bundle.model.training


def test_early_stopping_restores_best_epoch(data):
    """Validation labels rotated to the wrong class: once the decoder learns to use the label,
    validation loss must rise, so training stops early and must restore the best epoch."""
    train_x, train_y, val_x, val_y = data
    wrong_labels = (val_y + 1) % NUM_CLASSES
    making = CVAEMaking(max_epochs=200, cvae_patience=5, cvae_lr=1e-2)
    trained = train_cvae(train_x, train_y, val_x, wrong_labels, NUM_CLASSES, CORRECT, making, CPU, seed=0)
    val_losses = trained.history["val_loss"]
    assert len(val_losses) < making.max_epochs
    assert len(val_losses) == trained.best_epoch + making.cvae_patience
    assert trained.best_epoch == int(np.argmin(val_losses)) + 1
    restored = evaluate_loss(trained, val_x, wrong_labels, seed=0)
    assert restored == pytest.approx(min(val_losses), rel=1e-6)
    assert restored < val_losses[-1]


def test_same_seed_same_model_and_samples(data, bundle):
    twin = train_cvae(*data, NUM_CLASSES, CORRECT, FEW_EPOCHS, CPU, seed=0)
    other = train_cvae(*data, NUM_CLASSES, CORRECT, FEW_EPOCHS, CPU, seed=1)
    for name, weights in bundle.model.state_dict().items():
        assert torch.equal(weights, twin.model.state_dict()[name])
    assert not torch.equal(bundle.model.decoder[0].weight, other.model.decoder[0].weight)

    train_y = data[1]
    samples, labels = generate_offline(bundle, train_y, variance=1.0, seed=5)
    twin_samples, twin_labels = generate_offline(twin, train_y, variance=1.0, seed=5)
    other_samples, _ = generate_offline(bundle, train_y, variance=1.0, seed=6)
    np.testing.assert_array_equal(samples, twin_samples)
    np.testing.assert_array_equal(labels, twin_labels)
    assert not np.array_equal(samples, other_samples)


def test_generation_copies_class_counts_and_maps_back_through_the_train_scaler(data):
    """Generation copies the training class counts, and the scaler maps the decoder's sigmoid back onto the
    train range: the range bound holds by construction (sigmoid, then min-max), so what this checks is the
    mapping itself, with a constant feature (span 0) that must come back exactly at its value."""
    train_x, train_y, val_x, val_y = (array.copy() for array in data)
    train_x[:, 3], val_x[:, 3] = 2.5, 2.5
    trained = train_cvae(train_x, train_y, val_x, val_y, NUM_CLASSES, CORRECT, FEW_EPOCHS, CPU, seed=0)
    samples, labels = generate_offline(trained, train_y, variance=3.0, seed=0)

    np.testing.assert_array_equal(np.bincount(labels, minlength=NUM_CLASSES), np.bincount(train_y))
    assert samples.dtype == np.float32 and samples.shape == train_x.shape
    low, high = train_x.min(axis=0), train_x.max(axis=0)
    slack = 1e-5 * (high - low)  # float32 rounding of min + 1.0 * (max - min)
    for label in range(NUM_CLASSES):
        members = samples[labels == label]
        assert len(members) > 0
        assert (members >= low - slack).all() and (members <= high + slack).all()
    assert (samples[:, 3] == 2.5).all()


def test_samples_keep_each_class_structure():
    """A classifier trained on CVAE samples alone labels real held-out records: the decoder must have learnt
    what sets the classes apart, not only the overall spread. On these separated clusters it reaches
    >= 95 % (majority class: 60 %; the same samples with shuffled labels score about 46 %)."""
    from sklearn.linear_model import LogisticRegression

    (train_x, train_y), (val_x, val_y), (held_x, held_y) = (mixture(n, seed) for n, seed in ((300, 0), (150, 1),
                                                                                           (500, 2)))
    trained = train_cvae(train_x, train_y, val_x, val_y, NUM_CLASSES, CORRECT,
                         CVAEMaking(max_epochs=30, cvae_lr=1e-2), CPU, seed=0)
    samples, labels = generate_offline(trained, train_y, variance=1.0, seed=0)
    classifier = LogisticRegression(max_iter=1000).fit(samples, labels)
    assert classifier.score(held_x, held_y) >= 0.95


def test_offline_count_keeps_class_proportions(bundle, data):
    train_y = data[1]
    samples, labels = generate_offline(bundle, train_y, variance=1.0, seed=0, count=1000)
    assert samples.shape == (1000, data[0].shape[1])
    expected = np.bincount(train_y, minlength=NUM_CLASSES) / len(train_y) * 1000
    assert np.abs(np.bincount(labels, minlength=NUM_CLASSES) - expected).max() < 1
    np.testing.assert_array_equal(class_counts(np.array([0, 0, 1]), 3, total=7), [5, 2, 0])


def test_checkpoint_reused_only_for_same_data_and_settings(tmp_path, data):
    train_x, train_y, val_x, val_y = data
    first = load_or_train_cvae(tmp_path, *data, NUM_CLASSES, CORRECT, FEW_EPOCHS, CPU, seed=0)
    (saved,) = tmp_path.glob("cvae-*.pt")
    before = saved.stat()

    again = load_or_train_cvae(tmp_path, *data, NUM_CLASSES, CORRECT, FEW_EPOCHS, CPU, seed=0)
    after = saved.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not retrained
    assert list(tmp_path.glob("cvae-*.pt")) == [saved]
    assert torch.equal(first.model.decoder[2].weight, again.model.decoder[2].weight)
    assert again.history == first.history and again.best_epoch == first.best_epoch
    assert not again.model.training
    np.testing.assert_array_equal(generate_offline(first, train_y, 1.0, seed=0)[0],
                                  generate_offline(again, train_y, 1.0, seed=0)[0])

    changed_train = train_x.copy()
    changed_train[0, 0] += 1
    changed_val = val_x.copy()
    changed_val[0, 0] += 1
    load_or_train_cvae(tmp_path, changed_train, train_y, val_x, val_y, NUM_CLASSES, CORRECT, FEW_EPOCHS, CPU, seed=0)
    load_or_train_cvae(tmp_path, train_x, train_y, changed_val, val_y, NUM_CLASSES, CORRECT, FEW_EPOCHS, CPU, seed=0)
    other_beta = dataclasses.replace(FEW_EPOCHS, cvae_beta=1.0)
    load_or_train_cvae(tmp_path, *data, NUM_CLASSES, CORRECT, other_beta, CPU, seed=0)
    load_or_train_cvae(tmp_path, *data, NUM_CLASSES, CORRECT, FEW_EPOCHS, CPU, seed=1)
    assert len(list(tmp_path.glob("cvae-*.pt"))) == 5
    assert saved.stat().st_mtime_ns == before.st_mtime_ns
    assert not list(tmp_path.glob(".*.tmp"))


def test_unreadable_checkpoint_is_user_error(tmp_path, data):
    path = checkpoint_path(tmp_path, *data, NUM_CLASSES, CORRECT, FEW_EPOCHS, seed=0)
    path.write_bytes(b"truncated")
    with pytest.raises(UserError, match="delete it"):
        load_or_train_cvae(tmp_path, *data, NUM_CLASSES, CORRECT, FEW_EPOCHS, CPU, seed=0)
    bundle = train_cvae(*data, NUM_CLASSES, CORRECT, FEW_EPOCHS, CPU, seed=0)
    torch.save({"state_dict": bundle.model.state_dict()}, path)  # readable, but the scaler and history are lost
    with pytest.raises(UserError, match="delete it"):
        load_or_train_cvae(tmp_path, *data, NUM_CLASSES, CORRECT, FEW_EPOCHS, CPU, seed=0)


def test_bundle_records_its_checkpoint(tmp_path, data):
    trained = load_or_train_cvae(tmp_path, *data, NUM_CLASSES, CORRECT, FEW_EPOCHS, CPU, seed=0)
    loaded = load_or_train_cvae(tmp_path, *data, NUM_CLASSES, CORRECT, FEW_EPOCHS, CPU, seed=0)
    expected = checkpoint_path(tmp_path, *data, NUM_CLASSES, CORRECT, FEW_EPOCHS, seed=0)
    assert trained.checkpoint == loaded.checkpoint == expected and expected.is_file()


def test_online_sampler_fresh_each_epoch_with_training_label_distribution(bundle, data):
    train_y = data[1]
    sampler = OnlineSampler(bundle, train_y, factor=10, variance=1.0, seed=3, device=CPU)
    x0, y0 = sampler(0)
    x1, y1 = sampler(1)
    assert x0.shape == (10 * len(train_y), data[0].shape[1]) and y0.shape == (10 * len(train_y),)
    assert x0.device.type == CPU.type and y0.dtype == torch.int64
    assert not torch.equal(x0, x1) and not torch.equal(y0, y1)

    x0_again, y0_again = OnlineSampler(bundle, train_y, factor=10, variance=1.0, seed=3, device=CPU)(0)
    assert torch.equal(x0, x0_again) and torch.equal(y0, y0_again)

    # one more class than the training set holds: the absent class must never be drawn
    with_absent_class = train_cvae(*data, NUM_CLASSES + 1, CORRECT, FEW_EPOCHS, CPU, seed=0)
    _, labels = OnlineSampler(with_absent_class, train_y, seed=3, device=CPU)(2)
    drawn = np.bincount(labels.numpy(), minlength=NUM_CLASSES + 1) / len(labels)
    expected = np.bincount(train_y, minlength=NUM_CLASSES + 1) / len(train_y)
    assert drawn[NUM_CLASSES] == 0
    np.testing.assert_allclose(drawn, expected, atol=0.04)  # 2,000 draws: ~3.5 standard errors


def test_val_dimension_mismatch_is_user_error(data):
    train_x, train_y, val_x, val_y = data
    with pytest.raises(UserError, match="dimension"):
        train_cvae(train_x, train_y, val_x[:, :8], val_y, NUM_CLASSES, CORRECT, FEW_EPOCHS, CPU, seed=0)
