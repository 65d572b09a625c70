"""fsync for files and folders: what makes a write (a file's bytes, or a name in a folder) survive a crash of the
machine, not only of the process. Used by training checkpoints, checkpoint conversion and HF folders."""

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


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder, deepest first (a file fsynced before costs a syscall)."""
    for parent, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(Path(parent, name))
        fsync_path(Path(parent))
