"""The paper's grid with one command: run the stage scripts, skip what is current, aggregate.

`python -m src.sweep CONFIG [--jobs N] [--slurm FILE] [--dry_run] [--output_root DIR] [--rerun-other-code]`

A config (schema at the top of assets/configs/demo.yaml) expands into points, one
stage-script run each, in stages that form a DAG:
  create_db per dataset -> anonymize (k-Same per k, CVAE per seed)
  -> probe (one per anonymizer and seed; online CVAE probes here too)
  -> noise (the test-noise probes of the same anonymizer and seed, after its plain
     probe so that the two never run at once)
  -> attack (with an `attack` entry: python -m src.attack per release and seed; --online for the
     model an online entry ships).
A point is current, and is skipped without starting a process, when its outputs
exist, every input they record still has the recorded fingerprint, and the settings
the config sets, or defaults, match the settings they record; otherwise it runs. A
failed point's dependants are skipped, the rest carry on, and the failures are listed
at the end (exit status 1). Everything for one config lives in <output_root>/sweeps/<name>/:
results/ (the probes' JSON files), logs/<point>.log, tables/ (src.aggregate).

One module per job: config (schema and validation), grid (points), current (what is
current), runner (running points), slurm (a job-array script instead).
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

from src.aggregate import aggregate
from src.cli import ArgumentParser, UserError
from src.io import check_output_folder
from src.sweep.config import REPO_ROOT, load_config
from src.sweep.current import stale_reason
from src.sweep.grid import expand
from src.sweep.runner import dry_run, run_points
from src.sweep.slurm import slurm_script

__all__ = ["REPO_ROOT", "expand", "load_config", "main", "stale_reason"]


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="sweep config, e.g. assets/configs/demo.yaml")
    parser.add_argument("--jobs", type=int, default=1, help="points run at once (default 1)")
    parser.add_argument("--slurm", type=Path, default=None,
                        help="write a Slurm job-array script here instead of running")
    parser.add_argument("--dry_run", action="store_true", help="list the points and what a run would do")
    parser.add_argument("--output_root", type=Path, default=None, help="where sweeps/<name>/ goes (default: config)")
    parser.add_argument("--rerun-other-code", dest="rerun_other_code", action="store_true",
                        help="also rerun points whose outputs were made by another code version")
    args = parser.parse_args()
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: give at least 1")
    config = load_config(args.config)
    output_root = args.output_root.resolve() if args.output_root else Path(config.paths["output_root"])
    sweep_dir = output_root / "sweeps" / config.name  # relative to the repo root unless absolute
    log_dir = REPO_ROOT / sweep_dir / "logs"
    check_output_folder(log_dir, "--output_root")
    log_dir.mkdir(parents=True, exist_ok=True)
    points = expand(config, sweep_dir / "results")

    if args.slurm is not None:
        script = slurm_script(points, config, log_dir)
        try:
            args.slurm.parent.mkdir(parents=True, exist_ok=True)
            args.slurm.write_text(script)
        except OSError as err:
            raise UserError(f"cannot write --slurm {args.slurm}: {err.strerror}") from err
        print(f"wrote {args.slurm}: {len(points)} tasks; submit with: bash {args.slurm}")
        return
    if args.dry_run:
        dry_run(points, args.rerun_other_code)
        return

    started = time.monotonic()
    state, failures = run_points(points, args.jobs, log_dir, args.rerun_other_code)
    counts = Counter(state.values())
    print(f"{len(points)} points in {time.monotonic() - started:.0f} s: {counts['ran']} ran, "
          f"{counts['current']} current, {counts['failed']} failed, {counts['blocked']} skipped after a failure")
    results = [out for point in points if point.stage in ("probe", "noise") and state[point.name] in ("ran", "current")
               for out in point.outputs]
    if results:
        tables = REPO_ROOT / sweep_dir / "tables"
        print(aggregate([REPO_ROOT / out for out in results], tables, config.warn_epsilon))
        print(f"tables and figures in {tables}")
    attacks = [out for point in points if point.stage == "attack" and state[point.name] in ("ran", "current")
               for out in point.outputs]
    if attacks:
        from src.attack_report import write_attack_report

        tables = REPO_ROOT / sweep_dir / "tables"
        print(write_attack_report([REPO_ROOT / out for out in attacks], tables))
        print(f"attack tables and ROC figure in {tables}")
    if failures:
        print(f"{len(failures)} failed points:", file=sys.stderr)
        for point, reason in failures:
            print(f"  {point.name}: {reason}\n    log: {log_dir / f'{point.name}.log'}", file=sys.stderr)
        sys.exit(1)
