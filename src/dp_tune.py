"""python -m src.dp_tune: choose the DP statistics' public settings (clipping radii, budget shares,
covariance floor, the DP probe's ridge) on a public database, never on the private one.

The DP Gaussian release and the DP least-squares probe (src/dp_stats.py) take their radii and shares
as public constants. This varies one of them at a time around the defaults, draws the noisy statistics
`--draws` times at `--epsilon` (seeded draws: this is tuning on public data, nothing is released), and
prints the test accuracy of the DP least-squares probe from each, as a Markdown table. Pick the epsilon
whose noise per record matches the private run's: z / N about equal, e.g. the 1,077 digits at epsilon
10 for 10,000 records at epsilon 1. docs/dp-baselines.md holds the run behind the defaults.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from src.anonymizers.dp_gaussian import GaussMaking
from src.anonymizers.dp_probe import RIDGE, least_squares
from src.cli import ArgumentParser, UserError, check_finite, run_cli
from src.defaults import DEFAULT_ROOTS, PAPER_BACKBONE
from src.dp_stats import COVARIANCE_FLOOR, statistics_of
from src.io import declared_classes, load_database
from src.metrics import accuracy
from src.naming import database_dir

GRID: dict[str, tuple] = {  # each setting's values tried, the others at their defaults
    "dpg_center_clip": (30.0, 45.0, 60.0),
    "dpg_mean_clip": (2.5, 5.0, 10.0, 20.0),
    "dpg_residual_clip": (2.0, 3.0, 5.0, 10.0, 20.0),
    "dpg_shares": ((0.05, 0.05, 0.3, 0.6), (0.05, 0.05, 0.6, 0.3), (0.02, 0.03, 0.15, 0.8), (0.02, 0.02, 0.32, 0.64)),
    "covariance_floor": (0.1, 0.25, 0.5, 1.0),
    "ridge": (0.0, 0.01, 0.1, 1.0),
}
CONSTANTS = {"covariance_floor": COVARIANCE_FLOOR, "ridge": RIDGE}  # the GRID entries that are not GaussMaking's


def dp_probe_accuracies(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], num_classes: int,
                        epsilon: float, making: GaussMaking, draws: int, covariance_floor: float,
                        ridge: float) -> np.ndarray:
    """Test accuracy (%) of the DP least-squares probe from `draws` noise draws (seeds 0 .. draws-1)."""
    scores, seeded = [], replace(making, dpg_seeded_noise_not_private=True)
    for draw in range(draws):
        stats = statistics_of(*train, num_classes, epsilon, seeded, seed=draw)
        weight, bias = least_squares(stats.means, stats.covariance(covariance_floor), stats.class_sizes(), ridge)
        scores.append(accuracy(test[1], (test[0] @ weight + bias).argmax(axis=1)))
    return np.asarray(scores)


def tuning_table(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], num_classes: int,
                 epsilon: float, draws: int) -> str:
    """The Markdown table of GRID: one row per setting and value, the defaults marked."""
    rows = ["| setting | value | DP least-squares accuracy (%) |", "|---|---|---|"]
    default = GaussMaking()
    trials = [(name, value) for name, values in GRID.items() for value in values]
    for name, value in tqdm(trials, desc="settings", leave=False, disable=None):
        constants = {**CONSTANTS, **({name: value} if name in CONSTANTS else {})}
        making = default if name in CONSTANTS else replace(default, **{name: value})
        is_default = value == (CONSTANTS[name] if name in CONSTANTS else getattr(default, name))
        scores = dp_probe_accuracies(train, test, num_classes, epsilon, making, draws, **constants)
        shown = " / ".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}"
        rows.append(f"| {name} | {shown}{' (default)' if is_default else ''} | "
                    f"{scores.mean():.2f} ± {scores.std(ddof=1) if draws > 1 else 0.0:.2f} |")
    return "\n".join(rows)


def main() -> None:
    """python -m src.dp_tune: the DP statistics' public settings tried on a public database."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("--dataset", required=True, help="a public dataset's name, e.g. digits")
    parser.add_argument("--backbone", default=PAPER_BACKBONE,
                        help=f"whose databases to read (default {PAPER_BACKBONE})")
    parser.add_argument("--database_root", type=Path, default=DEFAULT_ROOTS["database_root"],
                        help="where create_db.py wrote them (default assets/database)")
    parser.add_argument("--epsilon", type=float, required=True, help="the budget to tune at")
    parser.add_argument("--draws", type=int, default=20, help="noise draws per setting (default 20)")
    args = parser.parse_args()
    epsilon = check_finite("--epsilon", args.epsilon, above=0)
    if args.draws < 1:
        raise UserError(f"--draws {args.draws}: give at least 1")
    folder = database_dir(args.database_root, args.dataset, args.backbone)
    train_x, train_y, meta = load_database(folder / "train.npz", "create_db.py")
    test_x, test_y, _ = load_database(folder / "test.npz", "create_db.py")
    num_classes = declared_classes(meta, folder / "train.npz", train_y, test_y)
    print(f"{args.dataset} ({len(train_x)} train, {len(test_x)} test records), epsilon {epsilon:g}, "
          f"{args.draws} draws, mean ± std:\n")
    print(tuning_table((train_x.astype(np.float64), train_y), (test_x.astype(np.float64), test_y), num_classes,
                       epsilon, args.draws))


if __name__ == "__main__":
    run_cli(main)
