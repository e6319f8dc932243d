"""A Slurm job-array script for a sweep: one task per point, one array per stage, each
array starting once the previous one finished without error."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from src.sweep.config import REPO_ROOT, SweepConfig
from src.sweep.grid import STAGES, Point


def slurm_script(points: list[Point], config: SweepConfig, log_dir: Path) -> str:
    """A job-array script: `bash FILE` submits one array per stage, each afterok on the previous one."""
    stages = [(stage, [i for i, point in enumerate(points) if point.stage == stage]) for stage in STAGES]
    stages = [(stage, indices) for stage, indices in stages if indices]
    directives = [f"#SBATCH --job-name=sweep-{config.name}", f"#SBATCH --array=0-{len(points) - 1}",
                  f"#SBATCH --output={log_dir.resolve()}/slurm-%A_%a.log"]
    directives += [f"#SBATCH --{key.replace('_', '-')}={value}" for key, value in sorted(config.slurm.items())]
    submit = ["previous=''"]
    for stage, indices in stages:
        submit += [f'{stage}=$(sbatch --parsable ${{previous:+--dependency=afterok:$previous}} '
                   f'--array={indices[0]}-{indices[-1]} "$script" run)',
                   f'previous="${{{stage}%%;*}}"',
                   f'echo "submitted {stage} ({len(indices)} tasks) as job $previous"']
    cases = [f"  {i}) \"$PYTHON\" {shlex.join(point.command)} ;;  # {point.name}" for i, point in enumerate(points)]
    return "\n".join([
        "#!/bin/bash",
        f"# Slurm job arrays for the sweep '{config.name}', one task per grid point ({len(points)} tasks),",
        "# written by `python -m src.sweep CONFIG --slurm FILE`.",
        "#   Submit:        bash FILE        (one array per stage: "
        + ", ".join(f"{stage} {ix[0]}-{ix[-1]}" for stage, ix in stages) + ";",
        "#                                   each starts once the previous array finished without error)",
        "#   One task here: SLURM_ARRAY_TASK_ID=<i> bash FILE run",
        "#   Other python or checkout: PYTHON=... REPO=... bash FILE",
        "# Plain `sbatch FILE` is refused: it would start every stage at once.",
        *directives,
        "set -euo pipefail",
        f"PYTHON=\"${{PYTHON:-{sys.executable}}}\"",
        f"REPO=\"${{REPO:-{REPO_ROOT}}}\"",
        "",
        'if [[ "${1:-}" != run ]]; then',
        '  if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then',
        '    echo "error: submit with: bash <this file> (plain sbatch would not order the stages)" >&2',
        "    exit 2",
        "  fi",
        '  script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"',
        *[f"  {line}" for line in submit],
        "  exit 0",
        "fi",
        "",
        'cd "$REPO"',
        'case "$SLURM_ARRAY_TASK_ID" in',
        *cases,
        f'  *) echo "error: no task $SLURM_ARRAY_TASK_ID in this sweep (0-{len(points) - 1})" >&2; exit 2 ;;',
        "esac",
        "",
    ])
