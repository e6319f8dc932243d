"""Linear probe trained on CVAE samples drawn afresh every epoch ("online"), evaluated on
the real test split with Gaussian noise added to its embeddings.

Trains the CVAE on the real train split (early stopping on val) or reuses its checkpoint
(the same one anonymize.py uses), then feeds the probe online_factor x N new samples per
epoch. As in the reference, samples, val and test are z-scored with the real train
statistics, so the default test noise is in real units. Writes one file per sigma:
<output_root>/<dataset>/<dataset>_cvae-online-v<variance>-s<seed>_sigma-<sigma>[-real].json
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src.anonymizers.cvae import CVAEAnonymizer
from src.cli import ArgumentParser, run_cli
from src.naming import result_paths
from src.options import add_options, from_args
from src.settings import ProbeSettings, ProbeTraining

GENERATOR = CVAEAnonymizer()


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, ProbeSettings, skip=("anonymizer",))
    add_options(parser, ProbeTraining)
    parser.set_defaults(sigma=None, noise_units=["real"])  # the reference's online script: real units
    for settings_class in (GENERATOR.Release, GENERATOR.Making, GENERATOR.Online):
        add_options(parser.add_argument_group(f"--anonymizer {GENERATOR.name}"), settings_class)
    return parser


def parse_settings(argv: list[str] | None = None) -> ProbeSettings:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sigma is None:
        parser.error("the following arguments are required: --sigma")
    return from_args(ProbeSettings, args, training=from_args(ProbeTraining, args),
                     anonymizer=GENERATOR.name, release=from_args(GENERATOR.Release, args),
                     making=from_args(GENERATOR.Making, args), online=from_args(GENERATOR.Online, args))


def outputs(settings: ProbeSettings) -> list[Path]:
    return list(result_paths(settings, GENERATOR.flag(settings.release, online=True), plain=False).values())


def main() -> None:
    settings = parse_settings()
    from src.evaluation import probe_online, write_results  # torch: loaded after the flags are checked

    write_results(settings, probe_online(settings))


if __name__ == "__main__":
    run_cli(main)
