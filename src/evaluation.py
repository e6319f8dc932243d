"""The probing experiment shared by probing.py, probing_noise.py and probing_noise_cvae.py.

Load the real train/val/test databases and the released (identity or anonymized)
train set, check they fit together, train a linear probe on the released set
(z-scored with its own statistics, as the reference does), evaluate it on the real
test set with Gaussian noise of each sigma added to the z-scored test embeddings,
and measure how close the released set sits to the real records. Privacy is always
measured in the real train z-score space, so every anonymizer is judged on one scale.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from src.cli import UserError
from src.defaults import DEFAULT_ROOTS, PAPER_BACKBONE
from src.io import (array_fingerprint, database_dir, dataset_dirname, file_fingerprint, load_database,
                    package_versions, write_json)
from src.metrics import accuracy, auroc, balanced_accuracy, privacy_metrics
from src.probe import ProbeConfig, predict_proba, probe_checkpoint_path, train_probe, zscore, zscore_stats
from src.runtime import resolve_device, seed_everything

ANONYMIZERS = ("identity", "ksame", "cvae")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments every probing script takes (the reference's names and defaults)."""
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--backbone", default=PAPER_BACKBONE)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_root", type=Path, default=DEFAULT_ROOTS["output_root"])
    parser.add_argument("-l", "--lr", type=float, default=ProbeConfig.lr)
    parser.add_argument("-e", "--epochs", type=int, default=ProbeConfig.max_epochs,
                        help="maximum epochs (early stopping may end sooner)")
    parser.add_argument("-b", "--batch_size", type=int, default=ProbeConfig.batch_size)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--database_root", type=Path, default=DEFAULT_ROOTS["database_root"])
    parser.add_argument("--ckpt_root", type=Path, default=DEFAULT_ROOTS["ckpt_root"])


def add_anonymizer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--anonymizer", choices=ANONYMIZERS, default="identity")
    parser.add_argument("--k", type=int, help="cluster size, required with --anonymizer ksame")


def add_sigma_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sigma", type=float, nargs="+", required=True,
                        help="std of the Gaussian noise added to the z-scored test embeddings; one or several")


def checked_sigmas(sigmas: list[float]) -> list[float]:
    for sigma in sigmas:
        if not (math.isfinite(sigma) and sigma >= 0):
            raise UserError(f"--sigma {sigma:g}: noise levels must be finite and non-negative")
    return sigmas


def probe_config(args: argparse.Namespace) -> ProbeConfig:
    if args.lr <= 0 or args.epochs < 1 or args.batch_size < 1:
        raise UserError("-l/--lr must be positive and -e/--epochs and -b/--batch_size at least 1")
    return ProbeConfig(lr=args.lr, batch_size=args.batch_size, max_epochs=args.epochs)


def anonymizer_flag(args: argparse.Namespace) -> str:
    """Name of the released set in result files: identity, ksame-<k> or cvae."""
    if args.anonymizer == "ksame":
        if args.k is None or args.k < 2:
            raise UserError("--anonymizer ksame needs --k, a cluster size of at least 2")
        return f"ksame-{args.k}"
    return args.anonymizer


def released_database(args: argparse.Namespace) -> tuple[Path, str]:
    """The released train set's file and the command that makes it."""
    folder = database_dir(args.database_root, args.dataset, args.backbone)
    command = f"--dataset {args.dataset} --backbone {args.backbone}"
    if args.database_root != DEFAULT_ROOTS["database_root"]:
        command += f" --database_root {args.database_root}"
    if args.anonymizer == "identity":
        return folder / "train.npz", f"python create_db.py {command}"
    if args.anonymizer == "ksame":
        return folder / f"train_ksame-{args.k}.npz", f"python anonymize.py {command} --anonymizer ksame --k {args.k}"
    return (folder / f"train_cvae-s{args.seed}.npz",
            f"python anonymize.py {command} --anonymizer cvae --seed {args.seed}")


def result_path(args: argparse.Namespace, flag: str, sigma: float | None = None) -> Path:
    """<output_root>/<dataset>/<dataset>_<flag>-s<seed>[_sigma-<sigma>].json, the dataset spelt as in folder names."""
    name = dataset_dirname(args.dataset)
    suffix = f"_sigma-{sigma:g}" if sigma is not None else ""
    return Path(args.output_root) / name / f"{name}_{flag}-s{args.seed}{suffix}.json"


def write_noise_results(args: argparse.Namespace, flag: str, results: dict[float, dict]) -> None:
    """One result file per sigma, named as the reference does, with a one-line summary each."""
    for sigma, result in results.items():
        path = result_path(args, flag, sigma)
        write_json(path, result)
        print(f"{args.dataset} {flag} seed {args.seed} sigma {sigma:g}: AUC {result['auc']:.2f}, "
              f"accuracy {result['accuracy']:.2f} -> {path}")


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


def load_probe_data(database_root: Path, dataset: str, backbone: str,
                    released_path: Path | None = None, released_hint: str = "") -> ProbeData:
    """Load and cross-check the databases; `released_path` None means the real train set is released."""
    folder = database_dir(database_root, dataset, backbone)
    make_db = f"python create_db.py --dataset {dataset} --backbone {backbone}"
    paths = {split: folder / f"{split}.npz" for split in ("train", "val", "test")}
    splits = {split: load_database(path, make_db)[:2] for split, path in paths.items()}
    if released_path is None or Path(released_path) == paths["train"]:
        released_path = paths["train"]
        released_x, released_y = splits["train"]
    else:
        released_x, released_y = load_database(released_path, released_hint)[:2]

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
    return ProbeData(released_x, released_y, *splits["train"], *splits["val"], *splits["test"],
                     num_classes=max(int(y.max()) for y in labels) + 1,
                     inputs={str(path): file_fingerprint(path)
                             for path in dict.fromkeys([*paths.values(), released_path])})


def utility_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    predictions = probs.argmax(axis=1)
    return {"auc": auroc(labels, probs), "accuracy": accuracy(labels, predictions),
            "balanced_accuracy": balanced_accuracy(labels, predictions)}


def noisy_test_metrics(model: torch.nn.Linear, test_x: torch.Tensor, test_y: np.ndarray, sigmas: list[float],
                       seed: int) -> dict[float, dict[str, float]]:
    """Utility on z-scored test embeddings plus N(0, sigma^2) noise, for each sigma.

    Every sigma scales the same seeded noise draw, so the noise differs across sigmas only in scale.
    """
    noise = torch.randn(test_x.shape, generator=torch.Generator().manual_seed(seed)).to(test_x.device)
    return {sigma: utility_metrics(test_y, predict_proba(model, test_x + sigma * noise if sigma > 0 else test_x))
            for sigma in sigmas}


def released_privacy(released_x: np.ndarray, train_x: np.ndarray, test_x: np.ndarray, val_x: np.ndarray,
                     seed: int, device: torch.device) -> dict[str, float]:
    """Privacy and fidelity metrics with every set z-scored by the real train statistics."""
    mean, std = zscore_stats(train_x)
    released, train, test, val = (torch.from_numpy(zscore(x, mean, std)).to(device)
                                  for x in (released_x, train_x, test_x, val_x))
    return privacy_metrics(released, train, test, val, seed)


def result_record(utility: dict, privacy: dict, sigma: float, args: argparse.Namespace, data: ProbeData,
                  history: dict, device: torch.device) -> dict:
    """One result file's content: metrics at top level, then how they were made."""
    return {
        **utility, **privacy, "sigma": sigma,
        "num_classes": data.num_classes,
        "n_released": len(data.released_x),
        "probe": {"best_epoch": history["best_epoch"], "epochs_run": len(history["val_loss"]),
                  "best_val_loss": min(history["val_loss"])},
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "device": str(device),  # what --device auto resolved to: float results differ slightly between devices
        "inputs": data.inputs,
        "versions": package_versions(),
    }


def run_probing(args: argparse.Namespace, sigmas: list[float]) -> tuple[str, dict[float, dict]]:
    """The whole experiment for probing.py / probing_noise.py: (flag, {sigma: result record})."""
    flag = anonymizer_flag(args)
    config = probe_config(args)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    released_path, hint = released_database(args)
    data = load_probe_data(args.database_root, args.dataset, args.backbone, released_path, hint)

    mean, std = zscore_stats(data.released_x)
    train_x, val_x, test_x = (torch.from_numpy(zscore(x, mean, std)).to(device)
                              for x in (data.released_x, data.val_x, data.test_x))
    train_y, val_y = torch.from_numpy(data.released_y).to(device), torch.from_numpy(data.val_y).to(device)
    checkpoint = probe_checkpoint_path(
        database_dir(args.ckpt_root, args.dataset, args.backbone) / "probe", config, args.seed, data.num_classes,
        {"train": array_fingerprint(data.released_x, data.released_y), "val": array_fingerprint(data.val_x, data.val_y)})
    model, history = train_probe((train_x, train_y), val_x, val_y, data.num_classes, config, device, args.seed,
                                 checkpoint)

    utility = noisy_test_metrics(model, test_x, data.test_y, sigmas, args.seed)
    privacy = released_privacy(data.released_x, data.train_x, data.test_x, data.val_x, args.seed, device)
    return flag, {sigma: result_record(utility[sigma], privacy, sigma, args, data, history, device)
                  for sigma in sigmas}
