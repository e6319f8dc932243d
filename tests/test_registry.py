"""The anonymizer registry and the typed settings: names round-trip, records are a stable
interface, and a new anonymizer is one module plus one registry line."""
from __future__ import annotations

import dataclasses
import json
import os
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from src.anonymizers import ANONYMIZERS, MAKING, ONLINE, PICKING, anonymizer_of_flag, shared_flags
from src.cli import UserError
from src.io import STAGE_SCRIPTS, code_version, save_database
from src.naming import database_dir
from src.naming import parse_result_name
from src.anonymizers.base import Anonymizer
from src.options import option, option_fields, settings_record
from src.settings import AnonymizeSettings, CreateDbSettings, ProbeSettings, ProbeTraining, StageSettings
from src.sweep.grid import stage_script

REPO = Path(__file__).resolve().parents[1]


def example_values(f: dataclasses.Field) -> list:
    """Two values of a setting other than its default, within the bounds the field declares."""
    if f.metadata["kind"] is bool:
        return [not f.default]
    bounds = f.metadata["bounds"]
    low = bounds["minimum"] if bounds["minimum"] is not None else (bounds["above"] or 0) + 0.5
    candidates = [low, low + 1, low + 2.5, low * 3 + 1]
    if f.metadata["kind"] is int:
        candidates = [int(math.ceil(value)) for value in candidates]
    inside = [value for value in candidates if value != f.default
              and (bounds["maximum"] is None or value <= bounds["maximum"])]
    return list(dict.fromkeys(inside))[:2]


def example_releases(anonymizer) -> list:
    """Release settings from the anonymizer's own declaration: its defaults (a setting the class requires at
    its first example), then each setting moved to each of its examples in turn, where the class accepts it."""
    fields = option_fields(anonymizer.Release)
    base = {f.name: f.default for f in fields}
    try:
        anonymizer.Release(**base)
    except UserError:  # a setting without a usable default (k-Same's k)
        base = {f.name: f.default if f.default is not None else example_values(f)[0] for f in fields}
    releases = [anonymizer.Release(**base)]
    for f in fields:
        for value in example_values(f):
            if value == base[f.name]:
                continue
            try:
                releases.append(anonymizer.Release(**{**base, f.name: value}))
            except UserError:  # a combination the settings refuse (e.g. DP with the reference objective)
                continue
    return releases


def test_example_releases_cover_every_setting():
    for anonymizer in ANONYMIZERS.values():
        releases = example_releases(anonymizer)
        for f in option_fields(anonymizer.Release):
            assert len({getattr(release, f.name) for release in releases}) >= 2, (anonymizer.name, f.name)


def test_shared_flags_are_declared_alike(monkeypatch):
    """A flag two anonymizers share is one flag on the command line: the registry refuses a clash."""
    for parts in (PICKING, MAKING, ONLINE):
        shared_flags(parts)  # the registry as it is: no clash

    @dataclasses.dataclass(frozen=True)
    class ClashingRelease:
        k: float = option(0.5, "a float where k-Same's k is an int", above=0)

    class Clashing(Anonymizer):
        name = "clashing"
        Release = ClashingRelease
        name_format = "clashing-{k}"

    monkeypatch.setitem(ANONYMIZERS, "clashing", Clashing())
    with pytest.raises(TypeError, match="'k' of --anonymizer clashing clashes with --anonymizer ksame"):
        shared_flags(PICKING)


@pytest.mark.parametrize("name", list(ANONYMIZERS))
def test_result_flags_and_release_names_read_back(name):
    anonymizer = ANONYMIZERS[name]
    releases = example_releases(anonymizer)
    flags = [anonymizer.flag(release) for release in releases]
    assert len(set(flags)) == len(flags)  # every setting that picks a release shows in its name
    for release, flag in zip(releases, flags):
        assert "_" not in flag and anonymizer.parse_flag(flag) == release and anonymizer_of_flag(flag) is anonymizer
        parsed = parse_result_name(f"organs_axial_{flag}-s7_sigma-0.5.json")
        assert (parsed["dataset"], parsed["flag"], parsed["seed"], parsed["sigma"]) == ("organs_axial", flag, 7, 0.5)
        assert anonymizer.release_name(release, 7).endswith(".npz")
    if anonymizer.Online is not None:
        online = anonymizer.flag(releases[0], online=True)
        assert online not in flags and anonymizer.parse_flag(online) == releases[0]


@pytest.mark.parametrize("script", STAGE_SCRIPTS)
def test_recorded_settings_are_the_settings_fields(script):
    """Records are what sweeps compare: renaming a setting must change this, not silently rerun sweeps."""
    module = stage_script(script)
    argv = {"create_db.py": [], "anonymize.py": ["--anonymizer", "ksame", "--k", "3"],
            "probing.py": ["--anonymizer", "ksame", "--k", "3"], "probing_noise.py": ["--sigma", "1"],
            "probing_noise_cvae.py": ["--sigma", "1"]}[script]
    settings = module.parse_settings(["--dataset", "digits", *argv])
    record = settings_record(settings)
    expected = {"create_db.py": {"dataset", "backbone", "weights", "random_init", "img_size", "size", "batch_size",
                                 "num_workers", "device", "seed", "dataset_root", "database_root", "download"},
                "anonymize.py": {"dataset", "backbone", "seed", "device", "database_root", "ckpt_root", "anonymizer",
                                 "k"},
                "probing.py": {"dataset", "backbone", "seed", "device", "database_root", "ckpt_root", "output_root",
                               "lr", "epochs", "batch_size", "anonymizer", "sigma", "noise_units", "k"},
                "probing_noise.py": {"dataset", "backbone", "seed", "device", "database_root", "ckpt_root",
                                     "output_root", "lr", "epochs", "batch_size", "anonymizer", "sigma", "noise_units"},
                "probing_noise_cvae.py": {"dataset", "backbone", "seed", "device", "database_root", "ckpt_root",
                                          "output_root", "lr", "epochs", "batch_size", "anonymizer", "sigma",
                                          "noise_units", "variance", "reference_objective", "dp_epsilon",
                                          "max_epochs", "cvae_lr", "cvae_batch_size", "cvae_patience", "cvae_beta",
                                          "cvae_hidden_dim", "cvae_latent_dim", "dp_delta", "max_grad_norm",
                                          "dp_epochs", "dp_bounds", "dp_count_share", "dp_seeded_noise_not_private",
                                          "online_factor"}}[script]
    assert set(record) == expected
    json.dumps(record)  # records are plain JSON
    assert module.outputs(settings)


def test_importing_the_sweep_and_scripts_loads_no_model_library():
    code = ("import sys; import src.sweep, src.aggregate; sys.path.insert(0, '.'); "
            "import anonymize, probing, probing_noise, probing_noise_cvae, create_db; "
            "print(sorted({'torch', 'timm', 'medmnist', 'torchvision'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_code_version_names_the_commit_or_the_sources(tmp_path):
    """In this checkout: the commit git names (dirty when anything differs from it). In a copy outside git: the hash
    of src/ and the scripts, the same for an identical copy and another for a changed one."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert code_version().removesuffix("-dirty") == f"git:{head.stdout.strip()[:12]}"
    code = "from src.io import code_version; print(code_version())"
    versions = []
    for name, edit in (("copy", ""), ("same", ""), ("changed", "\n# one more line\n")):
        copy = tmp_path / name
        shutil.copytree(REPO / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__"))
        for script in STAGE_SCRIPTS:
            shutil.copy(REPO / script, copy / script)
        with open(copy / "src" / "naming.py", "a") as handle:
            handle.write(edit)
        done = subprocess.run([sys.executable, "-c", code], cwd=copy, capture_output=True, text=True, check=True,
                              env={**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path)})
        versions.append(done.stdout.strip())
    assert versions[0].startswith("src:") and versions[0] == versions[1] != versions[2]


TOY_MODULE = '''"""A toy anonymizer for the registry test: Gaussian noise of std k added to each vector (its flag
--k is k-Same's too: each keeps its own default)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from src.anonymizers.base import Anonymizer, Release, ReleaseInputs
from src.options import Settings, option


@dataclass(frozen=True)
class NoiseRelease(Settings):
    k: int = option(1, "std of the added noise", minimum=1)


class GaussianNoise(Anonymizer):
    name = "noise"
    Release = NoiseRelease
    seeded = True
    name_format = "noise-{k}"

    def make(self, inputs: ReleaseInputs, release: NoiseRelease, making: Any, seed: int, device: Any) -> Release:
        noise = np.random.default_rng(seed).normal(scale=release.k, size=inputs.train_x.shape)
        return Release((inputs.train_x + noise).astype(np.float32), inputs.train_y)
'''


def copy_code(repo: Path) -> None:
    """A scratch copy of the scripts, src/ and the configs."""
    for name in (*STAGE_SCRIPTS, "src", "assets/configs"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, repo / name)


def add_module(repo: Path, module: str, source: str, registry: str, anchor: str, line: str, import_line: str) -> None:
    """One new module in the copy, and its registry line (plus the line's import) after `anchor`."""
    (repo / module).write_text(source)
    text = (repo / registry).read_text()
    assert anchor in text
    text = text.replace(anchor, anchor + line).replace("from __future__ import annotations\n",
                                                        "from __future__ import annotations\n" + import_line, 1)
    (repo / registry).write_text(text)


TOY_METRIC = '''"""A toy metric for the registry test: the spread of the distances to closest record."""
from __future__ import annotations


def dcr_spread(neighbours) -> float:
    return float(neighbours.dcr.std())
'''


TOY_DATASET = '''"""A toy dataset for the registry test: 3 classes of flat colour images, 8 x 8 RGB, made on the fly."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from src.data.base import DatasetOptions, ImageSplit


def load_toy_split(root: Path, split: str, options: DatasetOptions) -> ImageSplit:
    count = {"train": 12, "val": 6, "test": 9}[split]
    labels = np.arange(count) % 3
    images = np.repeat((labels * 100).astype(np.uint8)[:, None, None, None], 8 * 8 * 3).reshape(count, 8, 8, 3)
    return ImageSplit(labels=labels, class_names=["dark", "mid", "light"], images=images, source={"name": "toy"})
'''


@pytest.mark.slow
def test_a_new_dataset_is_one_module_and_one_registry_line(tmp_path):
    """Copy the code, add a dataset and its registry line, and embed it with create_db.py."""
    repo = tmp_path / "repo"
    copy_code(repo)
    add_module(repo, "src/data/toy.py", TOY_DATASET, "src/data/__init__.py", "DATASETS: dict[str, Loader] = {\n",
                 '    "toy": load_toy_split,\n', "from src.data.toy import load_toy_split\n")
    done = subprocess.run([sys.executable, "create_db.py", "--dataset", "toy", "--backbone", "test_vit",
                           "--random_init", "--img_size", "32", "--device", "cpu", "--num_workers", "0",
                           "--database_root", str(tmp_path / "db")], cwd=repo, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    for split, count in (("train", 12), ("val", 6), ("test", 9)):
        with np.load(tmp_path / "db" / "toy" / "test_vit" / f"{split}.npz") as npz:
            assert npz["embeddings"].shape[0] == count and np.isfinite(npz["embeddings"]).all()
            np.testing.assert_array_equal(npz["labels"], np.arange(count) % 3)


@pytest.mark.slow
def test_a_new_anonymizer_is_one_module_and_one_registry_line(tmp_path):
    """Copy the code, add a Gaussian-noise anonymizer and a metric, each with its registry line, and run every
    stage, the sweep and the tables on them."""
    repo = tmp_path / "repo"
    copy_code(repo)
    add_module(repo, "src/anonymizers/noise.py", TOY_MODULE, "src/anonymizers/__init__.py",
               '    "cvae": CVAEAnonymizer(),\n', '    "noise": GaussianNoise(),\n',
               "from src.anonymizers.noise import GaussianNoise\n")
    add_module(repo, "src/dcr_spread.py", TOY_METRIC, "src/metric_registry.py",
               '    Metric("coverage", KNOWN, coverage),\n', '    Metric("dcr_spread", KNOWN, dcr_spread),\n',
               "from src.dcr_spread import dcr_spread\n")

    backbone = "vit_small_patch14_dinov2"
    database_root = tmp_path / "database"
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    settings = settings_record(CreateDbSettings(dataset="digits", backbone=backbone, database_root=database_root,
                                                dataset_root=tmp_path / "data", device="cpu"))
    for split, count in (("train", 120), ("val", 45), ("test", 60)):
        labels = np.arange(count) % 3
        save_database(database_dir(database_root, "digits", backbone) / f"{split}.npz",
                      centres[labels] + rng.normal(size=(count, 16)), labels,
                      {"stage": "create_db", "split": split, "settings": settings, "inputs": {}})

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, *args], cwd=repo, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done

    common = ["--dataset", "digits", "--backbone", backbone, "--database_root", str(database_root),
              "--ckpt_root", str(tmp_path / "ckpts"), "--device", "cpu", "--seed", "3"]
    run("anonymize.py", *common, "--anonymizer", "noise")  # its own default k = 1, not k-Same's (none)
    run("anonymize.py", *common, "--anonymizer", "noise", "--k", "2")
    folder = database_dir(database_root, "digits", backbone)
    assert (folder / "train_noise-1-s3.npz").is_file() and (folder / "train_noise-2-s3.npz").is_file()
    out = ["--output_root", str(tmp_path / "logs"), "-e", "5"]
    run("probing.py", *common, *out, "--anonymizer", "noise", "--k", "2")
    run("probing_noise.py", *common, *out, "--anonymizer", "noise", "--k", "2", "--sigma", "1",
        "--noise_units", "released", "real")
    written = sorted(path.name for path in (tmp_path / "logs" / "digits").iterdir())
    assert written == ["digits_noise-2-s3.json", "digits_noise-2-s3_sigma-1-real.json",
                       "digits_noise-2-s3_sigma-1.json"]
    record = json.loads((tmp_path / "logs/digits/digits_noise-2-s3.json").read_text())
    assert record["settings"]["k"] == 2 and record["average_mindistance"] > 0

    config = {"name": "toy", "datasets": ["digits"], "backbone": backbone, "seeds": [0, 1], "sigmas": [0, 2],
              "anonymizers": {"identity": {}, "ksame": {"k": [3]}, "noise": {"k": [1, 2]}}, "device": "cpu",
              "probe": {"epochs": 5},
              "paths": {"dataset_root": str(tmp_path / "data"), "database_root": str(database_root),
                        "ckpt_root": str(tmp_path / "ckpts"), "output_root": str(tmp_path / "sweeps")}}
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(config))
    done = run("-m", "src.sweep", str(tmp_path / "toy.yaml"), "--jobs", "2")
    assert "| noise-1 |" in done.stdout and "| noise-2 |" in done.stdout and "| ksame-3 |" in done.stdout
    tables = tmp_path / "sweeps/sweeps/toy/tables"
    header = "| dataset | identity | ksame-3 | noise-1 | noise-2 |"
    assert (tables / "auc_sigma-2-real.md").read_text().splitlines()[0] == header
    known = next(line for line in done.stdout.splitlines() if line.startswith("| anonymizer | exact_copy_share"))
    assert known.endswith("| coverage | dcr_spread |")  # the new metric, in its table and the registry's order
    spread = (tables / "dcr_spread_sigma-0.md").read_text().splitlines()
    assert spread[0] == header and spread[2].startswith("| digits | 0.000 ± 0.000 |")  # identity: every DCR is 0


def settings_classes() -> list[type]:
    """Every settings class whose fields are flags: the stages' and each anonymizer's."""
    classes = [CreateDbSettings, StageSettings, AnonymizeSettings, ProbeSettings, ProbeTraining]
    for anonymizer in ANONYMIZERS.values():
        classes += [cls for cls in (anonymizer.Release, anonymizer.Making, anonymizer.Online)
                    if cls is not None and option_fields(cls)]
    return list(dict.fromkeys(classes))


def valid_values(settings_class: type) -> dict:
    """Values every field accepts: defaults, a required text a name, a required number its first example."""
    values = {}
    for f in option_fields(settings_class):
        if f.metadata["required"]:
            values[f.name] = "digits" if f.metadata["choices"] is None else f.metadata["choices"][0]
        elif f.default is None and f.metadata["kind"] in (int, float) and f.metadata["bounds"]["minimum"]:
            values[f.name] = example_values(f)[0]  # a setting with no usable default (k-Same's k)
    if settings_class is AnonymizeSettings:
        values["anonymizer"] = "ksame"
    return values


@pytest.mark.parametrize("settings_class", settings_classes(), ids=lambda cls: cls.__name__)
def test_settings_classes_are_frozen_and_refuse_values_outside_their_bounds(settings_class):
    """Each bounded number, switch and text of each settings class is checked on construction, with the flag named;
    the object cannot be changed afterwards."""
    base = valid_values(settings_class)
    settings = settings_class(**base)
    first = option_fields(settings_class)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(settings, first.name, getattr(settings, first.name))
    checked = 0
    for f in option_fields(settings_class):
        flag = (f.metadata["flags"] or (f"--{f.name}",))[0]
        bounds, kind = f.metadata["bounds"], f.metadata["kind"]
        bad = []
        if kind in (int, float):
            bad = [float("nan"), float("inf")]
            if bounds["minimum"] is not None:
                bad.append(bounds["minimum"] - 1)
            if bounds["above"] is not None:
                bad.append(bounds["above"])
            if bounds["maximum"] is not None:
                bad.append(bounds["maximum"] + 1)
            if kind is int:
                bad.append(2.5)
        elif kind is bool:
            bad = ["yes"]
        elif f.metadata["choices"] or f.metadata["pattern"]:
            bad = ["no-such-choice"]
        for value in bad:
            value = (value,) * (2 if f.metadata["nargs"] == 2 else 1) if f.metadata["nargs"] else value
            with pytest.raises(UserError, match=re.escape(flag)):
                settings_class(**{**base, f.name: value})
            checked += 1
    assert checked > 0
