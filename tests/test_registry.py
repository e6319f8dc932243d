"""The anonymizer registry and the typed settings: names round-trip, records are a stable
interface, and a new anonymizer is one module plus one registry line."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from src.anonymizers import ANONYMIZERS, anonymizer_of_flag
from src.io import code_version, database_dir, save_database
from src.naming import parse_result_name
from src.options import option_fields, settings_record
from src.settings import CreateDbSettings
from src.sweep.grid import stage_script

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("create_db.py", "anonymize.py", "probing.py", "probing_noise.py", "probing_noise_cvae.py")


def example_releases(anonymizer) -> list:
    """Release settings that vary every field away from its default (and the defaults themselves)."""
    examples = {"k": [2, 10], "variance": [1.0, 0.5], "reference_objective": [False, True], "dp_epsilon": [None, 1.5],
                "dpg_epsilon": [None, 0.5], "dpp_epsilon": [None, 2.0]}
    fields = option_fields(anonymizer.Release)
    releases = [anonymizer.Release(**{f.name: examples[f.name][0] for f in fields})]
    for f in fields:
        values = {g.name: examples[g.name][0] for g in fields}
        values[f.name] = examples[f.name][1]
        releases.append(anonymizer.Release(**values))
    return releases


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


@pytest.mark.parametrize("script", SCRIPTS)
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
                                          "max_epochs", "dp_delta", "max_grad_norm", "dp_epochs", "dp_bounds",
                                          "dp_count_share", "dp_secret_noise", "online_factor"}}[script]
    assert set(record) == expected
    json.dumps(record)  # records are plain JSON
    assert module.outputs(settings)


def test_importing_the_sweep_and_scripts_loads_no_model_library():
    code = ("import sys; import src.sweep, src.aggregate; sys.path.insert(0, '.'); "
            "import anonymize, probing, probing_noise, probing_noise_cvae, create_db; "
            "print(sorted({'torch', 'timm', 'medmnist', 'torchvision'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_code_version_names_the_commit_or_the_sources():
    version = code_version()
    assert version.startswith(("git:", "src:")) and len(version) > 8


TOY_MODULE = '''"""A toy anonymizer for the registry test: Gaussian noise of scale s added to each vector."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from src.anonymizers.base import Anonymizer, Release, ReleaseInputs
from src.options import check_options, option


@dataclass(frozen=True)
class NoiseRelease:
    scale: float = option(1.0, "std of the added noise", picks_release=True, above=0)

    def __post_init__(self) -> None:
        check_options(self)


class GaussianNoise(Anonymizer):
    name = "noise"
    Release = NoiseRelease
    seeded = True
    flag_pattern = r"noise-(?P<scale>\\d+(?:\\.\\d*)?(?:e[+-]?\\d+)?)"

    def flag(self, release: NoiseRelease) -> str:
        return f"noise-{release.scale:g}"

    def release_from_flag(self, groups: dict[str, str]) -> NoiseRelease:
        return NoiseRelease(scale=float(groups["scale"]))

    def make(self, inputs: ReleaseInputs, release: NoiseRelease, making: Any, seed: int, device: Any) -> Release:
        noise = np.random.default_rng(seed).normal(scale=release.scale, size=inputs.train_x.shape)
        return Release((inputs.train_x + noise).astype(np.float32), inputs.train_y)
'''


@pytest.mark.slow
def test_a_new_anonymizer_is_one_module_and_one_registry_line(tmp_path):
    """Copy the code, add a Gaussian-noise anonymizer and its registry line, and run every stage on it."""
    repo = tmp_path / "repo"
    for name in (*SCRIPTS, "src", "assets/configs"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, repo / name)
    (repo / "src/anonymizers/noise.py").write_text(TOY_MODULE)
    registry = repo / "src/anonymizers/__init__.py"
    text = registry.read_text()
    text = text.replace('    "cvae": CVAEAnonymizer(),\n',
                        '    "cvae": CVAEAnonymizer(),\n    "noise": GaussianNoise(),\n')
    text = text.replace("from src.anonymizers.ksame import KSame\n",
                        "from src.anonymizers.ksame import KSame\nfrom src.anonymizers.noise import GaussianNoise\n")
    registry.write_text(text)  # the import and the line: the registry's one addition

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
    run("anonymize.py", *common, "--anonymizer", "noise", "--scale", "0.5")
    released = database_dir(database_root, "digits", backbone) / "train_noise-0.5-s3.npz"
    assert released.is_file()
    out = ["--output_root", str(tmp_path / "logs"), "-e", "5"]
    run("probing.py", *common, *out, "--anonymizer", "noise", "--scale", "0.5")
    run("probing_noise.py", *common, *out, "--anonymizer", "noise", "--scale", "0.5", "--sigma", "1",
        "--noise_units", "released", "real")
    written = sorted(path.name for path in (tmp_path / "logs" / "digits").iterdir())
    assert written == ["digits_noise-0.5-s3.json", "digits_noise-0.5-s3_sigma-1-real.json",
                       "digits_noise-0.5-s3_sigma-1.json"]
    record = json.loads((tmp_path / "logs/digits/digits_noise-0.5-s3.json").read_text())
    assert record["settings"]["scale"] == 0.5 and record["average_mindistance"] > 0

    config = {"name": "toy", "datasets": ["digits"], "backbone": backbone, "seeds": [0, 1], "sigmas": [0, 2],
              "anonymizers": {"identity": {}, "noise": {"scale": [0.5, 2.0]}}, "device": "cpu",
              "probe": {"epochs": 5},
              "paths": {"dataset_root": str(tmp_path / "data"), "database_root": str(database_root),
                        "ckpt_root": str(tmp_path / "ckpts"), "output_root": str(tmp_path / "sweeps")}}
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(config))
    done = run("-m", "src.sweep", str(tmp_path / "toy.yaml"), "--jobs", "2")
    assert "| noise-0.5 |" in done.stdout and "| noise-2 |" in done.stdout
    table = (tmp_path / "sweeps/sweeps/toy/tables/auc_sigma-2-real.md").read_text().splitlines()
    assert table[0] == "| dataset | identity | noise-0.5 | noise-2 |"


def test_settings_classes_are_frozen_and_checked():
    release = ANONYMIZERS["ksame"].Release(k=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        release.k = 5
