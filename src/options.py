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
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from src.cli import UserError, check_finite

def option(default: Any, help: str, *, flags: tuple[str, ...] = (), kind: type | None = None, nargs: str | None = None,
           choices: Iterable[str] | None = None, required: bool = False, changes_results: bool = True,
           minimum: float | None = None, above: float | None = None, maximum: float | None = None,
           pattern: tuple[str, str] | None = None) -> Any:
    """A settings field that is also a flag.

    `changes_results` False marks where/how settings (device, folders, workers): a sweep
    output made with other such values is still current. Numbers must be finite and within
    `minimum`, `maximum` (inclusive) and `above` (exclusive); a text must be one of `choices` or
    match `pattern` (a regex and what to write instead). `check_value` checks them all, for
    flags, library calls and sweep configs alike.
    """
    kind = kind or (type(default) if default is not None and not isinstance(default, (list, tuple)) else str)
    metadata = {"help": help, "flags": flags, "kind": kind, "nargs": nargs, "required": required,
                "choices": tuple(choices) if choices is not None else None, "changes_results": changes_results,
                "bounds": {"minimum": minimum, "above": above, "maximum": maximum},
                "pattern": pattern[0] if pattern else None, "pattern_hint": pattern[1] if pattern else None}
    if isinstance(default, list):
        default = tuple(default)
    return dataclasses.field(default=default, metadata=metadata)


def option_fields(settings_class: type) -> list[dataclasses.Field]:
    """The fields of a settings class that are flags."""
    return [f for f in dataclasses.fields(settings_class) if "help" in f.metadata]


def option_field(settings_class: type, name: str) -> dataclasses.Field:
    """One flag field of a settings class, by name."""
    return next(f for f in option_fields(settings_class) if f.name == name)


def flag_of(f: dataclasses.Field) -> str:
    """The main spelling of a field's flag (the one the sweep writes)."""
    return (f.metadata["flags"] or (f"--{f.name}",))[0]


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, settings_class: type,
                skip: Iterable[str] = (), given_only: bool = False) -> None:
    """Add the flags of a settings class; flags whose dest is in `skip` are left out (added elsewhere).
    With `given_only` the parsed namespace holds only the flags given, and `from_args` takes the
    settings class's own defaults for the rest."""
    for f in option_fields(settings_class):
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


def _result_fields(settings: Any) -> Iterator[tuple[dataclasses.Field, Any]]:
    """(field, value) of every recorded setting that shapes the results (see `changes_results`)."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is None and f.metadata.get("nested"):
            continue
        if dataclasses.is_dataclass(value):
            yield from _result_fields(value)
        elif f.metadata.get("changes_results", True):
            yield f, value


def result_keys(settings: Any) -> set[str]:
    """Recorded keys whose values shape the results."""
    return {f.name for f, _ in _result_fields(settings)}


def default_result_keys(settings: Any) -> set[str]:
    """Those of `result_keys` whose value is the option's default. An option is added with the default that
    keeps what the code did before, so an output that does not record it was made as this default makes it."""
    return {f.name for f, value in _result_fields(settings) if value == f.default}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


# ---------------------------------------------------------------- the one check of a setting's value

def check_value(label: str, f: dataclasses.Field, value: Any) -> Any:
    """One value of a settings field, checked against the field's declaration wherever it comes from (a flag,
    a library call or a sweep config, `label` naming it): a switch true or false; a number finite, whole for
    an int, and within the declared bounds; a text one of the choices, or matching the pattern. None passes
    where it is the default (an option's meaning when unset)."""
    meta = f.metadata
    if value is None and f.default is None:
        return value
    if meta["kind"] is bool:
        if not isinstance(value, bool):
            raise UserError(f"{label} {value!r}: give true or false")
    elif meta["kind"] in (int, float):
        if meta["kind"] is int and isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
            raise UserError(f"{label} {value}: give a whole number")
        check_finite(label, value, **meta["bounds"])
    elif not isinstance(value, (str, Path)) or not str(value).strip():
        raise UserError(f"{label} {value!r}: give a non-empty text")
    elif meta["choices"] and value not in meta["choices"]:
        raise UserError(f"{label} {value!r}: choose one of {', '.join(meta['choices'])}")
    elif meta["pattern"] and not re.fullmatch(meta["pattern"], str(value)):
        raise UserError(f"{label} {value!r}: {meta['pattern_hint']}")
    return value


class Settings:
    """Base of every settings dataclass: its options are checked by `check_options` when it is made.
    A subclass with checks of its own overrides `__post_init__` and calls this one."""

    def __post_init__(self) -> None:
        check_options(self)


def check_options(settings: Any) -> None:
    """Every option of `settings` checked by `check_value`, named by its flag."""
    for f in option_fields(type(settings)):
        flag = "/".join(f.metadata["flags"]) or f"--{f.name}"
        values = getattr(settings, f.name)
        for value in values if isinstance(values, tuple) else (values,):
            check_value(flag, f, value)
