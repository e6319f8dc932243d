"""Defaults every stage shares, stated once: the paper's backbone, the asset folders and the
reference's CVAE sampling settings."""
from __future__ import annotations

from pathlib import Path

# The paper's backbone: every stage's default --backbone, and so the default database folder name.
PAPER_BACKBONE = "vit_base_patch14_dinov2.lvd142m"
# Where the stages read and write by default (each has a --<name> flag), relative to the repo root.
DEFAULT_ROOTS = {"dataset_root": Path("assets/data"), "database_root": Path("assets/database"),
                 "ckpt_root": Path("assets/ckpts"), "output_root": Path("assets/logs")}
# The reference's sampling scale (--variance, which multiplies the std of z) and online
# samples per epoch as a multiple of N.
SAMPLING_VARIANCE = 1.0
ONLINE_FACTOR = 10
# The DP-CVAE's defaults (src/dp_cvae.py), read by its flags.
DEFAULT_MAX_GRAD_NORM = 1.0
DEFAULT_DP_EPOCHS = 100  # on a 1,000-record mixture: probe AUROC rose from 20 to 100 epochs, flat to 200
# Public clipping range of every embedding feature, chosen without looking at any data: a guess for
# layer-normalised ViT features (most values within a few units of 0), not yet checked against the
# paper backbone's embeddings. It affects utility only (privacy rests on gradient clipping): too narrow
# clips features, too wide coarsens the decoder's resolution. Pick it from public data (e.g. a public
# image set embedded with the same backbone), never from the private training set.
DEFAULT_DP_BOUNDS = (-10.0, 10.0)
DEFAULT_COUNT_SHARE = 0.1
