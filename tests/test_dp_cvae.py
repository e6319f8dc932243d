"""DP-CVAE: accounting against independent accountants, clipping against per-record autograd, releases of
neighbouring datasets that differ only through the accounted mechanisms, secret noise, and the ledger, on
small Gaussian-mixture embeddings."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_checks import assert_one_line_error  # tests/cli_checks.py
from src.cli import UserError
from src.cvae import CVAE, OnlineSampler, batch_loss, evaluate_loss, generate_offline
from src.io import file_fingerprint, save_database
from src.naming import private_sidecar_path
from src.anonymizers.cvae import CVAEMaking, CVAERelease
from src.dp_cvae import clipped_gradient_sum, default_delta, dp_class_counts, released_labels, train_cvae_dp

CPU = torch.device("cpu")
NUM_CLASSES = 3


def mixture(num_samples: int, seed: int, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Three class clusters (one-hot centres of height 4) with unit noise, proportions 0.6 / 0.3 / 0.1."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(NUM_CLASSES, size=num_samples, p=(0.6, 0.3, 0.1))
    return (4 * np.eye(NUM_CLASSES, dim)[labels] + rng.normal(size=(num_samples, dim))).astype(np.float32), labels


SMALL = {"cvae_batch_size": 32, "cvae_hidden_dim": 16, "cvae_latent_dim": 4, "cvae_lr": 1e-2}  # a quick network


def dp(epsilon: float, **making) -> tuple[CVAERelease, CVAEMaking]:
    """A small DP-CVAE's settings, its noise seeded (reproducible tests) unless `making` says otherwise."""
    return CVAERelease(dp_epsilon=epsilon), CVAEMaking(**{**SMALL, "dp_seeded_noise_not_private": True, **making})


@pytest.mark.parametrize("num_samples, batch_size, epochs", [(60, 16, 3), (200, 64, 2), (1078, 512, 5)])
def test_spent_epsilon_within_target_by_an_independent_accountant(num_samples, batch_size, epochs):
    """The recorded epsilon is the ledger's Renyi composition; opacus's PRV accountant, told only the recorded
    DP-SGD parameters, plus the histogram's pure epsilon (basic composition) must stay within the target."""
    accountants = pytest.importorskip("opacus.accountants")
    x, y = mixture(num_samples, seed=0)
    _, accounting = train_cvae_dp(x, y, NUM_CLASSES, *dp(2.0, dp_epochs=epochs, cvae_batch_size=batch_size), CPU, 0)

    laplace, sgd = accounting["mechanisms"]
    assert laplace == {"mechanism": "laplace", "epsilon": pytest.approx(0.2)}
    assert sgd["sample_rate"] == accounting["sample_rate"] <= 1 and sgd["steps"] == accounting["steps"]
    assert sgd["steps"] == epochs * round(1 / sgd["sample_rate"] + 0.5 - 1e-9) or sgd["sample_rate"] == 1
    assert accounting["delta"] <= 1 / (10 * num_samples)
    assert accounting["spent_epsilon"] <= 2.0 + 1e-9
    assert accounting["spent_epsilon"] > 2.0 - 0.1  # calibrated, not merely safe
    prv = accountants.PRVAccountant()
    prv.history = [(sgd["noise_multiplier"], sgd["sample_rate"], sgd["steps"])]
    assert prv.get_epsilon(delta=accounting["delta"]) + laplace["epsilon"] <= 2.0 + 1e-6
    assert accounting["relation"].startswith("add/remove one record")


def per_record_clipped_sum(model: CVAE, x, onehot, noise, release, making) -> tuple[list, list[float]]:
    """The oracle: each record's gradient by autograd alone, clipped to the norm, then summed."""
    parameters = list(model.parameters())
    total = [torch.zeros_like(parameter) for parameter in parameters]
    norms = []
    for i in range(len(x)):
        rows = slice(i, i + 1)
        grads = torch.autograd.grad(batch_loss(model, x[rows], onehot[rows], noise[rows], release, making),
                                    parameters)
        norm = torch.sqrt(sum(grad.pow(2).sum() for grad in grads))
        norms.append(norm.item())
        for accumulated, grad in zip(total, grads):
            accumulated += grad * min(1.0, making.max_grad_norm / (norm.item() + 1e-6))
    return total, norms


def test_clipped_gradient_sum_equals_per_record_clipping():
    torch.manual_seed(0)
    release, unclipped = dp(1.0, max_grad_norm=1e12)  # no record reaches the norm
    model = CVAE(6, NUM_CLASSES, unclipped.cvae_hidden_dim, unclipped.cvae_latent_dim).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(7, 6, generator=generator, dtype=torch.float64)
    x[0] *= 0  # a record far from the others, with a larger gradient
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2, 0]), NUM_CLASSES).double()
    noise = torch.randn(7, unclipped.cvae_latent_dim, generator=generator, dtype=torch.float64)
    _, norms = per_record_clipped_sum(model, x, onehot, noise, release, unclipped)
    max_grad_norm = float(np.median(norms))  # some records are clipped, some are not
    _, making = dp(1.0, max_grad_norm=max_grad_norm)
    expected, _ = per_record_clipped_sum(model, x, onehot, noise, release, making)

    sums = clipped_gradient_sum(model, x, onehot, noise, release, making)
    for parameter, oracle in zip(model.parameters(), expected):
        torch.testing.assert_close(sums[parameter], oracle)
    assert min(norms) < max_grad_norm < max(norms)


def test_empty_poisson_batch_gives_zero_gradient_sums():
    release, making = dp(1.0, max_grad_norm=1.0)
    model = CVAE(6, NUM_CLASSES, making.cvae_hidden_dim, making.cvae_latent_dim)
    empty = torch.zeros(0, 6), torch.zeros(0, NUM_CLASSES), torch.zeros(0, making.cvae_latent_dim)
    sums = clipped_gradient_sum(model, *empty, release, making)
    for parameter in model.parameters():
        assert torch.equal(sums[parameter], torch.zeros_like(parameter))


def test_scaler_and_class_counts_ignore_a_records_extreme_value():
    """Neither the scaling nor the class counts may read the private data's minima or maxima."""
    pytest.importorskip("opacus")
    x, y = mixture(100, seed=2)
    changed = x.copy()
    changed[np.argmax(x[:, 0]), 0] = 1e6
    settings = dp(4.0, dp_epochs=1, dp_bounds=(-3.0, 7.0))
    (bundle, accounting), (other, other_accounting) = (
        train_cvae_dp(data, y, NUM_CLASSES, *settings, CPU, seed=0) for data in (x, changed))
    for scaler in (bundle.scaler, other.scaler):
        assert torch.equal(scaler.minimum, torch.full((8,), -3.0)) and torch.equal(scaler.span, torch.full((8,), 10.0))
    assert accounting == other_accounting


def test_class_counts_are_the_rounded_laplace_histogram():
    """Two classes of 500 and Laplace(1/epsilon) on each count: each released count has mean 500 and standard
    deviation sqrt(2) / epsilon (plus rounding), and the noisy total sets the release's size."""
    labels = np.repeat([0, 1], 500)
    epsilon = 0.2
    rng = np.random.default_rng(0)
    draws = [dp_class_counts(labels, 2, epsilon, rng) for _ in range(4000)]
    first = np.array([counts[0] for counts, _ in draws])
    assert first.mean() == pytest.approx(500, abs=0.5)
    assert first.std() == pytest.approx(math.sqrt(2) / epsilon, rel=0.1)
    assert all(abs(counts.sum() - total) <= 1 for counts, total in draws)


def test_default_delta_stays_below_a_tenth_of_one_over_n():
    """From the noisy total plus its high-probability error: delta <= 1 / (10 N) for every draw here."""
    rng = np.random.default_rng(1)
    for num_samples, classes in ((60, 3), (1077, 10), (10_000, 10), (60_000, 10)):
        labels = np.arange(num_samples) % classes
        for _ in range(200):
            _, total = dp_class_counts(labels, classes, 0.1, rng)
            delta = default_delta(total, classes, 0.1)
            assert delta <= 1 / (10 * num_samples) and math.log10(delta).is_integer()


def test_seeded_runs_are_reproducible_on_cpu():
    pytest.importorskip("opacus")
    x, y = mixture(120, seed=3)
    runs = [train_cvae_dp(x, y, NUM_CLASSES, *dp(1.0, dp_epochs=2), CPU, seed=seed)
            for seed in (5, 5, 6)]
    (first, first_accounting), (second, second_accounting), (other, _) = runs
    assert first_accounting == second_accounting and "NOT PRIVATE" in first_accounting["noise"]
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name])
    assert not torch.equal(first.model.decoder[0].weight, other.model.decoder[0].weight)


def test_noise_is_secret_by_default():
    """By default the seed fixes the initial weights only: two runs with one seed release different models."""
    pytest.importorskip("opacus")
    x, y = mixture(120, seed=3)
    settings = dp(1.0, dp_epochs=1, dp_seeded_noise_not_private=False)
    (first, accounting), (second, _) = (train_cvae_dp(x, y, NUM_CLASSES, *settings, CPU, 5)
                                        for _ in range(2))
    assert not torch.equal(first.model.decoder[0].weight, second.model.decoder[0].weight)
    assert accounting["noise"].startswith("secret")


def test_a_non_finite_record_is_refused_before_training():
    pytest.importorskip("opacus")
    x, y = mixture(60, seed=0)
    x[7, 2] = np.nan
    with pytest.raises(UserError, match="NaN or infinite"):
        train_cvae_dp(x, y, NUM_CLASSES, *dp(1.0), CPU, 0)


def test_bundle_generates_with_the_released_class_counts():
    pytest.importorskip("opacus")
    x, y = mixture(90, seed=4)
    bundle, accounting = train_cvae_dp(x, y, NUM_CLASSES, *dp(8.0, dp_epochs=2), CPU, 0)
    labels = released_labels(np.array(accounting["class_counts"]))
    vectors, generated = generate_offline(bundle, labels, variance=1.0, seed=0)
    assert np.bincount(generated, minlength=NUM_CLASSES).tolist() == accounting["class_counts"]
    assert vectors.min() >= -10.0 and vectors.max() <= 10.0  # the decoder's sigmoid mapped onto the bounds
    online, _ = OnlineSampler(bundle, labels, factor=2, seed=0, device=CPU)(1)
    assert online.shape == (2 * len(labels), x.shape[1])


@pytest.mark.slow
def test_training_at_a_generous_budget_lowers_the_loss():
    """Utility sanity: at epsilon = 8 thirty epochs of DP training reconstruct better than one."""
    pytest.importorskip("opacus")
    x, y = mixture(400, seed=5)
    untrained, _ = train_cvae_dp(x, y, NUM_CLASSES, *dp(8.0, dp_epochs=1, cvae_batch_size=64), CPU, 0)
    trained, _ = train_cvae_dp(x, y, NUM_CLASSES, *dp(8.0, dp_epochs=30, cvae_batch_size=64), CPU, 0)
    assert evaluate_loss(trained, x, y, seed=0) < 0.8 * evaluate_loss(untrained, x, y, seed=0)


@pytest.mark.parametrize("field, value", [("dp_delta", 0.0), ("dp_delta", 0.5), ("max_grad_norm", 0.0),
                                          ("max_grad_norm", -1.0), ("dp_epochs", 0), ("dp_bounds", (1.0, 1.0)),
                                          ("dp_count_share", 0.0), ("dp_count_share", 1.0)])
def test_bad_settings_are_user_errors(field, value):
    with pytest.raises(UserError, match="--"):
        CVAEMaking(**{field: value})


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_budgets_are_user_errors(value):
    with pytest.raises(UserError, match="--dp_epsilon"):
        CVAERelease(dp_epsilon=value)


def test_delta_of_one_over_n_or_more_is_a_user_error():
    pytest.importorskip("opacus")
    x, y = mixture(50, seed=0)
    with pytest.raises(UserError, match="--dp_delta"):
        train_cvae_dp(x, y, NUM_CLASSES, *dp(1.0, dp_delta=0.02), CPU, 0)


def test_reference_objective_is_a_user_error():
    with pytest.raises(UserError, match="--reference_objective"):
        CVAERelease(dp_epsilon=1.0, reference_objective=True)


def test_budget_too_small_for_one_step_is_a_user_error():
    """No noise up to 1e6 brings these steps within the budget."""
    pytest.importorskip("opacus")
    x, y = mixture(50, seed=0)
    with pytest.raises(UserError, match="--dp_epsilon"):
        train_cvae_dp(x, y, NUM_CLASSES, *dp(1e-9, dp_delta=1e-9, dp_epochs=1, cvae_batch_size=64), CPU, 0)


def test_missing_opacus_is_a_user_error_saying_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)  # what `import opacus` sees when it is not installed
    x, y = mixture(50, seed=0)
    with pytest.raises(UserError, match="pip install opacus"):
        train_cvae_dp(x, y, NUM_CLASSES, *dp(1.0), CPU, 0)


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
        save_database(folder / f"{split}.npz", rng.normal(size=(count, 8)) + 3.0 * labels[:, None], labels,
                      {"class_names": ["a", "b"]})
    before = sorted(path.name for path in folder.iterdir())
    result = subprocess.run([sys.executable, "anonymize.py", "--dataset", "toy", "--backbone", "tiny", "--device",
                             "cpu", "--database_root", str(tmp_path), "--ckpt_root", str(tmp_path / "ckpts"),
                             "--anonymizer", "cvae", *args], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True)
    assert_one_line_error(result, *fragments)
    assert sorted(path.name for path in folder.iterdir()) == before and not (tmp_path / "ckpts").exists()


def write_split(folder: Path, x: np.ndarray, y: np.ndarray, split: str) -> None:
    save_database(folder / f"{split}.npz", x, y, {"split": split, "class_names": ["a", "b", "c"]})


def release_of(root: Path, train: tuple[np.ndarray, np.ndarray], seed: int = 0,
               seeded: bool = True) -> tuple[np.ndarray, dict, Path]:
    """A DP-CVAE release made by the stage's own function from databases holding `train`: (embeddings, meta,
    path)."""
    from src.io import load_database
    from src.releases import make_release
    from src.settings import AnonymizeSettings

    folder = root / "db" / "toy" / "bb"
    write_split(folder, *train, "train")
    write_split(folder, *mixture(40, seed=9), "val")
    making = CVAEMaking(max_epochs=3, dp_epochs=2, dp_seeded_noise_not_private=seeded)
    settings = AnonymizeSettings(dataset="toy", backbone="bb", seed=seed, device="cpu", database_root=root / "db",
                                 ckpt_root=root / "ckpts", anonymizer="cvae", release=CVAERelease(dp_epsilon=4.0),
                                 making=making)
    path = make_release(settings)
    embeddings, _, meta = load_database(path)
    return embeddings, meta, path


def flatten(record: object, prefix: str = "") -> dict[str, object]:
    if isinstance(record, dict):
        return {k: v for key, value in record.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): record}


@pytest.mark.slow
def test_neighbouring_datasets_differ_only_through_the_accounted_mechanisms(tmp_path):
    """Releases of a train set and of the same set plus one record (same seed, seeded noise so that only the
    data differ): the same meta keys, no fingerprint or other function of the private data, and every value
    that differs is one the mechanisms account for (the noisy counts, and what the training derives from them)."""
    pytest.importorskip("opacus")
    x, y = mixture(150, seed=1)
    extra = (np.vstack([x, x[:1] + 5.0]), np.r_[y, y[:1]])
    (first, meta, path), (second, other_meta, _) = (release_of(tmp_path / name, data)
                                                    for name, data in (("d", (x, y)), ("d1", extra)))
    assert set(flatten(meta)) == set(flatten(other_meta))
    accounted = {"count", "dp.class_counts", "dp.mechanisms", "dp.sample_rate", "dp.steps", "dp.noise_multiplier",
                 "dp.spent_epsilon", "dp.delta"}
    differing = {key for key, value in flatten(meta).items() if flatten(other_meta)[key] != value}
    assert differing <= accounted | {"settings.database_root", "settings.ckpt_root"}
    assert len(first) == sum(meta["dp"]["class_counts"]) and len(second) == sum(other_meta["dp"]["class_counts"])
    text = json.dumps(meta)
    train = tmp_path / "d" / "db" / "toy" / "bb" / "train.npz"
    for private in (file_fingerprint(train), "inputs", "elapsed_s", "val_loss", "best_epoch", str(train)):
        assert private not in text
    sidecar = private_sidecar_path(path)
    kept = json.loads(sidecar.read_text())
    assert kept["inputs"][str(train)] == file_fingerprint(train) and "val_loss_after_training" in kept
    assert "do not publish" in kept["note"].lower()


@pytest.mark.slow
def test_same_seed_gives_other_samples_unless_the_noise_is_seeded(tmp_path):
    pytest.importorskip("opacus")
    data = mixture(120, seed=2)
    secret = [release_of(tmp_path / f"s{i}", data, seeded=False)[0] for i in range(2)]
    seeded = [release_of(tmp_path / f"p{i}", data, seeded=True)[0] for i in range(2)]
    assert secret[0].shape != secret[1].shape or not np.array_equal(secret[0], secret[1])
    np.testing.assert_array_equal(seeded[0], seeded[1])


@pytest.mark.slow
def test_the_ledger_composes_a_splits_releases_and_warns_past_a_threshold(tmp_path):
    pytest.importorskip("opacus")
    data = mixture(120, seed=3)
    metas = [release_of(tmp_path, data, seed=seed)[1] for seed in (0, 1)]
    done = subprocess.run([sys.executable, "-m", "src.ledger", "--database_root", str(tmp_path / "db"),
                           "--warn_epsilon", "5"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("| toy/bb/train |"))
    composed = float(row.split("|")[4])
    each = [meta["dp"]["spent_epsilon"] for meta in metas]
    assert max(each) < composed <= sum(each) + 1e-3  # composition costs more than one, at most their sum
    assert "past --warn_epsilon 5" in done.stderr
