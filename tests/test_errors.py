"""The error convention, class by class: argument errors, UserErrors from DataLoader workers,
multi-line library messages, non-finite numbers, files read before they are checked, outputs
checked after the work, and temporaries left by killed writers."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from src.anonymizers.cvae import CVAEMaking, CVAERelease
from src.cli import ArgumentParser, UserError, brief_reason, check_finite, check_seed, user_message
from src.data import load_split
from src.cvae import CVAE, checkpoint_path, load_or_train_cvae, train_cvae
from src.io import atomic_path, check_output_folder, load_database, remove_dead_temporaries, save_database, write_json
from src.probe import probe_checkpoint_path, train_probe
from src.settings import ProbeTraining
from src.runtime import seed_everything
from src.sweep import load_config
from cli_checks import assert_one_line_error  # tests/cli_checks.py

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TINY_CVAE = CVAEMaking(max_epochs=3, cvae_hidden_dim=8, cvae_latent_dim=2)


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def without_progress_bars(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """The run with tqdm's lines ('<label>:  0%|   | 0/6 [00:00<?, ?img/s]') dropped from stderr: the
    convention allows progress bars beside the one error line."""
    lines = [line for line in result.stderr.splitlines() if not re.search(r"\| *\d+/\d+ \[", line)]
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout, "\n".join(lines))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: 'nothing created or changed' is equality of two snapshots."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def blobs(n: int, seed: int, dim: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Two well separated Gaussian classes, alternating labels."""
    labels = np.arange(n) % 2
    return (np.random.default_rng(seed).normal(size=(n, dim)) + 4.0 * labels[:, None]).astype(np.float32), labels


def write_databases(root: Path) -> Path:
    """Real-format databases <root>/db/toy/bb/{train,val,test}.npz; returns that folder."""
    folder = root / "db" / "toy" / "bb"
    for split, n, seed in [("train", 40, 1), ("val", 20, 2), ("test", 20, 3)]:
        save_database(folder / f"{split}.npz", *blobs(n, seed), {"split": split})
    return folder


def probe_args(root: Path) -> list[str]:
    return ["--dataset", "toy", "--backbone", "bb", "--database_root", str(root / "db"),
            "--output_root", str(root / "logs"), "--ckpt_root", str(root / "ckpts"), "-e", "5", "--device", "cpu"]


# ------------------------------------------------------------------ argument errors

def demo_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="demo.py")
    parser.add_argument("--anonymizer", required=True, choices=["ksame", "cvae"])
    parser.add_argument("--seed", type=int, default=0)
    return parser


@pytest.mark.parametrize("argv, fragments", [
    (["--anonymizer", "foo"], ["--anonymizer", "'ksame'", "'cvae'"]),
    ([], ["required", "--anonymizer"]),
    (["--anonymizer", "cvae", "--seed", "1.5"], ["--seed", "'1.5'"]),
    (["--anonymizer", "cvae", "--colour", "red"], ["--colour"]),
])
def test_argument_errors_are_one_line_user_errors(argv, fragments, capsys):
    with pytest.raises(UserError) as caught:
        demo_parser().parse_args(argv)
    message = user_message(caught.value)
    assert "\n" not in message and message.endswith("see demo.py --help")
    assert all(fragment in message for fragment in fragments), message
    assert capsys.readouterr().err == ""  # argparse printed no usage block


@pytest.mark.slow
def test_every_script_turns_a_bad_choice_into_one_line(tmp_path):
    for script, argv in [("anonymize.py", ["--dataset", "toy", "--anonymizer", "foo"]),
                         ("probing.py", ["--dataset", "toy", "--anonymizer", "foo"]),
                         ("create_db.py", ["--dataset", "toy", "--batch_size", "many"]),
                         ("-m", ["src.sweep", "config.yaml", "--jobs", "two"])]:
        assert_one_line_error(run(script, *argv, cwd=REPO), "see ", "--help")


@pytest.mark.parametrize("script, argv, flag", [
    ("anonymize.py", ["--anonymizer", "ksame", "--k", "5", "--dp_epsilon", "1"], "--dp_epsilon"),
    ("anonymize.py", ["--anonymizer", "ksame", "--k", "5", "--dp_delta", "3.5"], "--dp_delta"),
    ("probing.py", ["--anonymizer", "identity", "--dp_epsilon", "1"], "--dp_epsilon"),
    ("probing_noise.py", ["--anonymizer", "ksame", "--k", "2", "--variance", "1.0", "--sigma", "1"], "--variance"),
])
def test_a_flag_of_another_anonymizer_is_refused_and_nothing_is_written(tmp_path, script, argv, flag):
    """Asking for DP (or any setting) of an anonymizer that has none must not silently write a non-DP release."""
    folder = write_databases(tmp_path)
    before = snapshot(tmp_path)
    result = run(script, *probe_args(tmp_path)[:6], "--ckpt_root", str(tmp_path / "ckpts"), *argv)
    assert_one_line_error(result, flag, "does not apply to --anonymizer", "cvae")
    assert snapshot(tmp_path) == before and folder.is_dir()


def test_the_online_probe_offers_only_anonymizers_with_an_online_mode(tmp_path):
    write_databases(tmp_path)
    before = snapshot(tmp_path)
    result = run("probing_noise_cvae.py", *probe_args(tmp_path), "--anonymizer", "ksame", "--sigma", "1")
    assert_one_line_error(result, "--anonymizer ksame has no online mode", "cvae")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ DataLoader workers

class FailingImages(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == 2:
            raise UserError("cannot read image broken.png (truncated); replace or delete it")
        return torch.zeros(3)


def test_user_error_from_a_dataloader_worker_comes_back_as_its_own_line():
    with pytest.raises(UserError) as caught:
        list(DataLoader(FailingImages(), batch_size=1, num_workers=1))
    assert "Traceback" in str(caught.value)  # torch re-raised it with the worker's traceback as its text
    assert user_message(caught.value) == "cannot read image broken.png (truncated); replace or delete it"


def write_image_tree(root: Path) -> Path:
    """An imagefolder: tree with two classes per split, all real PNGs."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for index in range(3):
                pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{index}.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["text", "truncated"])
def test_create_db_reports_a_bad_image_read_in_a_worker_on_one_line(tmp_path, damage):
    images = write_image_tree(tmp_path / "images")
    bad = images / "train" / "b" / "1.png"
    if damage == "text":
        bad.write_text("not an image")
    else:
        bad.write_bytes(bad.read_bytes()[:200])
    result = run("create_db.py", "--dataset", f"imagefolder:{images}", "--backbone", "test_vit", "--random_init",
                 "--img_size", "64", "--num_workers", "1", "--device", "cpu", "--database_root", str(tmp_path / "db"))
    assert_one_line_error(without_progress_bars(result), str(bad), "replace or delete it")
    assert not (tmp_path / "db").exists()


# ------------------------------------------------------------------ library messages and internal errors

def test_brief_reason_keeps_the_first_sentence_of_a_multi_line_message(tmp_path):
    damaged = tmp_path / "probe.pt"
    damaged.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(Exception) as caught:
        torch.load(damaged, weights_only=True)
    assert str(caught.value).count("\n") >= 3  # what used to leak into our message
    reason = brief_reason(caught.value)
    assert "\n" not in reason and reason.startswith(type(caught.value).__name__ + ": ") and len(reason) < 120
    assert brief_reason(KeyError()) == "KeyError"


def test_damaged_probe_checkpoint_is_one_line(tmp_path):
    checkpoint = tmp_path / "probe.pt"
    checkpoint.write_bytes(np.random.default_rng(1).bytes(2000))
    x, y = blobs(20, 0)
    with pytest.raises(UserError) as caught:
        train_probe((torch.from_numpy(x), torch.from_numpy(y)), torch.from_numpy(x), torch.from_numpy(y), 2,
                    ProbeTraining(epochs=2), CPU, 0, checkpoint)
    message = user_message(caught.value)
    assert "\n" not in message and str(checkpoint) in message and "delete it to retrain" in message


def test_an_unexpected_error_keeps_its_traceback():
    code = "from src.cli import run_cli\ndef main():\n    raise RuntimeError('a bug')\nrun_cli(main)"
    result = run("-c", code)
    assert result.returncode == 1 and "Traceback" in result.stderr and "RuntimeError: a bug" in result.stderr


# ------------------------------------------------------------------ numbers

@pytest.mark.parametrize("value, bounds", [
    (float("nan"), {}), (float("inf"), {}), (float("-inf"), {"minimum": 0}), (-1e-9, {"minimum": 0}),
    (0.0, {"above": 0}), (2.0, {"maximum": 1}), (True, {}), ("0.1", {}),
])
def test_check_finite_refuses_with_the_flag_and_the_range(value, bounds):
    with pytest.raises(UserError, match=r"^-l/--lr .*: give a finite number") as caught:
        check_finite("-l/--lr", value, **bounds)
    assert "\n" not in str(caught.value)


def test_check_finite_returns_good_values():
    assert check_finite("-l/--lr", 1e-3, above=0) == 1e-3
    assert check_finite("--variance", 0, minimum=0, maximum=1) == 0
    assert check_finite("--variance", np.float32(0.5), above=0) == np.float32(0.5)


@pytest.mark.parametrize("seed", [-1, 2 ** 32, 2 ** 64, 1.5, True])
def test_seeds_outside_numpy_range_are_user_errors(seed):
    with pytest.raises(UserError, match=rf"^--seed {seed}: seeds are integers from 0 to {2 ** 32 - 1}$"):
        check_seed("--seed", seed)
    if isinstance(seed, int) and not isinstance(seed, bool):
        with pytest.raises(UserError, match="--seed"):
            seed_everything(seed)


def test_largest_seed_seeds_every_generator():
    assert check_seed("--seed", np.int64(7)) == 7
    seed_everything(2 ** 32 - 1)
    first = np.random.random(), torch.rand(1).item()
    seed_everything(2 ** 32 - 1)
    assert (np.random.random(), torch.rand(1).item()) == first


@pytest.mark.parametrize("labels, meta, fragment", [
    (np.array([0, 1, 10 ** 13, 1]), {}, "label 10000000000000 is out of range"),
    (np.array([0, 1, 4, 1]), {}, "C at most 4, its number of rows"),
    (np.array([0, 1, 2, 1]), {"class_names": ["a", "b"]}, "C at most 2, its number of class names"),
])
def test_labels_beyond_the_classes_the_data_can_hold_are_refused(tmp_path, labels, meta, fragment):
    path = tmp_path / "train.npz"
    save_database(path, np.zeros((4, 3)), labels, meta)
    with pytest.raises(UserError, match=fragment):
        load_database(path)
    save_database(path, np.zeros((4, 3)), np.array([0, 3, 2, 1]), {"class_names": list("abcd")})
    assert load_database(path)[1].max() == 3  # labels 0..N-1 are the largest range allowed


def test_probe_that_never_reaches_a_finite_loss_is_an_error_not_a_result(tmp_path):
    x, y = blobs(40, 0)
    data = torch.from_numpy(x), torch.from_numpy(y)
    with pytest.raises(UserError, match=r"never finite.*-l/--lr 1e\+300; lower -l/--lr"):
        train_probe(data, *data, 2, ProbeTraining(lr=1e300, epochs=20), CPU, 0, tmp_path / "probe.pt")
    assert not (tmp_path / "probe.pt").exists()


def test_probe_checkpoint_of_an_untrained_probe_is_refused(tmp_path):
    x, y = blobs(40, 0)
    data = torch.from_numpy(x), torch.from_numpy(y)
    config = ProbeTraining(epochs=3)
    checkpoint = probe_checkpoint_path(tmp_path, config, 0, 2, {"data": "toy"})
    model, history = train_probe(data, *data, 2, config, CPU, 0, checkpoint)
    history["best_epoch"] = -1  # what the earlier code saved when every validation loss was NaN
    torch.save({"state_dict": model.state_dict(), "history": history}, checkpoint)
    with pytest.raises(UserError, match="never reached a finite validation loss; delete it"):
        train_probe(data, *data, 2, config, CPU, 0, checkpoint)


def test_cvae_that_never_reaches_a_finite_loss_is_an_error(tmp_path):
    x, y = blobs(40, 0)
    with pytest.raises(UserError, match="CVAE validation loss was never finite"):
        train_cvae(x, y, x, y, 2, CVAERelease(), replace(TINY_CVAE, cvae_lr=1e30), CPU, 0)  # Adam steps of 1e30


@pytest.mark.parametrize("best_loss", [float("nan"), float("-inf")])
def test_cvae_checkpoint_with_a_non_finite_best_loss_is_refused(tmp_path, best_loss):
    x, y = blobs(40, 0)
    path = checkpoint_path(tmp_path, x, y, x, y, 2, CVAERelease(), TINY_CVAE, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": CVAE(4, 2, 8, 2).state_dict(), "scaler_minimum": torch.zeros(4),
                "scaler_span": torch.ones(4), "history": {"train_loss": [1.0], "val_loss": [best_loss]},
                "best_epoch": 1}, path)
    with pytest.raises(UserError, match="never finite; delete it to retrain"):
        load_or_train_cvae(tmp_path, x, y, x, y, 2, CVAERelease(), TINY_CVAE, CPU, 0)


@pytest.mark.slow
@pytest.mark.parametrize("lr", ["inf", "1e300", "nan"])
def test_probe_cli_with_a_learning_rate_that_cannot_train_changes_nothing(tmp_path, lr):
    folder = write_databases(tmp_path)
    earlier = tmp_path / "logs" / "toy" / "toy_identity-s42.json"
    write_json(earlier, {"auc": 99.0})
    before = snapshot(tmp_path)
    result = run("probing.py", *probe_args(tmp_path), "-l", lr)
    assert_one_line_error(result, "-l/--lr")
    assert snapshot(tmp_path) == before and folder.is_dir()


# ------------------------------------------------------------------ files read before they are checked

@pytest.mark.parametrize("case", ["npy", "truncated", "foreign_zip", "meta_list", "text_embeddings"])
def test_database_format_is_checked_before_use(tmp_path, case):
    path = tmp_path / "train.npz"
    embeddings, labels = blobs(6, 0)
    if case == "npy":
        with open(path, "wb") as handle:
            np.save(handle, embeddings)
    elif case == "truncated":
        save_database(path, embeddings, labels, {})
        path.write_bytes(path.read_bytes()[:300])
    elif case == "foreign_zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme.txt", "hello")
    elif case == "meta_list":
        np.savez(path, embeddings=embeddings, labels=labels, meta=np.array("[1, 2]"))
    else:
        np.savez(path, embeddings=embeddings.astype(str), labels=labels)
    with pytest.raises(UserError) as caught:
        load_database(path, "python create_db.py --dataset toy")
    message = user_message(caught.value)
    assert "\n" not in message and str(path) in message and "python create_db.py --dataset toy" in message


def test_medmnist_file_saved_by_np_save_is_refused_before_reading(tmp_path):
    (tmp_path / "medmnist").mkdir()
    with open(tmp_path / "medmnist" / "breastmnist_224.npz", "wb") as handle:
        np.save(handle, np.zeros((4, 8, 8), dtype=np.uint8))
    with pytest.raises(UserError, match=r"breastmnist_224\.npz is not an \.npz archive.*download it again"):
        load_split("breastmnist", tmp_path, "train")


def test_anonymize_refuses_an_npy_named_npz_and_writes_nothing(tmp_path):
    folder = write_databases(tmp_path)
    with open(folder / "train.npz", "wb") as handle:
        np.save(handle, np.zeros((40, 4), dtype=np.float32))
    before = snapshot(tmp_path)
    result = run("anonymize.py", "--dataset", "toy", "--backbone", "bb", "--anonymizer", "ksame", "--k", "2",
                 "--device", "cpu", "--database_root", str(tmp_path / "db"), "--ckpt_root", str(tmp_path / "ck"))
    assert_one_line_error(result, "train.npz", "not an .npz archive")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("content, fragment", [
    ("name: tiny\n# caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 16)"),
    (b"name: [tiny\ndatasets: x\n", "is not valid YAML (expected ',' or ']', but got ':', line 2 column 9)"),
    (b"name: \x07\n", "is not valid YAML (ReaderError: unacceptable character"),
])
def test_sweep_config_text_is_checked_before_parsing(tmp_path, content, fragment):
    config = tmp_path / "sweep.yaml"
    config.write_bytes(content)
    with pytest.raises(UserError) as caught:
        load_config(config)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


# ------------------------------------------------------------------ outputs checked before the work

@pytest.mark.parametrize("case", ["file", "under_file"])
def test_output_folder_that_cannot_exist_is_refused(tmp_path, case):
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file")
    target = blocker if case == "file" else blocker / "sub" / "out"
    with pytest.raises(UserError, match=r"^--output_root .* is not writable \(.*results.txt is not a folder\)"):
        check_output_folder(target, "--output_root")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(UserError, match="is not writable"):
        check_output_folder(locked / "new", "--ckpt_root")


def test_output_folder_check_creates_nothing(tmp_path):
    check_output_folder(tmp_path / "a" / "b", "--output_root")
    check_output_folder(tmp_path, "--output_root")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_probe_with_an_output_root_that_is_a_file_does_no_work(tmp_path):
    write_databases(tmp_path)
    (tmp_path / "logs").write_text("a file")
    before = snapshot(tmp_path)
    assert_one_line_error(run("probing.py", *probe_args(tmp_path)), "--output_root")
    assert snapshot(tmp_path) == before  # no probe checkpoint trained and written first


# ------------------------------------------------------------------ temporaries of killed writers

WRITER = textwrap.dedent("""
    import sys, time
    from src.io import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        tmp.write_text("half of the new")
        print("writing", flush=True)
        time.sleep(120)
""")


def start_writer(path: Path) -> subprocess.Popen:
    """A process inside atomic_path's block, stopped mid-write until killed."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    return writer


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def test_killed_write_keeps_the_old_output_and_the_rerun_cleans_up(tmp_path):
    result = tmp_path / "out" / "result.json"
    write_json(result, {"auc": 1.0})
    writer = start_writer(result)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    leftover = temporaries(result.parent)
    assert len(leftover) == 1 and f"-{writer.pid}." in leftover[0].name  # named after its writer
    assert json.loads(result.read_text()) == {"auc": 1.0}  # the earlier output survives

    rerun = run("-c", f"from src.io import write_json; write_json({str(result)!r}, {{'auc': 2.0}})")
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(result.read_text()) == {"auc": 2.0} and temporaries(result.parent) == []


def test_a_live_writers_temporary_is_never_removed(tmp_path):
    other = tmp_path / "train.npz"
    writer = start_writer(other)
    try:
        live = temporaries(tmp_path)
        write_json(tmp_path / "result.json", {"auc": 3.0})  # a write beside it, as a second run would make
        check_output_folder(tmp_path, "--output_root")
        assert remove_dead_temporaries(tmp_path) == [] and temporaries(tmp_path) == live
    finally:
        writer.kill()
        writer.wait()
    assert remove_dead_temporaries(tmp_path) == live and temporaries(tmp_path) == []


def test_temporaries_of_other_hosts_and_other_programs_are_left_alone(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    foreign = [tmp_path / f".result.json.other-host-{pid}.abcd1234.tmp", tmp_path / "notes.tmp",
               tmp_path / f".result.json.{pid}.tmp"]
    for path in foreign:
        path.write_text("not ours")
    with atomic_path(tmp_path / "result.json") as tmp:
        assert f"-{os.getpid()}." in tmp.name and tmp.name.startswith(".result.json.")
        tmp.write_text("{}")
    assert sorted(path for path in tmp_path.iterdir() if path.name != "result.json") == sorted(foreign)
