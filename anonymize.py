"""Stage 2: turn the real training embeddings into a privacy-preserving training set.

    python anonymize.py --dataset D --backbone B --anonymizer ksame --k 5   -> train_ksame-5.npz
    python anonymize.py --dataset D --backbone B --anonymizer cvae --seed 42 -> train_cvae-s42.npz

written beside the database (same keys). k-Same replaces each vector by the mean of its
cluster of k (deterministic, no seed). The CVAE is trained on train (early stopping on
val) or reused from its checkpoint, and its decoder samples as many vectors per class as
the real training set has.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from src.cvae import SAMPLING_VARIANCE, CVAEConfig, generate_offline, load_or_train_cvae
from src.cli import ArgumentParser, UserError, run_cli
from src.defaults import DEFAULT_ROOTS, PAPER_BACKBONE
from src.io import database_dir, file_fingerprint, load_database, package_versions, save_database
from src.ksame import ksame
from src.runtime import resolve_device, seed_everything


def parse_args() -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--backbone", default=PAPER_BACKBONE)
    parser.add_argument("--anonymizer", required=True, choices=["ksame", "cvae"])
    parser.add_argument("--k", type=int, default=None, help="k-Same cluster size (at least 2)")
    parser.add_argument("--seed", type=int, default=42, help="CVAE training and sampling seed")
    parser.add_argument("--variance", type=float, default=SAMPLING_VARIANCE,
                        help="CVAE sampling scale: z = variance * N(0, I), as the reference (it scales the std)")
    parser.add_argument("--reference_objective", action="store_true",
                        help="train the CVAE with the reference's (incorrect) reparameterisation and KL")
    parser.add_argument("--max_epochs", type=int, default=CVAEConfig.max_epochs, help="CVAE epoch limit")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--database_root", type=Path, default=DEFAULT_ROOTS["database_root"])
    parser.add_argument("--ckpt_root", type=Path, default=DEFAULT_ROOTS["ckpt_root"])
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    seed_everything(args.seed)
    folder = database_dir(args.database_root, args.dataset, args.backbone)
    make_db = f"python create_db.py --dataset {args.dataset} --backbone {args.backbone}"
    train_path = folder / "train.npz"
    train_x, train_y, _ = load_database(train_path, make_db)
    inputs = {str(train_path): file_fingerprint(train_path)}
    if len(np.unique(train_y)) < 2:
        raise UserError(f"{train_path} holds one class only; there is nothing for a class-conditional release to keep")
    settings = {"dataset": args.dataset, "backbone": args.backbone, "anonymizer": args.anonymizer}
    start = time.perf_counter()

    if args.anonymizer == "ksame":
        if args.k is None:  # its bounds (2 <= k <= N) are checked by ksame()
            raise UserError("--anonymizer ksame needs --k, the cluster size (at least 2)")
        settings["k"] = args.k
        out_path = folder / f"train_ksame-{args.k}.npz"
        embeddings, labels = ksame(train_x, train_y, args.k, device)
        details = {}
    else:
        if not (np.isfinite(args.variance) and args.variance > 0) or args.max_epochs < 1:
            raise UserError("--variance must be positive and --max_epochs at least 1")
        val_path = folder / "val.npz"
        val_x, val_y, _ = load_database(val_path, make_db)
        if val_x.shape[1] != train_x.shape[1]:
            raise UserError(f"{val_path} has dimension {val_x.shape[1]} but {train_path} has {train_x.shape[1]}; "
                            "recreate both with the same backbone")
        inputs[str(val_path)] = file_fingerprint(val_path)
        config = CVAEConfig(max_epochs=args.max_epochs, reference_objective=args.reference_objective)
        num_classes = int(max(train_y.max(), val_y.max())) + 1
        ckpt_dir = database_dir(args.ckpt_root, args.dataset, args.backbone)
        bundle = load_or_train_cvae(ckpt_dir, train_x, train_y, val_x, val_y, num_classes, config, device, args.seed)
        embeddings, labels = generate_offline(bundle, train_y, args.variance, args.seed)
        settings.update(seed=args.seed, variance=args.variance, cvae=asdict(config))
        out_path = folder / f"train_cvae-s{args.seed}.npz"
        details = {"checkpoint": str(bundle.checkpoint), "best_epoch": bundle.best_epoch,
                   "epochs_run": len(bundle.history["val_loss"])}

    elapsed = time.perf_counter() - start
    meta = {"stage": "anonymize", "settings": settings, "inputs": inputs, **details,
            "count": int(len(labels)), "elapsed_s": round(elapsed, 3), "device": str(device),
            "versions": package_versions()}
    save_database(out_path, embeddings, labels, meta)
    print(f"wrote {out_path}: {embeddings.shape[0]} x {embeddings.shape[1]} in {elapsed:.1f} s")


if __name__ == "__main__":
    run_cli(main)
