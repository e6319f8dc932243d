"""DP-CVAE: accounting against opacus's accountant, clipping against per-record autograd, and no private
statistic outside the budget, on small Gaussian-mixture embeddings."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_checks import assert_one_line_error  # tests/cli_checks.py
from src.cli import UserError
from src.cvae import CVAE, CVAEConfig, OnlineSampler, batch_loss, evaluate_loss, generate_offline
from src.io import save_database
from src.dp_cvae import (DPSettings, clipped_gradient_sum, default_delta, dp_class_counts, released_labels,
                         train_cvae_dp)

CPU = torch.device("cpu")
NUM_CLASSES = 3


def mixture(num_samples: int, seed: int, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Three class clusters (one-hot centres of height 4) with unit noise, proportions 0.6 / 0.3 / 0.1."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(NUM_CLASSES, size=num_samples, p=(0.6, 0.3, 0.1))
    return (4 * np.eye(NUM_CLASSES, dim)[labels] + rng.normal(size=(num_samples, dim))).astype(np.float32), labels


def small_config(batch_size: int = 32) -> CVAEConfig:
    return CVAEConfig(batch_size=batch_size, hidden_dim=16, latent_dim=4, lr=1e-2)


@pytest.mark.parametrize("num_samples, batch_size, epochs", [(60, 16, 3), (200, 64, 2), (1078, 512, 5)])
def test_spent_epsilon_within_target_for_the_steps_run(num_samples, batch_size, epochs):
    accountants = pytest.importorskip("opacus.accountants")
    x, y = mixture(num_samples, seed=0)
    dp = DPSettings(epsilon=2.0, epochs=epochs)
    _, accounting = train_cvae_dp(x, y, NUM_CLASSES, small_config(batch_size), dp, CPU, seed=0)

    batches = math.ceil(num_samples / batch_size)
    assert accounting["steps"] == epochs * batches and accounting["sample_rate"] == 1 / batches
    assert accounting["delta"] == default_delta(num_samples) < 1 / num_samples
    assert accounting["spent_epsilon"] <= dp.epsilon + 1e-6
    assert accounting["spent_epsilon"] > dp.epsilon - 0.02  # calibrated, not merely safe
    # An accountant of our own, told only the mechanism's parameters, agrees with the recorded epsilon.
    accountant = accountants.RDPAccountant()
    accountant.history = [(accounting["noise_multiplier"], accounting["sample_rate"], accounting["steps"])]
    assert accountant.get_epsilon(delta=accounting["delta"]) == pytest.approx(accounting["sgd_epsilon"])
    assert accounting["spent_epsilon"] == pytest.approx(accounting["sgd_epsilon"] + dp.count_share * dp.epsilon)


def per_record_clipped_sum(model: CVAE, x, onehot, noise, config, max_grad_norm) -> tuple[list, list[float]]:
    """The oracle: each record's gradient by autograd alone, clipped to the norm, then summed."""
    parameters = list(model.parameters())
    total = [torch.zeros_like(parameter) for parameter in parameters]
    norms = []
    for i in range(len(x)):
        rows = slice(i, i + 1)
        grads = torch.autograd.grad(batch_loss(model, x[rows], onehot[rows], noise[rows], config), parameters)
        norm = torch.sqrt(sum(grad.pow(2).sum() for grad in grads))
        norms.append(norm.item())
        for accumulated, grad in zip(total, grads):
            accumulated += grad * min(1.0, max_grad_norm / (norm.item() + 1e-6))
    return total, norms


def test_clipped_gradient_sum_equals_per_record_clipping():
    torch.manual_seed(0)
    config = small_config()
    model = CVAE(6, NUM_CLASSES, config.hidden_dim, config.latent_dim).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(7, 6, generator=generator, dtype=torch.float64)
    x[0] *= 0  # a record far from the others, with a larger gradient
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2, 0]), NUM_CLASSES).double()
    noise = torch.randn(7, config.latent_dim, generator=generator, dtype=torch.float64)
    _, norms = per_record_clipped_sum(model, x, onehot, noise, config, math.inf)
    max_grad_norm = float(np.median(norms))  # some records are clipped, some are not
    expected, _ = per_record_clipped_sum(model, x, onehot, noise, config, max_grad_norm)

    sums = clipped_gradient_sum(model, x, onehot, noise, config, max_grad_norm)
    for parameter, oracle in zip(model.parameters(), expected):
        torch.testing.assert_close(sums[parameter], oracle)
    assert min(norms) < max_grad_norm < max(norms)


def test_empty_poisson_batch_gives_zero_gradient_sums():
    config = small_config()
    model = CVAE(6, NUM_CLASSES, config.hidden_dim, config.latent_dim)
    sums = clipped_gradient_sum(model, torch.zeros(0, 6), torch.zeros(0, NUM_CLASSES), torch.zeros(0, 4), config, 1.0)
    for parameter in model.parameters():
        assert torch.equal(sums[parameter], torch.zeros_like(parameter))


def test_scaler_and_class_counts_ignore_a_records_extreme_value():
    """Neither the scaling nor the class counts may read the private data's minima or maxima."""
    pytest.importorskip("opacus")
    x, y = mixture(100, seed=2)
    changed = x.copy()
    changed[np.argmax(x[:, 0]), 0] = 1e6
    dp = DPSettings(epsilon=4.0, epochs=1, bounds=(-3.0, 7.0))
    (bundle, accounting), (other, other_accounting) = (
        train_cvae_dp(data, y, NUM_CLASSES, small_config(), dp, CPU, seed=0) for data in (x, changed))
    for scaler in (bundle.scaler, other.scaler):
        assert torch.equal(scaler.minimum, torch.full((8,), -3.0)) and torch.equal(scaler.span, torch.full((8,), 10.0))
    assert accounting["class_counts"] == other_accounting["class_counts"]
    assert sum(accounting["class_counts"]) == len(x)


def test_zero_count_share_gives_uniform_counts_whatever_the_labels():
    rng = np.random.default_rng(0)
    for labels in (np.zeros(10, dtype=np.int64), np.array([0, 1, 1, 2, 2, 2, 2, 2, 2, 2])):
        assert dp_class_counts(labels, NUM_CLASSES, 0.0, 10, rng).tolist() == [4, 3, 3]


def test_class_count_noise_has_the_laplace_scale():
    """Two classes of 500 and Laplace(1/epsilon) on each count: the released first count is about
    500 + (L0 - L1) / 2, whose standard deviation is sqrt(2 * 2 / epsilon^2) / 2 = 1 / epsilon."""
    labels = np.repeat([0, 1], 500)
    epsilon = 0.2
    rng = np.random.default_rng(0)
    first = np.array([dp_class_counts(labels, 2, epsilon, 1000, rng)[0] for _ in range(4000)])
    assert first.mean() == pytest.approx(500, abs=0.5)
    assert first.std() == pytest.approx(1 / epsilon, rel=0.1)


def test_seeded_runs_are_reproducible_on_cpu():
    pytest.importorskip("opacus")
    x, y = mixture(120, seed=3)
    dp = DPSettings(epsilon=1.0, epochs=2)
    runs = [train_cvae_dp(x, y, NUM_CLASSES, small_config(), dp, CPU, seed=seed) for seed in (5, 5, 6)]
    (first, first_accounting), (second, second_accounting), (other, _) = runs
    assert first_accounting == second_accounting
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name])
    assert not torch.equal(first.model.decoder[0].weight, other.model.decoder[0].weight)


def test_secret_noise_is_not_the_seeds():
    """With secret noise the seed fixes the initial weights only: two runs release different models."""
    pytest.importorskip("opacus")
    x, y = mixture(120, seed=3)
    dp = DPSettings(epsilon=1.0, epochs=1, secret_noise=True)
    (first, accounting), (second, _) = (train_cvae_dp(x, y, NUM_CLASSES, small_config(), dp, CPU, 5) for _ in range(2))
    assert not torch.equal(first.model.decoder[0].weight, second.model.decoder[0].weight)
    assert accounting["noise_seed"] == "secret"


def test_bundle_generates_with_the_released_class_counts():
    pytest.importorskip("opacus")
    x, y = mixture(90, seed=4)
    bundle, accounting = train_cvae_dp(x, y, NUM_CLASSES, small_config(), DPSettings(epsilon=8.0, epochs=2), CPU, 0)
    labels = released_labels(np.array(accounting["class_counts"]))
    vectors, generated = generate_offline(bundle, labels, variance=1.0, seed=0)
    assert np.bincount(generated, minlength=NUM_CLASSES).tolist() == accounting["class_counts"]
    assert vectors.min() >= -10.0 and vectors.max() <= 10.0  # the decoder's sigmoid mapped onto the bounds
    online, _ = OnlineSampler(bundle, labels, factor=2, seed=0, device=CPU)(1)
    assert online.shape == (2 * len(x), x.shape[1])


@pytest.mark.slow
def test_training_at_a_generous_budget_lowers_the_loss():
    """Utility sanity: at epsilon = 8 thirty epochs of DP training reconstruct better than one."""
    pytest.importorskip("opacus")
    x, y = mixture(400, seed=5)
    config = small_config(64)
    untrained, _ = train_cvae_dp(x, y, NUM_CLASSES, config, DPSettings(epsilon=8.0, epochs=1, count_share=0), CPU, 0)
    trained, _ = train_cvae_dp(x, y, NUM_CLASSES, config, DPSettings(epsilon=8.0, epochs=30, count_share=0), CPU, 0)
    assert evaluate_loss(trained, x, y, seed=0) < 0.8 * evaluate_loss(untrained, x, y, seed=0)


def test_default_delta_is_a_power_of_ten_below_one_over_n():
    assert [default_delta(n) for n in (9, 10, 999, 1000, 1078, 50_000)] == [0.1, 0.01, 1e-3, 1e-4, 1e-4, 1e-5]


@pytest.mark.parametrize("settings", [
    {"epsilon": 0.0}, {"epsilon": -1.0}, {"epsilon": float("nan")}, {"epsilon": float("inf")},
    {"epsilon": 1.0, "delta": 0.0}, {"epsilon": 1.0, "delta": 1.0}, {"epsilon": 1.0, "delta": 1.5},
    {"epsilon": 1.0, "max_grad_norm": 0.0}, {"epsilon": 1.0, "max_grad_norm": -1.0},
    {"epsilon": 1.0, "epochs": 0}, {"epsilon": 1.0, "bounds": (1.0, 1.0)}, {"epsilon": 1.0, "count_share": 1.0},
])
def test_bad_settings_are_user_errors(settings):
    with pytest.raises(UserError, match="--"):
        DPSettings(**settings)


def test_delta_of_one_over_n_or_more_is_a_user_error():
    pytest.importorskip("opacus")
    x, y = mixture(50, seed=0)
    with pytest.raises(UserError, match="--dp_delta"):
        train_cvae_dp(x, y, NUM_CLASSES, small_config(), DPSettings(epsilon=1.0, delta=0.02), CPU, 0)


def test_reference_objective_is_a_user_error():
    pytest.importorskip("opacus")
    x, y = mixture(50, seed=0)
    config = CVAEConfig(reference_objective=True)
    with pytest.raises(UserError, match="--reference_objective"):
        train_cvae_dp(x, y, NUM_CLASSES, config, DPSettings(epsilon=1.0), CPU, 0)


def test_budget_too_small_for_one_step_is_a_user_error():
    """One full-batch step (rate 1, the accountant's closed form), yet no noise up to 1e6 reaches it."""
    pytest.importorskip("opacus")
    x, y = mixture(50, seed=0)
    with pytest.raises(UserError, match="--dp_epsilon"):
        train_cvae_dp(x, y, NUM_CLASSES, small_config(64), DPSettings(epsilon=1e-9, delta=1e-9, epochs=1), CPU, 0)


def test_missing_opacus_is_a_user_error_saying_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)  # what `import opacus` sees when it is not installed
    x, y = mixture(50, seed=0)
    with pytest.raises(UserError, match="pip install opacus"):
        train_cvae_dp(x, y, NUM_CLASSES, small_config(), DPSettings(epsilon=1.0), CPU, 0)


@pytest.mark.slow
@pytest.mark.parametrize("args, fragments", [
    (["--dp_epsilon", "0"], ["--dp_epsilon"]),
    (["--dp_epsilon", "nan"], ["--dp_epsilon"]),
    (["--dp_epsilon", "1", "--dp_delta", "1.5"], ["--dp_delta"]),
    (["--dp_epsilon", "1", "--dp_delta", "0.1"], ["--dp_delta", "1/N"]),
    (["--dp_epsilon", "1", "--max_grad_norm", "0"], ["--max_grad_norm"]),
    (["--dp_epsilon", "1", "--reference_objective"], ["--reference_objective", "--dp_epsilon"]),
    (["--dp_epsilon", "1e-9", "--dp_delta", "1e-9"], ["--dp_epsilon"]),
])
def test_dp_flags_refuse_bad_budgets_in_one_line_and_write_nothing(tmp_path, args, fragments):
    folder = tmp_path / "toy" / "tiny"
    rng = np.random.default_rng(0)
    for split, count in (("train", 53), ("val", 20)):
        labels = np.arange(count) % 2
        save_database(folder / f"{split}.npz", rng.normal(size=(count, 8)) + 3.0 * labels[:, None], labels, {})
    before = sorted(path.name for path in folder.iterdir())
    result = subprocess.run([sys.executable, "anonymize.py", "--dataset", "toy", "--backbone", "tiny", "--device",
                             "cpu", "--database_root", str(tmp_path), "--ckpt_root", str(tmp_path / "ckpts"),
                             "--anonymizer", "cvae", *args], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True)
    assert_one_line_error(result, *fragments)
    assert sorted(path.name for path in folder.iterdir()) == before and not (tmp_path / "ckpts").exists()
