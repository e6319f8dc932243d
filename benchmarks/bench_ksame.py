"""Benchmark: k-Same (src/ksame.py) against a plain N x N implementation of the reference.

The baseline materialises the float64 distance matrix and, every step, rescans the
block of unassigned points to sum distances (O(N^2) memory, O(N^3/k) time): the
reference's approach. To keep that block contiguous it swaps assigned points to the
end of the matrix, so each step reads exactly the unassigned block once.

Each method runs in its own subprocess on the same Gaussian-mixture embeddings
(D = 768, 5 classes); we report its wall time (data generation and imports excluded)
and its peak resident memory (ru_maxrss of that process, imports and data included;
the resident size just before the run is shown beside it), and whether the clusters
are identical.

    python benchmarks/bench_ksame.py                   # N = 546, 5000, 20000; k = 5
    python benchmarks/bench_ksame.py --sizes 546 5000 --k 10
    python benchmarks/bench_ksame.py --large         # adds N = 60000, k = 2, ours only
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
    dist = x @ x.T
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


def resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def worker(method: str, num_samples: int, k: int, out: Path) -> None:
    """Run one method once and write its clusters and measurements."""
    import torch

    from src.ksame import ksame_clusters
    from src.runtime import resolve_device

    embeddings = gaussian_mixture(num_samples)
    device = resolve_device("auto")
    before = resident_mb()
    start = time.perf_counter()
    if method == "ours":
        clusters = ksame_clusters(embeddings, k, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
    else:
        clusters = reference_clusters(embeddings, k)
    seconds = time.perf_counter() - start
    np.save(out / f"{method}.npy", clusters)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / f"{method}.json").write_text(json.dumps({"seconds": seconds, "peak_mb": peak, "before_mb": before,
                                                    "device": str(device)}))


def run_worker(method: str, num_samples: int, k: int, threads: int, out: Path) -> dict:
    """One method in a fresh process, so that its peak memory is its own; BLAS threads capped."""
    env = {**os.environ, **{name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                           "OPENBLAS_NUM_THREADS")}}
    subprocess.run([sys.executable, __file__, "--worker", method, "--sizes",
                    str(num_samples), "--k", str(k), "--out", str(out)], check=True, env=env)
    return json.loads((out / f"{method}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[546, 5000, 20000])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--large", action="store_true", help="also N = 60000, k = 2, ours only")
    parser.add_argument("--skip-reference-above", type=int, default=20000,
                        help="run the N x N baseline only up to this N")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="CPU threads for both methods (on a busy shared machine, 1 is the least noisy)")
    parser.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.sizes[0], args.k, args.out)
        return

    runs = [(n, args.k) for n in args.sizes] + ([(60000, 2)] if args.large else [])
    print(f"Gaussian mixture, D = {DIM}, {NUM_CLASSES} classes, {args.threads} CPU thread(s). Each method in its own"
          " process; time excludes data generation; peak = ru_maxrss of that process (imports and data included).")
    print(f"{'N':>6} {'k':>3} {'method':<10} {'device':<6} {'seconds':>9} {'RSS before MB':>14} {'peak RSS MB':>12}"
          f" {'speed-up':>9} {'same clusters':>14}")
    for num_samples, k in runs:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            ours = run_worker("ours", num_samples, k, args.threads, out)
            reference = None
            if num_samples <= args.skip_reference_above:
                reference = run_worker("reference", num_samples, k, args.threads, out)
                same = np.array_equal(np.load(out / "ours.npy"), np.load(out / "reference.npy"))
            for name, result in (("ours", ours), ("reference", reference)):
                if result is None:
                    continue
                ratio = f"{reference['seconds'] / ours['seconds']:.1f}x" if reference and name == "ours" else ""
                agree = ("yes" if same else "NO") if reference and name == "ours" else ""
                print(f"{num_samples:>6} {k:>3} {name:<10} {result['device']:<6} {result['seconds']:>9.2f}"
                      f" {result['before_mb']:>14.0f} {result['peak_mb']:>12.0f} {ratio:>9} {agree:>14}", flush=True)


if __name__ == "__main__":
    main()
