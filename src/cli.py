"""The one error convention of every script: bad input the user can fix is one line on
stderr and exit status 2; anything else is a bug and keeps its traceback.

Everything that turns a failure into that line lives here: argument errors
(`ArgumentParser`), UserErrors that torch re-raises from DataLoader workers with the
worker's traceback as their text (`user_message`), library exceptions whose text runs
over many lines (`brief_reason`), and the checks of numeric flags (`check_finite`,
`check_seed`) that settings call before any work starts.
"""
from __future__ import annotations

import argparse
import math
import numbers
import re
import sys
from typing import Callable, NoReturn

SEED_LIMIT = 2 ** 32  # numpy's legacy seeding takes seeds in [0, 2^32)


class UserError(Exception):
    """Bad input the user can fix: reported as one line on stderr, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error convention: a bad or missing flag raises UserError
    with argparse's one-line reason (it names the flag, and the choices where there are any),
    instead of printing the usage block and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}; see {self.prog} --help")


def brief_reason(err: BaseException) -> str:
    """A library exception as a short phrase for our own message: its type and the first
    sentence of its first non-blank line (torch.load, for one, explains itself over several
    lines, most of them advice that does not apply to a damaged file)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    sentence = re.split(r"(?<=\.)\s", lines[0], maxsplit=1)[0].rstrip(".")
    return f"{type(err).__name__}: {sentence}"


def user_message(err: UserError) -> str:
    """The one line to print for a UserError.

    torch re-raises an exception from a DataLoader worker (or its pin-memory thread) as the same
    type built from "Caught UserError in DataLoader worker process 0.\\nOriginal Traceback ...",
    the worker's formatted traceback. That text ends in "src.cli.UserError: <our message>",
    which is what the user needs; anything else that still spans lines is joined onto one.
    """
    text = str(err)
    marker = f"{UserError.__module__}.{UserError.__qualname__}: "
    if text.startswith(f"Caught {UserError.__name__} ") and "\nOriginal Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1]
    return " ".join(text.split())


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(), turning UserError into a one-line message and exit status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(2)


def check_finite(flag: str, value: float, minimum: float | None = None, above: float | None = None,
                 maximum: float | None = None) -> float:
    """`value` of `flag` if it is a finite number within the bounds (minimum and maximum included,
    `above` excluded), else a one-line UserError naming the flag and the valid range."""
    bounds = [f"at least {number_text(minimum)}" if minimum is not None else "",
              f"above {number_text(above)}" if above is not None else "",
              f"at most {number_text(maximum)}" if maximum is not None else ""]
    wanted = "a finite number" + "".join(f" {bound}" for bound in bounds if bound)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UserError(f"{flag} {value}: give {wanted}")
    if ((minimum is not None and value < minimum) or (above is not None and value <= above)
            or (maximum is not None and value > maximum)):
        raise UserError(f"{flag} {number_text(value)}: give {wanted}")
    return value


def number_text(value: float) -> str:
    """A number as a message shows it: whole numbers in full (seed limits), others in %g."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def check_seed(flag: str, value: int) -> int:
    """`value` of `flag` if it is an integer seed in [0, 2^32), which every generator we seed accepts."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < SEED_LIMIT:
        raise UserError(f"{flag} {value}: seeds are integers from 0 to {SEED_LIMIT - 1}")
    return value
