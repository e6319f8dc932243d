"""The DP baselines: the class-conditional Gaussian release and the least-squares probe (src.dp_stats).

Accounting against the exact Gaussian mechanism (three Gaussian mechanisms with multipliers z_i on
their sensitivities are one Gaussian mechanism with 1 / z^2 = sum 1 / z_i^2), each statistic's
sensitivity on data (one record added, extreme ones included), and utility on a small mixture
against the closed forms (the exact statistics, and least squares solved directly).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from src.anonymizers.dp_gaussian import GaussAnonymizer, GaussMaking, GaussRelease, sample_gaussians
from src.anonymizers.dp_probe import least_squares
from src.anonymizers.base import ReleaseInputs
from src.dp_stats import (class_sums, clip_rows, exact_statistics, noisy_statistics, residual_scatter, statistics_of,
                          symmetric_noise)
from src.io import load_database, save_database

pytest.importorskip("opacus")
from test_ledger import exact_gaussian_delta  # noqa: E402 (the ledger's own oracle)

REPO = Path(__file__).resolve().parents[1]


def radii(center: float, mean: float, residual: float, **making) -> GaussMaking:
    """The DP Gaussian's settings with these clipping radii, at delta 1e-5 and the default shares."""
    return GaussMaking(dpg_center_clip=center, dpg_mean_clip=mean, dpg_residual_clip=residual,
                       **{"dpg_delta": 1e-5, **making})


def mixture(n_per_class: int, dim: int, classes: int, seed: int, sample_seed: int = 0, spread: float = 3.0):
    """Gaussian classes with a shared anisotropic covariance (the model the release assumes); `seed` picks
    the model, `sample_seed` the records."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, (classes, dim))
    mixing = rng.normal(0, 1, (dim, dim)) / math.sqrt(dim)
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + np.random.default_rng([seed, sample_seed]).normal(0, 1, (len(y), dim)) @ mixing
    return x, y, centres, mixing.T @ mixing


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 8.0])
def test_accounting_is_the_exact_gaussian_mechanism_at_the_target(epsilon):
    x, y, _, _ = mixture(50, 4, 3, seed=0)
    dp = noisy_statistics(x, y, 3, epsilon, radii(20.0, 10.0, 5.0), np.random.default_rng(0)).dp
    z = 1 / math.sqrt(sum(1 / m["noise_multiplier"] ** 2 for m in dp["mechanisms"]))
    assert dp["spent_epsilon"] <= epsilon * (1 + 1e-9) and dp["delta"] == 1e-5
    assert exact_gaussian_delta(dp["spent_epsilon"], z) <= 1e-5  # the guarantee holds
    assert exact_gaussian_delta(epsilon * (1 - 2e-3), z) > 1e-5  # and the noise is what it needs (to 0.1 %)
    shares = [dp["statistics"][name]["share"] for name in ("counts", "centre", "sums", "scatter")]
    assert [1 / (z * z) * s for s in shares] == pytest.approx([1 / m["noise_multiplier"] ** 2
                                                               for m in dp["mechanisms"]])
    assert "relation" in dp and set(dp) >= {"mechanisms", "target_epsilon", "spent_epsilon", "delta"}


def test_each_statistic_moves_at_most_its_sensitivity_when_one_record_is_added():
    x, y, _, _ = mixture(40, 6, 3, seed=1)
    rng = np.random.default_rng(2)
    mean_clip, residual_clip = 4.0, 2.0
    means = rng.normal(0, 1, (3, 6))  # released by round 1: fixed when round 2 runs
    onehot = np.eye(3)
    base_sums, base_scatter = class_sums(x, onehot[y], mean_clip), residual_scatter(x, y, means, residual_clip)
    moves = []
    for scale in (0.1, 1.0, 100.0, 1e6):  # from inside both clips to far outside
        record, label = rng.normal(0, scale, (1, 6)), np.array([int(rng.integers(3))])
        x2, y2 = np.concatenate([x, record]), np.concatenate([y, label])
        centre_move = np.linalg.norm(clip_rows(x2, 3.0).sum(axis=0) - clip_rows(x, 3.0).sum(axis=0))
        assert centre_move <= 3.0 * (1 + 1e-9)
        sums_move = np.linalg.norm(class_sums(x2, onehot[y2], mean_clip) - base_sums)
        scatter_move = np.linalg.norm(residual_scatter(x2, y2, means, residual_clip) - base_scatter)
        assert sums_move <= mean_clip * (1 + 1e-9) and scatter_move <= residual_clip ** 2 * (1 + 1e-9)
        moves.append((sums_move, scatter_move))
    assert moves[-1] == pytest.approx((mean_clip, residual_clip ** 2))  # the bound is reached: the clip acts
    np.testing.assert_allclose(np.linalg.norm(clip_rows(x * 50, 3.0), axis=1), 3.0)


def test_scatter_noise_is_the_symmetrised_whole_matrix_mechanism():
    """The scatter's noise is (G + G^T) / 2 with G iid N(0, std^2) over the whole matrix, whose Frobenius
    sensitivity the previous test bounds: std on the diagonal, std / sqrt(2) off it, and the spectral
    norm sqrt(2 D) std of the semicircle law's edge, which the covariance floor is a quarter of."""
    std, dim = 3.0, 300
    noise = symmetric_noise(dim, std, np.random.default_rng(7))
    np.testing.assert_array_equal(noise, noise.T)
    off = noise[np.triu_indices(dim, 1)]
    assert np.std(np.diag(noise)) == pytest.approx(std, rel=0.1)
    assert np.std(off) == pytest.approx(std / math.sqrt(2), rel=0.01)
    assert np.linalg.norm(noise, 2) == pytest.approx(math.sqrt(2 * dim) * std, rel=0.05)


def test_noise_is_secret_unless_seeded_and_non_finite_input_is_refused():
    x, y, _, _ = mixture(30, 3, 2, seed=3)
    secret = radii(20.0, 10.0, 5.0)
    first, second = (statistics_of(x, y, 2, 1.0, secret, seed=0).means for _ in range(2))
    assert not np.array_equal(first, second)  # same --seed, fresh noise
    seeded = radii(20.0, 10.0, 5.0, dpg_seeded_noise_not_private=True)
    np.testing.assert_array_equal(statistics_of(x, y, 2, 1.0, seeded, 0).means,
                                  statistics_of(x, y, 2, 1.0, seeded, 0).means)
    bad = x.copy()
    bad[3, 1] = np.nan
    from src.cli import UserError
    with pytest.raises(UserError, match="non-finite"):
        statistics_of(bad, y, 2, 1.0, secret, 0)
    with pytest.raises(UserError, match="below 1/N"):
        statistics_of(x, y, 2, 1.0, radii(20.0, 10.0, 5.0, dpg_delta=0.1), 0)


def test_exact_release_matches_the_mixture_and_dp_noise_shrinks_with_epsilon():
    x, y, centres, covariance = mixture(4000, 5, 3, seed=4)
    exact = exact_statistics(x, y, 3)
    assert exact.class_sizes().tolist() == [4000] * 3
    np.testing.assert_allclose(exact.means, centres, atol=0.08)
    np.testing.assert_allclose(exact.covariance(), covariance, atol=0.08)
    samples, labels = sample_gaussians(exact.means, exact.covariance(), np.array([3000, 0, 5]),
                                       np.random.default_rng(0))
    assert np.bincount(labels, minlength=3).tolist() == [3000, 0, 5]
    np.testing.assert_allclose(np.cov(samples[labels == 0].T), covariance, atol=0.1)
    clip = float(np.linalg.norm(x, axis=1).max())  # nothing clipped: the error is the noise alone
    errors = []
    for epsilon in (0.5, 8.0):
        noisy = [noisy_statistics(x, y, 3, epsilon, radii(clip, 2 * clip, clip), np.random.default_rng(seed))
                 for seed in range(5)]
        errors.append(np.mean([np.abs(stats.means - exact.means).max() for stats in noisy]))
    assert errors[1] < errors[0] / 4  # the noise's std scales as 1 / epsilon


def test_least_squares_from_statistics_is_least_squares_on_the_rows():
    x, y, _, _ = mixture(200, 6, 4, seed=5)
    exact = exact_statistics(x, y, 4)
    weight, bias = least_squares(exact.means, exact.covariance(), exact.class_sizes(), ridge=0.0)
    design = np.hstack([x, np.ones((len(x), 1))])
    direct = np.linalg.lstsq(design, np.eye(4)[y], rcond=None)[0]
    np.testing.assert_allclose(weight, direct[:-1], atol=1e-8)
    np.testing.assert_allclose(bias, direct[-1], atol=1e-8)


def test_least_squares_of_clipped_records_zeroes_the_autograd_gradient_of_their_loss():
    """The DP probe's per-record clipping, against autograd: from the statistics of rows clipped one by one,
    least_squares returns the minimiser of the mean squared loss of those clipped records (plus the ridge),
    so the loss's gradient, each record's taken by autograd and summed, vanishes there."""
    import torch

    x, y, _, _ = mixture(150, 6, 4, seed=9)
    clipped = clip_rows(x, 0.6 * float(np.median(np.linalg.norm(x, axis=1))))  # about half the rows clipped
    exact = exact_statistics(clipped, y, 4)
    ridge = 0.05
    weight, bias = least_squares(exact.means, exact.covariance(), exact.class_sizes(), ridge)
    w = torch.tensor(weight, requires_grad=True)
    b = torch.tensor(bias, requires_grad=True)
    targets = torch.eye(4, dtype=torch.float64)[torch.from_numpy(y)]
    gradient_w, gradient_b = torch.zeros_like(w), torch.zeros_like(b)
    for row, target in zip(torch.from_numpy(clipped), targets):  # per record, then summed
        loss = 0.5 * ((row @ w + b - target) ** 2).sum() / len(y)
        grad_w, grad_b = torch.autograd.grad(loss, (w, b))
        gradient_w += grad_w
        gradient_b += grad_b
    gradient_w += ridge * w.detach()  # the ridge's own gradient
    assert float(gradient_w.abs().max()) < 1e-10 and float(gradient_b.abs().max()) < 1e-10
    moved = least_squares(exact.means, exact.covariance(), exact.class_sizes(), 2 * ridge)[0]
    assert np.abs(moved - weight).max() > 1e-4  # the ridge enters: the check can tell them apart


def test_dp_probe_and_release_classify_a_mixture_at_epsilon_1():
    x, y, _, _ = mixture(1000, 8, 4, seed=6)
    test_x, test_y, _, _ = mixture(250, 8, 4, seed=6, sample_seed=1)  # same model, held-out records
    clip = 30.0
    stats = noisy_statistics(x, y, 4, 1.0, radii(clip, clip, 10.0), np.random.default_rng(1))
    weight, bias = least_squares(stats.means, stats.covariance(), stats.class_sizes(), ridge=0.1)
    assert np.mean((test_x @ weight + bias).argmax(axis=1) == test_y) > 0.95
    inputs = ReleaseInputs(x.astype(np.float32), y, x[:0], y[:0], 4, Path("."))
    making = radii(clip, clip, 10.0, dpg_seeded_noise_not_private=True)
    release = GaussAnonymizer().make(inputs, GaussRelease(dpg_epsilon=1.0), making, seed=0, device="cpu")
    assert abs(len(release.labels) - len(y)) < 200 and release.details["dp"]["target_epsilon"] == 1.0
    released = exact_statistics(release.embeddings, release.labels, 4)
    weight, bias = least_squares(released.means, released.covariance(), released.class_sizes(), ridge=0.0)
    assert np.mean((test_x @ weight + bias).argmax(axis=1) == test_y) > 0.95


def test_a_larger_release_samples_the_same_statistics_more_closely():
    """--dpg_factor f: f times each noisy count, the same noise and accounting (sampling is post-processing),
    and the release's class means nearer the statistics' (their sampling error shrinks as 1 / sqrt(f))."""
    x, y, _, _ = mixture(500, 6, 3, seed=8)
    inputs = ReleaseInputs(x.astype(np.float32), y, x[:0], y[:0], 3, Path("."))
    making = radii(30.0, 30.0, 10.0, dpg_seeded_noise_not_private=True)
    stats = statistics_of(x, y, 3, 1.0, making, seed=0)  # the noise both releases below draw
    releases = {factor: GaussAnonymizer().make(inputs, GaussRelease(dpg_epsilon=1.0, dpg_factor=factor), making,
                                               seed=0, device="cpu") for factor in (1, 10)}
    errors = {}
    for factor, release in releases.items():
        assert np.bincount(release.labels, minlength=3).tolist() == (factor * stats.class_sizes()).tolist()
        errors[factor] = np.abs(exact_statistics(release.embeddings, release.labels, 3).means - stats.means).max()
    assert releases[10].details == releases[1].details  # the same accounting
    assert errors[10] < errors[1] / 2
    anonymizer = GaussAnonymizer()
    assert anonymizer.flag(GaussRelease(dpg_epsilon=1.0, dpg_factor=10)) == "gauss-x10-dp1"
    assert anonymizer.flag(GaussRelease(dpg_epsilon=1.0)) == "gauss-dp1"
    assert anonymizer.parse_flag("gauss-x10-dp1") == GaussRelease(dpg_epsilon=1.0, dpg_factor=10)


@pytest.mark.slow
def test_scripts_write_a_dp_release_and_dp_probe_results(tmp_path):
    """anonymize.py --anonymizer gauss and probing.py --anonymizer lsq end to end on a small mixture, where
    opacus cannot be imported: the baselines' accounting is exact without it (it is an optional extra)."""
    x, y, _, _ = mixture(300, 16, 3, seed=7)
    folder = tmp_path / "db" / "mix" / "b"
    for split, (xs, ys) in {"train": (x, y), "val": mixture(40, 16, 3, 7, 1)[:2],
                            "test": mixture(60, 16, 3, 7, 2)[:2]}.items():
        save_database(folder / f"{split}.npz", xs.astype(np.float32), ys, {"stage": "create_db"})
    common = ["--dataset", "mix", "--backbone", "b", "--database_root", str(tmp_path / "db"), "--ckpt_root",
              str(tmp_path / "ck"), "--device", "cpu"]

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        without_opacus = ("import runpy, sys; sys.modules['opacus'] = None; sys.argv = sys.argv[1:]; "
                          "runpy.run_path(sys.argv[0], run_name='__main__')")
        return subprocess.run([sys.executable, "-c", without_opacus, script, *args], cwd=REPO, capture_output=True,
                              text=True)

    made = run("anonymize.py", *common, "--anonymizer", "gauss", "--dpg_epsilon", "2", "--dpg_center_clip", "40",
                "--dpg_mean_clip", "20")
    assert made.returncode == 0, made.stderr
    _, labels, meta = load_database(folder / "train_gauss-dp2-s42.npz")
    assert meta["dp"]["spent_epsilon"] <= 2 and not meta["dp"]["seeded_noise_not_private"]
    for anonymizer in (["gauss", "--dpg_epsilon", "2"], ["lsq", "--dpp_epsilon", "2"], ["lsq"]):
        probed = run("probing.py", *common, "--output_root", str(tmp_path / "out"), "--anonymizer", *anonymizer)
        assert probed.returncode == 0, probed.stderr
    result = json.loads((tmp_path / "out" / "mix" / "mix_lsq-dp2-s42.json").read_text())
    assert result["dp_spent_epsilon"] <= 2 and result["accuracy"] > 80 and result["probe_train_s"] >= 0
    larger = ["--anonymizer", "gauss", "--dpg_epsilon", "2", "--dpg_factor", "3"]
    assert run("anonymize.py", *common, *larger).returncode == 0
    assert run("probing.py", *common, "--output_root", str(tmp_path / "out"), *larger).returncode == 0
    result = json.loads((tmp_path / "out" / "mix" / "mix_gauss-x3-dp2-s42.json").read_text())
    assert abs(result["n_released"] - 3 * len(y)) < 3 * 60 and result["n_privacy"] == result["n_released"] // 3
    bad = x.copy().astype(np.float32)
    bad[0, 0] = np.inf
    save_database(folder / "train.npz", bad, y, {"stage": "create_db"})
    (folder / "train_gauss-dp2-s42.npz").unlink()
    refused = run("anonymize.py", *common, "--anonymizer", "gauss", "--dpg_epsilon", "2")
    assert refused.returncode == 2 and refused.stderr.startswith("error:") and "NaN or inf" in refused.stderr
    assert refused.stderr.count("\n") == 1 and not (folder / "train_gauss-dp2-s42.npz").exists()


def test_tuning_tool_scores_every_setting_against_ridge_least_squares_on_the_rows(tmp_path):
    """python -m src.dp_tune on a public database in the real format: with all records inside every radius
    and the noise negligible, every row is the exact ridge least squares' accuracy; at a small epsilon the
    noise shows; bad input is refused with one line."""
    from src.anonymizers.dp_probe import RIDGE
    from src.dp_tune import GRID

    (x, y, _, _), (test_x, test_y, _, _) = (mixture(n, 16, 3, seed=8, sample_seed=draw, spread=0.3)
                                            for n, draw in ((2000, 0), (200, 1)))
    x, test_x = 0.1 * x, 0.1 * test_x  # norms under 1: inside every radius GRID tries; classes overlap
    folder = tmp_path / "db" / "public" / "b"
    for split, (xs, ys) in {"train": (x, y), "test": (test_x, test_y)}.items():
        save_database(folder / f"{split}.npz", xs.astype(np.float32), ys, {"stage": "create_db"})
    x = x.astype(np.float32).astype(np.float64)
    centred, onehot = x - x.mean(axis=0), np.eye(3)[y]

    def ridge_least_squares_accuracy(ridge: float) -> float:
        weight = np.linalg.solve(centred.T @ centred / len(x) + ridge * np.eye(16), centred.T @ onehot / len(x))
        bias = onehot.mean(axis=0) - x.mean(axis=0) @ weight
        return 100 * np.mean((test_x.astype(np.float32) @ weight + bias).argmax(axis=1) == test_y)

    def accuracies(*args: str) -> list[float]:
        run = subprocess.run([sys.executable, "-m", "src.dp_tune", "--dataset", "public", "--backbone", "b",
                              "--database_root", str(tmp_path / "db"), "--draws", "2", *args],
                             cwd=REPO, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        rows = [line.split("|") for line in run.stdout.splitlines()[4:]]  # after the title and the header
        assert [(row[1].strip(), row[2].split("(")[0].strip()) for row in rows] == [
            (name, " / ".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}")
            for name, values in GRID.items() for value in values]
        assert sum("(default)" in row[2] for row in rows) == len(GRID)
        return [float(row[3].split("±")[0]) for row in rows]

    ridges = [value if name == "ridge" else RIDGE for name, values in GRID.items() for value in values]
    exact = [ridge_least_squares_accuracy(ridge) for ridge in ridges]
    assert 60 < exact[0] < 90 and len(set(exact)) > 1  # the classes overlap, and the ridge matters
    assert accuracies("--epsilon", "1e5") == pytest.approx(exact, abs=1.0)
    assert np.mean(accuracies("--epsilon", "0.05")) < np.mean(exact) - 5
    for args, message in ((["--epsilon", "0"], "--epsilon 0: give a finite number above 0"),
                          (["--epsilon", "1", "--dataset", "absent"], "missing database")):
        refused = subprocess.run([sys.executable, "-m", "src.dp_tune", "--dataset", "public", "--backbone", "b",
                                  "--database_root", str(tmp_path / "db"), *args], cwd=REPO, capture_output=True,
                                 text=True)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and message in refused.stderr
