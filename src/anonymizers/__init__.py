"""Anonymizer registry: a name (the value of --anonymizer) maps to the anonymizer.

Adding an anonymizer is one module in this folder (a subclass of
`src.anonymizers.base.Anonymizer`) and one line in ANONYMIZERS; the stage scripts, the
sweep and the aggregate read everything else from it. Order here is column order in tables.
"""
from __future__ import annotations

import argparse
from typing import Any

from src.anonymizers.base import Anonymizer
from src.anonymizers.cvae import CVAEAnonymizer
from src.anonymizers.dp_gaussian import GaussAnonymizer
from src.anonymizers.dp_probe import DPProbe
from src.anonymizers.identity import Identity
from src.anonymizers.ksame import KSame
from src.cli import UserError
from src.options import add_options, from_args, option_fields

ANONYMIZERS: dict[str, Anonymizer] = {
    "identity": Identity(),
    "ksame": KSame(),
    "cvae": CVAEAnonymizer(),
    "gauss": GaussAnonymizer(),
    "lsq": DPProbe(),  # not a release: the DP least-squares probe on the real train set
}


def get_anonymizer(name: str) -> Anonymizer:
    if name not in ANONYMIZERS:
        raise UserError(f"unknown --anonymizer {name!r}; choose one of {', '.join(ANONYMIZERS)}")
    return ANONYMIZERS[name]


def anonymizer_of_flag(flag: str) -> Anonymizer | None:
    """The anonymizer whose result flag this is (None for a flag no anonymizer writes)."""
    for anonymizer in ANONYMIZERS.values():
        try:
            if anonymizer.parse_flag(flag) is not None:
                return anonymizer
        except UserError:  # the flag's numbers are out of the anonymizer's range: not a result of ours
            return None
    return None


# Which of an anonymizer's settings a script takes as flags: the probes pick a release; anonymize.py also
# says how to make it; the online probe (probing_noise_cvae.py) also how to sample, and offers only the
# anonymizers that declare an online mode (Online settings and a `sampler`).
PICKING = ("release",)
MAKING = ("release", "making")
ONLINE = ("release", "making", "online")


def _settings_classes(anonymizer: Anonymizer, parts: tuple[str, ...]) -> dict[str, type]:
    return {part: getattr(anonymizer, part.capitalize()) for part in parts}


def offering(parts: tuple[str, ...]) -> dict[str, Anonymizer]:
    """The anonymizers a script with these parts offers."""
    return {name: anonymizer for name, anonymizer in ANONYMIZERS.items()
            if "online" not in parts or anonymizer.Online is not None}


def shared_flags(parts: tuple[str, ...]) -> dict[str, list[str]]:
    """Flag (field) name -> the anonymizers that declare it. A flag two anonymizers share must be declared
    alike (the same spelling, kind and number of values), since the command line has one of it; each
    anonymizer keeps its own default, help and bounds. A clash is a programming error, raised here."""
    owners: dict[str, list[str]] = {}
    declared: dict[str, tuple] = {}
    for name, anonymizer in offering(parts).items():
        for settings_class in _settings_classes(anonymizer, parts).values():
            for f in option_fields(settings_class):
                shape = (f.metadata["flags"], f.metadata["kind"], f.metadata["nargs"])
                if declared.setdefault(f.name, shape) != shape:
                    raise TypeError(f"flag {f.name!r} of --anonymizer {name} clashes with --anonymizer "
                                    f"{owners[f.name][0]}'s (spelling, kind or nargs differ); rename one")
                owners.setdefault(f.name, []).append(name)
    return owners


def add_anonymizer_options(parser: argparse.ArgumentParser, parts: tuple[str, ...]) -> None:
    """The flags of every anonymizer the script offers, a group each. argparse records only the flags given
    (no defaults), so a shared flag takes each anonymizer's own default, and a flag of another anonymizer
    can be refused (`anonymizer_settings`)."""
    owners = shared_flags(parts)
    for name, anonymizer in offering(parts).items():
        group = parser.add_argument_group(f"--anonymizer {name}")
        for settings_class in _settings_classes(anonymizer, parts).values():
            add_options(group, settings_class, skip={flag for flag, names in owners.items() if names[0] != name},
                        given_only=True)


def no_online_mode(name: str) -> str:
    """The refusal of an anonymizer without an online mode where one is needed (one wording everywhere)."""
    return f"--anonymizer {name} has no online mode; choose one of {', '.join(offering(ONLINE))}"


def anonymizer_settings(anonymizer: Anonymizer, args: argparse.Namespace, parts: tuple[str, ...]) -> dict[str, Any]:
    """The nested settings objects of one anonymizer (by part), built from parsed flags; a flag given that only
    other anonymizers take is refused, so that a run never silently ignores what the user asked for."""
    if anonymizer.name not in offering(parts):
        raise UserError(no_online_mode(anonymizer.name))
    classes = _settings_classes(anonymizer, parts)
    own = {f.name for settings_class in classes.values() for f in option_fields(settings_class)}
    for flag, names in shared_flags(parts).items():
        if hasattr(args, flag) and flag not in own:
            raise UserError(f"--{flag} does not apply to --anonymizer {anonymizer.name}: it is a flag of "
                            f"--anonymizer {' and '.join(names)}; drop it or choose that anonymizer")
    return {part: from_args(settings_class, args) for part, settings_class in classes.items()}
