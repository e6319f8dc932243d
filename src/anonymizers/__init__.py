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
from src.anonymizers.identity import Identity
from src.anonymizers.ksame import KSame
from src.cli import UserError
from src.options import add_options, from_args, option_fields

ANONYMIZERS: dict[str, Anonymizer] = {
    "identity": Identity(),
    "ksame": KSame(),
    "cvae": CVAEAnonymizer(),
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


def _settings_classes(anonymizer: Anonymizer, making: bool) -> list[type]:
    """The settings classes whose fields are an anonymizer's flags in a script: Release, and Making with `making`."""
    return [anonymizer.Release] + ([anonymizer.Making] if making else [])


def shared_flags(making: bool) -> dict[str, list[str]]:
    """Flag (field) name -> the anonymizers that declare it. A flag two anonymizers share must be declared
    alike (the same spelling, kind and number of values), since the command line has one of it; each
    anonymizer keeps its own default, help and bounds. A clash is a programming error, raised here."""
    owners: dict[str, list[str]] = {}
    declared: dict[str, tuple] = {}
    for name, anonymizer in ANONYMIZERS.items():
        for settings_class in _settings_classes(anonymizer, making):
            for f in option_fields(settings_class):
                shape = (f.metadata["flags"], f.metadata["kind"], f.metadata["nargs"])
                if declared.setdefault(f.name, shape) != shape:
                    raise TypeError(f"flag {f.name!r} of --anonymizer {name} clashes with --anonymizer "
                                    f"{owners[f.name][0]}'s (spelling, kind or nargs differ); rename one")
                owners.setdefault(f.name, []).append(name)
    return owners


def add_anonymizer_options(parser: argparse.ArgumentParser, making: bool) -> None:
    """Every anonymizer's flags, a group each: the release-picking ones, and with `making` those that only
    anonymize.py takes. argparse records only the flags given (no defaults), so a shared flag takes each
    anonymizer's own default, and a flag of another anonymizer can be refused (`anonymizer_settings`)."""
    owners = shared_flags(making)
    for name, anonymizer in ANONYMIZERS.items():
        group = parser.add_argument_group(f"--anonymizer {name}")
        for settings_class in _settings_classes(anonymizer, making):
            add_options(group, settings_class, skip={flag for flag, names in owners.items() if names[0] != name},
                        given_only=True)


def anonymizer_settings(anonymizer: Anonymizer, args: argparse.Namespace, making: bool) -> dict[str, Any]:
    """The nested settings objects of one anonymizer, built from parsed flags; a flag given that only other
    anonymizers take is refused, so that a run never silently ignores what the user asked for."""
    own = {f.name for settings_class in _settings_classes(anonymizer, making) for f in option_fields(settings_class)}
    for flag, names in shared_flags(making).items():
        if hasattr(args, flag) and flag not in own:
            raise UserError(f"--{flag} does not apply to --anonymizer {anonymizer.name}: it is a flag of "
                            f"--anonymizer {' and '.join(names)}; drop it or choose that anonymizer")
    settings = {"release": from_args(anonymizer.Release, args)}
    if making:
        settings["making"] = from_args(anonymizer.Making, args)
    return settings
