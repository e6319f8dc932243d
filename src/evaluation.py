"""The probing experiment of probing.py, probing_noise.py and probing_noise_cvae.py.

Load the real train/val/test databases, take a training set (a released file, or fresh
generator samples every epoch), train a linear probe on it, evaluate it on the real test
set with Gaussian noise of each sigma, and measure how close the released set sits to the
real records. The probe z-scores its inputs with the training set's statistics (the
reference's offline scripts) or the real train's (its online script). Test noise is in the
units the settings name: the probe's own z-units ("released", the reference's offline
behaviour) or the real train set's ("real": N(0, sigma^2 s_j^2) added to raw test
vectors, s_j the real train std of feature j), so that every released set meets the same
noise. Privacy is always measured in the real train z-score space.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from src.anonymizers import get_anonymizer
from src.anonymizers.base import ReleaseInputs
from src.cli import UserError
from src.io import (array_fingerprint, check_output_folder, declared_classes, file_fingerprint, load_database,
                    provenance, write_json)
from src.metrics import (accuracy, auroc, balanced_accuracy, check_sizes, nearest_neighbours, privacy_metrics,
                         random_rows)
from src.naming import (create_db_command, database_dir, database_paths, release_hint,
                         release_path, result_paths, with_private_sidecar)
from src.options import settings_record
from src.probe import TrainSource, predict_proba, probe_checkpoint_path, train_probe, zscore, zscore_stats
from src.runtime import resolve_device, seed_everything
from src.settings import ProbeSettings, StageSettings

@dataclass
class ProbeData:
    """Real splits and the released train set, as loaded; `inputs` fingerprints every file read."""

    released_x: np.ndarray
    released_y: np.ndarray
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    inputs: dict[str, str]
    released_meta: dict  # what the release's maker recorded (e.g. a DP release's accounting)


def load_probe_data(settings: StageSettings, released_path: Path | None = None, released_hint: str = "") -> ProbeData:
    """Load and cross-check the databases; `released_path` None means the real train set is released."""
    paths = database_paths(settings.database_root, settings.dataset, settings.backbone)
    make_db = create_db_command(settings)
    loaded = {split: load_database(path, make_db) for split, path in paths.items()}
    splits = {split: (x, y) for split, (x, y, _) in loaded.items()}
    released_meta: dict = {}
    if released_path is None or Path(released_path) == paths["train"]:
        released_path = paths["train"]
        released_x, released_y = splits["train"]
    else:
        released_x, released_y, released_meta = load_database(released_path, released_hint)
        released_meta = with_private_sidecar(released_path, released_meta)  # a DP release's timing is beside it

    dims = {path: x.shape[1] for path, (x, _) in [*zip(paths.values(), splits.values()),
                                                   (released_path, (released_x, released_y))]}
    if len(set(dims.values())) > 1:
        listing = ", ".join(f"{path} has {dim}" for path, dim in dims.items())
        raise UserError(f"embedding sizes differ ({listing}); recreate them with the same backbone")
    labels = [y for _, y in splits.values()] + [released_y]
    known = set(np.unique(released_y).tolist())
    for path, y in ((released_path, released_y), (paths["test"], splits["test"][1])):
        if len(np.unique(y)) < 2:
            raise UserError(f"{path} holds one class only ({int(y[0])}); a probe and its AUC need at least two")
    for split in ("val", "test"):
        unseen = sorted(set(np.unique(splits[split][1]).tolist()) - known)
        if unseen:
            raise UserError(f"{paths[split]} has labels {unseen} absent from the training set {released_path}; "
                            "the probe cannot learn them, recreate the training set with every class")
    check_sizes(released_x, splits["train"][0], splits["test"][0], splits["val"][0])  # before any training
    return ProbeData(released_x, released_y, *splits["train"], *splits["val"], *splits["test"],
                     num_classes=declared_classes(loaded["train"][2], paths["train"], *labels),
                     inputs={str(path): file_fingerprint(path)
                             for path in dict.fromkeys([*paths.values(), released_path])},
                     released_meta=released_meta)


@dataclass
class TrainingSet:
    """What a probe trains on, and how its inputs are scaled.

    `source` gives raw vectors: fixed arrays, or `epoch -> (x, y)` drawing fresh samples.
    `released_x/y` is the set whose privacy is measured (N vectors for a generator).
    `key` identifies the source for the probe's checkpoint name.
    """

    flag: str
    source: tuple[np.ndarray, np.ndarray] | Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    released_x: np.ndarray
    released_y: np.ndarray
    mean: np.ndarray  # the probe's input scaling
    std: np.ndarray
    key: dict
    details: dict  # added to every result record (e.g. samples per epoch, privacy of a whole epoch)


def released_training_set(settings: ProbeSettings, data: ProbeData) -> TrainingSet:
    """A released file, z-scored with its own statistics as the reference does."""
    anonymizer = get_anonymizer(settings.anonymizer)
    mean, std = zscore_stats(data.released_x)
    if anonymizer.fits_probe:  # raw inputs: z-scoring would read the private train statistics
        mean, std = np.zeros_like(mean), np.ones_like(std)
    return TrainingSet(anonymizer.flag(settings.release), (data.released_x, data.released_y), data.released_x,
                       data.released_y, mean, std,
                       {"train": array_fingerprint(data.released_x, data.released_y),
                        "val": array_fingerprint(data.val_x, data.val_y)},
                       {"n_released": len(data.released_x), **dp_record(data.released_meta),
                        **({"release_s": data.released_meta["elapsed_s"]} if "elapsed_s" in data.released_meta
                           else {})})


def dp_record(made: dict) -> dict:
    """A DP release's accounting for result files, its target and spent epsilon also as table columns."""
    if "dp" not in made:
        return {}
    return {"dp": made["dp"], "dp_target_epsilon": made["dp"]["target_epsilon"],
            "dp_spent_epsilon": made["dp"]["spent_epsilon"]}


def utility_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    predictions = probs.argmax(axis=1)
    return {"auc": auroc(labels, probs), "accuracy": accuracy(labels, predictions),
            "balanced_accuracy": balanced_accuracy(labels, predictions)}


def noisy_test_metrics(model: torch.nn.Linear, test_x: torch.Tensor, test_y: np.ndarray, sigmas: list[float],
                       seed: int, noise_scale: torch.Tensor | None = None) -> dict[float, dict[str, float]]:
    """Utility on z-scored test embeddings plus N(0, sigma^2 noise_scale_j^2) noise, for each sigma.

    `noise_scale` (per feature, default 1) turns the probe's z-units into other units. Every
    sigma scales the same seeded noise draw, so the noise differs across sigmas only in scale.
    """
    noise = torch.randn(test_x.shape, generator=torch.Generator().manual_seed(seed)).to(test_x.device)
    if noise_scale is not None:
        noise *= noise_scale
    return {sigma: utility_metrics(test_y, predict_proba(model, test_x + sigma * noise if sigma > 0 else test_x))
            for sigma in sigmas}


def released_privacy(released_x: np.ndarray, data: ProbeData, seed: int, device: torch.device) -> dict[str, float]:
    """Privacy and fidelity metrics with every set z-scored by the real train statistics (val is the
    density attack's reference, test the holdout), and the reference's distance for comparison
    (`average_mindistance_reference_space`)."""
    mean, std = zscore_stats(data.train_x)
    released, train, test, val = (torch.from_numpy(zscore(x, mean, std)).to(device)
                                  for x in (released_x, data.train_x, data.test_x, data.val_x))
    return {**privacy_metrics(released, train, test, val, seed),
            "average_mindistance_reference_space": reference_space_mindistance(released_x, data.train_x, device)}


def privacy_rows(released_x: np.ndarray, samples_per_record: int, seed: int) -> np.ndarray:
    """The rows privacy is measured on: a release sampled f times per record (--dpg_factor f) on 1/f of its
    rows by a seeded permutation, any other release whole. The neighbour metrics then compare sets of the
    size a one-sample release has, as the online mode measures its first N samples, and their all-pairs
    searches do not grow with the square of f; each per-row share is estimated without bias."""
    if samples_per_record == 1:
        return released_x
    count = len(released_x) // samples_per_record
    return released_x[random_rows(torch.arange(len(released_x)), count, seed).numpy()]


def reference_space_mindistance(released_x: np.ndarray, train_x: np.ndarray, device: torch.device) -> float:
    """The reference's average minimum distance: the release z-scored with its own statistics, the real
    train set with its own, and only the first len(release) real vectors searched (two defects kept on purpose)."""
    released = torch.from_numpy(zscore(released_x, *zscore_stats(released_x))).to(device)
    originals = torch.from_numpy(zscore(train_x, *zscore_stats(train_x))[:len(released_x)]).to(device)
    return float(nearest_neighbours(released, originals)[0].double().mean())


def noise_scale(unit_std: np.ndarray, probe_std: np.ndarray, device: torch.device) -> torch.Tensor | None:
    """Per-feature factor from the probe's z-units to noise units (None: they are the same units)."""
    ratio = unit_std / probe_std
    return None if np.array_equal(ratio, np.ones_like(ratio)) else torch.from_numpy(ratio).to(device)


def load_released(settings: ProbeSettings) -> ProbeData:
    """The real databases and the release the settings name."""
    anonymizer = get_anonymizer(settings.anonymizer)
    return load_probe_data(settings, release_path(settings, anonymizer, settings.release),
                           release_hint(settings, anonymizer, settings.release))


def run_probing(settings: ProbeSettings, data: ProbeData, training: TrainingSet, device: torch.device,
                plain: bool = False) -> dict[Path, dict]:
    """Train the probe on `training`, evaluate it at every sigma and units, measure privacy: {path: record}."""
    paths = result_paths(settings, training.flag, plain)
    val_x, test_x = (torch.from_numpy(zscore(x, training.mean, training.std)).to(device)
                     for x in (data.val_x, data.test_x))
    source: TrainSource
    if callable(training.source):
        mean_t, std_t = (torch.from_numpy(a).to(device) for a in (training.mean, training.std))
        draw = training.source

        def source(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = draw(epoch)
            return x.sub_(mean_t).div_(std_t), y  # in place: an epoch's samples are fresh, and many
    else:
        x, y = training.source
        source = (torch.from_numpy(zscore(x, training.mean, training.std)).to(device), torch.from_numpy(y).to(device))
    checkpoint = probe_checkpoint_path(database_dir(settings.ckpt_root, settings.dataset, settings.backbone) / "probe",
                                       settings.training, settings.seed, data.num_classes, training.key)
    anonymizer = get_anonymizer(settings.anonymizer)
    if anonymizer.fits_probe:
        start = time.perf_counter()
        model, probe_record = fitted_probe(anonymizer, settings, data, device)
        probe_train_s = time.perf_counter() - start
    else:
        model, history = train_probe(source, val_x, torch.from_numpy(data.val_y).to(device), data.num_classes,
                                     settings.training, device, settings.seed, checkpoint)
        probe_record = {"probe": {"best_epoch": history["best_epoch"], "epochs_run": len(history["val_loss"]),
                                  "best_val_loss": min(history["val_loss"]),
                                  "from_checkpoint": history["from_checkpoint"]}}
        probe_train_s = history["train_s"]  # when it was trained, also for a probe loaded from its checkpoint

    scales = {units: noise_scale(unit_std, training.std, device) for units, unit_std in
              (("released", zscore_stats(training.released_x)[1]), ("real", zscore_stats(data.train_x)[1]))}
    utility = {units: noisy_test_metrics(model, test_x, data.test_y, sorted({s for s, u in paths if u == units}),
                                         settings.seed, scales[units])
               for units in dict.fromkeys(units for _, units in paths)}
    measured = privacy_rows(training.released_x, anonymizer.samples_per_record(settings.release), settings.seed)
    privacy = released_privacy(measured, data, settings.seed, device)
    common = {**privacy, **training.details, "n_privacy": len(measured), "num_classes": data.num_classes,
              **probe_record, "probe_train_s": round(probe_train_s, 3),
              "settings": settings_record(settings),
              "device": str(device),  # what --device auto resolved to: float results differ slightly between devices
              "inputs": data.inputs, **provenance()}
    return {path: {**utility[units][sigma], "sigma": sigma, "noise_units": units, **common}
            for (sigma, units), path in paths.items()}


def fitted_probe(anonymizer, settings: ProbeSettings, data: ProbeData,
                 device: torch.device) -> tuple[torch.nn.Linear, dict]:
    """A probe the anonymizer fits itself on the raw real train split (the DP probe), as an nn.Linear, and
    what results record about it (its accounting)."""
    weight, bias, details = anonymizer.fit_probe(data.train_x, data.train_y, data.num_classes, settings.release,
                                                 settings.seed)
    model = torch.nn.Linear(*weight.shape).to(device)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(weight.T.astype(np.float32)))
        model.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    return model.eval(), {"probe": {"fitted": anonymizer.name}, **dp_record(details)}


def check_probe_outputs(settings: ProbeSettings) -> None:
    """Result and checkpoint folders take files, before any work starts."""
    check_output_folder(settings.output_root, "--output_root")
    check_output_folder(settings.ckpt_root, "--ckpt_root")


def probe_release(settings: ProbeSettings, plain: bool = False) -> dict[Path, dict]:
    """probing.py / probing_noise.py: the probe on a released file."""
    check_probe_outputs(settings)
    device = resolve_device(settings.device)
    seed_everything(settings.seed)
    data = load_released(settings)
    return run_probing(settings, data, released_training_set(settings, data), device, plain)


def online_training_set(settings: ProbeSettings, data: ProbeData, device: torch.device) -> TrainingSet:
    """Fresh generator samples every epoch, z-scored with the real train statistics as the
    reference's online script does. Privacy is measured on the first N samples of epoch 0 (as
    many as an offline release holds), and on the whole epoch under keys ending in `_epoch`."""
    anonymizer = get_anonymizer(settings.anonymizer)
    inputs = ReleaseInputs(data.train_x, data.train_y, data.val_x, data.val_y, data.num_classes,
                           database_dir(settings.ckpt_root, settings.dataset, settings.backbone))
    draw, key, trained = anonymizer.sampler(inputs, settings.release, settings.making, settings.online,
                                            settings.seed, device)
    first_epoch = [draw(0)]  # decoded once: measured here, then handed to the probe as its epoch 0

    def source(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return first_epoch.pop() if epoch == 0 and first_epoch else draw(epoch)

    # on the CPU these share memory with epoch 0, which the probe z-scores in place: measured and copied first
    epoch_x, epoch_y = (tensor.cpu().numpy() for tensor in first_epoch[0])
    count = len(data.train_y)
    whole_epoch = released_privacy(epoch_x, data, settings.seed, device)
    mean, std = zscore_stats(data.train_x)
    return TrainingSet(anonymizer.flag(settings.release, online=True), source, epoch_x[:count].copy(),
                       epoch_y[:count].copy(), mean, std,
                       {**key, "zscore": "real train", "val": array_fingerprint(data.val_x, data.val_y)},
                       {"n_released": len(epoch_x), **dp_record(trained),
                        **{f"{name}_epoch": value for name, value in whole_epoch.items()}})


def probe_online(settings: ProbeSettings) -> dict[Path, dict]:
    """probing_noise_cvae.py: the probe on fresh generator samples every epoch."""
    check_probe_outputs(settings)
    device = resolve_device(settings.device)
    seed_everything(settings.seed)
    data = load_probe_data(settings)
    return run_probing(settings, data, online_training_set(settings, data, device), device)


def write_results(settings: ProbeSettings, results: dict[Path, dict]) -> None:
    """Write each result file, with a one-line summary each."""
    for path, result in results.items():
        write_json(path, result)
        noise = f" sigma {result['sigma']:g} ({result['noise_units']} units)" if result["sigma"] > 0 else ""
        print(f"{settings.dataset} seed {settings.seed}{noise}: AUC {result['auc']:.2f}, accuracy "
              f"{result['accuracy']:.2f}, mindistance {result['average_mindistance']:.3f}, "
              f"MIA AUC {result['mia_auc']:.2f} -> {path}")
