"""The console every command writes its tables and progress to (stderr; stdout is data)."""
from __future__ import annotations

import os
import sys

from rich.console import Console

LOG_WIDTH = 200
"""Columns when stderr is not a terminal (a log file, CI, ``2>&1 | tee``) and COLUMNS is unset. rich falls back to
80 there, which cut `mpplan solve`'s plan table (~190 columns) and validate's table to one character a cell; a
file has no width to respect. A terminal keeps its own width."""


def stderr_console(quiet: bool = False) -> Console:
    to_file = not sys.stderr.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=True, quiet=quiet, width=LOG_WIDTH if to_file else None)
