"""Stage 2: turn the real training embeddings into a privacy-preserving training set.

    python anonymize.py --dataset D --backbone B --anonymizer ksame --k 5   -> train_ksame-5.npz
    python anonymize.py --dataset D --backbone B --anonymizer cvae --seed 42 -> train_cvae-s42.npz

written beside the database (same keys). k-Same replaces each vector by the mean of its
cluster of k (deterministic, no seed). The CVAE is trained on train (early stopping on
val) or reused from its checkpoint, and its decoder samples as many vectors per class as
the real training set has. Anonymizers are listed in src/anonymizers/.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src.anonymizers import MAKING, add_anonymizer_options, anonymizer_settings, get_anonymizer
from src.cli import ArgumentParser, run_cli
from src.options import add_options, from_args
from src.settings import AnonymizeSettings


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, AnonymizeSettings)
    add_anonymizer_options(parser, MAKING)
    return parser


def parse_settings(argv: list[str] | None = None) -> AnonymizeSettings:
    args = build_parser().parse_args(argv)
    return from_args(AnonymizeSettings, args, **anonymizer_settings(get_anonymizer(args.anonymizer), args, MAKING))


def outputs(settings: AnonymizeSettings) -> list[Path]:
    from src.releases import release_path

    return [release_path(settings, get_anonymizer(settings.anonymizer), settings.release)]


def main() -> None:
    settings = parse_settings()
    from src.releases import make_release  # torch: loaded after the flags are checked, and never by the sweep

    make_release(settings)


if __name__ == "__main__":
    run_cli(main)
