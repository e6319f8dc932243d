"""Linear probe on identity or anonymized train embeddings, evaluated on the real test split.

Writes <output_root>/<dataset>/<dataset>_<flag>-s<seed>.json with the test AUROC,
accuracy, balanced accuracy and the released set's privacy metrics.
"""
from __future__ import annotations

from pathlib import Path

from src.anonymizers import PICKING, add_anonymizer_options, anonymizer_settings, get_anonymizer
from src.cli import ArgumentParser, run_cli
from src.naming import released_flag, result_paths
from src.options import add_options, from_args
from src.settings import ProbeSettings, ProbeTraining


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    add_options(parser, ProbeSettings, skip=("sigma", "noise_units"))
    add_options(parser, ProbeTraining)
    add_anonymizer_options(parser, PICKING)
    return parser


def parse_settings(argv: list[str] | None = None) -> ProbeSettings:
    args = build_parser().parse_args(argv)
    return from_args(ProbeSettings, args, training=from_args(ProbeTraining, args),
                     sigma=(0.0,), noise_units=("released",),
                     **anonymizer_settings(get_anonymizer(args.anonymizer), args, PICKING))


def outputs(settings: ProbeSettings) -> list[Path]:
    return list(result_paths(settings, released_flag(settings), plain=True).values())


def main() -> None:
    settings = parse_settings()
    from src.evaluation import probe_release, write_results  # torch: loaded after the flags are checked

    write_results(settings, probe_release(settings, plain=True))


if __name__ == "__main__":
    run_cli(main)
