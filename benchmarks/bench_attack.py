"""Benchmark: what the membership-inference attack's shadows cost (src/attack.py), against its floor.

Measured in the same run, on the same real-format data (scikit-learn's digits pixels, 64 features,
as databases; or --database_root/--dataset/--backbone for real embeddings):
- one shadow (src.attack._shadow: one worker's unit, one CPU thread) against one ordinary training of
  the same anonymizer on the same records (the anonymizer's make, as anonymize.py calls it); goal <= 1.1x;
- S shadows made with --jobs 2 (src.attack.shadow_observations, worker processes) against S x one shadow
  made in this process; on 2 free cores the ideal ratio is 0.5.
Rounds alternate the sides (benchmarks.timing.race) and keep each side's fastest.

    python benchmarks/bench_attack.py                                   # k-Same 5, S = 4
    python benchmarks/bench_attack.py --anonymizer cvae --max_epochs 50 --shadows 4
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from src.anonymizers import get_anonymizer  # noqa: E402
from src.attack import _shadow, load_records, release_from_rows, shadow_observations  # noqa: E402
from src.io import save_database  # noqa: E402
from src.mia import draw_split  # noqa: E402
from src.runtime import one_cpu_thread  # noqa: E402
from src.settings import AttackSettings  # noqa: E402
from timing import race  # noqa: E402


def digits_databases(root: Path) -> tuple[Path, str, str]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    for split, rows in (("train", order[:900]), ("test", order[900:1400]), ("val", order[1400:])):
        save_database(root / "pixels" / "raw" / f"{split}.npz", digits.data[rows], digits.target[rows], {})
    return root, "pixels", "raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anonymizer", default="ksame", choices=["ksame", "cvae"])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max_epochs", type=int, default=1000)
    parser.add_argument("--shadows", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--database_root", type=Path)
    parser.add_argument("--dataset")
    parser.add_argument("--backbone")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root, dataset, backbone = ((args.database_root, args.dataset, args.backbone) if args.database_root
                                   else digits_databases(Path(tmp)))
        anonymizer = get_anonymizer(args.anonymizer)
        release = anonymizer.Release(k=args.k) if args.anonymizer == "ksame" else anonymizer.Release()
        making = anonymizer.Making() if args.anonymizer == "ksame" else anonymizer.Making(max_epochs=args.max_epochs)
        common = dict(dataset=dataset, backbone=backbone, device="cpu", database_root=root,
                      ckpt_root=Path(tmp) / "ckpts", output_root=Path(tmp) / "out", anonymizer=args.anonymizer,
                      release=release, making=making, targets=200, shadows=args.shadows)
        serial, parallel = AttackSettings(**common, jobs=1), AttackSettings(**common, jobs=2)
        inputs, _ = load_records(serial)
        split = draw_split(len(inputs["records_x"]), serial.targets, serial.shadows, serial.seed)
        rows = split.shadow_rows(0)
        # every run gets a fresh checkpoint folder, so that no CVAE is reused from a cache
        counter = iter(range(10 ** 6))

        def fresh(settings: AttackSettings) -> dict:
            return {**inputs, "checkpoint_dir": Path(tmp) / "ckpts" / str(next(counter))}

        def ordinary() -> np.ndarray:
            with one_cpu_thread():
                return release_from_rows(serial, fresh(serial), rows, 43, torch.device("cpu")).embeddings

        one = race({"ordinary training": ordinary,
                    "one shadow": lambda: _shadow((serial, fresh(serial), rows, 43, split.targets))},
                   torch.device("cpu"), args.repeat)
        many = race({f"{args.shadows} shadows, one process": lambda: list(shadow_observations(serial, fresh(serial),
                                                                                              split)),
                     f"{args.shadows} shadows, --jobs 2": lambda: list(shadow_observations(parallel, fresh(parallel),
                                                                                           split))},
                    torch.device("cpu"), args.repeat)
    name = f"{args.anonymizer}" + (f" k={args.k}" if args.anonymizer == "ksame" else f" max_epochs={args.max_epochs}")
    print(f"{name}, {len(rows)} records per training, best of {args.repeat}")
    for table in (one, many):
        (base_name, (base, _)), (other_name, (other, _)) = table.items()
        print(f"  {base_name:<28} {base:8.2f} s")
        print(f"  {other_name:<28} {other:8.2f} s   ratio {other / base:.2f}")


if __name__ == "__main__":
    main()
