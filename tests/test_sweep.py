"""The sweep runner: config validation, the grid, skipping current points, failures, Slurm.

The tiny grid here is digits x identity x seeds {0, 1} x sigmas {0, 1}: one create_db
point (made current by writing its databases, in create_db's format, from the digits
pixels), two probes and two noise probes. Tests that run the real stage scripts are
marked slow.
"""
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from src.data import SPLITS, load_split
from src.cli import run_cli
from src.io import code_version, file_fingerprint, load_database, save_database, write_json
from src.naming import database_dir
from src.options import settings_record
from src.settings import CreateDbSettings
from src.sweep import REPO_ROOT, expand, load_config, main, stale_reason
from src.sweep.grid import stage_script
from table_checks import without_timing  # tests/table_checks.py

BACKBONE = "vit_small_patch14_dinov2"
STAGE_SCRIPTS = all((REPO_ROOT / script).is_file() for script in ("create_db.py", "probing.py", "probing_noise.py"))
needs_scripts = pytest.mark.skipif(not STAGE_SCRIPTS, reason="stage scripts not in the checkout yet")


def write_config(tmp_path: Path, name: str = "tiny", **overrides) -> Path:
    config = {"name": name, "datasets": ["digits"], "backbone": BACKBONE, "seeds": [0, 1], "sigmas": [0, 1],
              "anonymizers": {"identity": {}}, "device": "cpu",
              "paths": {key: str(tmp_path / key) for key in ("dataset_root", "database_root", "ckpt_root",
                                                             "output_root")}}
    config.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_databases(database_root: Path) -> Path:
    """digits pixels as 64-d embeddings, with the meta create_db writes, so create_db finds them current."""
    folder = database_dir(database_root, "digits", BACKBONE)
    settings = settings_record(CreateDbSettings(dataset="digits", backbone=BACKBONE, database_root=database_root,
                                                dataset_root=database_root.parent / "dataset_root", device="cpu"))
    for split in SPLITS:
        data = load_split("digits", database_root, split)
        embeddings = data.images.reshape(len(data), -1).astype(np.float32) / 255.0
        save_database(folder / f"{split}.npz", embeddings, data.labels,
                      {"stage": "create_db", "split": split, "settings": settings, "inputs": {}})
    return folder


def write_probe_result(tmp_path: Path, seed: int, sigma: float | None = None, auc: float = 90.0) -> Path:
    """An identity probe result in the probe scripts' format (settings as the probing scripts record them)."""
    folder = database_dir(tmp_path / "database_root", "digits", BACKBONE)
    results = tmp_path / "output_root" / "sweeps" / "tiny" / "results"
    argv = ["--dataset", "digits", "--backbone", BACKBONE, "--seed", str(seed), "--output_root", str(results),
            "--device", "cpu", "--database_root", str(tmp_path / "database_root"),
            "--ckpt_root", str(tmp_path / "ckpt_root")]
    script = stage_script("probing.py" if sigma is None else "probing_noise.py")
    settings = script.parse_settings(argv + ([] if sigma is None else ["--sigma", str(sigma), "--noise_units",
                                                                        "released", "real"]))
    for path in script.outputs(settings):  # the released-units file first, as it is returned
        write_json(path, {"auc": auc, "accuracy": 0.9, "average_mindistance": 0.0, "mia_auc": 50.0,
                          "sigma": sigma or 0.0, "settings": settings_record(settings),
                          "inputs": {str(folder / f"{s}.npz"): file_fingerprint(folder / f"{s}.npz")
                                     for s in SPLITS}})
    return script.outputs(settings)[0]


def sweep(monkeypatch, *argv) -> int:
    """Run the sweep CLI in this process; its exit status."""
    monkeypatch.setattr(sys, "argv", ["sweep", *map(str, argv)])
    try:
        run_cli(main)
    except SystemExit as exit_info:
        return exit_info.code
    return 0


def no_processes(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")
    monkeypatch.setattr(subprocess, "run", refuse)


def test_shipped_configs_expand_to_their_grids(tmp_path):
    # the demo's weights file is made by `make demo`; a stand-in lets the grid be checked without it
    demo_config = yaml.safe_load((REPO_ROOT / "assets/configs/demo.yaml").read_text())
    demo_config["weights"] = str(tmp_path / "stand-in.safetensors")
    (tmp_path / "stand-in.safetensors").write_bytes(b"weights")
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(demo_config))
    demo = expand(load_config(tmp_path / "demo.yaml"), Path("results"))
    # 1 create_db, 3 k-Same + 3 x 3 CVAE anonymizations (no DP, epsilon 1 and 8), (identity, 3 k-Same, 3 CVAEs)
    # x 3 seeds probes and noise probes, 3 online probes
    assert len(demo) == 1 + 12 + 21 + 21 + 3
    paper = expand(load_config(REPO_ROOT / "assets/configs/paper.yaml"), Path("results"))
    assert len(paper) == 8 * (1 + 3 + 5 + 5 * 5 + 5 * 5 + 5)
    for points in (demo, paper):
        seen = set()
        for point in points:
            assert set(point.deps) <= seen, point.name  # every dependency comes first
            seen.add(point.name)
    online = next(point for point in demo if point.name == "online-digits-v1-s0")
    assert online.command[online.command.index("--sigma") + 1:][:3] == ["0.0", "1.0", "4.0"]


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, "unknown key 'colour' in the config"),
    ({"anonymizers": {"ksame": {"k": [1]}}}, "anonymizers.ksame.k 1: give a finite number at least 2"),
    ({"anonymizers": {"blur": {}}}, "unknown key 'blur' in anonymizers"),
    ({"anonymizers": {}}, "anonymizers is empty"),
    ({"seeds": []}, "seeds is empty"),
    ({"seeds": [-1]}, "seeds -1: give a finite number at least 0"),
    ({"datasets": []}, "datasets is empty"),
    ({"datasets": ["mnist-typo"]}, "unknown dataset 'mnist-typo'"),
    ({"backbone": "not_a_model"}, "unknown --backbone 'not_a_model'"),
    ({"anonymizers": {"cvae": {"variance": 0}}}, "variance 0: give a finite number above 0"),
    ({"probe": {"lr": "1e-3"}}, "write 1.0e-3"),
    ({"sigmas": [-1]}, "sigmas -1: give a finite number at least 0"),
    ({"device": "tpu"}, "device 'tpu': give auto"),
    ({"seeds": [2 ** 32]}, "seeds 4294967296: give a finite number at least 0 at most 4294967295"),
    ({"weights": "assets/weights/missing.safetensors"}, "does not exist"),
])
def test_bad_config_values_are_user_errors(tmp_path, monkeypatch, capsys, change, message):
    assert sweep(monkeypatch, write_config(tmp_path, **change), "--dry_run") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("device", ["mps", "cuda:1", "cpu"])
def test_the_sweep_takes_every_device_name_the_scripts_take(tmp_path, monkeypatch, device):
    assert load_config(write_config(tmp_path, device=device)).device == device
    assert stage_script("probing.py").parse_settings(["--dataset", "digits", "--device", device]).device == device


@pytest.mark.slow
def test_cli_exits_2_with_one_line(tmp_path):
    config = write_config(tmp_path, colour="red")
    done = subprocess.run([sys.executable, "-m", "src.sweep", str(config)], cwd=REPO_ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "colour" in done.stderr


def test_unwritable_output_folder_exits_2(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert sweep(monkeypatch, write_config(tmp_path), "--output_root", blocker / "out") == 2
    assert "is not writable" in capsys.readouterr().err


def test_current_points_are_skipped_and_changes_make_them_stale(tmp_path, monkeypatch, capsys):
    write_databases(tmp_path / "database_root")
    for seed in (0, 1):
        write_probe_result(tmp_path, seed, auc=90.0 + 2 * seed)
        write_probe_result(tmp_path, seed, sigma=1.0, auc=80.0)
    config_path = write_config(tmp_path)
    no_processes(monkeypatch)
    assert sweep(monkeypatch, config_path) == 0
    out = capsys.readouterr().out
    assert "0 ran, 5 current" in out and "| identity | 91.00 ± 1.41 |" in out
    assert list((tmp_path / "output_root/sweeps/tiny/logs").iterdir()) == []
    assert (tmp_path / "output_root/sweeps/tiny/tables/auc_sigma-1.csv").is_file()

    config = load_config(config_path)
    points = {p.name: p for p in expand(config, tmp_path / "output_root/sweeps/tiny/results")}
    assert all(stale_reason(point) is None for point in points.values())
    # a result recorded with other settings is stale, and only that one
    result = write_probe_result(tmp_path, 1)
    record = json.loads(result.read_text())
    record["settings"]["seed"] = 7
    result.write_text(json.dumps(record))
    assert "seed=7" in stale_reason(points["probe-digits-identity-s1"])
    assert stale_reason(points["probe-digits-identity-s0"]) is None
    # so is one made with another probe setting than the default of a key the config omits
    record["settings"].update(seed=1, epochs=5)
    result.write_text(json.dumps(record))
    assert "epochs=5" in stale_reason(points["probe-digits-identity-s1"])
    # a setting the output does not record (an option added since) counts as its default, and only that
    del record["settings"]["epochs"]
    result.write_text(json.dumps(record))
    assert stale_reason(points["probe-digits-identity-s1"]) is None
    longer = dataclasses.replace(points["probe-digits-identity-s1"],
                                 settings={**points["probe-digits-identity-s1"].settings, "epochs": 5},
                                 at_default=points["probe-digits-identity-s1"].at_default - {"epochs"})
    assert "epochs=None" in stale_reason(longer)
    # changed embeddings make every probe that read them stale, but not the database itself
    test_db = database_dir(tmp_path / "database_root", "digits", BACKBONE) / "test.npz"
    embeddings, labels, meta = load_database(test_db)
    embeddings[0, 0] += 1.0
    save_database(test_db, embeddings, labels, meta)
    assert "changed since" in stale_reason(points["noise-digits-identity-s0"])
    assert stale_reason(points["create_db-digits"]) is None
    assert sweep(monkeypatch, config_path, "--dry_run") == 0
    assert "4 to run, 1 current" in capsys.readouterr().out
    # a config that now sets another image size makes the database stale
    resized = {p.name: p for p in expand(load_config(write_config(tmp_path, img_size=112)), Path("r"))}
    assert "img_size=None" in stale_reason(resized["create_db-digits"])


def submitted(tmp_path: Path, script: Path) -> list[str]:
    """Run the script's submit mode against a stand-in `sbatch` that logs its arguments."""
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\necho "$@" >> "$SBATCH_LOG"\necho $(( $(wc -l < "$SBATCH_LOG") + 100 ))\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "SBATCH_LOG": str(tmp_path / "sbatch.log")}
    subprocess.run(["bash", str(script)], check=True, env=env, capture_output=True)
    return (tmp_path / "sbatch.log").read_text().splitlines()


def test_slurm_script_has_one_task_per_point_and_chains_stages(tmp_path, monkeypatch):
    config_path, script = write_config(tmp_path), tmp_path / "sweep.sh"
    assert sweep(monkeypatch, config_path, "--slurm", script) == 0
    text = script.read_text()
    points = expand(load_config(config_path), tmp_path / "output_root/sweeps/tiny/results")
    tasks = re.findall(r'^  (\d+)\) "\$PYTHON" (.*) ;;  # (\S+)$', text, flags=re.M)
    assert [int(index) for index, _, _ in tasks] == list(range(len(points))) and len(points) == 5
    assert [shlex.split(command) for _, command, _ in tasks] == [point.command for point in points]
    assert f"#SBATCH --array=0-{len(points) - 1}" in text
    assert submitted(tmp_path, script) == [
        f"--parsable --array=0-0 {script} run",
        f"--parsable --dependency=afterok:101 --array=1-2 {script} run",
        f"--parsable --dependency=afterok:102 --array=3-4 {script} run",
    ]
    refused = subprocess.run(["bash", str(script)], env={**os.environ, "SLURM_ARRAY_TASK_ID": "0"},
                             capture_output=True, text=True)  # plain sbatch: tasks without `run`
    assert refused.returncode == 2 and "submit with" in refused.stderr


@pytest.mark.slow
@needs_scripts
def test_slurm_tasks_run_locally_as_written(tmp_path, monkeypatch, capsys):
    write_databases(tmp_path / "database_root")
    config_path, script = write_config(tmp_path), tmp_path / "sweep.sh"
    assert sweep(monkeypatch, config_path, "--slurm", script) == 0
    for task in range(5):
        done = subprocess.run(["bash", str(script), "run"], env={**os.environ, "SLURM_ARRAY_TASK_ID": str(task)},
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    capsys.readouterr()
    assert sweep(monkeypatch, config_path, "--dry_run") == 0
    assert "0 to run, 5 current" in capsys.readouterr().out


@pytest.mark.slow
@needs_scripts
def test_runs_real_scripts_skips_reruns_and_jobs_agree(tmp_path, monkeypatch, capsys):
    tables = {}
    for jobs in (1, 2):
        root = tmp_path / f"jobs{jobs}"
        write_databases(root / "database_root")
        assert sweep(monkeypatch, write_config(root), "--jobs", jobs) == 0
        assert "4 ran, 1 current" in capsys.readouterr().out
        folder = root / "output_root/sweeps/tiny/tables"
        tables[jobs] = without_timing({path.name: path.read_text() for path in folder.glob("*.csv")})
    assert tables[1] == tables[2] and "auc_sigma-1.csv" in tables[1]

    root = tmp_path / "jobs1"
    logs = root / "output_root/sweeps/tiny/logs"
    written = {path.name: path.stat().st_mtime_ns for path in logs.iterdir()}
    result = root / "output_root/sweeps/tiny/results/digits/digits_identity-s1.json"
    record = json.loads(result.read_text())
    record["settings"]["seed"] = 7  # as if made by another grid: stale
    result.write_text(json.dumps(record))
    assert sweep(monkeypatch, write_config(root)) == 0
    assert "1 ran, 4 current" in capsys.readouterr().out
    rerun = {path.name for path in logs.iterdir() if path.stat().st_mtime_ns != written[path.name]}
    assert rerun == {"probe-digits-identity-s1.log"}
    assert json.loads(result.read_text())["settings"]["seed"] == 1


@pytest.mark.slow
@needs_scripts
def test_failed_points_are_listed_and_their_dependants_skipped(tmp_path, monkeypatch, capsys):
    write_databases(tmp_path / "database_root")
    for seed in (0, 1):
        write_probe_result(tmp_path, seed)
        write_probe_result(tmp_path, seed, sigma=1.0)
    missing = [f"imagefolder:{tmp_path / name}" for name in ("missing-a", "missing-b")]
    config_path = write_config(tmp_path, datasets=[*missing, "digits"])
    assert sweep(monkeypatch, config_path, "--jobs", 2) == 1
    captured = capsys.readouterr()
    assert "0 ran, 5 current, 2 failed, 8 skipped after a failure" in captured.out
    assert "| identity | 90.00 ± 0.00 |" in captured.out  # the current dataset is still tabled
    failed = re.findall(r"^  (create_db-\S+): exit status 2: error: .*$", captured.err, flags=re.M)
    assert len(failed) == 2 and all(f"{name}.log" in captured.err for name in failed)


def test_rerun_other_code_marks_outputs_of_another_code_version_stale(tmp_path):
    write_databases(tmp_path / "database_root")
    result = write_probe_result(tmp_path, 0)
    results = tmp_path / "output_root/sweeps/tiny/results"
    points = {p.name: p for p in expand(load_config(write_config(tmp_path)), results)}
    probe = points["probe-digits-identity-s0"]
    record = json.loads(result.read_text())
    result.write_text(json.dumps({**record, "code_version": "git:000000000000"}))
    assert stale_reason(probe) is None
    assert "made by code git:000000000000" in stale_reason(probe, rerun_other_code=True)
    result.write_text(json.dumps({**record, "code_version": code_version()}))
    assert stale_reason(probe, rerun_other_code=True) is None
