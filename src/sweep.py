"""The paper's grid with one command: run the stage scripts, skip what is current, aggregate.

`python -m src.sweep CONFIG [--jobs N] [--slurm FILE] [--dry_run] [--output_root DIR]`

A config (schema at the top of assets/configs/demo.yaml) expands into points, one
stage-script run each, in four stages that form a DAG:
  create_db per dataset -> anonymize (k-Same per k, CVAE per seed)
  -> probe (one per anonymizer and seed; online CVAE probes here too)
  -> noise (the test-noise probes of the same anonymizer and seed, after its plain
     probe so that the two never run at once).
A point is current, and is skipped without starting a process, when its outputs
exist, every input they record still has the recorded fingerprint, and the settings
the config sets, or defaults, match the settings they record; otherwise it runs. A
failed point's dependants are skipped, the rest carry on, and the failures are listed
at the end (exit status 1). Everything for one config lives in <output_root>/sweeps/<name>/:
results/ (the probes' JSON files), logs/<point>.log, tables/ (src.aggregate).
"""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
import zipfile
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from src.aggregate import aggregate
from src.backbones import check_backbone_name
from src.cvae import ONLINE_FACTOR, SAMPLING_VARIANCE
from src.data import IMAGEFOLDER_PREFIX, SPLITS, dataset_names
from src.cli import ArgumentParser, UserError, brief_reason, run_cli
from src.defaults import DEFAULT_ROOTS
from src.io import check_output_folder, database_dir, dataset_dirname, file_fingerprint
from src.probe import ProbeConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("create_db", "anonymize", "probe", "noise")
TOP_KEYS = {"name", "datasets", "backbone", "weights", "img_size", "seeds", "sigmas", "anonymizers", "probe",
            "create_db", "device", "download", "paths", "slurm"}
ANONYMIZER_KEYS = {"identity": set(), "ksame": {"k"}, "cvae": {"variance"}, "cvae-online": {"variance", "online_factor"}}
PROBE_FLAGS = {"lr": "-l", "epochs": "-e", "batch_size": "-b"}  # config key (= recorded setting) -> probe flag
# What an omitted key means (the reference's values). Always passed and checked, so that
# removing a key from the config makes outputs made with another value stale.
PROBE_DEFAULTS = {"lr": ProbeConfig.lr, "epochs": ProbeConfig.max_epochs, "batch_size": ProbeConfig.batch_size}
PATH_DEFAULTS = {key: str(root) for key, root in DEFAULT_ROOTS.items()}
SLURM_KEYS = {"partition", "account", "time", "gres", "cpus_per_task", "mem"}


@dataclass(frozen=True)
class SweepConfig:
    name: str
    datasets: list[str]
    backbone: str
    weights: str | None
    img_size: int | None
    seeds: list[int]
    sigmas: list[float]  # always includes 0, the plain probe
    identity: bool
    ksame_k: list[int]
    cvae: bool
    cvae_variance: float
    online_variances: list[float]
    online_factor: int
    probe: dict[str, float]
    create_db: dict[str, int]
    device: str
    download: bool
    paths: dict[str, str]
    slurm: dict[str, str]


@dataclass
class Point:
    """One stage-script run: its command (after the interpreter), what it writes and what it waits for."""

    name: str
    stage: str
    command: list[str]
    outputs: list[Path]  # relative to the repo root unless absolute
    settings: dict[str, object]  # argument values every output must record
    deps: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- config

def load_config(path: Path) -> SweepConfig:
    """Read and strictly validate a sweep config; any unknown key or bad value is a UserError."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read config {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                        "save it as UTF-8") from err
    except yaml.YAMLError as err:  # its text spans lines; the problem and where it is make one
        mark = getattr(err, "problem_mark", None)
        where = f"{err.problem}, line {mark.line + 1} column {mark.column + 1}" if mark else brief_reason(err)
        raise UserError(f"{path} is not valid YAML ({where}); fix the file") from err

    def fail(message: str) -> UserError:
        return UserError(f"{path}: {message}")

    def check_keys(mapping: object, allowed: set[str], where: str) -> dict:
        if mapping is None:
            return {}
        if not isinstance(mapping, dict):
            raise fail(f"{where} must be a mapping")
        unknown = sorted(set(map(str, mapping)) - allowed)
        if unknown:
            raise fail(f"unknown key {unknown[0]!r} in {where}; allowed: {', '.join(sorted(allowed))}")
        return mapping

    def number(value: object, where: str, integer: bool = False, minimum: float | None = None,
               positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) else ""
            raise fail(f"{where} must be {'an integer' if integer else 'a number'}, got {value!r}{hint}")
        if not math.isfinite(value) or (minimum is not None and value < minimum) or (positive and value <= 0):
            bound = "> 0" if positive else f">= {minimum:g}"
            raise fail(f"{where} must be finite and {bound}, got {value!r}")
        return value

    def number_list(value: object, where: str, integer: bool = False, minimum: float | None = None,
                    positive: bool = False) -> list:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise fail(f"{where} is empty; give at least one value")
        values = [number(item, where, integer, minimum, positive) for item in values]
        if len(set(values)) != len(values):
            raise fail(f"{where} lists a value twice: {values}")
        return values

    def text(value: object, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise fail(f"{where} must be a non-empty string, got {value!r}")
        return value

    raw = check_keys(raw, TOP_KEYS, "the config")
    for required in ("datasets", "backbone", "seeds", "anonymizers"):
        if required not in raw:
            raise fail(f"missing key {required!r}")

    datasets = raw["datasets"] if isinstance(raw["datasets"], list) else [raw["datasets"]]
    if not datasets:
        raise fail("datasets is empty; name at least one dataset")
    for dataset in datasets:
        text(dataset, "datasets")
        if dataset not in dataset_names() and not dataset.startswith(IMAGEFOLDER_PREFIX):
            raise fail(f"unknown dataset {dataset!r}; choose from {', '.join(dataset_names())} "
                       f"or {IMAGEFOLDER_PREFIX}<path>")
    if len(set(datasets)) != len(datasets):
        raise fail(f"datasets lists a name twice: {datasets}")

    backbone = text(raw["backbone"], "backbone")
    try:
        check_backbone_name(backbone)
    except UserError as err:
        raise fail(f"backbone: {err}") from err
    weights = text(raw["weights"], "weights") if raw.get("weights") is not None else None
    if weights is not None and not (REPO_ROOT / weights).is_file():
        raise fail(f"weights file {weights} does not exist (relative to {REPO_ROOT}); create it or remove the key")
    img_size = int(number(raw["img_size"], "img_size", integer=True, minimum=1)) if "img_size" in raw else None

    seeds = [int(seed) for seed in number_list(raw["seeds"], "seeds", integer=True, minimum=0)]  # numpy refuses < 0
    sigmas = sorted({0.0, *map(float, number_list(raw.get("sigmas", [0]), "sigmas", minimum=0))})

    anonymizers = check_keys(raw["anonymizers"], set(ANONYMIZER_KEYS), "anonymizers")
    if not anonymizers:
        raise fail("anonymizers is empty; list at least one of identity, ksame, cvae, cvae-online")
    options = {name: check_keys(anonymizers[name], ANONYMIZER_KEYS[name], f"anonymizers.{name}")
               for name in anonymizers}
    ksame_k = []
    if "ksame" in options:
        if "k" not in options["ksame"]:
            raise fail("anonymizers.ksame needs k, e.g. {k: [2, 5, 10]}")
        ksame_k = [int(k) for k in number_list(options["ksame"]["k"], "anonymizers.ksame.k", integer=True, minimum=2)]
    cvae_variance = float(number(options.get("cvae", {}).get("variance", SAMPLING_VARIANCE), "anonymizers.cvae.variance",
                                 positive=True))
    online = options.get("cvae-online", {})
    online_variances = ([float(v) for v in number_list(online.get("variance", [SAMPLING_VARIANCE]),
                                                       "anonymizers.cvae-online.variance", positive=True)]
                        if "cvae-online" in options else [])
    online_factor = int(number(online.get("online_factor", ONLINE_FACTOR), "anonymizers.cvae-online.online_factor",
                               integer=True, minimum=1))

    probe = {**PROBE_DEFAULTS, **{key: number(value, f"probe.{key}", integer=key != "lr", positive=True)
                                  for key, value in check_keys(raw.get("probe"), set(PROBE_FLAGS), "probe").items()}}
    create_db = {key: int(number(value, f"create_db.{key}", integer=True, minimum=0 if key == "num_workers" else 1))
                 for key, value in check_keys(raw.get("create_db"), {"batch_size", "num_workers"}, "create_db").items()}
    device = raw.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise fail(f"device must be auto, cpu or cuda, got {device!r}")
    download = raw.get("download", False)
    if not isinstance(download, bool):
        raise fail(f"download must be true or false, got {download!r}")
    paths = {**PATH_DEFAULTS, **{key: text(value, f"paths.{key}") for key, value in
                                 check_keys(raw.get("paths"), set(PATH_DEFAULTS), "paths").items()}}
    slurm = {key: str(value) for key, value in check_keys(raw.get("slurm"), SLURM_KEYS, "slurm").items()}
    name = text(raw.get("name", Path(path).stem), "name")
    if "/" in name or name.startswith("."):
        raise fail(f"name {name!r} must be a plain folder name")

    return SweepConfig(name=name, datasets=datasets, backbone=backbone, weights=weights, img_size=img_size,
                       seeds=seeds, sigmas=sigmas, identity="identity" in options, ksame_k=ksame_k,
                       cvae="cvae" in options, cvae_variance=cvae_variance, online_variances=online_variances,
                       online_factor=online_factor, probe=probe, create_db=create_db, device=device,
                       download=download, paths=paths, slurm=slurm)


# ---------------------------------------------------------------- grid

def argument(value: object) -> str:
    """Command-line text of a config value: integers plainly, floats exactly."""
    return str(value) if isinstance(value, int) else repr(float(value))


def expand(config: SweepConfig, results_dir: Path) -> list[Point]:
    """Every point of the grid, each after the points it depends on."""
    roots = config.paths
    device = ["--device", config.device]
    probe_args = [arg for key, value in config.probe.items() for arg in (PROBE_FLAGS[key], argument(value))]
    noisy = [sigma for sigma in config.sigmas if sigma > 0]
    weights_id = "timm-pretrained" if config.weights is None else file_fingerprint(REPO_ROOT / config.weights)
    points = []
    for dataset in config.datasets:
        db_dir = database_dir(Path(roots["database_root"]), dataset, config.backbone)
        safe = dataset_dirname(dataset)  # the dataset name as folders and file names spell it
        base = {"dataset": dataset, "backbone": config.backbone}
        stores = ["--database_root", roots["database_root"], "--ckpt_root", roots["ckpt_root"]]

        create_args = [] if config.weights is None else ["--weights", config.weights]
        create_args += [] if config.img_size is None else ["--img_size", str(config.img_size)]
        create_args += [arg for key, value in config.create_db.items() for arg in (f"--{key}", str(value))]
        # create_db records the weights by fingerprint, and img_size None for the backbone's own
        create_settings = {**base, "weights": weights_id, "img_size": config.img_size}
        create = Point(f"create_db-{safe}", "create_db",
                       ["create_db.py", "--dataset", dataset, "--backbone", config.backbone, *create_args, *device,
                        "--dataset_root", roots["dataset_root"], "--database_root", roots["database_root"],
                        *(["--download"] if config.download else [])],
                       [db_dir / f"{split}.npz" for split in SPLITS], create_settings)
        points.append(create)

        # anonymizer flag of the probe -> (probe arguments, settings, point that makes its train file)
        probed: dict[str, tuple[list[str], dict, str]] = {}
        if config.identity:
            probed["identity"] = (["--anonymizer", "identity"], {"anonymizer": "identity"}, create.name)
        for k in config.ksame_k:
            anonymize = Point(f"anonymize-{safe}-ksame-{k}", "anonymize",
                              ["anonymize.py", "--dataset", dataset, "--backbone", config.backbone,
                               "--anonymizer", "ksame", "--k", str(k), *device, *stores],
                              [db_dir / f"train_ksame-{k}.npz"], {**base, "anonymizer": "ksame", "k": k}, [create.name])
            points.append(anonymize)
            probed[f"ksame-{k}"] = (["--anonymizer", "ksame", "--k", str(k)], {"anonymizer": "ksame", "k": k},
                                    anonymize.name)
        cvae_made: dict[int, str] = {}
        if config.cvae or config.online_variances:  # the online probes use the CVAE trained here
            for seed in config.seeds:
                anonymize = Point(f"anonymize-{safe}-cvae-s{seed}", "anonymize",
                                  ["anonymize.py", "--dataset", dataset, "--backbone", config.backbone,
                                   "--anonymizer", "cvae", "--seed", str(seed),
                                   "--variance", argument(config.cvae_variance), *device, *stores],
                                  [db_dir / f"train_cvae-s{seed}.npz"],
                                  {**base, "anonymizer": "cvae", "seed": seed, "variance": config.cvae_variance},
                                  [create.name])
                points.append(anonymize)
                cvae_made[seed] = anonymize.name

        results = results_dir / safe
        for seed in config.seeds:
            seeded = dict(probed)
            if config.cvae:
                seeded["cvae"] = (["--anonymizer", "cvae"], {"anonymizer": "cvae"}, cvae_made[seed])
            for flag, (args, settings, made_by) in seeded.items():
                common = ["--dataset", dataset, "--backbone", config.backbone, *args, "--seed", str(seed),
                          "--output_root", str(results_dir), *probe_args, *device, *stores]
                expected = {**base, **settings, "seed": seed, **config.probe}
                probe = Point(f"probe-{safe}-{flag}-s{seed}", "probe", ["probing.py", *common],
                              [results / f"{safe}_{flag}-s{seed}.json"], expected, [made_by])
                points.append(probe)
                if noisy:
                    points.append(Point(f"noise-{safe}-{flag}-s{seed}", "noise",
                                        ["probing_noise.py", *common, "--sigma", *map(argument, noisy)],
                                        [results / f"{safe}_{flag}-s{seed}_sigma-{s:g}.json" for s in noisy],
                                        expected, [probe.name]))
            for variance in config.online_variances:
                points.append(Point(
                    f"online-{safe}-v{variance:g}-s{seed}", "probe",
                    ["probing_noise_cvae.py", "--dataset", dataset, "--backbone", config.backbone,
                     "--variance", argument(variance), "--sigma", *map(argument, config.sigmas),
                     "--online_factor", str(config.online_factor),
                     "--seed", str(seed), "--output_root", str(results_dir), *probe_args, *device, *stores],
                    [results / f"{safe}_cvae-online-v{variance:g}-s{seed}_sigma-{s:g}.json" for s in config.sigmas],
                    {**base, "variance": variance, "online_factor": config.online_factor, "seed": seed,
                     **config.probe},
                    [cvae_made[seed]]))
    return sorted(points, key=lambda point: STAGES.index(point.stage))  # stable: config order within a stage


# ---------------------------------------------------------------- currency

def recorded(path: Path) -> dict | None:
    """The settings/inputs record of an output: a result JSON, or the meta of a database."""
    try:
        if path.suffix == ".json":
            record = json.loads(path.read_text())
        elif not zipfile.is_zipfile(path):  # np.load would hand back an array for an .npy under this name
            return None
        else:
            with np.load(path, allow_pickle=False) as npz:
                record = json.loads(str(npz["meta"])) if "meta" in npz.files else {}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    return record if isinstance(record, dict) else None


def same_setting(found: object, wanted: object) -> bool:
    """Recorded and configured values agree: numbers numerically, paths by where they point."""
    if isinstance(wanted, bool) or isinstance(found, bool):
        return found is wanted
    if isinstance(wanted, (int, float)) and isinstance(found, (int, float)):
        return math.isclose(found, wanted, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(wanted, str) and isinstance(found, str):
        return found == wanted or (REPO_ROOT / found).resolve() == (REPO_ROOT / wanted).resolve()
    return found == wanted


def stale_reason(point: Point) -> str | None:
    """Why the point must run, or None when all its outputs are current."""
    for output in point.outputs:
        path = REPO_ROOT / output
        if not path.is_file():
            return f"{output} is missing"
        record = recorded(path)
        if record is None:
            return f"cannot read {output}"
        settings, inputs = record.get("settings"), record.get("inputs")
        if not isinstance(settings, dict) or not isinstance(inputs, dict):
            return f"{output} records no settings or inputs"
        for key, wanted in point.settings.items():
            if key not in settings or not same_setting(settings[key], wanted):
                return f"{output} has {key}={settings.get(key)!r}, the config sets {wanted!r}"
        for name, fingerprint in inputs.items():
            source = REPO_ROOT / name
            if not source.is_file():
                return f"input {name} of {output} is gone"
            if file_fingerprint(source) != fingerprint:
                return f"input {name} changed since {output} was written"
    return None


# ---------------------------------------------------------------- running

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


def run_points(points: list[Point], jobs: int, log_dir: Path) -> tuple[dict[str, str], list[tuple[Point, str]]]:
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
                        reasons[point.name] = stale_reason(point)
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


def dry_run(points: list[Point]) -> None:
    """List each point with what a run would do, checking currency as far as it can be known now."""
    will_run: set[str] = set()
    for point in points:
        if will_run.intersection(point.deps):
            status = "run (after its dependencies)"
        else:
            reason = stale_reason(point)
            status = "current" if reason is None else f"run: {reason}"
        if status != "current":
            will_run.add(point.name)
        print(f"[{point.stage}] {point.name}: {status}\n    {shlex.join(['python', *point.command])}")
    print(f"{len(points)} points, {len(will_run)} to run, {len(points) - len(will_run)} current")


# ---------------------------------------------------------------- slurm

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


# ---------------------------------------------------------------- main

def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="sweep config, e.g. assets/configs/demo.yaml")
    parser.add_argument("--jobs", type=int, default=1, help="points run at once (default 1)")
    parser.add_argument("--slurm", type=Path, default=None, help="write a Slurm job-array script here instead of running")
    parser.add_argument("--dry_run", action="store_true", help="list the points and what a run would do")
    parser.add_argument("--output_root", type=Path, default=None, help="where sweeps/<name>/ goes (default: config)")
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
        dry_run(points)
        return

    started = time.monotonic()
    state, failures = run_points(points, args.jobs, log_dir)
    counts = Counter(state.values())
    print(f"{len(points)} points in {time.monotonic() - started:.0f} s: {counts['ran']} ran, "
          f"{counts['current']} current, {counts['failed']} failed, {counts['blocked']} skipped after a failure")
    results = [out for point in points if point.stage in ("probe", "noise") and state[point.name] in ("ran", "current")
               for out in point.outputs]
    if results:
        tables = REPO_ROOT / sweep_dir / "tables"
        print(aggregate([REPO_ROOT / out for out in results], tables))
        print(f"tables and figures in {tables}")
    if failures:
        print(f"{len(failures)} failed points:", file=sys.stderr)
        for point, reason in failures:
            print(f"  {point.name}: {reason}\n    log: {log_dir / f'{point.name}.log'}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
