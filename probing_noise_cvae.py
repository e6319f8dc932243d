"""Linear probe trained on CVAE samples drawn afresh every epoch ("online"), evaluated on
the real test split with Gaussian noise added to its embeddings. The CVAE is the default and,
so far, the only anonymizer with an online mode (`--anonymizer` offers any that declares one).

Trains the CVAE on the real train split (early stopping on val) or reuses its checkpoint
(the same one anonymize.py uses), then feeds the probe online_factor x N new samples per
epoch. As in the reference, samples, val and test are z-scored with the real train
statistics, so the default test noise is in real units. Writes one file per sigma:
<output_root>/<dataset>/<dataset>_cvae-online-v<variance>-s<seed>_sigma-<sigma>[-real].json
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src.anonymizers import ONLINE, add_anonymizer_options, anonymizer_settings, get_anonymizer
from src.cli import ArgumentParser, run_cli
from src.naming import result_paths
from src.options import add_options, from_args
from src.settings import ProbeSettings, ProbeTraining

def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, ProbeSettings)
    add_options(parser, ProbeTraining)
    parser.set_defaults(sigma=None, noise_units=["real"], anonymizer="cvae")  # the reference's online script
    add_anonymizer_options(parser, ONLINE)
    return parser


def parse_settings(argv: list[str] | None = None) -> ProbeSettings:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sigma is None:
        parser.error("the following arguments are required: --sigma")
    return from_args(ProbeSettings, args, training=from_args(ProbeTraining, args),
                     **anonymizer_settings(get_anonymizer(args.anonymizer), args, ONLINE))


def outputs(settings: ProbeSettings) -> list[Path]:
    flag = get_anonymizer(settings.anonymizer).flag(settings.release, online=True)
    return list(result_paths(settings, flag, plain=False).values())


def main() -> None:
    settings = parse_settings()
    from src.evaluation import probe_online, write_results  # torch: loaded after the flags are checked

    write_results(settings, probe_online(settings))


if __name__ == "__main__":
    run_cli(main)
