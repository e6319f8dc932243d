"""Build the OCTDL split tree the `octdl` dataset reads, from the raw OCTDL download.

    python assets/data/octdl/preprocess_octdl.py --raw /path/to/OCTDL --out assets/data/octdl

writes <out>/dataset_1/{train,val,test}/<disease>/*.jpg (val 0.15, test 0.25, seed 42),
<out>/dataset_1/split.csv recording every image's split and partition.json recording the method.

--split authors (default) draws the paper's split exactly, so results compare with theirs:
per disease, that disease's patients are split 60/15/25 %, so a patient with two diseases
can land in two splits. --split patient keeps every patient in one split (no leak).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root, for `src`

from src.data.octdl import SPLIT_METHODS, build_octdl_tree  # noqa: E402
from src.cli import run_cli  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True,
                        help="unpacked OCTDL download: <disease>/ folders of JPEGs and OCTDL_labels.csv")
    parser.add_argument("--out", type=Path, default=Path("assets/data/octdl"),
                        help="folder that receives dataset_1/ (default: assets/data/octdl)")
    parser.add_argument("--val", type=float, default=0.15,
                        help="fraction for validation: of each disease's patients (authors) or of images (patient)")
    parser.add_argument("--test", type=float, default=0.25,
                        help="fraction for test: of each disease's patients (authors) or of images (patient)")
    parser.add_argument("--split", default="authors", metavar="{" + ",".join(SPLIT_METHODS) + "}",
                        help="authors: per disease by that disease's patients, as the paper's script (default); "
                             "patient: every patient in exactly one split")
    parser.add_argument("--seed", type=int, default=42, help="seed of the patient shuffle")
    parser.add_argument("--size", type=int, default=None,
                        help="resize so the shorter side has this many pixels (default: copy unchanged)")
    args = parser.parse_args()
    counts = build_octdl_tree(args.raw, args.out, args.val, args.test, args.seed, args.size, method=args.split)
    print(f"wrote {args.out / 'dataset_1'} ({args.split} split): "
          + ", ".join(f"{split} {count}" for split, count in counts.items()))


if __name__ == "__main__":
    run_cli(main)
