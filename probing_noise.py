"""Linear probe evaluated on the real test split with Gaussian noise added to its z-scored embeddings.

The probe is trained once and evaluated at every --sigma; each writes
<output_root>/<dataset>/<dataset>_<flag>-s<seed>_sigma-<sigma>.json.
"""
from __future__ import annotations

import argparse

from src.evaluation import (add_anonymizer_arguments, add_common_arguments, add_sigma_argument, checked_sigmas,
                            result_path, run_probing)
from src.io import run_cli, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_arguments(parser)
    add_anonymizer_arguments(parser)
    add_sigma_argument(parser)
    args = parser.parse_args()
    flag, results = run_probing(args, checked_sigmas(args.sigma))
    for sigma, result in results.items():
        path = result_path(args, flag, sigma)
        write_json(path, result)
        print(f"{args.dataset} {flag} seed {args.seed} sigma {sigma:g}: AUC {result['auc']:.2f}, "
              f"accuracy {result['accuracy']:.2f} -> {path}")


if __name__ == "__main__":
    run_cli(main)
