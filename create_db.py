"""Stage 1: embed an image dataset's train / val / test splits with a frozen timm backbone.

Writes <database_root>/<dataset>/<backbone>/{train,val,test}.npz (keys embeddings,
labels, meta). A split whose database exists and was made with the same settings and
weights is reused, not recomputed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src.cli import ArgumentParser, run_cli
from src.naming import database_paths
from src.options import add_options, from_args
from src.settings import CreateDbSettings


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, CreateDbSettings)
    return parser


def parse_settings(argv: list[str] | None = None) -> CreateDbSettings:
    return from_args(CreateDbSettings, build_parser().parse_args(argv))


def outputs(settings: CreateDbSettings) -> list[Path]:
    return list(database_paths(settings.database_root, settings.dataset, settings.backbone).values())


def main() -> None:
    settings = parse_settings()
    from src.databases import create_databases  # torch and timm: loaded after the flags are checked

    create_databases(settings)


if __name__ == "__main__":
    run_cli(main)
