"""The grid of a sweep config as points: one stage-script run each, after the points it needs.

A point's command line is written from the config; its settings and outputs come from
the stage script itself (its `parse_settings` and `outputs`), so no flag or file name is
spelt here a second time, and a command the script would refuse fails here first.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from src.cli import UserError
from src.naming import dataset_dirname
from src.options import command_flags, default_result_keys, flag_value, option_fields, result_keys, settings_record
from src.settings import AttackSettings, CreateDbSettings, ProbeTraining
from src.anonymizers.base import ONLINE_SUFFIX
from src.sweep.config import REPO_ROOT, AnonymizerGrid, SweepConfig, grid_settings, settings_objects

STAGES = ("create_db", "anonymize", "probe", "noise", "attack")
ATTACK_MODULE = "src.attack"  # run as `python -m src.attack`: a library module, not one of the paper's scripts
_SCRIPTS: dict[str, ModuleType] = {}


@dataclass
class Point:
    """One stage-script run: its command (after the interpreter), what it writes and what it waits for."""

    name: str
    stage: str
    command: list[str]
    outputs: list[Path]  # relative to the repo root unless absolute
    settings: dict[str, object]  # the recorded settings every output must have (those that shape results)
    deps: list[str] = field(default_factory=list)
    at_default: frozenset[str] = frozenset()  # those of `settings` at their option's default


def stage_script(script: str) -> ModuleType:
    """A stage script as a module, for its parser and output names (it loads no model library until main())."""
    if script not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"_stage_{Path(script).stem}", REPO_ROOT / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPTS[script] = module
    return _SCRIPTS[script]


def make_point(name: str, stage: str, command: list[str], deps: list[str]) -> Point:
    """A point whose settings and outputs the script derives from its own command line (a top-level
    script, or `-m module` for a stage that lives in src/)."""
    module = command[0] == "-m"
    script = importlib.import_module(command[1]) if module else stage_script(command[0])
    try:
        settings = script.parse_settings(command[2 if module else 1:])
    except SystemExit as exit_info:  # argparse refused it: a flag the sweep wrote that the script does not take
        raise UserError(f"point {name}: {command[0]} refused {' '.join(command[1:])}") from exit_info
    record = settings_record(settings)
    return Point(name, stage, command, script.outputs(settings), {key: record[key] for key in result_keys(settings)},
                 deps, frozenset(default_result_keys(settings)))


def anonymizer_flags(grid: AnonymizerGrid, combination: dict[str, Any]) -> tuple[list[str], str]:
    """The flags of one grid combination, and its result flag."""
    objects = settings_objects(grid, combination)
    args = [arg for part in objects.values()
            for arg in command_flags(type(part), {f.name: getattr(part, f.name) for f in dataclasses.fields(part)
                                          if f.name in combination})]
    if grid.online:
        return args, grid.anonymizer.flag(objects["release"], online=True)
    return args, grid.anonymizer.flag(objects["release"])


def expand(config: SweepConfig, results_dir: Path) -> list[Point]:
    """Every point of the grid, each after the points it depends on."""
    roots = config.paths
    device = ["--device", config.device]
    stores = ["--database_root", roots["database_root"], "--ckpt_root", roots["ckpt_root"]]
    probe_args = command_flags(ProbeTraining, config.probe)
    noisy = [sigma for sigma in config.sigmas if sigma > 0]
    noise_args = ["--sigma", *map(flag_value, noisy), "--noise_units", *config.noise_units]
    points = []
    for dataset in config.datasets:
        safe = dataset_dirname(dataset)  # the dataset name as folders and file names spell it
        base = ["--dataset", dataset, "--backbone", config.backbone]
        create_values = {"weights": config.weights, "img_size": config.img_size, "download": config.download,
                         "dataset_root": roots["dataset_root"], "database_root": roots["database_root"],
                         **config.create_db}
        create = make_point(f"create_db-{safe}", "create_db",
                            ["create_db.py", *base, *command_flags(CreateDbSettings, create_values), *device], [])
        points.append(create)

        # probes of each seed: (result flag, anonymizer flags, the anonymize point it reads, if any)
        probed: dict[int, list[tuple[str, list[str], str]]] = {seed: [] for seed in config.seeds}
        made: dict[tuple[str, int], list[str]] = {}  # (anonymizer, seed) -> its anonymize points
        for grid in (g for g in config.anonymizers if not g.online):
            anonymizer = grid.anonymizer
            for combination in grid_settings(grid):
                args, flag = anonymizer_flags(grid, combination)
                choose = ["--anonymizer", anonymizer.name, *args]
                if not anonymizer.makes_releases:
                    for seed in config.seeds:
                        probed[seed].append((flag, choose, create.name))
                    continue
                for seed in config.seeds if anonymizer.seeded else [None]:
                    seeded = ["--seed", str(seed)] if seed is not None else []
                    point = make_point(f"anonymize-{safe}-{flag}" + (f"-s{seed}" if seed is not None else ""),
                                       "anonymize", ["anonymize.py", *base, *choose, *seeded, *device, *stores],
                                       [create.name])
                    points.append(point)
                    pick = ["--anonymizer", anonymizer.name, *picking_flags(grid, combination)]
                    for probe_seed in ([seed] if seed is not None else config.seeds):
                        made.setdefault((anonymizer.name, probe_seed), []).append(point.name)
                        probed[probe_seed].append((flag, pick, point.name))

        results = ["--output_root", str(results_dir)]
        for seed in config.seeds:
            for flag, choose, made_by in probed[seed]:
                common = [*base, *choose, "--seed", str(seed), *results, *probe_args, *device, *stores]
                probe = make_point(f"probe-{safe}-{flag}-s{seed}", "probe", ["probing.py", *common], [made_by])
                points.append(probe)
                if noisy:
                    points.append(make_point(f"noise-{safe}-{flag}-s{seed}", "noise",
                                             ["probing_noise.py", *common, *noise_args], [probe.name]))
            for grid in (g for g in config.anonymizers if g.online):
                for combination in grid_settings(grid):
                    args, flag = anonymizer_flags(grid, combination)
                    label = flag.removeprefix(grid.anonymizer.name + ONLINE_SUFFIX + "-")
                    points.append(make_point(
                        f"online-{safe}-{label}-s{seed}", "probe",
                        ["probing_noise_cvae.py", *base, "--anonymizer", grid.anonymizer.name, *args,
                         "--sigma", *map(flag_value, config.sigmas), "--noise_units", *config.noise_units,
                         "--seed", str(seed), *results, *probe_args, *device, *stores],
                        made.get((grid.anonymizer.name, seed), [])))
        points += attack_points(config, safe, base, [*results, *device, *stores], create.name)
    return sorted(points, key=lambda point: STAGES.index(point.stage))  # stable: config order within a stage


def attack_points(config: SweepConfig, safe: str, base: list[str], common: list[str], made_by: str) -> list[Point]:
    """With an `attack` entry: one membership-inference run per release and seed, offline releases and the
    models online entries ship (src.attack makes its own attacked release and shadows from the real
    databases, so it waits for create_db only)."""
    if config.attack is None:
        return []
    attack_args = command_flags(AttackSettings, config.attack)
    points: dict[str, Point] = {}
    for grid in config.anonymizers:
        for combination in grid_settings(grid):
            args, flag = attack_flags(grid, combination)
            for seed in config.seeds:
                name = f"attack-{safe}-{flag}-s{seed}"
                if name not in points:  # online entries that differ only in how they sample share one model
                    points[name] = make_point(name, "attack", ["-m", ATTACK_MODULE, *base, "--anonymizer",
                                                               grid.anonymizer.name, *args, "--seed", str(seed),
                                                               *attack_args, *common], [made_by])
    return list(points.values())


def attack_flags(grid: AnonymizerGrid, combination: dict[str, Any]) -> tuple[list[str], str]:
    """The attack's anonymizer flags for one combination, and its result flag. An online entry's release is
    its trained model: named by the Release settings that shape it (`src.attack --online` refuses those that
    only say how it is sampled, and the online settings, which say how many samples a probe epoch gets)."""
    if not grid.online:
        return anonymizer_flags(grid, combination)
    shaping = {name: value for name, value in combination.items() if name not in grid.anonymizer.sampling_settings}
    release = settings_objects(grid, shaping)["release"]
    return ["--online", *picking_flags(grid, shaping)], grid.anonymizer.flag(release, online=True)


def picking_flags(grid: AnonymizerGrid, combination: dict[str, Any]) -> list[str]:
    """The flags that pick a release in the probing scripts (its Release settings)."""
    release = settings_objects(grid, combination)["release"]
    return command_flags(type(release), {name: value for name, value in combination.items()
                                 if name in {f.name for f in option_fields(type(release))}})
