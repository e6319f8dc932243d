"""What every anonymizer declares, so that the stages, the sweep and the aggregate need
nothing else: its settings (which are its flags), its release and result names, and how
it makes a release.

An anonymizer has two settings classes (frozen dataclasses of `src.options.option`
fields, each checking its values):
- `Release`: what names a release; its values appear in the release file name and the
  result flag, and the probing scripts take these flags to pick the release.
- `Making`: how a release is made (training length, ...); only anonymize.py takes them.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

NUMBER = r"\d+(?:\.\d*)?(?:e[+-]?\d+)?"  # a non-negative float as f"{value:g}" writes it in flags and names


@dataclass(frozen=True)
class NoSettings:
    """For an anonymizer with nothing to set."""


@dataclass
class ReleaseInputs:
    """What a release may be made from: the real train split, and val for model selection."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    num_classes: int
    checkpoint_dir: Path  # where a trained model may be cached


@dataclass
class Release:
    """A released training set and what its metadata should add (checkpoint, accounting, ...)."""

    embeddings: np.ndarray
    labels: np.ndarray
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


class Anonymizer:
    """Base of every anonymizer. A subclass sets `name`, its settings classes, `flag_pattern`,
    and overrides `flag`, `release_from_flag` and `make`."""

    name: ClassVar[str]
    Release: ClassVar[type] = NoSettings
    Making: ClassVar[type] = NoSettings
    Online: ClassVar[type | None] = None  # settings of an online mode (fresh samples each probe epoch), if any
    seeded: ClassVar[bool] = False  # whether a release depends on --seed (and so its name carries it)
    makes_releases: ClassVar[bool] = True  # False for the real set itself
    needs_val: ClassVar[bool] = False  # whether making a release reads the val split
    fits_probe: ClassVar[bool] = False  # True: a probe fitted by the anonymizer itself (`fit_probe`), not trained
    flag_pattern: ClassVar[str]  # regex of `flag(...)`; its named groups are read by `release_from_flag`

    def flag(self, release: Any) -> str:
        """The release's name in result files: `<dataset>_<flag>-s<seed>.json`. No '_' allowed."""
        return self.name

    def release_from_flag(self, groups: dict[str, str]) -> Any:
        """The Release settings that `flag` turned into the matched text."""
        return self.Release()

    def parse_flag(self, flag: str) -> Any | None:
        """The Release settings a result flag names, or None if the flag is not this anonymizer's."""
        match = re.fullmatch(self.flag_pattern, flag)
        return None if match is None else self.release_from_flag(match.groupdict())

    def release_name(self, release: Any, seed: int) -> str:
        """The released set's file name beside the databases: train_<flag>[-s<seed>].npz."""
        return f"train_{self.flag(release)}" + (f"-s{seed}" if self.seeded else "") + ".npz"

    def make(self, inputs: ReleaseInputs, release: Any, making: Any, seed: int, device: Any) -> Release:
        raise NotImplementedError

    def column_label(self, flag: str) -> str:
        """The table column of a result flag."""
        return flag

    def column_order(self, flag: str) -> tuple:
        """Sort key among this anonymizer's columns in tables (registry order comes first)."""
        return tuple(value if isinstance(value, (int, float)) else 0
                     for value in dataclasses.astuple(self.parse_flag(flag)))
