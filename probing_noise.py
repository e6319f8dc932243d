"""Linear probe evaluated on the real test split with Gaussian noise added to its z-scored embeddings.

The probe is trained once and evaluated at every --sigma; each writes
<output_root>/<dataset>/<dataset>_<flag>-s<seed>_sigma-<sigma>.json.
"""
from __future__ import annotations

from src.evaluation import (add_anonymizer_arguments, add_common_arguments, add_sigma_argument, checked_sigmas,
                            run_probing, write_noise_results)
from src.cli import ArgumentParser, run_cli


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    add_common_arguments(parser)
    add_anonymizer_arguments(parser)
    add_sigma_argument(parser)
    args = parser.parse_args()
    flag, results = run_probing(args, checked_sigmas(args.sigma))
    write_noise_results(args, flag, results)


if __name__ == "__main__":
    run_cli(main)
