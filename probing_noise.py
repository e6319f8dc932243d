"""Linear probe evaluated on the real test split with Gaussian noise added to its embeddings.

The probe is trained once and evaluated at every --sigma and --noise_units; each writes
<output_root>/<dataset>/<dataset>_<flag>-s<seed>_sigma-<sigma>[-real].json. The default
units are the reference's: the released set's own z-units (a release with a narrower
spread meets weaker noise); `--noise_units real` gives every release the same noise,
N(0, sigma^2 s_j^2) with s_j the real train std of feature j.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src.anonymizers import PICKING, add_anonymizer_options, anonymizer_settings, get_anonymizer
from src.cli import ArgumentParser, run_cli
from src.naming import released_flag, result_paths
from src.options import add_options, from_args
from src.settings import ProbeSettings, ProbeTraining


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, ProbeSettings)
    add_options(parser, ProbeTraining)
    parser.set_defaults(sigma=None)
    add_anonymizer_options(parser, PICKING)
    return parser


def parse_settings(argv: list[str] | None = None) -> ProbeSettings:
    args = build_parser().parse_args(argv)
    if args.sigma is None:
        build_parser().error("the following arguments are required: --sigma")
    return from_args(ProbeSettings, args, training=from_args(ProbeTraining, args),
                     **anonymizer_settings(get_anonymizer(args.anonymizer), args, PICKING))


def outputs(settings: ProbeSettings) -> list[Path]:
    return list(result_paths(settings, released_flag(settings), plain=False).values())


def main() -> None:
    settings = parse_settings()
    from src.evaluation import probe_release, write_results  # torch: loaded after the flags are checked

    write_results(settings, probe_release(settings))


if __name__ == "__main__":
    run_cli(main)
