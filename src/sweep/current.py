"""Whether a point's outputs are current: present, made with the settings the config asks
for (a setting an output does not record counts as its option's default), from inputs that have
not changed since (and, on request, by this code version)."""
from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np

from src.io import code_version, file_fingerprint
from src.naming import with_private_sidecar
from src.sweep.config import REPO_ROOT
from src.sweep.grid import Point


def recorded(path: Path) -> dict | None:
    """The settings/inputs record of an output: a result JSON, or the meta of a database with, for a DP
    release, its private sidecar (where its input fingerprints are kept out of the release)."""
    try:
        if path.suffix == ".json":
            record = json.loads(path.read_text())
        elif not zipfile.is_zipfile(path):  # np.load would hand back an array for an .npy under this name
            return None
        else:
            with np.load(path, allow_pickle=False) as npz:
                record = json.loads(str(npz["meta"])) if "meta" in npz.files else {}
            if isinstance(record, dict):
                record = with_private_sidecar(path, record)
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


def stale_reason(point: Point, rerun_other_code: bool = False) -> str | None:
    """Why the point must run, or None when all its outputs are current.

    With `rerun_other_code`, an output made by another version of the code is stale too.
    """
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
            if key not in settings and key in point.at_default:
                continue  # an option added since this output was made, at the default that keeps the old behaviour
            if key not in settings or not same_setting(settings[key], wanted):
                return f"{output} has {key}={settings.get(key)!r}, the config sets {wanted!r}"
        if rerun_other_code and record.get("code_version") != code_version():
            return f"{output} was made by code {record.get('code_version')}, this is {code_version()}"
        for name, fingerprint in inputs.items():
            source = REPO_ROOT / name
            if not source.is_file():
                return f"input {name} of {output} is gone"
            if file_fingerprint(source) != fingerprint:
                return f"input {name} changed since {output} was written"
    return None
