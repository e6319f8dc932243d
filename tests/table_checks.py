"""Comparing two runs' tables, which agree on everything but the seconds each run took."""
from __future__ import annotations

from src.metric_registry import TIMING, table_metrics


def without_timing(tables: dict[str, str]) -> dict[str, str]:
    """Tables by file name, less the timing tables and the timing rows of summary.csv: no two runs share those."""
    timing = table_metrics(TIMING)
    kept = {name: text for name, text in tables.items() if not name.startswith(timing)}
    if "summary.csv" in kept:
        kept["summary.csv"] = "".join(line for line in kept["summary.csv"].splitlines(True)
                                      if line.split(",")[4] not in timing)
    return kept
