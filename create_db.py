"""Stage 1: embed an image dataset's train / val / test splits with a frozen timm backbone.

Writes <database_root>/<dataset>/<backbone>/{train,val,test}.npz (keys embeddings,
labels, meta). A split whose database exists and was made with the same settings and
weights is reused, not recomputed.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from src.backbones import check_backbone_name, create_backbone
from src.data import SPLITS, DatasetOptions, load_split
from src.extract import extract_embeddings
from src.cli import ArgumentParser, UserError, run_cli
from src.defaults import DEFAULT_ROOTS, PAPER_BACKBONE
from src.io import database_dir, file_fingerprint, load_database, package_versions, save_database
from src.runtime import resolve_device, seed_everything


def parse_args() -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="registry name, e.g. breastmnist, digits, imagefolder:PATH")
    parser.add_argument("--backbone", default=PAPER_BACKBONE, help="any timm model name")
    parser.add_argument("--weights", type=Path, default=None, help=".safetensors or .pth state dict (offline)")
    parser.add_argument("--random_init", action="store_true", help="no pretrained weights (tests, baselines)")
    parser.add_argument("--img_size", type=int, default=None, help="input size (default: the backbone's)")
    parser.add_argument("--size", type=int, default=224, help="MedMNIST+ image size on disk")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dataset_root", type=Path, default=DEFAULT_ROOTS["dataset_root"])
    parser.add_argument("--database_root", type=Path, default=DEFAULT_ROOTS["database_root"])
    parser.add_argument("--download", action="store_true", help="fetch missing data where the source allows")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.batch_size < 1 or args.num_workers < 0 or (args.img_size is not None and args.img_size < 1):
        raise UserError("--batch_size and --img_size must be positive and --num_workers non-negative")
    if args.weights is not None and not args.weights.is_file():
        raise UserError(f"--weights {args.weights} does not exist; give a .safetensors or .pth state dict")
    check_backbone_name(args.backbone)
    device = resolve_device(args.device)
    seed_everything(args.seed)  # a random initialisation depends on the seed, so its id names it
    weights_id = (file_fingerprint(args.weights) if args.weights is not None
                  else f"random-init-s{args.seed}" if args.random_init else "timm-pretrained")
    settings = {"dataset": args.dataset, "backbone": args.backbone, "weights": weights_id,
                "img_size": args.img_size, "size": args.size}
    out_dir = database_dir(args.database_root, args.dataset, args.backbone)
    todo = []
    for name in SPLITS:
        if _is_current(out_dir / f"{name}.npz", settings):
            print(f"reusing {out_dir / f'{name}.npz'} (same settings and weights)")
        else:
            todo.append(name)
    if not todo:
        return
    # every split still to embed is read before the slow part, so a missing one fails fast
    options = DatasetOptions(download=args.download, size=args.size)
    splits = {name: load_split(args.dataset, args.dataset_root, name, options) for name in todo}
    backbone = create_backbone(args.backbone, args.weights, args.img_size, pretrained=not args.random_init)
    for name, split in splits.items():
        embeddings = extract_embeddings(backbone, split, device, args.batch_size, args.num_workers,
                                        description=f"{args.dataset}/{name}")
        meta = {"stage": "create_db", "split": name, "settings": settings, "weights": backbone.weights,
                "inputs": {str(args.weights): weights_id} if args.weights else {},
                "data_config": backbone.data_config, "class_names": split.class_names,
                "dataset_source": split.source, "count": len(split), "embedding_dim": int(embeddings.shape[1]),
                "device": str(device), "arguments": {k: str(v) for k, v in vars(args).items()},
                "versions": package_versions()}
        save_database(out_dir / f"{name}.npz", embeddings, split.labels, meta)
        print(f"wrote {out_dir / f'{name}.npz'}: {embeddings.shape[0]} x {embeddings.shape[1]}")


def _is_current(path: Path, settings: dict) -> bool:
    """An existing, readable database made with exactly these settings."""
    if not path.is_file():
        return False
    try:
        _, _, meta = load_database(path)
    except UserError:
        return False  # unreadable: recompute it
    return meta.get("settings") == settings


if __name__ == "__main__":
    run_cli(main)
