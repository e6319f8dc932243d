"""SDMetrics' distance to closest record (src.metrics.sdmetrics_dcr) against its plain form, which
materialises queries x references x columns in blocks, as the formula reads. Same inputs, same run,
interleaved; prints both times, their ratio and the largest difference.

    python benchmarks/bench_sdmetrics_dcr.py [--queries 1000] [--references 4000] [--dim 384] [--query_scale 1.2]

--query_scale sets how far the queries reach past the references' range: 1.2 puts a few coordinates
outside; 3 about a fifth, as many as a DP-CVAE release at a small epsilon has.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.metrics import PAIRWISE_ELEMENTS, sdmetrics_dcr  # noqa: E402
from timing import race  # noqa: E402


@torch.no_grad()
def materialised_dcr(queries: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """The formula as written: every |q - r| / range clipped at 1, for blocks of queries x all references."""
    queries, reference = queries.double(), reference.double()
    spread = reference.max(dim=0).values - reference.min(dim=0).values
    constant = spread == 0
    nearest = torch.empty(len(queries), dtype=torch.float64)
    rows_per_block = max(1, PAIRWISE_ELEMENTS // (len(reference) * reference.shape[1]))
    for start in range(0, len(queries), rows_per_block):
        difference = (queries[start:start + rows_per_block, None, :] - reference[None, :, :]).abs()
        scaled = (difference / torch.where(constant, 1.0, spread)).clamp(max=1.0)
        scaled = torch.where(constant, (difference > 0).double(), scaled)
        counted = (~constant | (difference > 0)).sum(dim=2)
        nearest[start:start + rows_per_block] = (scaled.sum(dim=2) / counted.clamp(min=1)).min(dim=1).values
    return nearest.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--references", type=int, default=4000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--query_scale", type=float, default=1.2, help="queries' std; the references' is 1")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(args.references, args.dim, generator=generator)
    queries = args.query_scale * torch.randn(args.queries, args.dim, generator=generator)
    timed = race({"ours": lambda: sdmetrics_dcr(queries, reference),
                  "materialised": lambda: materialised_dcr(queries, reference)}, torch.device("cpu"), args.repeats)
    (ours_s, ours), (plain_s, plain) = timed["ours"], timed["materialised"]
    outside = float(((queries < reference.min(dim=0).values) | (queries > reference.max(dim=0).values)).double().mean())
    print(f"{args.queries} queries (std {args.query_scale:g}, {100 * outside:.0f} % of coordinates outside the "
          f"references' range) x {args.references} references x {args.dim} columns, {torch.get_num_threads()} "
          f"threads, best of {args.repeats}: ours {ours_s:.2f} s, materialised {plain_s:.2f} s, "
          f"speed-up {plain_s / ours_s:.1f}x, largest difference {np.abs(ours - plain).max():.1e}")


if __name__ == "__main__":
    main()
