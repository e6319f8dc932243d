"""Conditional VAE release: samples of a CVAE trained on the real embeddings (src.cvae),
as many per class as the real training set has. Also the paper's online variant, where
the probe gets fresh samples every epoch (probing_noise_cvae.py), and, with --dp_epsilon,
a differentially private CVAE (src.dp_cvae) whose release carries its spent budget."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from src.anonymizers.base import PRIVATE, Anonymizer, Release, ReleaseInputs
from src.cli import UserError
from src.defaults import ONLINE_FACTOR, SAMPLING_VARIANCE
from src.options import Settings, option



@dataclass(frozen=True)
class CVAERelease(Settings):
    variance: float = option(SAMPLING_VARIANCE, "sampling scale: z = variance * N(0, I), as the reference "
                             "(it scales the std); named in the release when not 1", above=0)
    reference_objective: bool = option(False, "train with the reference's (incorrect) reparameterisation and KL")
    dp_epsilon: float | None = option(None, "train with DP-SGD to this (epsilon, delta) budget; needs opacus",
                                      kind=float, above=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dp_epsilon is not None and self.reference_objective:
            raise UserError("--reference_objective cannot be combined with --dp_epsilon: DP training uses the "
                            "correct ELBO only; drop one of the two flags")


@dataclass(frozen=True)
class CVAEMaking(Settings):
    # The reference's hyperparameters; the library (src.cvae, src.dp_cvae) reads them from here.
    max_epochs: int = option(1000, "CVAE epoch limit (early stopping on val usually ends sooner)",
                             flags=("--max_epochs", "--cvae_max_epochs"), minimum=1)
    cvae_lr: float = option(1e-3, "CVAE: Adam learning rate", above=0)
    cvae_batch_size: int = option(512, "CVAE: batch size (DP: the expected batch of Poisson sampling)", minimum=1)
    cvae_patience: int = option(15, "CVAE: epochs without a better val loss before early stopping", minimum=1)
    cvae_beta: float = option(0.1, "CVAE: weight of the KL term in the loss", minimum=0)
    cvae_hidden_dim: int = option(256, "CVAE: width of the encoder's and decoder's hidden layer", minimum=1)
    cvae_latent_dim: int = option(50, "CVAE: dimension of the latent z", minimum=1)
    dp_delta: float | None = option(None, "DP delta (default: 1 / (10 N+) rounded down to a power of ten, N+ a high "
                                    "bound on N from the noisy class counts)", kind=float, above=0, maximum=0.1)
    max_grad_norm: float = option(1.0, "DP: per-record gradient clipping norm C", above=0)
    # on a 1,000-record mixture the probe's AUROC rose from 20 to 100 epochs and stayed flat to 200
    dp_epochs: int = option(100, "DP: epochs trained (no early stopping on private data)", minimum=1)
    # Chosen without looking at any data, for layer-normalised ViT features (most values within a few units of
    # 0); the demo's DINOv2-S digits lie within [-7.1, 7.4]. It affects utility only (privacy rests on gradient
    # clipping): too narrow clips features, too wide coarsens the decoder. Pick it from public data, never from
    # the private training set.
    dp_bounds: tuple[float, ...] = option([-10.0, 10.0], "DP: public clipping range LOW HIGH of every "
                                          "feature, never taken from the private data", kind=float, nargs=2)
    dp_count_share: float = option(0.1, "DP: share of epsilon for the noisy class counts, which "
                                   "also stand in for N", above=0, maximum=0.9)
    dp_seeded_noise_not_private: bool = option(False, "DP: seed the privacy noise from --seed, for reproducible "
                                               "runs; anyone who knows the seed can undo it, so NOT PRIVATE")

    def __post_init__(self) -> None:
        super().__post_init__()
        low, high = self.dp_bounds
        if not low < high:
            raise UserError(f"--dp_bounds {low:g} {high:g}: give LOW below HIGH")


@dataclass(frozen=True)
class CVAEOnline(Settings):
    online_factor: int = option(ONLINE_FACTOR, "online samples per probe epoch, as a multiple of N", minimum=1)


class CVAEAnonymizer(Anonymizer):
    name = "cvae"
    Release = CVAERelease
    Making = CVAEMaking
    Online = CVAEOnline
    seeded = True
    needs_val = True
    name_format = "cvae[-v{variance}][-ref{reference_objective}][-dp{dp_epsilon}]"
    sampling_settings = ("variance",)

    def make(self, inputs: ReleaseInputs, release: CVAERelease, making: CVAEMaking, seed: int,
             device: Any) -> Release:
        from src.cvae import generate_offline  # torch: imported when a release is made

        bundle, labels, details = self.trained_model(inputs, release, making, seed, device)
        embeddings, labels = generate_offline(bundle, labels, release.variance, seed)
        return Release(embeddings, labels, {key: value for key, value in details.items() if key != PRIVATE},
                       private=details.get(PRIVATE, {}))

    def trained_model(self, inputs: ReleaseInputs, release: CVAERelease, making: CVAEMaking, seed: int,
                      device: Any) -> tuple[Any, Any, dict]:
        """The CVAE for these data and settings, the labels whose class counts generation copies, and
        what the release records about its training. Non-DP: the checkpoint if there is one, else
        trained (early stopping on val) and saved. DP: trained with DP-SGD, generation copying its
        privately released class counts, never the training labels."""
        from src.cvae import evaluate_loss, load_or_train_cvae

        if release.dp_epsilon is None:
            bundle = load_or_train_cvae(inputs.checkpoint_dir, inputs.train_x, inputs.train_y, inputs.val_x,
                                        inputs.val_y, inputs.num_classes, release, making, device, seed)
            return bundle, inputs.train_y, {"checkpoint": str(bundle.checkpoint), "best_epoch": bundle.best_epoch,
                                            "epochs_run": len(bundle.history["val_loss"])}
        from src.dp_cvae import released_labels, train_cvae_dp

        if not inputs.classes_declared:  # the labels' largest value would leak a rare class's presence
            raise UserError("a DP release needs the dataset's declared classes, which this training database "
                            "does not record; recreate it with create_db.py")
        bundle, accounting = train_cvae_dp(inputs.train_x, inputs.train_y, inputs.num_classes, release, making,
                                           device, seed)
        # the val split only after training, for the maker's eyes: outside the mechanism, so never released
        val_loss = evaluate_loss(bundle, inputs.val_x.clip(*making.dp_bounds), inputs.val_y, seed)
        return bundle, released_labels(accounting["class_counts"]), {"dp": accounting,
                                                                     PRIVATE: {"val_loss_after_training": val_loss}}

    def model_losses(self, model: Any, x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
        """Each record's loss (squared reconstruction error + beta * KL, one fixed noise draw from `seed`)
        under the CVAE the online mode ships: lower for the records it was trained on."""
        from src.cvae import evaluate_losses

        return evaluate_losses(model, x, y, seed)

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
