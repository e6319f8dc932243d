"""Settings fields that are also command-line flags: each is declared once, with its check.

A settings class is a frozen dataclass whose fields are made with `option(...)`. The
field's name is its flag (`--name`, or the `flags` given), its default the flag's
default, and the class's `__post_init__` checks the values. Scripts add the flags with
`add_options` and build the settings with `from_args`; result files record
`settings_record(settings)`; the sweep builds the same record from a point's argv.
"""
from __future__ import annotations

import argparse
import dataclasses
import numbers
from pathlib import Path
from typing import Any, Iterable

from src.cli import UserError, check_finite, number_text

def option(default: Any, help: str, *, flags: tuple[str, ...] = (), kind: type | None = None, nargs: str | None = None,
           choices: Iterable[str] | None = None, required: bool = False, changes_results: bool = True,
           picks_release: bool = False, minimum: float | None = None, above: float | None = None,
           maximum: float | None = None) -> Any:
    """A settings field that is also a flag.

    `changes_results` False marks where/how settings (device, folders, workers): a sweep
    output made with other such values is still current. `picks_release` marks an
    anonymizer setting that names its release file, so the probing scripts take it too.
    Numbers must be finite and within `minimum`, `maximum` (inclusive) and `above` (exclusive);
    `check_options` checks them, and the sweep checks config values against the same bounds.
    """
    kind = kind or (type(default) if default is not None and not isinstance(default, (list, tuple)) else str)
    metadata = {"help": help, "flags": flags, "kind": kind, "nargs": nargs, "required": required,
                "choices": tuple(choices) if choices is not None else None, "changes_results": changes_results,
                "picks_release": picks_release,
                "bounds": {"minimum": minimum, "above": above, "maximum": maximum}}
    if isinstance(default, list):
        default = tuple(default)
    return dataclasses.field(default=default, metadata=metadata)


def option_fields(settings_class: type, picks_release: bool | None = None) -> list[dataclasses.Field]:
    """The fields of a settings class that are flags (optionally only those that pick a release)."""
    return [f for f in dataclasses.fields(settings_class) if "help" in f.metadata
            and (picks_release is None or f.metadata["picks_release"] == picks_release)]


def flag_of(f: dataclasses.Field) -> str:
    """The main spelling of a field's flag (the one the sweep writes)."""
    return (f.metadata["flags"] or (f"--{f.name}",))[0]


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, settings_class: type,
                picks_release: bool | None = None, skip: Iterable[str] = (), given_only: bool = False) -> None:
    """Add the flags of a settings class; flags whose dest is in `skip` are left out (added elsewhere).
    With `given_only` the parsed namespace holds only the flags given, and `from_args` takes the
    settings class's own defaults for the rest."""
    for f in option_fields(settings_class, picks_release):
        if f.name in skip:
            continue
        meta = f.metadata
        flags = meta["flags"] or (f"--{f.name}",)
        unset = {"default": argparse.SUPPRESS} if given_only else {}
        if meta["kind"] is bool:
            parser.add_argument(*flags, dest=f.name, action="store_true", help=meta["help"], **unset)
            continue
        kwargs = {"type": meta["kind"] if meta["kind"] is not Path else Path, "help": meta["help"]}
        if meta["nargs"]:
            kwargs["nargs"] = meta["nargs"]
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if meta["required"]:
            kwargs["required"] = True
        else:
            kwargs["default"] = list(f.default) if isinstance(f.default, tuple) else f.default
        parser.add_argument(*flags, dest=f.name, **{**kwargs, **unset})


def from_args(settings_class: type, args: argparse.Namespace, **given: Any) -> Any:
    """Build settings from parsed flags (lists become tuples, so the settings stay hashable and frozen); a
    field whose flag the namespace lacks (see `add_options`'s `given_only`) keeps its default."""
    values = {f.name: getattr(args, f.name) for f in option_fields(settings_class)
              if f.name not in given and hasattr(args, f.name)}
    values = {name: tuple(value) if isinstance(value, list) else value for name, value in values.items()}
    return settings_class(**values, **given)


def flag_value(value: object) -> str:
    """Command-line text of a setting's value: integers plainly, floats exactly."""
    return str(value) if isinstance(value, int) else repr(float(value))


def command_flags(settings_class: type, values: dict[str, Any]) -> list[str]:
    """The command-line flags that set `values` (field name -> value) of a settings class (None and False: unset)."""
    args = []
    for f in option_fields(settings_class):
        value = values.get(f.name)
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag_of(f))
        elif isinstance(value, (list, tuple)):
            args += [flag_of(f), *(flag_value(item) if not isinstance(item, str) else item for item in value)]
        else:
            args += [flag_of(f), flag_value(value) if not isinstance(value, str) else value]
    return args


def settings_record(settings: Any) -> dict[str, Any]:
    """What outputs record: the settings' fields, nested settings flattened in, paths as text."""
    record: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is None and f.metadata.get("nested"):
            continue  # no such part (the offline probes have no generator settings)
        if dataclasses.is_dataclass(value):
            nested = settings_record(value)
            clash = set(nested) & set(record)
            if clash:
                raise ValueError(f"settings {sorted(clash)} of {type(value).__name__} clash with the stage's own")
            record.update(nested)
        else:
            record[f.name] = _plain(value)
    return record


def result_keys(settings: Any) -> set[str]:
    """Recorded keys whose values shape the results (see `changes_results`)."""
    keys = set()
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is None and f.metadata.get("nested"):
            continue
        if dataclasses.is_dataclass(value):
            keys |= result_keys(value)
        elif f.metadata.get("changes_results", True):
            keys.add(f.name)
    return keys


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


# ---------------------------------------------------------------- checks, one per kind of number

def check_options(settings: Any) -> None:
    """Every numeric option of `settings` finite, whole where it is an int, and within its declared bounds."""
    for f in option_fields(type(settings)):
        if f.metadata["kind"] in (int, float):
            flag = "/".join(f.metadata["flags"]) or f"--{f.name}"
            values = getattr(settings, f.name)
            for value in values if isinstance(values, tuple) else (values,):
                if value is None:
                    continue  # not given: the option's meaning when unset
                if f.metadata["kind"] is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                    raise UserError(f"{flag} {value}: give a whole number")
                check_finite(flag, value, **f.metadata["bounds"])


def bounds_text(bounds: dict[str, float | None]) -> str:
    """'>= 2', '> 0 and <= 1': a field's bounds as the sweep's config errors state them."""
    signs = (("minimum", ">="), ("above", ">"), ("maximum", "<="))
    parts = [f"{sign} {number_text(bounds[key])}" for key, sign in signs if bounds[key] is not None]
    return " and ".join(parts)
