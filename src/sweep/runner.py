"""Running a sweep's points: up to N stage scripts at once in dependency order, skipping
current ones, a log per point, failures collected instead of stopping the rest."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from tqdm import tqdm

from src.sweep.config import REPO_ROOT
from src.sweep.current import stale_reason
from src.sweep.grid import Point


def execute(point: Point, log_path: Path, threads: int | None) -> int:
    """Run one point's script from the repo root, its output going to the point's log.

    `threads` caps the script's torch threads (unless OMP_NUM_THREADS is set): with
    several scripts at once, oversubscribed threads spin and slow every one down.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    started = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join([sys.executable, *point.command])}\n")
        log.flush()
        code = subprocess.run([sys.executable, *point.command], cwd=REPO_ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        log.write(f"\n[exit status {code} after {time.monotonic() - started:.1f} s]\n")
    return code


def last_line(log_path: Path) -> str:
    """The script's last words (its one-line error), without the header and footer we add."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()[1:]
             if line.strip() and not line.startswith("[exit status")]
    return lines[-1] if lines else "(no output)"


def run_points(points: list[Point], jobs: int, log_dir: Path,
               rerun_other_code: bool = False) -> tuple[dict[str, str], list[tuple[Point, str]]]:
    """Run the stale points, up to `jobs` at once in dependency order.

    Returns each point's state (ran, current, failed, blocked) and the failures with their reasons.
    """
    state: dict[str, str] = {}
    failures: list[tuple[Point, str]] = []
    reasons: dict[str, str | None] = {}
    pending = list(points)
    running: dict[Future, Point] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool, \
            tqdm(total=len(points), desc="sweep", unit="point", disable=None) as bar:
        while pending or running:
            runnable = []
            for point in list(pending):
                deps = [state.get(dep) for dep in point.deps]
                if None in deps:
                    continue  # a dependency is still to run
                if "failed" in deps or "blocked" in deps:
                    state[point.name] = "blocked"
                else:
                    if point.name not in reasons:  # known once the dependencies are settled
                        reasons[point.name] = stale_reason(point, rerun_other_code)
                    if reasons[point.name] is not None:
                        runnable.append(point)
                        continue
                    state[point.name] = "current"
                pending.remove(point)
                bar.update()
            # the cores are shared among the scripts that will run side by side: a lone
            # create_db gets them all, a stage of many small points one thread each
            side_by_side = min(jobs, len(running) + len(runnable))
            threads = None if jobs == 1 else max(1, (os.cpu_count() or 1) // max(1, side_by_side))
            for point in runnable[:jobs - len(running)]:
                running[pool.submit(execute, point, log_dir / f"{point.name}.log", threads)] = point
                pending.remove(point)
            if not running:
                if pending:
                    raise RuntimeError(f"points wait on unknown points: {[p.name for p in pending]}")
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                point = running.pop(future)
                code = future.result()
                missing = [str(out) for out in point.outputs if not (REPO_ROOT / out).is_file()]
                log_path = log_dir / f"{point.name}.log"
                if code != 0 or missing:
                    reason = f"exit status {code}: {last_line(log_path)}" if code else f"did not write {missing[0]}"
                    failures.append((point, reason))
                    state[point.name] = "failed"
                    tqdm.write(f"FAILED {point.name} ({reason}); log: {log_path}")
                else:
                    state[point.name] = "ran"
                bar.update()
            bar.set_postfix(Counter(state.values()))
    return state, failures


def dry_run(points: list[Point], rerun_other_code: bool = False) -> None:
    """List each point with what a run would do, checking currency as far as it can be known now."""
    will_run: set[str] = set()
    for point in points:
        if will_run.intersection(point.deps):
            status = "run (after its dependencies)"
        else:
            reason = stale_reason(point, rerun_other_code)
            status = "current" if reason is None else f"run: {reason}"
        if status != "current":
            will_run.add(point.name)
        print(f"[{point.stage}] {point.name}: {status}\n    {shlex.join(['python', *point.command])}")
    print(f"{len(points)} points, {len(will_run)} to run, {len(points) - len(will_run)} current")
