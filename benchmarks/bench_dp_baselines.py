"""Benchmark: the DP baselines against their non-DP versions at N = 10,000 (goal: at most 3x).

(a) The class-conditional Gaussian release: `GaussAnonymizer.make` with --dpg_epsilon against
    without (exact statistics), sampling included.
(b) The least-squares probe: `DPProbe.fit_probe` with --dpp_epsilon against without.
Both DP runs include their noise calibration (a bisection over the ledger's accountant).
Data: a 10-class Gaussian mixture of the size of the Fashion-MNIST embeddings (D = 384).

    python benchmarks/bench_dp_baselines.py --size 10000 --dim 384 --repeats 3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.anonymizers.base import ReleaseInputs  # noqa: E402
from src.anonymizers.dp_gaussian import GaussAnonymizer, GaussMaking, GaussRelease  # noqa: E402
from src.anonymizers.dp_probe import DPProbe, DPProbeRelease  # noqa: E402
from timing import race  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, args.size)
    x = (rng.normal(0, 2, (10, args.dim))[y] + rng.normal(0, 1, (args.size, args.dim))).astype(np.float32)
    inputs = ReleaseInputs(x, y, x[:0], y[:0], 10, Path("."))
    gauss, probe, making = GaussAnonymizer(), DPProbe(), GaussMaking()
    runs = {"gauss": lambda: gauss.make(inputs, GaussRelease(), making, 0, "cpu"),
            "gauss DP": lambda: gauss.make(inputs, GaussRelease(dpg_epsilon=args.epsilon), making, 0, "cpu"),
            "lsq": lambda: probe.fit_probe(x, y, 10, DPProbeRelease(), 0),
            "lsq DP": lambda: probe.fit_probe(x, y, 10, DPProbeRelease(dpp_epsilon=args.epsilon), 0)}
    times = race(runs, torch.device("cpu"), args.repeats)
    print(f"N = {args.size}, D = {args.dim}, epsilon {args.epsilon:g}, best of {args.repeats}, "
          f"torch threads {torch.get_num_threads()}")
    for method in ("gauss", "lsq"):
        plain, private = times[method][0], times[f"{method} DP"][0]
        print(f"{method:6s} non-DP {plain:7.3f} s   DP {private:7.3f} s   ratio {private / plain:5.2f}x")


if __name__ == "__main__":
    main()
