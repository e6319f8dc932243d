"""Conditional VAE release: samples of a CVAE trained on the real embeddings (src.cvae),
as many per class as the real training set has. Also the paper's online variant, where
the probe gets fresh samples every epoch (probing_noise_cvae.py), and, with --dp_epsilon,
a differentially private CVAE (src.dp_cvae) whose release carries its spent budget."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from src.anonymizers.base import Anonymizer, Release, ReleaseInputs
from src.cli import UserError
from src.defaults import (DEFAULT_COUNT_SHARE, DEFAULT_DP_BOUNDS, DEFAULT_DP_EPOCHS, DEFAULT_MAX_GRAD_NORM,
                          ONLINE_FACTOR, SAMPLING_VARIANCE)
from src.options import check_options, option



@dataclass(frozen=True)
class CVAERelease:
    variance: float = option(SAMPLING_VARIANCE, "sampling scale: z = variance * N(0, I), as the reference "
                             "(it scales the std); named in the release when not 1", above=0)
    reference_objective: bool = option(False, "train with the reference's (incorrect) reparameterisation and KL")
    dp_epsilon: float | None = option(None, "train with DP-SGD to this (epsilon, delta) budget; needs opacus",
                                      kind=float, above=0)

    def __post_init__(self) -> None:
        check_options(self)
        if self.dp_epsilon is not None and self.reference_objective:
            raise UserError("--reference_objective cannot be combined with --dp_epsilon: DP training uses the "
                            "correct ELBO only; drop one of the two flags")


@dataclass(frozen=True)
class CVAEMaking:
    max_epochs: int = option(1000, "CVAE epoch limit (early stopping on val usually ends sooner)",
                             flags=("--max_epochs", "--cvae_max_epochs"), minimum=1)
    dp_delta: float | None = option(None, "DP delta (default: 1/N rounded down to a power of ten)", kind=float)
    max_grad_norm: float = option(DEFAULT_MAX_GRAD_NORM, "DP: per-record gradient clipping norm C")
    dp_epochs: int = option(DEFAULT_DP_EPOCHS, "DP: epochs trained (no early stopping on private data)")
    dp_bounds: tuple[float, ...] = option(list(DEFAULT_DP_BOUNDS), "DP: public clipping range LOW HIGH of every "
                                          "feature, never taken from the private data", kind=float, nargs=2)
    dp_count_share: float = option(DEFAULT_COUNT_SHARE, "DP: share of epsilon for the class counts (0: uniform)")
    dp_secret_noise: bool = option(False, "DP: draw the noise from OS entropy, not the recorded --seed")

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
    name_format = "cvae[-v{variance}][-ref{reference_objective}][-dp{dp_epsilon}]"

    def make(self, inputs: ReleaseInputs, release: CVAERelease, making: CVAEMaking, seed: int,
             device: Any) -> Release:
        from src.cvae import generate_offline  # torch: imported when a release is made

        bundle, labels, details = self.trained_model(inputs, release, making, seed, device)
        embeddings, labels = generate_offline(bundle, labels, release.variance, seed)
        return Release(embeddings, labels, details)

    def trained_model(self, inputs: ReleaseInputs, release: CVAERelease, making: CVAEMaking, seed: int,
                      device: Any) -> tuple[Any, Any, dict]:
        """The CVAE for these data and settings, the labels whose class counts generation copies, and
        what the release records about its training. Non-DP: the checkpoint if there is one, else
        trained (early stopping on val) and saved. DP: trained with DP-SGD, generation copying its
        privately released class counts, never the training labels."""
        from src.cvae import CVAEConfig, evaluate_loss, load_or_train_cvae

        config = CVAEConfig(max_epochs=making.max_epochs, reference_objective=release.reference_objective)
        if release.dp_epsilon is None:
            bundle = load_or_train_cvae(inputs.checkpoint_dir, inputs.train_x, inputs.train_y, inputs.val_x,
                                        inputs.val_y, inputs.num_classes, config, device, seed)
            return bundle, inputs.train_y, {"checkpoint": str(bundle.checkpoint), "best_epoch": bundle.best_epoch,
                                            "epochs_run": len(bundle.history["val_loss"])}
        from src.dp_cvae import DPSettings, released_labels, train_cvae_dp

        dp = DPSettings(epsilon=release.dp_epsilon, delta=making.dp_delta, max_grad_norm=making.max_grad_norm,
                        epochs=making.dp_epochs, bounds=tuple(making.dp_bounds), count_share=making.dp_count_share,
                        secret_noise=making.dp_secret_noise)
        bundle, accounting = train_cvae_dp(inputs.train_x, inputs.train_y, inputs.num_classes, config, dp, device,
                                           seed)
        # the val split only after training, for reporting (clipped to the public bounds, as training data)
        val_x = inputs.val_x.clip(*dp.bounds)
        accounting["val_loss_after_training"] = evaluate_loss(bundle, val_x, inputs.val_y, seed)
        return bundle, released_labels(accounting["class_counts"]), {"dp": accounting}

    def sampler(self, inputs: ReleaseInputs, release: CVAERelease, making: CVAEMaking, online: CVAEOnline,
                seed: int, device: Any) -> tuple[Any, dict, dict]:
        """`epoch -> (x, y)`, online_factor x N fresh samples per epoch; what identifies it for a checkpoint;
        and what results record about its training (the DP accounting)."""
        from src.cvae import OnlineSampler

        bundle, labels, details = self.trained_model(inputs, release, making, seed, device)
        sampler = OnlineSampler(bundle, labels, factor=online.online_factor, variance=release.variance,
                                seed=seed, device=device)
        trained = details["dp"] if "dp" in details else bundle.checkpoint.stem
        key = {"cvae": trained, "variance": release.variance, "online_factor": online.online_factor}
        return sampler, key, {"dp": details["dp"]} if "dp" in details else {}
