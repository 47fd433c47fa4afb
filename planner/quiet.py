"""Silence C/C++ libraries that print straight to a file descriptor, past Python's sys.stdout / sys.stderr."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


@contextlib.contextmanager
def fd_to_devnull(fd: int) -> Iterator[None]:
    """Point file descriptor ``fd`` (1 or 2) at /dev/null while the block runs. Python's own stream is flushed
    first, so nothing it already holds is lost; without such a descriptor there is nothing to protect."""
    (sys.stdout if fd == 1 else sys.stderr).flush()
    try:
        saved = os.dup(fd)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
