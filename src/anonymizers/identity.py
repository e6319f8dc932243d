"""The real training set itself, released as it is: the baseline every table starts with."""
from __future__ import annotations

from typing import Any

from src.anonymizers.base import Anonymizer


class Identity(Anonymizer):
    name = "identity"
    name_format = "identity"
    makes_releases = False

    def release_name(self, release: Any, seed: int) -> str:
        return "train.npz"  # the real training database written by create_db.py
