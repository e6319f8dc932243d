"""Benchmark: k-Same (src/ksame.py) against its arithmetic floor and the reference's approach.

Two yardsticks, measured in the same run on the same data and threads:
- gram: one float64 Gram matrix X @ X.T of the embeddings (numpy on CPU, torch on CUDA); above
  N = 10,000 the same product by row blocks, lower triangle only (as numpy's X @ X.T, a
  symmetric rank-k update, does), each block ~256 MB. The `x gram` column is
  each method's time over this one: k-Same needs every pairwise distance at least once.
- reference: the float64 distance matrix, with the block of unassigned points rescanned every
  step to sum distances (O(N^2) memory, O(N^3/k) time): the reference's approach. To keep that
  block contiguous it swaps assigned points to the end of the matrix. Run up to
  --skip-reference-above only.

Each method runs in its own subprocess on the same Gaussian-mixture embeddings (D = 768,
5 classes); we report its wall time (data generation and imports excluded) and its peak
resident memory (ru_maxrss of that process, imports and data included; the resident size
just before the run is shown beside it), and whether the clusters equal the reference's.
With --repeat R, the Gram product and k-Same run R times each, in alternation, and the table shows
each one's fastest run and its largest peak: on a shared machine the noise only ever adds time,
and the alternation exposes both to the same hours.

    python benchmarks/bench_ksame.py                              # N = 546, 5000, 20000; k = 5
    python benchmarks/bench_ksame.py --sizes 20000 --k 2 5 10
    python benchmarks/bench_ksame.py --sizes 20000 60000 100000   # the reference only up to 20000;
                                                                  # x gram N0: over the Gram of N = 20000
    python benchmarks/bench_ksame.py --device cuda --sizes 20000 100000
    python benchmarks/bench_ksame.py --sizes 20000 --skip-reference-above 0 --phases   # where the time goes
    python benchmarks/bench_ksame.py --sizes 20000 --k 5 --repeat 3 --skip-reference-above 0   # best of 3
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIM = 768
NUM_CLASSES = 5
# The phases of src/ksame.py that --phases reports (cumulative time of each function under cProfile).
PHASES = {
    "_cells": "cells (Lloyd iterations) and their sums",
    "_refresh": "bounds refreshed from the cell sums",
    "_tighten": "bounds tightened without a product",
    "sums_and_nearest": "float64 passes admitting groups to the exact tier",
    "remove": "exact tier and warm rows updated, every step",
    "_closest": "neighbour choice, every step",
}


def gaussian_mixture(num_samples: int, seed: int = 0) -> np.ndarray:
    """Embedding-like data: five classes around random centres, unit noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(NUM_CLASSES, DIM))
    return (centres[rng.integers(0, NUM_CLASSES, num_samples)] + rng.normal(size=(num_samples, DIM))).astype(np.float32)


def reference_clusters(embeddings: np.ndarray, k: int) -> np.ndarray:
    """The reference procedure on a full float64 N x N distance matrix, rescanned every step."""
    n = len(embeddings) - len(embeddings) % k
    x = embeddings[:n].astype(np.float64)
    sq_norms = (x * x).sum(1)
    dist = np.empty((n, n))
    for start in range(0, n, 2048):  # by row blocks: one 20,000 x 20,000 X @ X.T crashes numpy's OpenBLAS
        np.matmul(x[start:start + 2048], x.T, out=dist[start:start + 2048])
    dist *= -2.0
    dist += sq_norms[:, None]
    dist += sq_norms[None, :]
    np.maximum(dist, 0.0, out=dist)
    np.sqrt(dist, out=dist)
    np.fill_diagonal(dist, 0.0)
    original = np.arange(n)  # original row index of each matrix position
    live = n  # positions [0, live) are unassigned
    clusters = np.empty((n // k, k), dtype=np.int64)
    for step in range(n // k):
        sums = dist[:live, :live].sum(1)
        best = np.flatnonzero(sums == sums.max())
        pivot = best[np.argmin(original[best])]
        others = np.delete(np.arange(live), pivot)
        order = np.lexsort((original[others], dist[pivot, others]))  # by distance, then index
        members = np.concatenate([[pivot], others[order[:k - 1]]])
        clusters[step] = original[members]
        for position in sorted(members, reverse=True):  # swap each assigned point to the end
            live -= 1
            dist[[position, live]] = dist[[live, position]]
            dist[:, [position, live]] = dist[:, [live, position]]
            original[[position, live]] = original[[live, position]]
    return clusters


# Above this N the Gram matrix is made by row blocks: numpy 2.x's bundled OpenBLAS crashes (SIGSEGV)
# on one 20,000 x 20,000 float64 X @ X.T here, and at 60,000 the result alone would take 29 GB.
GRAM_IN_ONE_PIECE = 10000


def gram_product(embeddings: np.ndarray, device_name: str) -> None:
    """One float64 Gram matrix of the embeddings, result discarded (the yardstick)."""
    import torch

    n = len(embeddings)
    if device_name == "cpu":
        x = embeddings.astype(np.float64)
        if n <= GRAM_IN_ONE_PIECE:
            x @ x.T  # numpy recognises X @ X.T and computes one triangle (syrk)
            return
        block = max(256, (256 * 2**20) // (8 * n))  # row blocks of at most ~256 MB of results
        for start in range(0, n, block):
            x[start:] @ x[start:start + block].T
        return
    x = torch.as_tensor(embeddings, device=device_name).double()
    block = n if n <= GRAM_IN_ONE_PIECE else max(256, (2**30) // (8 * n))
    for start in range(0, n, block):
        x[start:] @ x[start:start + block].T
    torch.cuda.synchronize()


def resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def worker(method: str, num_samples: int, k: int, device_name: str, out: Path) -> None:
    """Run one method once and write its clusters and measurements."""
    import torch

    from src.ksame import ksame_clusters
    from src.runtime import resolve_device

    embeddings = gaussian_mixture(num_samples)
    device = resolve_device(device_name) if method != "reference" else torch.device("cpu")
    if device.type == "cuda":  # CUDA start-up outside the timing
        torch.zeros(1, device=device)
        torch.cuda.synchronize()
    before = resident_mb()
    start = time.perf_counter()
    phases = {}
    if method == "ours":
        clusters = ksame_clusters(embeddings, k, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
    elif method == "phases":  # the same run under cProfile, for its time per phase
        import cProfile
        import pstats

        profile = cProfile.Profile()
        clusters = profile.runcall(ksame_clusters, embeddings, k, device)
        phases = {name: [seconds, calls] for (path, _, name), (_, calls, _, seconds, _) in
                  pstats.Stats(profile).stats.items() if path.endswith("ksame.py") and name in PHASES}
    elif method == "gram":
        gram_product(embeddings, device.type)
    else:
        clusters = reference_clusters(embeddings, k)
    seconds = time.perf_counter() - start
    if method != "gram":
        np.save(out / f"{method}.npy", clusters)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / f"{method}.json").write_text(json.dumps({"seconds": seconds, "peak_mb": peak, "before_mb": before,
                                                    "device": str(device), "phases": phases}))


def run_worker(method: str, num_samples: int, k: int, threads: int, device: str, out: Path) -> dict:
    """One method in a fresh process, so that its peak memory is its own; BLAS threads capped."""
    env = {**os.environ, **{name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                           "OPENBLAS_NUM_THREADS")}}
    subprocess.run([sys.executable, __file__, "--worker", method, "--sizes", str(num_samples), "--k", str(k),
                    "--device", device, "--out", str(out)], check=True, env=env)
    return json.loads((out / f"{method}.json").read_text())


def fastest(results: list[dict]) -> dict:
    """The fastest of repeated runs, with the largest peak memory of them all."""
    best = min(results, key=lambda result: result["seconds"])
    return {**best, "peak_mb": max(result["peak_mb"] for result in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[546, 5000, 20000])
    parser.add_argument("--k", type=int, nargs="+", default=[5], help="one or more k, each run at every size")
    parser.add_argument("--large", action="store_true", help="also N = 60000, k = 2")
    parser.add_argument("--skip-reference-above", type=int, default=20000,
                        help="run the N x N baseline only up to this N")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="CPU threads for every method (on a busy shared machine, 1 is the least noisy)")
    parser.add_argument("--device", default="auto", help="device for k-Same and the Gram product: auto, cpu, cuda")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the Gram product and k-Same this many times each, alternating; report the fastest")
    parser.add_argument("--phases", action="store_true",
                        help="also run k-Same once more under cProfile and print the time of each phase")
    parser.add_argument("--worker", choices=["ours", "gram", "reference", "phases"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1 (got {args.repeat})")
    if args.worker:
        worker(args.worker, args.sizes[0], args.k[0], args.device, args.out)
        return

    runs = [(n, k) for n in args.sizes for k in args.k] + ([(60000, 2)] if args.large else [])
    print(f"Gaussian mixture, D = {DIM}, {NUM_CLASSES} classes, {args.threads} CPU thread(s). Each method in its own"
          " process; time excludes data generation; peak = ru_maxrss of that process (imports and data included);"
          " x gram = time / time of one float64 Gram matrix of the same data, same run; x gram N0 = time / that"
          f" Gram time at the first size, N0 = {runs[0][0]}."
          + (f" Gram and k-Same: the fastest of {args.repeat} runs each, alternating." if args.repeat > 1 else ""))
    print(f"{'N':>6} {'k':>3} {'method':<10} {'device':<6} {'seconds':>9} {'RSS before MB':>14} {'peak RSS MB':>12}"
          f" {'x gram':>7} {'x gram N0':>10} {'speed-up':>9} {'same clusters':>14}", flush=True)
    first_gram = None
    for num_samples, k in runs:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            grams, ours_runs = [], []
            for _ in range(args.repeat):
                grams.append(run_worker("gram", num_samples, k, args.threads, args.device, out))
                ours_runs.append(run_worker("ours", num_samples, k, args.threads, args.device, out))
            gram, ours = fastest(grams), fastest(ours_runs)
            first_gram = first_gram or gram
            reference = None
            if num_samples <= args.skip_reference_above:
                reference = run_worker("reference", num_samples, k, args.threads, args.device, out)
                same = np.array_equal(np.load(out / "ours.npy"), np.load(out / "reference.npy"))
            for name, result in (("gram", gram), ("ours", ours), ("reference", reference)):
                if result is None:
                    continue
                over_gram = f"{result['seconds'] / gram['seconds']:.2f}"
                over_first = f"{result['seconds'] / first_gram['seconds']:.2f}"
                ratio = f"{reference['seconds'] / ours['seconds']:.1f}x" if reference and name == "ours" else ""
                agree = ("yes" if same else "NO") if reference and name == "ours" else ""
                print(f"{num_samples:>6} {k:>3} {name:<10} {result['device']:<6} {result['seconds']:>9.2f}"
                      f" {result['before_mb']:>14.0f} {result['peak_mb']:>12.0f} {over_gram:>7} {over_first:>10}"
                      f" {ratio:>9} {agree:>14}", flush=True)
            if args.phases:
                profiled = run_worker("phases", num_samples, k, args.threads, args.device, out)
                print(f"  phases of one more run under cProfile ({profiled['seconds']:.2f} s, profiling included):")
                for function, label in PHASES.items():
                    seconds, calls = profiled["phases"].get(function, [0.0, 0])
                    print(f"    {label:<52} {seconds:>8.2f} s {100 * seconds / profiled['seconds']:>5.1f} %"
                          f" {calls:>7} calls", flush=True)


if __name__ == "__main__":
    main()
