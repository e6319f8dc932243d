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
    "dpprobe": DPProbe(),  # not a release: the DP least-squares probe on the real train set
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




def add_anonymizer_options(parser: argparse.ArgumentParser, making: bool) -> None:
    """Every anonymizer's flags, a group each: the release-picking ones, and with `making` those
    that only anonymize.py takes. A flag two anonymizers share is added once."""
    added: set[str] = set()
    for name, anonymizer in ANONYMIZERS.items():
        group = parser.add_argument_group(f"--anonymizer {name}")
        classes = [anonymizer.Release] + ([anonymizer.Making] if making else [])
        for settings_class in classes:
            add_options(group, settings_class, skip=added)
            added |= {f.name for f in option_fields(settings_class)}


def anonymizer_settings(anonymizer: Anonymizer, args: argparse.Namespace, making: bool) -> dict[str, Any]:
    """The nested settings objects of one anonymizer, built from parsed flags."""
    settings = {"release": from_args(anonymizer.Release, args)}
    if making:
        settings["making"] = from_args(anonymizer.Making, args)
    return settings
