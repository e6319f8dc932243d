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
    num_classes: int  # as the dataset declares them (create_db.py's class names), or the largest label + 1
    checkpoint_dir: Path  # where a trained model may be cached
    classes_declared: bool = False  # whether num_classes comes from the dataset's declared classes


PRIVATE = "private"  # the key of what a maker computed from private data outside any DP mechanism


@dataclass
class Release:
    """A released training set and what its metadata should add (checkpoint, accounting, ...). `private` is
    what the maker learnt from the private data outside a DP mechanism (a validation loss): it goes to the
    release's private sidecar (src.naming.private_sidecar_path), never into the release."""

    embeddings: np.ndarray
    labels: np.ndarray
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    private: dict[str, Any] = dataclasses.field(default_factory=dict)


ONLINE_SUFFIX = "-online"  # after the name in the flag of an online mode: cvae-online-v1
_SEGMENT = re.compile(r"\[(?P<before>[^\[\]{}]*)\{(?P<optional>\w+)\}(?P<after>[^\[\]{}]*)\]|\{(?P<required>\w+)\}")


def _value_text(value: Any) -> str:
    """A setting's value inside a flag: numbers as f"{value:g}" writes them (NUMBER reads them back), a
    switch as nothing (its segment's presence says it is on)."""
    return "" if isinstance(value, bool) else f"{value:g}"


class Anonymizer:
    """Base of every anonymizer. A subclass sets `name`, its settings classes and `name_format`, and
    overrides `make`; its result flag, the flag's pattern, how a flag reads back and its table column
    are all derived from `name_format`."""

    name: ClassVar[str]
    Release: ClassVar[type] = NoSettings
    Making: ClassVar[type] = NoSettings
    # An online mode (fresh samples each probe epoch, probing_noise_cvae.py): its settings, `sampler`, and the
    # model it ships (`trained_model`, `model_losses`, attacked by `python -m src.attack --online`). None: none.
    Online: ClassVar[type | None] = None
    # Release settings that only say how the online mode samples its model: they name the release but leave the
    # trained model, which the attack on a model release scores, unchanged.
    sampling_settings: ClassVar[tuple[str, ...]] = ()
    seeded: ClassVar[bool] = False  # whether a release depends on --seed (and so its name carries it)
    makes_releases: ClassVar[bool] = True  # False for the real set itself
    needs_val: ClassVar[bool] = False  # whether making a release reads the val split
    # The release's name: the anonymizer's name, then literal text, `{field}` for a Release setting always
    # named, `[text{field}text]` for one named only when it is not its default (a switch: when it is on;
    # None: never). "ksame-{k}" gives ksame-5; "cvae[-v{variance}][-ref{reference_objective}]" gives cvae,
    # cvae-v0.5, cvae-ref. No '_' (it separates a result file name's parts).
    name_format: ClassVar[str]
    fits_probe: ClassVar[bool] = False  # True: a probe fitted by the anonymizer itself (`fit_probe`), not trained

    def _segments(self) -> list[tuple[str, str | None, str, bool]]:
        """`name_format` as (text before, field or None, text after, optional) pieces, the name first."""
        if not self.name_format.startswith(self.name) or "_" in _SEGMENT.sub("", self.name_format):
            raise TypeError(f"name_format {self.name_format!r} must start with {self.name!r}, its text hold no '_'")
        pieces, position = [(self.name, None, "", False)], len(self.name)
        for match in _SEGMENT.finditer(self.name_format, position):
            pieces.append((self.name_format[position:match.start()], None, "", False))
            if match["required"]:
                pieces.append(("", match["required"], "", False))
            else:
                pieces.append((match["before"], match["optional"], match["after"], True))
            position = match.end()
        pieces.append((self.name_format[position:], None, "", False))
        return [piece for piece in pieces if piece != ("", None, "", False)]

    def flag(self, release: Any, online: bool = False) -> str:
        """The release's name in result files: `<dataset>_<flag>-s<seed>.json`. An online flag names
        every numeric setting, its defaults too (cvae-online-v1); its table column does not."""
        defaults = {f.name: f.default for f in dataclasses.fields(self.Release)}
        text = []
        for index, (before, field, after, optional) in enumerate(self._segments()):
            if field is None:
                text.append(before + (ONLINE_SUFFIX if online and index == 0 else ""))
                continue
            value = getattr(release, field)
            if optional and (value is None or value is False or (value == defaults[field] and not online)):
                continue
            text.append(before + _value_text(value) + after)
        return "".join(text)

    def flag_pattern(self) -> str:
        """The regex of every flag `flag` writes; its groups are the Release fields and `online`."""
        pattern = []
        for index, (before, field, after, optional) in enumerate(self._segments()):
            if field is None:
                pattern.append(re.escape(before) + (f"(?P<online>{ONLINE_SUFFIX})?" if index == 0 else ""))
                continue
            kind = self._kind(field)
            group = f"(?P<{field}>{'' if kind is bool else r'[0-9]+' if kind is int else NUMBER})"
            piece = re.escape(before) + group + re.escape(after)
            pattern.append(f"(?:{piece})?" if optional else piece)
        return "".join(pattern)

    def _kind(self, field: str) -> type:
        return next(f.metadata.get("kind", type(f.default)) for f in dataclasses.fields(self.Release)
                    if f.name == field)

    def parse_flag(self, flag: str) -> Any | None:
        """The Release settings a result flag names, or None if the flag is not this anonymizer's."""
        match = re.fullmatch(self.flag_pattern(), flag)
        if match is None or (match["online"] and self.Online is None):
            return None
        values = {}
        for field, text in match.groupdict().items():
            if field == "online" or text is None:
                continue  # an optional setting not named: its default
            kind = self._kind(field)
            values[field] = True if kind is bool else kind(text)
        return self.Release(**values)

    def is_online(self, flag: str) -> bool:
        match = re.fullmatch(self.flag_pattern(), flag)
        return match is not None and match["online"] is not None

    def column_label(self, flag: str) -> str:
        """The table column of a result flag: as the flag, with an online flag's defaults left out."""
        release = self.parse_flag(flag)
        if not self.is_online(flag):
            return flag
        offline = self.flag(release)
        return offline[:len(self.name)] + ONLINE_SUFFIX + offline[len(self.name):]

    def release_name(self, release: Any, seed: int) -> str:
        """The released set's file name beside the databases: train_<flag>[-s<seed>].npz."""
        return f"train_{self.flag(release)}" + (f"-s{seed}" if self.seeded else "") + ".npz"

    def make(self, inputs: ReleaseInputs, release: Any, making: Any, seed: int, device: Any) -> Release:
        raise NotImplementedError

    def samples_per_record(self, release: Any) -> int:
        """Released rows per record of the real split (f for a release sampled f times per record); the
        probes measure privacy on a 1/f share of the release, as many rows as f = 1 would give."""
        return 1

    def sampler(self, inputs: ReleaseInputs, release: Any, making: Any, online: Any, seed: int,
                device: Any) -> tuple[Any, dict, dict]:
        """With an online mode: `epoch -> (x, y)` fresh samples each epoch, what identifies it for a probe
        checkpoint, and what results record about its training."""
        raise NotImplementedError

    def trained_model(self, inputs: ReleaseInputs, release: Any, making: Any, seed: int,
                      device: Any) -> tuple[Any, Any, dict]:
        """With an online mode: the model it ships (what `sampler` draws from), the labels whose class counts
        sampling copies, and what results record about its training."""
        raise NotImplementedError

    def model_losses(self, model: Any, x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
        """With an online mode: each record's loss under the shipped model (its training objective, any noise
        drawn from `seed`), the statistic of a membership attack by whoever holds the model."""
        raise NotImplementedError

    def column_order(self, flag: str) -> tuple:
        """Sort key among this anonymizer's columns in tables (registry order comes first): offline first,
        then by each setting, an unset (None) one before any value."""
        release = self.parse_flag(flag)
        return (self.is_online(flag), *((value is not None, value if isinstance(value, (int, float)) else 0)
                                        for value in dataclasses.astuple(release)))
