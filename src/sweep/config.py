"""A sweep config: its schema (assets/configs/demo.yaml documents it) and strict validation.

Anonymizer keys and their options come from the registry (src.anonymizers): each
anonymizer's settings fields are its keys, with the fields' own kinds and bounds; an
anonymizer with an online mode also has a `<name>-online` entry. Probe and create_db
keys are the stage settings' fields. Nothing here imports a model library, except to
check dataset and backbone names.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from src.anonymizers import ANONYMIZERS, Anonymizer
from src.anonymizers.base import ONLINE_SUFFIX
from src.cli import UserError, brief_reason, check_finite
from src.io import REPO_ROOT
from src.defaults import DEFAULT_ROOTS
from src.options import check_value, option_field, option_fields
from src.settings import NOISE_UNITS, AttackSettings, CreateDbSettings, ProbeSettings, ProbeTraining, StageSettings

TOP_KEYS = {"name", "datasets", "backbone", "weights", "img_size", "seeds", "sigmas", "noise_units", "anonymizers",
            "probe", "create_db", "device", "download", "paths", "slurm", "warn_epsilon", "attack"}
ATTACK_KEYS = ("targets", "shadows", "jobs")  # AttackSettings fields a config's `attack` entry may set
CREATE_DB_KEYS = ("batch_size", "num_workers")  # CreateDbSettings fields a config may set
PATH_DEFAULTS = {key: str(root) for key, root in DEFAULT_ROOTS.items()}
SLURM_KEYS = {"partition", "account", "time", "gres", "cpus_per_task", "mem"}


@dataclass(frozen=True)
class AnonymizerGrid:
    """One anonymizer's part of the grid: each option's values (the grid is their product)."""

    anonymizer: Anonymizer
    options: dict[str, list[Any]]  # field name -> values, for its Release, Making (and Online) settings
    online: bool = False  # fresh samples every probe epoch (probing_noise_cvae.py)


@dataclass(frozen=True)
class SweepConfig:
    name: str
    datasets: list[str]
    backbone: str
    weights: str | None
    img_size: int | None
    seeds: list[int]
    sigmas: list[float]  # always includes 0, the plain probe
    noise_units: list[str]
    anonymizers: list[AnonymizerGrid]
    probe: dict[str, float]
    create_db: dict[str, int]
    device: str
    download: bool
    paths: dict[str, str]
    slurm: dict[str, str]
    warn_epsilon: float | None = None  # warn when one split's DP releases compose past it
    attack: dict[str, int] | None = None  # membership inference (src.attack) on every release, if given


class ConfigReader:
    """Checks of one config file's values, each error naming the file and the key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, message: str) -> UserError:
        return UserError(f"{self.path}: {message}")

    def keys(self, mapping: object, allowed: set[str] | list[str], where: str) -> dict:
        if mapping is None:
            return {}
        if not isinstance(mapping, dict):
            raise self.fail(f"{where} must be a mapping")
        unknown = sorted(set(map(str, mapping)) - set(allowed))
        if unknown:
            raise self.fail(f"unknown key {unknown[0]!r} in {where}; allowed: {', '.join(sorted(allowed))}")
        return mapping

    def values(self, value: object, where: str) -> list:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise self.fail(f"{where} is empty; give at least one value")
        if len(set(map(repr, values))) != len(values):
            raise self.fail(f"{where} lists a value twice: {values}")
        return values

    def field_values(self, field: dataclasses.Field, value: object, where: str) -> list:
        """A settings field's config values, checked as its flag is (`check_value`); None = not set."""
        checked = []
        for item in self.values(value, where):
            try:
                check_value(where, field, item)
            except UserError as err:
                hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(item, str) else ""
                raise self.fail(f"{err}{hint}") from err
            kind = field.metadata["kind"]
            checked.append(kind(item) if kind in (int, float) and item is not None else item)
        return checked

    def text(self, value: object, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{where} must be a non-empty string, got {value!r}")
        return value


def anonymizer_fields(anonymizer: Anonymizer, online: bool) -> dict[str, dataclasses.Field]:
    """The config keys of an anonymizer entry: its settings fields."""
    classes = [anonymizer.Release, anonymizer.Online if online else anonymizer.Making]
    return {f.name: f for settings_class in classes for f in option_fields(settings_class)}


def grid_settings(grid: AnonymizerGrid) -> list[dict[str, Any]]:
    """Every combination of the grid's option values (one point each)."""
    combinations = [{}]
    for name, values in grid.options.items():
        combinations = [{**combination, name: value} for combination in combinations for value in values]
    return combinations


def settings_objects(grid: AnonymizerGrid, combination: dict[str, Any]) -> dict[str, Any]:
    """The anonymizer's settings objects for one combination (their checks run here)."""
    anonymizer = grid.anonymizer
    classes = {"release": anonymizer.Release, "online" if grid.online else "making":
               anonymizer.Online if grid.online else anonymizer.Making}
    return {part: settings_class(**{f.name: combination[f.name] for f in option_fields(settings_class)
                                    if f.name in combination})
            for part, settings_class in classes.items()}


def config_entries() -> dict[str, tuple[Anonymizer, bool]]:
    """Every key allowed under `anonymizers`: each registry name, and `<name>-online` where there is an online mode."""
    entries = {name: (anonymizer, False) for name, anonymizer in ANONYMIZERS.items()}
    entries.update({name + ONLINE_SUFFIX: (anonymizer, True) for name, anonymizer in ANONYMIZERS.items()
                    if anonymizer.Online is not None})
    return entries


def read_yaml(path: Path) -> object:
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as err:
        raise UserError(f"cannot read config {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                        "save it as UTF-8") from err
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:  # its text spans lines; the problem and where it is make one
        mark = getattr(err, "problem_mark", None)
        where = f"{err.problem}, line {mark.line + 1} column {mark.column + 1}" if mark else brief_reason(err)
        raise UserError(f"{path} is not valid YAML ({where}); fix the file") from err


def load_config(path: Path) -> SweepConfig:
    """Read and strictly validate a sweep config; any unknown key or bad value is a UserError."""
    read = ConfigReader(path)
    raw = read.keys(read_yaml(path), TOP_KEYS, "the config")
    for required in ("datasets", "backbone", "seeds", "anonymizers"):
        if required not in raw:
            raise read.fail(f"missing key {required!r}")

    if raw["datasets"] in ([], None):
        raise read.fail("datasets is empty; name at least one dataset")
    datasets = [read.text(dataset, "datasets") for dataset in read.values(raw["datasets"], "datasets")]
    check_dataset_names(read, datasets)
    backbone = read.text(raw["backbone"], "backbone")
    check_backbone_name(read, backbone)
    weights = read.text(raw["weights"], "weights") if raw.get("weights") is not None else None
    if weights is not None and not (REPO_ROOT / weights).is_file():
        raise read.fail(f"weights file {weights} does not exist (relative to {REPO_ROOT}); create it or remove the key")
    img_size = (read.field_values(option_field(CreateDbSettings, "img_size"), [raw["img_size"]], "img_size")[0]
                if "img_size" in raw else None)

    seeds = read.field_values(option_field(StageSettings, "seed"), raw["seeds"], "seeds")
    sigmas = sorted({0.0, *read.field_values(option_field(ProbeSettings, "sigma"), raw.get("sigmas", [0]), "sigmas")})
    noise_units = [read.text(units, "noise_units") for units in read.values(raw.get("noise_units", list(NOISE_UNITS)),
                                                                             "noise_units")]
    if not set(noise_units) <= set(NOISE_UNITS):
        raise read.fail(f"noise_units must list {' and/or '.join(NOISE_UNITS)}, got {noise_units}")

    entries = config_entries()
    requested = read.keys(raw["anonymizers"], list(entries), "anonymizers")
    if not requested:
        raise read.fail(f"anonymizers is empty; list at least one of {', '.join(entries)}")
    anonymizers = []
    for entry, options in requested.items():
        anonymizer, online = entries[entry]
        fields = anonymizer_fields(anonymizer, online)
        options = read.keys(options, list(fields), f"anonymizers.{entry}")
        values = {name: read.field_values(fields[name], value, f"anonymizers.{entry}.{name}")
                  for name, value in options.items()}
        grid = AnonymizerGrid(anonymizer, values, online)
        for combination in grid_settings(grid):  # each anonymizer checks its own settings
            try:
                settings_objects(grid, combination)
            except UserError as err:
                raise read.fail(f"anonymizers.{entry}: {err}") from err
        anonymizers.append(grid)

    probe_fields = {f.name: f for f in option_fields(ProbeTraining)}
    probe = {name: read.field_values(probe_fields[name], value, f"probe.{name}")[0]
             for name, value in read.keys(raw.get("probe"), list(probe_fields), "probe").items()}
    create_fields = {f.name: f for f in option_fields(CreateDbSettings) if f.name in CREATE_DB_KEYS}
    create_db = {name: read.field_values(create_fields[name], value, f"create_db.{name}")[0]
                 for name, value in read.keys(raw.get("create_db"), list(CREATE_DB_KEYS), "create_db").items()}
    attack = None
    if "attack" in raw:
        attack_fields = {f.name: f for f in option_fields(AttackSettings) if f.name in ATTACK_KEYS}
        attack = {name: read.field_values(attack_fields[name], value, f"attack.{name}")[0]
                  for name, value in read.keys(raw["attack"], list(ATTACK_KEYS), "attack").items()}
    device = read.field_values(option_field(StageSettings, "device"), [raw.get("device", "auto")], "device")[0]
    download = raw.get("download", False)
    if not isinstance(download, bool):
        raise read.fail(f"download must be true or false, got {download!r}")
    paths = {**PATH_DEFAULTS, **{key: read.text(value, f"paths.{key}") for key, value in
                                 read.keys(raw.get("paths"), set(PATH_DEFAULTS), "paths").items()}}
    slurm = {key: str(value) for key, value in read.keys(raw.get("slurm"), SLURM_KEYS, "slurm").items()}
    name = read.text(raw.get("name", Path(path).stem), "name")
    if "/" in name or name.startswith("."):
        raise read.fail(f"name {name!r} must be a plain folder name")

    warn_epsilon = raw.get("warn_epsilon")
    if warn_epsilon is not None:
        try:
            check_finite("warn_epsilon", warn_epsilon, above=0)
        except UserError as err:
            raise read.fail(str(err)) from err
    return SweepConfig(name=name, datasets=datasets, backbone=backbone, weights=weights, img_size=img_size,
                       seeds=seeds, sigmas=sigmas, noise_units=noise_units, anonymizers=anonymizers, probe=probe,
                       create_db=create_db, device=device, download=download, paths=paths, slurm=slurm,
                       warn_epsilon=warn_epsilon, attack=attack)


def check_dataset_names(read: ConfigReader, datasets: list[str]) -> None:
    from src.data import IMAGEFOLDER_PREFIX, dataset_names  # the loaders' libraries: only to check the names

    for dataset in datasets:
        if dataset not in dataset_names() and not dataset.startswith(IMAGEFOLDER_PREFIX):
            raise read.fail(f"unknown dataset {dataset!r}; choose from {', '.join(dataset_names())} "
                            f"or {IMAGEFOLDER_PREFIX}<path>")


def check_backbone_name(read: ConfigReader, backbone: str) -> None:
    from src.backbones import check_backbone_name as check  # timm: only to check the name

    try:
        check(backbone)
    except UserError as err:
        raise read.fail(f"backbone: {err}") from err
