"""Making a released training set (anonymize.py): read the real splits, let the anonymizer
make its release, write it beside the databases (src.naming) with its provenance."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from src.anonymizers import Anonymizer, get_anonymizer
from src.anonymizers.base import ReleaseInputs
from src.cli import UserError
from src.io import (check_output_folder, declared_classes, file_fingerprint, load_database, provenance,
                    save_database, write_json)
from src.naming import create_db_command, database_dir, database_paths, private_sidecar_path, release_path
from src.options import settings_record
from src.runtime import resolve_device, seed_everything
from src.settings import AnonymizeSettings, StageSettings


def load_release_inputs(settings: StageSettings, anonymizer: Anonymizer) -> tuple[ReleaseInputs, dict[str, str]]:
    """Real train (and val, when the anonymizer selects a model on it), checked; and their fingerprints."""
    paths = database_paths(settings.database_root, settings.dataset, settings.backbone)
    make_db = create_db_command(settings)
    train_path = paths["train"]
    train_x, train_y, train_meta = load_database(train_path, make_db)
    inputs = {str(train_path): file_fingerprint(train_path)}
    if len(np.unique(train_y)) < 2:
        raise UserError(f"{train_path} holds one class only; there is nothing for a class-conditional release to keep")
    val_x, val_y = train_x[:0], train_y[:0]
    if anonymizer.needs_val:
        val_path = paths["val"]
        val_x, val_y, _ = load_database(val_path, make_db)
        if val_x.shape[1] != train_x.shape[1]:
            raise UserError(f"{val_path} has dimension {val_x.shape[1]} but {train_path} has {train_x.shape[1]}; "
                            "recreate both with the same backbone")
        inputs[str(val_path)] = file_fingerprint(val_path)
    num_classes = declared_classes(train_meta, train_path, train_y, val_y)
    checkpoint_dir = database_dir(settings.ckpt_root, settings.dataset, settings.backbone)
    return ReleaseInputs(train_x, train_y, val_x, val_y, num_classes, checkpoint_dir,
                         classes_declared="class_names" in train_meta), inputs


PRIVATE_NOTE = ("NOT part of the release and not covered by its DP guarantee: computed from the private data "
                "outside the mechanism (input fingerprints, timing, validation loss). Keep it private; do not publish.")


def make_release(settings: AnonymizeSettings) -> Path:
    """Make the release the settings name and write it with its provenance; returns its path."""
    anonymizer = get_anonymizer(settings.anonymizer)
    check_output_folder(settings.database_root, "--database_root")
    check_output_folder(settings.ckpt_root, "--ckpt_root")
    device = resolve_device(settings.device)
    seed_everything(settings.seed)
    out_path = release_path(settings, anonymizer, settings.release)
    data, inputs = load_release_inputs(settings, anonymizer)
    start = time.perf_counter()
    release = anonymizer.make(data, settings.release, settings.making, settings.seed, device)
    elapsed = time.perf_counter() - start
    public = {"stage": "anonymize", "settings": settings_record(settings), **release.details,
              "count": int(len(release.labels)), **provenance()}
    private = {"inputs": inputs, "elapsed_s": round(elapsed, 3), "device": str(device), **release.private}
    if "dp" in release.details:  # a DP release reveals only what its mechanism accounts for
        write_json(private_sidecar_path(out_path), {"release": out_path.name, "note": PRIVATE_NOTE, **private})
        save_database(out_path, release.embeddings, release.labels, public)
    else:
        save_database(out_path, release.embeddings, release.labels, {**public, **private})
    print(f"wrote {out_path}: {release.embeddings.shape[0]} x {release.embeddings.shape[1]} in {elapsed:.1f} s")
    return out_path
