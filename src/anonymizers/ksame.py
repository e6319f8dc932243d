"""k-Same: every training vector becomes the mean of its cluster of k (src.ksame has the
reference's exact greedy clustering). Deterministic, so a release needs no seed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from src.anonymizers.base import Anonymizer, Release, ReleaseInputs
from src.cli import UserError
from src.options import Settings, option


@dataclass(frozen=True)
class KSameRelease(Settings):
    k: int | None = option(None, "k-Same cluster size (at least 2)", kind=int, minimum=2)

    def __post_init__(self) -> None:
        if self.k is None:
            raise UserError("--anonymizer ksame needs --k, a cluster size of at least 2")
        super().__post_init__()


class KSame(Anonymizer):
    name = "ksame"
    Release = KSameRelease
    name_format = "ksame-{k}"

    def make(self, inputs: ReleaseInputs, release: KSameRelease, making: Any, seed: int, device: Any) -> Release:
        from src.ksame import ksame  # torch: imported when a release is made, not when flags are read

        embeddings, labels = ksame(inputs.train_x, inputs.train_y, release.k, device)
        return Release(embeddings, labels)
