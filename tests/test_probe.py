"""The linear probe, the noisy evaluation and the probing CLIs on small real-format databases."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from src.evaluation import load_probe_data, noisy_test_metrics, privacy_rows
from src.cli import UserError
from src.io import save_database
from src.metrics import auroc
from src.probe import (EARLY_STOPPING_PATIENCE, cross_entropy_gradients, predict_proba, probe_checkpoint_path,
                       train_probe, zscore, zscore_stats)
from src.runtime import resolve_device
from src.settings import ProbeTraining, StageSettings
from cli_checks import assert_one_line_error  # tests/cli_checks.py

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def gaussian_classes(n: int, dim: int = 16, classes: int = 3, spread: float = 1.0, seed: int = 0):
    """Overlapping Gaussian blobs with fixed centres (drawn from seed 99) and `n` samples drawn from `seed`."""
    centres = np.random.default_rng(99).normal(size=(classes, dim))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    return (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(x), torch.from_numpy(y)


def test_zscore_maps_constant_features_to_zero():
    x = np.array([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]], dtype=np.float32)
    mean, std = zscore_stats(x)
    z = zscore(x, mean, std)
    np.testing.assert_allclose(z[:, 0], [-1.2247449, 0.0, 1.2247449], rtol=1e-6)
    assert (z[:, 1] == 0).all()


def test_written_out_gradients_equal_autograd():
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(12, 4)
    inputs, targets = torch.randn(37, 12, generator=generator), torch.tensor([0, 1, 2, 3, 3, 3, 0] * 5 + [1, 2])
    loss = torch.nn.functional.cross_entropy(layer(inputs), targets)
    loss.backward()
    with torch.no_grad():
        loss_sum, grad_weight, grad_bias = cross_entropy_gradients(layer.weight, layer.bias, inputs, targets)
    torch.testing.assert_close(loss_sum / len(targets), loss.detach())
    torch.testing.assert_close(grad_weight, layer.weight.grad)
    torch.testing.assert_close(grad_bias, layer.bias.grad)


def test_probe_matches_logistic_regression_auc():
    train, val, test = (gaussian_classes(n, spread=2.0, seed=s) for n, s in [(600, 1), (200, 2), (1000, 3)])
    model, history = train_probe(tensors(*train), *tensors(*val), 3, ProbeTraining(), CPU, seed=0)
    ours = auroc(test[1], predict_proba(model, torch.from_numpy(test[0])))
    reference = auroc(test[1], LogisticRegression(max_iter=2000).fit(*train).predict_proba(test[0]))
    assert 60.0 < reference < 99.0  # hard enough that a badly trained probe would show
    assert abs(ours - reference) < 1.0
    assert history["best_epoch"] == int(np.argmin(history["val_loss"]))


def test_probe_is_deterministic_and_stops_early():
    train, val = gaussian_classes(300, seed=1), gaussian_classes(100, seed=2)
    config = ProbeTraining(lr=0.1, epochs=100)  # a large step overfits fast, so patience ends the run
    first, history = train_probe(tensors(*train), *tensors(*val), 3, config, CPU, seed=7)
    second, _ = train_probe(tensors(*train), *tensors(*val), 3, config, CPU, seed=7)
    assert torch.equal(first.weight, second.weight)
    assert len(history["val_loss"]) == history["best_epoch"] + 1 + EARLY_STOPPING_PATIENCE
    assert not first.training


def test_callable_source_is_called_every_epoch_and_its_data_used():
    x, y = gaussian_classes(300, spread=0.5, seed=1)
    val_x, val_y = gaussian_classes(200, spread=0.5, seed=2)
    calls = []

    def source(epoch: int):
        calls.append(epoch)
        flipped = y if epoch == 0 else (y + 1) % 3  # from epoch 1 on the source teaches shifted labels
        return tensors(x, flipped)

    model, history = train_probe(source, *tensors(val_x, (val_y + 1) % 3), 3, ProbeTraining(lr=0.01, epochs=30),
                                 CPU, 0)
    assert calls == list(range(len(history["val_loss"])))
    predictions = predict_proba(model, torch.from_numpy(val_x)).argmax(axis=1)
    assert np.mean(predictions == (val_y + 1) % 3) > 0.9 and np.mean(predictions == val_y) < 0.1


def test_checkpoint_is_reused_only_for_the_same_key(tmp_path):
    train, val = gaussian_classes(200, seed=1), gaussian_classes(100, seed=2)
    config = ProbeTraining(epochs=5)
    path = probe_checkpoint_path(tmp_path, config, 0, 3, {"train": "a", "val": "b"})
    assert path != probe_checkpoint_path(tmp_path, config, 0, 3, {"train": "changed", "val": "b"})
    assert path != probe_checkpoint_path(tmp_path, config, 1, 3, {"train": "a", "val": "b"})
    trained, history = train_probe(tensors(*train), *tensors(*val), 3, config, CPU, 0, checkpoint=path)
    assert path.is_file()

    def must_not_train(epoch):
        raise AssertionError("a saved probe should be loaded, not retrained")

    loaded, loaded_history = train_probe(must_not_train, *tensors(*val), 3, config, CPU, 0, checkpoint=path)
    assert torch.equal(trained.weight, loaded.weight)
    assert not history["from_checkpoint"] and loaded_history["from_checkpoint"] and history["train_s"] > 0
    assert loaded_history == {**history, "from_checkpoint": True}  # its training time too, not the load's

    saved = torch.load(path, weights_only=True)
    del saved["history"]["train_s"]  # a checkpoint of older code: it is trained again
    torch.save(saved, path)
    retrained, again = train_probe(tensors(*train), *tensors(*val), 3, config, CPU, 0, checkpoint=path)
    assert not again["from_checkpoint"] and "train_s" in torch.load(path, weights_only=True)["history"]
    assert torch.equal(retrained.weight, trained.weight)  # from the seed's init, not the old file's weights

    path.write_bytes(b"truncated")
    with pytest.raises(UserError, match="probe checkpoint .* delete it"):
        train_probe(must_not_train, *tensors(*val), 3, config, CPU, 0, checkpoint=path)


def test_noise_zero_changes_nothing_and_large_noise_drives_auc_to_chance():
    train, val, test = (gaussian_classes(n, seed=s) for n, s in [(400, 1), (100, 2), (3000, 3)])
    model, _ = train_probe(tensors(*train), *tensors(*val), 3, ProbeTraining(epochs=20), CPU, 0)
    test_x = torch.from_numpy(test[0])
    results = noisy_test_metrics(model, test_x, test[1], [0.0, 1.0, 1000.0], seed=0)
    assert results[0.0]["auc"] == auroc(test[1], predict_proba(model, test_x))
    assert results[0.0]["auc"] > results[1.0]["auc"] > results[1000.0]["auc"]
    assert abs(results[1000.0]["auc"] - 50.0) < 5.0


def write_databases(root: Path, train_dim: int = 8, test_labels_offset: int = 0) -> Path:
    """Tiny real-format databases <root>/toy/bb/{train,val,test}.npz; returns that folder."""
    folder = root / "toy" / "bb"
    for split, n, seed in [("train", 90, 1), ("val", 30, 2), ("test", 45, 3)]:
        x, y = gaussian_classes(n, dim=train_dim if split == "train" else 8, seed=seed)
        save_database(folder / f"{split}.npz", x, y + (test_labels_offset if split == "test" else 0), {"split": split})
    return folder


def test_privacy_is_measured_on_a_seeded_share_of_a_release_sampled_more_than_once_per_record():
    released = np.arange(60, dtype=np.float32).reshape(30, 2)  # rows in class order, as a sampled release
    assert privacy_rows(released, 1, seed=0) is released  # one sample per record: all of it, noisy size or not
    subset = privacy_rows(released, 3, seed=0)
    assert subset.shape == (10, 2) and len({tuple(row) for row in subset}) == 10  # distinct rows of the release
    assert {tuple(row) for row in subset} <= {tuple(row) for row in released}
    assert subset[:, 0].max() >= 30  # drawn from the whole release, not its first rows
    np.testing.assert_array_equal(subset, privacy_rows(released, 3, seed=0))
    assert not np.array_equal(subset, privacy_rows(released, 3, seed=1))


def test_load_probe_data_rejects_mismatched_dimensions(tmp_path):
    write_databases(tmp_path, train_dim=6)
    with pytest.raises(UserError, match=r"train\.npz has 6.*val\.npz has 8"):
        load_probe_data(StageSettings(dataset="toy", backbone="bb", database_root=tmp_path))


def test_load_probe_data_rejects_test_label_unseen_in_training(tmp_path):
    write_databases(tmp_path, test_labels_offset=1)
    with pytest.raises(UserError, match=r"test\.npz has labels \[3\]"):
        load_probe_data(StageSettings(dataset="toy", backbone="bb", database_root=tmp_path))


def test_load_probe_data_rejects_a_single_class(tmp_path):
    folder = write_databases(tmp_path)
    x, y = gaussian_classes(45, dim=8, seed=3)
    save_database(folder / "test.npz", x, np.zeros_like(y), {})
    with pytest.raises(UserError, match=r"test\.npz holds one class only"):
        load_probe_data(StageSettings(dataset="toy", backbone="bb", database_root=tmp_path))


def test_classes_count_from_real_splits_not_released_labels(tmp_path):
    folder = write_databases(tmp_path)
    x, y = gaussian_classes(40, dim=8, seed=4)
    save_database(folder / "train_ksame-2.npz", x, np.where(y == 1, 0, y), {})  # class 1 absent, as in the defect
    save_database(folder / "val.npz", *gaussian_classes(30, dim=8, classes=1, seed=5), {})  # only class 0 in val
    x, y = gaussian_classes(30, dim=8, classes=2, seed=6)
    save_database(folder / "test.npz", x, np.where(y == 1, 2, y), {})  # classes 0 and 2
    settings = StageSettings(dataset="toy", backbone="bb", database_root=tmp_path)
    data = load_probe_data(settings, folder / "train_ksame-2.npz")
    assert data.num_classes == 3
    assert len(data.inputs) == 4


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def common_args(tmp_path: Path) -> list[str]:
    return ["--dataset", "toy", "--backbone", "bb", "--database_root", str(tmp_path / "db"),
            "--output_root", str(tmp_path / "logs"), "--ckpt_root", str(tmp_path / "ckpts"), "-e", "30", "-l", "0.03"]


def assert_user_error(result: subprocess.CompletedProcess, tmp_path: Path, *fragments: str) -> None:
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ckpts").exists()


@pytest.mark.slow
def test_probing_cli_writes_complete_result(tmp_path):
    folder = write_databases(tmp_path / "db")
    result = run_script("probing.py", *common_args(tmp_path), "--seed", "3")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "logs" / "toy" / "toy_identity-s3.json").read_text())
    for key in ("auc", "accuracy", "balanced_accuracy", "average_mindistance", "dcr_p5", "dcr_p50",
                "share_closer_than_real_nn", "mia_auc"):
        assert isinstance(record[key], float)
    assert record["sigma"] == 0.0 and record["average_mindistance"] == 0.0 and record["mia_auc"] > 90
    assert record["settings"]["seed"] == 3 and record["settings"]["anonymizer"] == "identity"
    assert record["settings"]["device"] == "auto" and record["device"] == str(resolve_device("auto"))
    assert set(record["inputs"]) == {str(folder / f"{split}.npz") for split in ("train", "val", "test")}
    assert {"torch", "numpy", "scikit-learn"} <= set(record["versions"])


@pytest.mark.slow
def test_probing_noise_cli_writes_one_file_per_sigma(tmp_path):
    folder = write_databases(tmp_path / "db")
    save_database(folder / "train_ksame-3.npz", *gaussian_classes(90, dim=8, seed=7), {})
    result = run_script("probing_noise.py", *common_args(tmp_path), "--anonymizer", "ksame", "--k", "3",
                        "--sigma", "0", "0.5", "20")
    assert result.returncode == 0, result.stderr
    records = {sigma: json.loads((tmp_path / "logs" / "toy" / f"toy_ksame-3-s42_sigma-{sigma}.json").read_text())
               for sigma in ("0", "0.5", "20")}
    assert [records[s]["sigma"] for s in ("0", "0.5", "20")] == [0.0, 0.5, 20.0]
    assert records["0"]["auc"] > records["20"]["auc"]
    assert records["0"]["average_mindistance"] == records["20"]["average_mindistance"] > 0
    assert str(folder / "train_ksame-3.npz") in records["0"]["inputs"]


@pytest.mark.slow
def test_cli_missing_anonymized_database_names_the_command(tmp_path):
    write_databases(tmp_path / "db")
    result = run_script("probing.py", *common_args(tmp_path), "--anonymizer", "ksame", "--k", "5")
    assert_user_error(result, tmp_path, "train_ksame-5.npz", "python anonymize.py --dataset toy --backbone bb",
                      "--anonymizer ksame --k 5")
    result = run_script("probing.py", *common_args(tmp_path), "--anonymizer", "cvae", "--seed", "4")
    assert_user_error(result, tmp_path, "train_cvae-s4.npz", "--anonymizer cvae --seed 4")


@pytest.mark.slow
def test_cli_rejects_negative_sigma_mismatched_dims_and_unseen_labels(tmp_path):
    write_databases(tmp_path / "db")
    assert_user_error(run_script("probing_noise.py", *common_args(tmp_path), "--sigma", "0.5", "-1"), tmp_path,
                      "--sigma -1")
    write_databases(tmp_path / "db", train_dim=6)
    assert_user_error(run_script("probing.py", *common_args(tmp_path)), tmp_path, "train.npz has 6")
    write_databases(tmp_path / "db", test_labels_offset=2)
    assert_user_error(run_script("probing_noise.py", *common_args(tmp_path), "--sigma", "1"), tmp_path,
                      "test.npz has labels [3, 4]")


@pytest.mark.slow
def test_online_cvae_cli_trains_on_fresh_samples_and_measures_them(tmp_path):
    write_databases(tmp_path / "db")
    args = [*common_args(tmp_path), "--variance", "1.0", "--sigma", "0", "20", "--cvae_max_epochs", "40",
            "--online_factor", "2", "--seed", "5"]
    result = run_script("probing_noise_cvae.py", *args)
    assert result.returncode == 0, result.stderr
    records = {sigma: json.loads((tmp_path / "logs" / "toy" / f"toy_cvae-online-v1-s5_sigma-{sigma}.json").read_text())
               for sigma in ("0", "20")}
    clean = records["0"]
    assert clean["auc"] > 70 and clean["auc"] > records["20"]["auc"]
    assert clean["n_released"] == 2 * 90  # one epoch of online_factor x N samples stands for the release
    assert clean["average_mindistance"] > 0  # generated, not the real set measured against itself
    assert clean["settings"]["online_factor"] == 2 and clean["settings"]["variance"] == 1.0
    assert len(list((tmp_path / "ckpts").glob("**/cvae-*.pt"))) == 1
    assert_one_line_error(run_script("probing_noise_cvae.py", *common_args(tmp_path), "--variance", "0",
                                     "--sigma", "1"), "--variance")


@pytest.mark.slow
def test_real_unit_noise_judges_a_rescaled_release_like_the_real_set(tmp_path):
    """A release that is the real set scaled by 0.5 trains the same probe (z-scores ignore scale) but, in its own
    z-units, meets half the real noise: the same AUC as the real set under real-unit noise, a higher one under
    released-unit noise."""
    folder = tmp_path / "db" / "toy" / "bb"
    for split, n, seed in [("train", 300, 1), ("val", 100, 2), ("test", 400, 3)]:
        x, y = gaussian_classes(n, dim=8, classes=2, spread=4.0, seed=seed)
        save_database(folder / f"{split}.npz", x, y, {"split": split})
    train_x, train_y = gaussian_classes(300, dim=8, classes=2, spread=4.0, seed=1)
    save_database(folder / "train_ksame-2.npz", 0.5 * train_x, train_y, {})  # any release name will do
    noise = ["--sigma", "2", "--noise_units", "released", "real"]
    aucs = {}
    for flags in (["--anonymizer", "identity"], ["--anonymizer", "ksame", "--k", "2"]):
        result = run_script("probing_noise.py", *common_args(tmp_path), *flags, *noise)
        assert result.returncode == 0, result.stderr
    for name in ("identity", "ksame-2"):
        for units, suffix in (("released", ""), ("real", "-real")):
            record = json.loads((tmp_path / "logs" / "toy" / f"toy_{name}-s42_sigma-2{suffix}.json").read_text())
            assert record["noise_units"] == units
            aucs[name, units] = record["auc"]
    assert aucs["identity", "released"] == aucs["identity", "real"]  # the real set's own units are real units
    assert abs(aucs["ksame-2", "real"] - aucs["identity", "real"]) < 0.1, aucs
    assert aucs["ksame-2", "released"] > aucs["identity", "released"] + 2


@pytest.mark.slow
def test_cli_refuses_a_holdout_too_small_for_the_metrics_before_training(tmp_path):
    folder = write_databases(tmp_path / "db")
    x, y = gaussian_classes(5, dim=8, seed=3)
    save_database(folder / "test.npz", x, np.arange(5) % 2, {})
    assert_user_error(run_script("probing_noise.py", *common_args(tmp_path), "--sigma", "1", "--noise_units", "real"),
                      tmp_path, "test split has 5 rows")
    assert_user_error(run_script("probing_noise.py", *common_args(tmp_path), "--sigma", "1", "--noise_units", "sun"),
                      tmp_path, "--noise_units", "see")
