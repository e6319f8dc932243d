"""Where every output lives and what it is called, stated once: databases, releases, result files,
and how a result file's name is read back (src.aggregate). No model library is imported here.

- databases: <database_root>/<dataset>/<backbone>/{train,val,test}.npz (create_db.py)
- release: <database_root>/<dataset>/<backbone>/train_<flag>[-s<seed>].npz, and beside a DP release its
  private sidecar train_<flag>[-s<seed>].PRIVATE-do-not-publish.json
- result:  <output_root>/<dataset>/<dataset>_<flag>-s<seed>[_sigma-<sigma>[-<units>]].json, the noise
  units named only where they differ from the reference's for that script (its offline
  scripts: released units; its online script: real units)
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from src.anonymizers import Anonymizer, anonymizer_of_flag, get_anonymizer
from src.anonymizers.base import NUMBER
from src.defaults import DEFAULT_ROOTS
from src.options import command_flags, option_fields
from src.settings import ProbeSettings, StageSettings

def dataset_dirname(dataset: str) -> str:
    """A dataset name as one folder or file name part (imagefolder:<path> holds ':' and '/')."""
    return dataset.replace(":", "_").replace("/", "_")


def database_dir(database_root: Path, dataset: str, backbone: str) -> Path:
    """Folder of one dataset's embeddings for one backbone: <root>/<dataset>/<backbone>/."""
    return Path(database_root) / dataset_dirname(dataset) / backbone


SPLITS = ("train", "val", "test")  # the databases of one dataset and backbone, as create_db.py writes them


def database_paths(database_root: Path, dataset: str, backbone: str) -> dict[str, Path]:
    """The real train / val / test databases: <root>/<dataset>/<backbone>/<split>.npz."""
    folder = database_dir(database_root, dataset, backbone)
    return {split: folder / f"{split}.npz" for split in SPLITS}


RESULT_NAME = re.compile(rf"^(?P<dataset>.+)_(?P<flag>[^_]+?)-s(?P<seed>\d+)"
                         rf"(?:_sigma-(?P<sigma>{NUMBER})(?:-(?P<units>real|released))?)?\.json$")


def database_command(settings: StageSettings) -> str:
    """The flags that name the databases, as a user would type them again."""
    command = f"--dataset {settings.dataset} --backbone {settings.backbone}"
    if Path(settings.database_root) != DEFAULT_ROOTS["database_root"]:
        command += f" --database_root {settings.database_root}"
    return command


def create_db_command(settings: StageSettings) -> str:
    """The command that makes the real databases, for the error when one is missing."""
    return f"python create_db.py {database_command(settings)}"


def release_path(settings: StageSettings, anonymizer: Anonymizer, release: Any) -> Path:
    return (database_dir(settings.database_root, settings.dataset, settings.backbone)
            / anonymizer.release_name(release, settings.seed))


PRIVATE_SIDECAR = ".PRIVATE-do-not-publish.json"


def private_sidecar_path(release: Path) -> Path:
    """Where a DP release's maker keeps what it learnt outside the mechanism (input fingerprints, timings, a
    validation loss): beside the release, named so that nobody publishes it with it."""
    return Path(release).with_name(Path(release).stem + PRIVATE_SIDECAR)


def with_private_sidecar(release: Path, meta: dict) -> dict:
    """A DP release's meta with what its maker kept in the private sidecar (fingerprints, timing) added
    underneath, for the maker's own tools (the sweep, the probes); any other meta as it is."""
    sidecar = private_sidecar_path(release)
    if "dp" not in meta or not sidecar.is_file():
        return meta
    return {**json.loads(sidecar.read_text()), **meta}


def release_hint(settings: StageSettings, anonymizer: Anonymizer, release: Any) -> str:
    """The command that makes a release, for the error when it is missing."""
    if not anonymizer.makes_releases:
        return create_db_command(settings)
    changed = {f.name: getattr(release, f.name) for f in option_fields(type(release))
               if getattr(release, f.name) != f.default}
    flags = ["--anonymizer", anonymizer.name, *command_flags(type(release), changed)]
    if anonymizer.seeded:
        flags += ["--seed", str(settings.seed)]
    return f"python anonymize.py {database_command(settings)} {' '.join(flags)}"


def reference_units(settings: ProbeSettings) -> str:
    """The test-noise units of the reference's script: its online script z-scores with the real train statistics."""
    return "real" if settings.online is not None else "released"


def result_path(settings: ProbeSettings, flag: str, sigma: float | None = None, units: str | None = None) -> Path:
    """<output_root>/<dataset>/<dataset>_<flag>-s<seed>[_sigma-<sigma>[-<units>]].json.

    Units other than the reference's are named; sigma 0 has no noise, so no units.
    """
    name = dataset_dirname(settings.dataset)
    departs = units is not None and units != reference_units(settings) and sigma
    suffix = "" if sigma is None else f"_sigma-{sigma:g}" + (f"-{units}" if departs else "")
    return Path(settings.output_root) / name / f"{name}_{flag}-s{settings.seed}{suffix}.json"


def result_paths(settings: ProbeSettings, flag: str, plain: bool) -> dict[tuple[float, str], Path]:
    """Every result file a run writes, by (sigma, units); `plain` is probing.py's one file without sigma."""
    if plain:
        return {(0.0, settings.noise_units[0]): result_path(settings, flag)}
    paths = {}
    for units in settings.noise_units:
        for sigma in settings.sigma:
            path = result_path(settings, flag, sigma, units)
            if path not in paths.values():  # sigma 0 is the same run in any units
                paths[(sigma, units)] = path
    return paths


def released_flag(settings: ProbeSettings) -> str:
    return get_anonymizer(settings.anonymizer).flag(settings.release)


def parse_result_name(name: str) -> dict[str, Any] | None:
    """(dataset, flag, anonymizer, seed, sigma, plain, units) of a result file name, units None when the name
    leaves them to the file (the reference's); None if no anonymizer writes this name."""
    match = RESULT_NAME.match(name)
    if match is None:
        return None
    anonymizer = anonymizer_of_flag(match["flag"])
    if anonymizer is None:
        return None
    return {"dataset": match["dataset"], "flag": match["flag"], "anonymizer": anonymizer, "seed": int(match["seed"]),
            "sigma": float(match["sigma"]) if match["sigma"] is not None else 0.0,
            "units": match["units"], "plain": match["sigma"] is None}
