"""fsync for files and folders: what makes a write (a file's bytes, or a name in a folder) survive a crash of the
machine, not only of the process. Used by training checkpoints and by checkpoint conversion."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the names in it, e.g. a rename, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
