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
