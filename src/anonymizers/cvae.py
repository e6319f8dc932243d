"""Conditional VAE release: samples of a CVAE trained on the real embeddings (src.cvae),
as many per class as the real training set has. Also the paper's online variant, where
the probe gets fresh samples every epoch (probing_noise_cvae.py)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from src.anonymizers.base import Anonymizer, Release, ReleaseInputs
from src.defaults import ONLINE_FACTOR, SAMPLING_VARIANCE
from src.options import check_options, option

NUMBER = r"\d+(?:\.\d*)?(?:e[+-]?\d+)?"  # a non-negative float as f"{value:g}" writes it


@dataclass(frozen=True)
class CVAERelease:
    variance: float = option(SAMPLING_VARIANCE, "sampling scale: z = variance * N(0, I), as the reference "
                             "(it scales the std); named in the release when not 1", picks_release=True, above=0)
    reference_objective: bool = option(False, "train with the reference's (incorrect) reparameterisation and KL",
                                       picks_release=True)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class CVAEMaking:
    max_epochs: int = option(1000, "CVAE epoch limit (early stopping on val usually ends sooner)",
                             flags=("--max_epochs", "--cvae_max_epochs"), minimum=1)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class CVAEOnline:
    online_factor: int = option(ONLINE_FACTOR, "online samples per probe epoch, as a multiple of N", minimum=1)

    def __post_init__(self) -> None:
        check_options(self)


class CVAEAnonymizer(Anonymizer):
    name = "cvae"
    Release = CVAERelease
    Making = CVAEMaking
    Online = CVAEOnline
    seeded = True
    needs_val = True
    flag_pattern = rf"cvae(?P<online>-online)?(?:-v(?P<variance>{NUMBER}))?(?P<ref>-ref)?"

    def flag(self, release: CVAERelease, online: bool = False) -> str:
        """cvae[-v<variance>][-ref]; online: cvae-online-v<variance>[-ref] (the variance always named)."""
        variance = f"-v{release.variance:g}" if online or release.variance != SAMPLING_VARIANCE else ""
        return f"cvae{'-online' if online else ''}{variance}{'-ref' if release.reference_objective else ''}"

    def release_from_flag(self, groups: dict[str, str]) -> CVAERelease:
        variance = float(groups["variance"]) if groups["variance"] is not None else SAMPLING_VARIANCE
        return CVAERelease(variance=variance, reference_objective=groups["ref"] is not None)

    def column_label(self, flag: str) -> str:
        """The online CVAE at the paper's variance 1 is the column `cvae-online`."""
        release = self.parse_flag(flag)
        if self.is_online(flag) and release.variance == SAMPLING_VARIANCE:
            return flag.replace(f"-v{SAMPLING_VARIANCE:g}", "", 1)
        return flag

    def column_order(self, flag: str) -> tuple:
        release = self.parse_flag(flag)
        return (self.is_online(flag), release.reference_objective, release.variance)

    def is_online(self, flag: str) -> bool:
        match = re.fullmatch(self.flag_pattern, flag)
        return match is not None and match["online"] is not None

    def make(self, inputs: ReleaseInputs, release: CVAERelease, making: CVAEMaking, seed: int,
             device: Any) -> Release:
        from src.cvae import generate_offline  # torch: imported when a release is made

        bundle = self.trained_model(inputs, release, making, seed, device)
        embeddings, labels = generate_offline(bundle, inputs.train_y, release.variance, seed)
        return Release(embeddings, labels, {"checkpoint": str(bundle.checkpoint), "best_epoch": bundle.best_epoch,
                                            "epochs_run": len(bundle.history["val_loss"])})

    def trained_model(self, inputs: ReleaseInputs, release: CVAERelease, making: CVAEMaking, seed: int,
                      device: Any) -> Any:
        """The CVAE for these data and settings: its checkpoint if there is one, else trained and saved."""
        from src.cvae import CVAEConfig, load_or_train_cvae

        config = CVAEConfig(max_epochs=making.max_epochs, reference_objective=release.reference_objective)
        return load_or_train_cvae(inputs.checkpoint_dir, inputs.train_x, inputs.train_y, inputs.val_x, inputs.val_y,
                                  inputs.num_classes, config, device, seed)

    def sampler(self, inputs: ReleaseInputs, release: CVAERelease, making: CVAEMaking, online: CVAEOnline,
                seed: int, device: Any) -> tuple[Any, dict]:
        """`epoch -> (x, y)`, online_factor x N fresh samples per epoch, and what identifies it for a checkpoint."""
        from src.cvae import OnlineSampler

        bundle = self.trained_model(inputs, release, making, seed, device)
        sampler = OnlineSampler(bundle, inputs.train_y, factor=online.online_factor, variance=release.variance,
                                seed=seed, device=device)
        return sampler, {"cvae": bundle.checkpoint.stem, "variance": release.variance,
                         "online_factor": online.online_factor}
