"""Timing helpers shared by the benchmarks: device synchronisation and interleaved repeats."""
from __future__ import annotations

import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def race(runs: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, tuple[float, object]]:
    """Least wall time of each run over `repeats` rounds, the runs interleaved within a round so
    that load from other processes on a shared machine falls on both sides alike. Returns
    (seconds, last result) per run name."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            results[name] = run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: (min(times[name]), results[name]) for name in runs}
