"""Typed settings of every stage: one frozen dataclass each, every value checked once here.

Scripts build them from their flags (`src.options.from_args`), the library takes them,
outputs record `src.options.settings_record(settings)`, and the sweep builds the same
record from a point's command line to decide whether an output is current.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.anonymizers import ANONYMIZERS, get_anonymizer, no_online_mode
from src.defaults import DEFAULT_ROOTS, PAPER_BACKBONE
from src.cli import SEED_LIMIT, UserError
from src.options import Settings, option

NOISE_UNITS = ("released", "real")  # test noise in the released set's z-units (the reference) or the real train's
DEVICES = "auto (CUDA, else MPS, else CPU), cpu, mps, cuda or cuda:N"


def device_option() -> Any:
    """The --device flag every stage and the sweep take: torch resolves it (src.runtime.resolve_device)."""
    return option("auto", DEVICES, changes_results=False, pattern=(r"auto|cpu|mps|cuda(?::[0-9]+)?", f"give {DEVICES}"))


def nested(factory: type | None = None) -> Any:
    """A field holding another settings object (an anonymizer's, the probe's), flattened into records; None
    where the stage has no such part, or the `factory` class's defaults."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"nested": True})
    return dataclasses.field(default=None, metadata={"nested": True})


@dataclass(frozen=True)
class StageSettings(Settings):
    """What every stage after create_db reads: which databases, seed, device and folders."""

    dataset: str = option(None, "registry name, e.g. breastmnist, digits, imagefolder:PATH", kind=str, required=True)
    backbone: str = option(PAPER_BACKBONE, "timm name of the backbone that made the databases")
    seed: int = option(42, "seed of everything random in the run", minimum=0, maximum=SEED_LIMIT - 1)
    device: str = device_option()
    database_root: Path = option(DEFAULT_ROOTS["database_root"], "where the databases are", changes_results=False)
    ckpt_root: Path = option(DEFAULT_ROOTS["ckpt_root"], "where trained models are cached", changes_results=False)

    def __post_init__(self) -> None:
        if not self.dataset:
            raise UserError("--dataset is empty; name a dataset")
        super().__post_init__()


@dataclass(frozen=True)
class CreateDbSettings(Settings):
    dataset: str = option(None, "registry name, e.g. breastmnist, digits, imagefolder:PATH", kind=str, required=True)
    backbone: str = option(PAPER_BACKBONE, "any timm model name")
    weights: Path | None = option(None, ".safetensors or .pth state dict (offline)", kind=Path)
    random_init: bool = option(False, "no pretrained weights (tests, baselines)")
    img_size: int | None = option(None, "input size (default: the backbone's)", kind=int, minimum=1)
    size: int = option(224, "MedMNIST+ image size on disk", minimum=1)
    batch_size: int = option(128, "images per forward pass", changes_results=False, minimum=1)
    num_workers: int = option(min(8, os.cpu_count() or 1), "image-decoding worker processes", changes_results=False,
                             minimum=0)
    device: str = device_option()
    seed: int = option(42, "seed (names a random initialisation)", minimum=0, maximum=SEED_LIMIT - 1)
    dataset_root: Path = option(DEFAULT_ROOTS["dataset_root"], "where the datasets are", changes_results=False)
    database_root: Path = option(DEFAULT_ROOTS["database_root"], "where the databases go", changes_results=False)
    download: bool = option(False, "fetch missing data where the source allows", changes_results=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weights is not None and not Path(self.weights).is_file():
            raise UserError(f"--weights {self.weights} does not exist; give a .safetensors or .pth state dict")


@dataclass(frozen=True)
class AnonymizeSettings(StageSettings):
    anonymizer: str = option(None, "how to make the release", kind=str, required=True,
                             choices=[name for name, a in ANONYMIZERS.items() if a.makes_releases])
    release: Any = nested()  # the anonymizer's Release settings
    making: Any = nested()  # the anonymizer's Making settings

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_anonymizer_settings(self.anonymizer, release=self.release, making=self.making)


@dataclass(frozen=True)
class ProbeTraining(Settings):
    """How the linear probe trains (src.probe.train_probe takes this): the reference's -l, -e and -b. Its
    fixed hyperparameters (no weight decay, the plateau and early-stopping patience) live in src.probe."""

    lr: float = option(1e-3, "probe learning rate (Adam)", flags=("-l", "--lr"), above=0)
    epochs: int = option(100, "maximum probe epochs (early stopping may end sooner)", flags=("-e", "--epochs"),
                        minimum=1)
    batch_size: int = option(128, "probe batch size", flags=("-b", "--batch_size"), minimum=1)


@dataclass(frozen=True)
class ProbeSettings(StageSettings):
    """probing.py (sigma 0 only), probing_noise.py and, with `online` set, probing_noise_cvae.py."""

    output_root: Path = option(DEFAULT_ROOTS["output_root"], "where result files go", changes_results=False)
    training: ProbeTraining = nested(ProbeTraining)
    anonymizer: str = option("identity", "which released training set to probe", choices=list(ANONYMIZERS))
    sigma: tuple[float, ...] = option([0.0], "std of the Gaussian test noise; one or several", kind=float,
                                     nargs="+", minimum=0)
    noise_units: tuple[str, ...] = option(["released"], "units of the test noise: the released set's z-units (the "
                                          "reference's offline scripts) or the real train set's; one or both",
                                          nargs="+", choices=NOISE_UNITS)
    release: Any = nested()  # the anonymizer's Release settings: which release to probe
    making: Any = nested()  # online only: how the generator is trained
    online: Any = nested()  # online only: the anonymizer's online settings (samples per epoch)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(set(self.noise_units)) != len(self.noise_units) or not self.noise_units:
            raise UserError(f"--noise_units {' '.join(self.noise_units)}: name each of {', '.join(NOISE_UNITS)} "
                            "at most once")
        _check_anonymizer_settings(self.anonymizer, release=self.release,
                                   making=self.making if self.online is not None else None)


@dataclass(frozen=True)
class AttackSettings(StageSettings):
    """python -m src.attack: membership inference on a release the stage makes from a drawn private set."""

    output_root: Path = option(DEFAULT_ROOTS["output_root"], "where result files go", changes_results=False)
    anonymizer: str = option("identity", "the anonymizer attacked", choices=list(ANONYMIZERS))
    targets: int = option(200, "target records (even; half are members of the attacked release)", minimum=2)
    shadows: int = option(8, "shadow releases shared across targets (even; each target IN for half)", minimum=2)
    jobs: int = option(1, "shadow releases made at once, one process each", changes_results=False, minimum=1)
    online: bool = option(False, "attack the online mode's release, the trained model it ships (the CVAE's encoder "
                          "and decoder), by each target's loss under it, instead of an offline release")
    release: Any = nested()  # the anonymizer's Release settings
    making: Any = nested()  # the anonymizer's Making settings

    def __post_init__(self) -> None:
        super().__post_init__()
        for flag, value in (("--targets", self.targets), ("--shadows", self.shadows)):
            if value % 2:
                raise UserError(f"{flag} {value}: give an even number, so that exactly half are members")
        if self.online and get_anonymizer(self.anonymizer).Online is None:
            raise UserError(f"--online: {no_online_mode(self.anonymizer)}, or drop --online")
        _check_anonymizer_settings(self.anonymizer, release=self.release, making=self.making)


def _check_anonymizer_settings(name: str, **parts: Any) -> None:
    """Nested settings must be the named anonymizer's own classes (a programming error otherwise)."""
    anonymizer = get_anonymizer(name)
    for part, value in parts.items():
        expected = getattr(anonymizer, part.capitalize())
        if value is not None and not isinstance(value, expected):
            raise TypeError(f"{part} settings of {name} must be {expected.__name__}, got {type(value).__name__}")
