"""The one error convention of every script: bad input the user can fix is one line on
stderr and exit status 2; anything else is a bug and keeps its traceback."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input the user can fix: reported as one line on stderr, exit status 2."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(), turning UserError into a one-line message and exit status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
