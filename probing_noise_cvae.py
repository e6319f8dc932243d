"""Linear probe trained on CVAE samples drawn afresh every epoch ("online"), evaluated on
the real test split with Gaussian noise N(0, sigma^2) added to the z-scored test embeddings.

Trains the CVAE on the real train split (early stopping on val) or reuses its checkpoint
(the same one anonymize.py uses), then feeds the probe online_factor x N new samples per
epoch, generated in batches on the device. Writes one file per sigma:
<output_root>/<dataset>/<dataset>_cvae-online-v<variance>-s<seed>_sigma-<sigma>.json
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from src.cvae import ONLINE_FACTOR, SAMPLING_VARIANCE, CVAEConfig, OnlineSampler, load_or_train_cvae
from src.evaluation import (add_common_arguments, add_sigma_argument, checked_sigmas, load_probe_data,
                            noisy_test_metrics, probe_config, released_privacy, result_record, write_noise_results)
from src.cli import ArgumentParser, UserError, run_cli
from src.io import array_fingerprint, database_dir
from src.probe import probe_checkpoint_path, train_probe, zscore, zscore_stats
from src.runtime import resolve_device, seed_everything


def parse_args() -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    add_sigma_argument(parser)
    parser.add_argument("--variance", type=float, default=SAMPLING_VARIANCE,
                        help="sampling scale: z = variance * N(0, I), as the reference (it scales the std)")
    parser.add_argument("--online_factor", type=int, default=ONLINE_FACTOR, help="samples per epoch, as a multiple of N")
    parser.add_argument("--reference_objective", action="store_true",
                        help="CVAE trained with the reference's (incorrect) reparameterisation and KL")
    parser.add_argument("--cvae_max_epochs", type=int, default=CVAEConfig.max_epochs)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    sigmas = checked_sigmas(args.sigma)
    config = probe_config(args)
    if not (np.isfinite(args.variance) and args.variance > 0) or args.online_factor < 1 or args.cvae_max_epochs < 1:
        raise UserError("--variance must be positive, --online_factor and --cvae_max_epochs at least 1")
    device = resolve_device(args.device)
    seed_everything(args.seed)
    data = load_probe_data(args.database_root, args.dataset, args.backbone)

    cvae_config = CVAEConfig(max_epochs=args.cvae_max_epochs, reference_objective=args.reference_objective)
    ckpt_dir = database_dir(args.ckpt_root, args.dataset, args.backbone)
    bundle = load_or_train_cvae(ckpt_dir, data.train_x, data.train_y, data.val_x, data.val_y, data.num_classes,
                                cvae_config, device, args.seed)
    sampler = OnlineSampler(bundle, data.train_y, factor=args.online_factor, variance=args.variance,
                            seed=args.seed, device=device)

    # The first epoch's samples fix the z-score statistics (no real train statistics leak
    # into the probe) and stand for the released data in the privacy metrics.
    first_x, first_y = (t.cpu().numpy() for t in sampler(0))
    mean, std = zscore_stats(first_x)
    mean_t, std_t = torch.from_numpy(mean).to(device), torch.from_numpy(std).to(device)

    def zscored_samples(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = sampler(epoch)
        return x.sub_(mean_t).div_(std_t), y  # in place: an epoch's samples are fresh, and 10 x N of them is large

    val_x, test_x = (torch.from_numpy(zscore(x, mean, std)).to(device) for x in (data.val_x, data.test_x))
    key = {"cvae": bundle.checkpoint.stem, "variance": args.variance,
           "online_factor": args.online_factor, "val": array_fingerprint(data.val_x, data.val_y)}
    probe_ckpt = probe_checkpoint_path(ckpt_dir / "probe", config, args.seed, data.num_classes, key)
    model, history = train_probe(zscored_samples, val_x, torch.from_numpy(data.val_y), data.num_classes,
                                 config, device, args.seed, probe_ckpt)

    utility = noisy_test_metrics(model, test_x, data.test_y, sigmas, args.seed)
    privacy = released_privacy(first_x, data.train_x, data.test_x, device)
    released = dataclasses.replace(data, released_x=first_x, released_y=first_y)
    flag = f"cvae-online-v{args.variance:g}"
    write_noise_results(args, flag, {sigma: result_record(utility[sigma], privacy, sigma, args, released, history,
                                                             device)
                                     for sigma in sigmas})


if __name__ == "__main__":
    run_cli(main)
