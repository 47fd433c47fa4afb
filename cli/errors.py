"""Exit codes and the one-line failure every command prints (DEVELOPERS.md: bad input exits 2, no plan fits 3,
never a traceback)."""
from __future__ import annotations

import sys
from typing import NoReturn

import typer

EXIT_FAILED_RUN = 1
EXIT_BAD_INPUT = 2
EXIT_NO_PLAN = 3


def fail(message: str, code: int = EXIT_BAD_INPUT, command: str = "") -> NoReturn:
    """Print ``mpplan [command]: message`` on stderr and exit with ``code``."""
    print(f"mpplan{' ' + command if command else ''}: {message}", file=sys.stderr)
    raise typer.Exit(code)
