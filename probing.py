"""Linear probe on identity or anonymized train embeddings, evaluated on the real test split.

Writes <output_root>/<dataset>/<dataset>_<flag>-s<seed>.json with the test AUROC,
accuracy, balanced accuracy and the released set's privacy metrics.
"""
from __future__ import annotations

from src.evaluation import add_anonymizer_arguments, add_common_arguments, result_path, run_probing
from src.cli import ArgumentParser, run_cli
from src.io import write_json


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    add_common_arguments(parser)
    add_anonymizer_arguments(parser)
    args = parser.parse_args()
    flag, results = run_probing(args, sigmas=[0.0])
    result, path = results[0.0], result_path(args, flag)
    write_json(path, result)
    print(f"{args.dataset} {flag} seed {args.seed}: AUC {result['auc']:.2f}, accuracy {result['accuracy']:.2f}, "
          f"mindistance {result['average_mindistance']:.3f}, MIA AUC {result['mia_auc']:.2f} -> {path}")


if __name__ == "__main__":
    run_cli(main)
