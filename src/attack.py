"""Membership-inference stage: attack a release made with the same anonymizer as anonymize.py.

    python -m src.attack --dataset D --backbone B --anonymizer ksame --k 5 [--shadows 8] [--jobs 2]
    -> <output_root>/attack/<dataset>/<dataset>_<flag>-s<seed>.json

The real train and test splits are the records. Targets are drawn from them, half made members of a
private training set (with a filler the attacker never sees); the anonymizer makes the attacked
release from it with --seed, exactly as anonymize.py would from those records. The attacker trains
--shadows shadow releases (the same anonymizer, seeds --seed + 1 ...), each on its auxiliary pool
and a balanced half of the targets, and runs the attacks of src.mia. The threat model and the
attacks are in src/mia.py and docs/attacks.md.

    python -m src.attack --dataset D --backbone B --anonymizer cvae --online
    -> <output_root>/attack/<dataset>/<dataset>_cvae-online-v1-s<seed>.json

With --online the release is the model the anonymizer's online mode ships (the CVAE's encoder and
decoder, probing_noise_cvae.py): the attacked model and the shadows are trained as that mode trains
them, and targets are scored by their loss under each model.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from src.anonymizers import MAKING, add_anonymizer_options, anonymizer_settings, get_anonymizer
from src.cli import ArgumentParser, UserError, run_cli
from src.options import add_options, from_args
from src.settings import AttackSettings

# The attacker's noise for a model's per-record loss: one draw for the attacked model and every shadow, so
# that their losses differ by their weights alone (and never the release's own seed, which it does not know).
LOSS_NOISE_SEED = 0


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, AttackSettings)
    add_anonymizer_options(parser, MAKING)
    return parser


def parse_settings(argv: list[str] | None = None) -> AttackSettings:
    args = build_parser().parse_args(argv)
    anonymizer = get_anonymizer(args.anonymizer)
    for name in anonymizer.sampling_settings if args.online else ():
        if hasattr(args, name):  # given: with given_only, argparse records only the flags on the command line
            raise UserError(f"--{name} does not apply to --online: it says how the model is sampled, and the "
                            "attack scores the trained model itself; drop it")
    return from_args(AttackSettings, args, **anonymizer_settings(anonymizer, args, MAKING))


def result_path(settings: AttackSettings) -> Path:
    anonymizer = get_anonymizer(settings.anonymizer)
    from src.naming import dataset_dirname

    flag = anonymizer.flag(settings.release, online=settings.online)
    name = f"{dataset_dirname(settings.dataset)}_{flag}-s{settings.seed}.json"
    return Path(settings.output_root) / "attack" / dataset_dirname(settings.dataset) / name


def outputs(settings: AttackSettings) -> list[Path]:
    return [result_path(settings)]


def _release_inputs(inputs: dict, rows: np.ndarray) -> Any:
    """What the anonymizer makes a release from when the train split holds exactly records[rows]."""
    from src.anonymizers.base import ReleaseInputs

    return ReleaseInputs(inputs["records_x"][rows], inputs["records_y"][rows], inputs["val_x"], inputs["val_y"],
                         inputs["num_classes"], inputs["checkpoint_dir"], inputs["classes_declared"])


def release_from_rows(settings: AttackSettings, inputs: Any, rows: np.ndarray, seed: int, device: Any) -> Any:
    """The anonymizer's release of records[rows] with `seed` (the identity releases them as they are):
    the same call anonymize.py makes on a train split holding exactly these rows."""
    from src.anonymizers.base import Release

    anonymizer = get_anonymizer(settings.anonymizer)
    if not anonymizer.makes_releases:
        return Release(inputs["records_x"][rows], inputs["records_y"][rows])
    return anonymizer.make(_release_inputs(inputs, rows), settings.release, settings.making, seed, device)


def model_from_rows(settings: AttackSettings, inputs: dict, rows: np.ndarray, seed: int,
                    device: Any) -> tuple[Any, dict]:
    """The model the online mode ships when trained on records[rows] with `seed` (the call
    probing_noise_cvae.py makes), and what results record about its training."""
    model, _, details = get_anonymizer(settings.anonymizer).trained_model(
        _release_inputs(inputs, rows), settings.release, settings.making, seed, device)
    return model, details


def target_losses(settings: AttackSettings, inputs: dict, model: Any, targets: np.ndarray) -> np.ndarray:
    """The targets' losses under a released model, with the attacker's fixed noise."""
    return get_anonymizer(settings.anonymizer).model_losses(model, inputs["records_x"][targets],
                                                            inputs["records_y"][targets], LOSS_NOISE_SEED)


def observed(settings: AttackSettings, inputs: dict, rows: np.ndarray, seed: int, targets: np.ndarray,
             device: Any) -> tuple[np.ndarray, dict]:
    """What the attacker sees of the anonymizer's output on records[rows]: the released embeddings, or with
    --online the targets' losses under the released model (computed where it was trained); and what the
    release records about its making (its DP accounting)."""
    if settings.online:
        model, details = model_from_rows(settings, inputs, rows, seed, device)
        return target_losses(settings, inputs, model, targets), details
    release = release_from_rows(settings, inputs, rows, seed, device)
    return release.embeddings, release.details


def _shadow(job: tuple[AttackSettings, dict, np.ndarray, int, np.ndarray]) -> np.ndarray:
    """What the attacker sees of one shadow: an independent unit for a worker process (one CPU thread)."""
    from src.runtime import one_cpu_thread, resolve_device, seed_everything

    settings, inputs, rows, seed, targets = job
    seed_everything(seed)
    with one_cpu_thread():
        return observed(settings, inputs, rows, seed, targets, resolve_device(settings.device))[0]


def shadow_observations(settings: AttackSettings, inputs: dict, split: Any) -> Iterator[np.ndarray]:
    """The shadows' `observed` outputs in order; with --jobs above 1, made in that many processes."""
    from tqdm import tqdm

    jobs = [(settings, inputs, split.shadow_rows(s), settings.seed + 1 + s, split.targets)
            for s in range(settings.shadows)]
    bar = dict(total=len(jobs), desc="shadow models" if settings.online else "shadow releases", unit="shadow")
    if settings.jobs == 1:
        yield from tqdm(map(_shadow, jobs), **bar)
        return
    with ProcessPoolExecutor(max_workers=settings.jobs, mp_context=get_context("spawn")) as pool:
        yield from tqdm(pool.map(_shadow, jobs), **bar)


def load_records(settings: AttackSettings) -> tuple[dict, dict[str, str]]:
    """The real records (train then test), val for model selection, and their fingerprints."""
    from src.io import declared_classes, file_fingerprint, load_database
    from src.naming import create_db_command, database_dir, database_paths

    paths = database_paths(settings.database_root, settings.dataset, settings.backbone)
    databases = {split: load_database(paths[split], create_db_command(settings)) for split in ("train", "test", "val")}
    loaded = {split: (x, y) for split, (x, y, _) in databases.items()}
    dims = {split: x.shape[1] for split, (x, _) in loaded.items()}
    if len(set(dims.values())) != 1:
        raise UserError(f"the splits in {paths['train'].parent} differ in dimension ({dims}); recreate them with "
                        "one backbone")
    records_x = np.concatenate([loaded["train"][0], loaded["test"][0]])
    records_y = np.concatenate([loaded["train"][1], loaded["test"][1]])
    if settings.targets + 4 > len(records_x):
        raise UserError(f"--targets {settings.targets}: the train and test splits hold {len(records_x)} records; "
                        "choose fewer targets")
    train_meta = databases["train"][2]
    inputs = {"records_x": records_x, "records_y": records_y, "val_x": loaded["val"][0], "val_y": loaded["val"][1],
              "num_classes": declared_classes(train_meta, paths["train"], *(y for _, y in loaded.values())),
              "classes_declared": "class_names" in train_meta,
              "checkpoint_dir": database_dir(settings.ckpt_root, settings.dataset, settings.backbone) / "attack"}
    return inputs, {str(paths[split]): file_fingerprint(paths[split]) for split in loaded}


def attack_release(settings: AttackSettings) -> dict:
    """Make the attacked release and its shadows, run every attack; the result record (not written)."""
    from src.io import provenance
    from src.mia import draw_split, run_attack, run_model_attack
    from src.options import settings_record
    from src.runtime import resolve_device, seed_everything

    device = resolve_device(settings.device)
    inputs, fingerprints = load_records(settings)
    split = draw_split(len(inputs["records_x"]), settings.targets, settings.shadows, settings.seed)
    seed_everything(settings.seed)
    start = time.perf_counter()
    shadows = partial(shadow_observations, settings, inputs, split)  # made when the attack asks for them
    observation, details = observed(settings, inputs, split.private_rows(), settings.seed, split.targets, device)
    dp = details.get("dp", {})
    run = run_model_attack if settings.online else run_attack
    outcome = run(inputs["records_x"], split, observation, shadows, device, settings.seed, float(dp.get("delta", 0.0)))
    flag = get_anonymizer(settings.anonymizer).flag(settings.release, online=settings.online)
    return {"stage": "attack", "settings": settings_record(settings), "inputs": fingerprints,
            "flag": flag, "spent_epsilon": dp.get("spent_epsilon"),
            "attacks": outcome["attacks"], "audit": outcome["audit"],
            "scores": {name: values.tolist() for name, values in outcome["scores"].items()},
            "members": outcome["members"].tolist(), "exposed": outcome["exposed"].tolist(),
            "elapsed_s": round(time.perf_counter() - start, 3), "device": str(device), **provenance()}


def main() -> None:
    settings = parse_settings()
    from src.io import check_output_folder, write_json

    check_output_folder(settings.output_root, "--output_root")
    result = attack_release(settings)
    path = result_path(settings)
    write_json(path, result)
    best = max(result["attacks"], key=lambda name: result["attacks"][name]["all"]["tpr_at_fpr_0.01"])
    summary = result["attacks"][best]["all"]
    print(f"wrote {path}: best {best} AUC {summary['auc']:.1f}, TPR@1%FPR {summary['tpr_at_fpr_0.01']:.1f} %, "
          f"epsilon >= {result['audit']['epsilon_lower_bound']:.2f}")


if __name__ == "__main__":
    run_cli(main)
