"""The sweep's Slurm script on a real cluster: a tiny sweep submitted with `bash FILE`, against a local run.

The grid is digits x (identity, k-Same k=2) x seed 0 x sigmas {0, 1} on a tiny random-init
timm ViT: six points in four dependent job arrays (create_db, anonymize, probe, noise). The
oracle is the same sweep run locally into other folders; both result folders must aggregate
to the same tables. Skipped when no Slurm cluster answers (.ci/slurm_up.sh starts one in CI).
Only the command lines and the config format are used, so any sweep implementation fits.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from src.backbones import create_backbone
from table_checks import without_timing  # tests/table_checks.py

REPO_ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "test_vit"  # timm's smallest ViT (0.3 M parameters), so extraction takes a second
WAIT_S = 300  # for the four arrays; a safety net against a stuck cluster, not a speed check
RESULTS = "output_root/sweeps/tiny/results"  # <output_root>/sweeps/<name>/results, relative to a run's folder
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}


def cluster_problem() -> str | None:
    """Why no job could run here now, or None when a Slurm node runs a job step within seconds."""
    if not all(shutil.which(command) for command in ("sinfo", "sbatch", "srun", "squeue", "scancel")):
        return "no Slurm client (sinfo, sbatch, srun) on PATH; .ci/slurm_up.sh starts a one-node cluster as root"
    try:
        listing = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=15)
        if listing.returncode != 0 or not {"idle", "mix", "alloc"} & set(listing.stdout.split()):
            return f"no Slurm node takes jobs ({first_line(listing) or listing.stdout.split()})"
        # the controller may still list a node whose slurmd is gone: run a step on it
        step = subprocess.run(["srun", "--immediate=10", "--time=1", "--job-name=test-slurm-probe", "true"],
                              capture_output=True, text=True, timeout=30)
        if step.returncode != 0:
            return f"the Slurm node does not run a job step ({first_line(step)})"
    except subprocess.TimeoutExpired as timeout:
        return f"{timeout.cmd[0]} got no answer within {timeout.timeout:g} s"
    return None


def first_line(done: subprocess.CompletedProcess) -> str:
    """What a failed Slurm command said first (its later lines are consequences)."""
    return done.stderr.strip().splitlines()[0] if done.stderr.strip() else ""


def write_weights(path: Path) -> Path:
    """A random initialisation of the backbone saved as a weights file, as the sweep's `weights` key wants."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_backbone(BACKBONE, pretrained=False).model
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(path))
    return path


def write_config(root: Path, weights: Path) -> Path:
    """The tiny sweep with every folder under `root`, so two runs share nothing but the weights."""
    config = {"name": "tiny", "datasets": ["digits"], "backbone": BACKBONE, "weights": str(weights), "img_size": 32,
              "seeds": [0], "sigmas": [0, 1], "anonymizers": {"identity": {}, "ksame": {"k": [2]}},
              "probe": {"epochs": 2}, "create_db": {"num_workers": 0}, "device": "cpu",
              "paths": {key: str(root / key) for key in ("dataset_root", "database_root", "ckpt_root", "output_root")}}
    path = root / "tiny.yaml"
    root.mkdir(parents=True)
    path.write_text(yaml.safe_dump(config))
    return path


def run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    """Run a command from the repo root; a failure shows what it printed."""
    done = subprocess.run(list(command), cwd=REPO_ROOT, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def job_states(job_name: str) -> list[tuple[str, str, str]]:
    """(job id, state, reason) of every task of the named jobs the controller still remembers."""
    listing = run("squeue", "-h", "-r", "-t", "all", "-n", job_name, "-o", "%i|%T|%r").stdout
    return [tuple(line.split("|")) for line in listing.splitlines()]


def wait_for_jobs(job_name: str, logs: Path) -> list[tuple[str, str, str]]:
    """Poll until no task is pending or running; fail at once on a task that failed or can never start."""
    deadline = time.monotonic() + WAIT_S
    while True:
        states = job_states(job_name)
        assert states, f"no job named {job_name} in squeue after submitting"
        stuck = [s for s in states if (s[1] not in ACTIVE_STATES | {"COMPLETED"}) or "NeverSatisfied" in s[2]]
        assert not stuck, f"tasks failed: {stuck}\n{log_tails(logs)}"
        if not any(state in ACTIVE_STATES for _, state, _ in states):
            return states
        assert time.monotonic() < deadline, f"jobs still active after {WAIT_S} s: {states}\n{log_tails(logs)}"
        time.sleep(1)


def log_tails(folder: Path) -> str:
    """The last lines of every log under the folder, for a failure message."""
    return "\n".join(f"== {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-5:])
                     for path in sorted(folder.rglob("*.log")))


def aggregated(results: Path, out: Path) -> dict[str, str]:
    """The text files (tables, summary, report) that `python -m src.aggregate` writes for a results folder."""
    run(sys.executable, "-m", "src.aggregate", str(results), "--out", str(out))
    return {path.name: path.read_text() for path in sorted(out.iterdir()) if path.suffix in (".md", ".csv", ".tex")}


def result_files(root: Path) -> list[Path]:
    """A run's probe result files, relative to its folder so that two runs compare."""
    return sorted(path.relative_to(root) for path in (root / RESULTS).rglob("*.json"))


@pytest.mark.slow
def test_sweep_submitted_to_slurm_matches_the_local_run(tmp_path):
    problem = cluster_problem()
    if problem is not None:
        pytest.skip(problem)
    weights = write_weights(tmp_path / f"{BACKBONE}.safetensors")
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    local_log = tmp_path / "local.log"
    with open(local_log, "w") as log:  # the oracle runs meanwhile, on the cores the cluster's tasks leave free
        local_run = subprocess.Popen([sys.executable, "-m", "src.sweep", str(write_config(local, weights)),
                                      "--jobs", "1"], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # its own process group, stage scripts included
    job_name = f"test-slurm-{uuid.uuid4().hex[:8]}"  # sbatch takes SBATCH_JOB_NAME over the script's #SBATCH line
    try:
        script = tmp_path / "sweep.sh"
        run(sys.executable, "-m", "src.sweep", str(write_config(on_slurm, weights)), "--slurm", str(script))
        run("bash", str(script), env={**os.environ, "SBATCH_JOB_NAME": job_name})
        states = wait_for_jobs(job_name, on_slurm)
        assert len(states) == 6 and {state for _, state, _ in states} == {"COMPLETED"}, states
        assert len(result_files(on_slurm)) == 6  # 2 anonymizers x (sigma 0, sigma 1 in both noise units)
        slurm_tables = aggregated(on_slurm / RESULTS, tmp_path / "tables-slurm")
        local_run.wait(timeout=WAIT_S)
    finally:
        subprocess.run(["scancel", "-n", job_name], capture_output=True, timeout=30)
        if local_run.poll() is None:
            os.killpg(local_run.pid, signal.SIGKILL)
            local_run.wait()
    assert local_run.returncode == 0, local_log.read_text()
    assert result_files(local) == result_files(on_slurm)
    # through the CLI for both: the sweep's own tables list summary.csv rows in point order, not file-name order
    local_tables = aggregated(local / RESULTS, tmp_path / "tables-local")
    assert "auc_sigma-1.csv" in slurm_tables and without_timing(slurm_tables) == without_timing(local_tables)
