"""Stage 1 as a function: embed a dataset's splits with a frozen backbone, reusing current databases."""
from __future__ import annotations

from pathlib import Path

from src.backbones import check_backbone_name, create_backbone
from src.cli import UserError
from src.data import DatasetOptions, load_split
from src.extract import extract_embeddings
from src.io import check_output_folder, file_fingerprint, load_database, provenance, save_database
from src.naming import database_paths
from src.options import result_keys, settings_record
from src.runtime import resolve_device, seed_everything
from src.settings import CreateDbSettings


def weights_inputs(settings: CreateDbSettings) -> dict[str, str]:
    """The weights file and its fingerprint: a database made with other weights is not current."""
    return {str(settings.weights): file_fingerprint(settings.weights)} if settings.weights is not None else {}


def is_current(path: Path, settings: CreateDbSettings, inputs: dict[str, str]) -> bool:
    """An existing, readable database made with the same result-shaping settings and weights."""
    if not path.is_file():
        return False
    try:
        _, _, meta = load_database(path)
    except UserError:
        return False  # unreadable: recompute it
    recorded, wanted = meta.get("settings", {}), settings_record(settings)
    return (all(recorded.get(key) == wanted[key] for key in result_keys(settings))
            and meta.get("inputs") == inputs)


def create_databases(settings: CreateDbSettings) -> None:
    check_output_folder(settings.database_root, "--database_root")
    check_backbone_name(settings.backbone)
    device = resolve_device(settings.device)
    seed_everything(settings.seed)  # a random initialisation depends on the seed
    inputs = weights_inputs(settings)
    todo = []
    for split, path in database_paths(settings.database_root, settings.dataset, settings.backbone).items():
        if is_current(path, settings, inputs):
            print(f"reusing {path} (same settings and weights)")
        else:
            todo.append((split, path))
    if not todo:
        return
    # every split still to embed is read before the slow part, so a missing one fails fast
    options = DatasetOptions(download=settings.download, size=settings.size)
    splits = {split: load_split(settings.dataset, settings.dataset_root, split, options) for split, _ in todo}
    backbone = create_backbone(settings.backbone, settings.weights, settings.img_size,
                               pretrained=not settings.random_init)
    for split, path in todo:
        data = splits[split]
        embeddings = extract_embeddings(backbone, data, device, settings.batch_size, settings.num_workers,
                                        description=f"{settings.dataset}/{split}")
        meta = {"stage": "create_db", "split": split, "settings": settings_record(settings), "inputs": inputs,
                "weights": backbone.weights, "data_config": backbone.data_config, "class_names": data.class_names,
                "dataset_source": data.source, "count": len(data), "embedding_dim": int(embeddings.shape[1]),
                "device": str(device), **provenance()}
        save_database(path, embeddings, data.labels, meta)
        print(f"wrote {path}: {embeddings.shape[0]} x {embeddings.shape[1]}")
