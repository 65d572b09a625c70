"""Copying bytes from one file into another inside the kernel, where the filesystems allow it.

os.copy_file_range moves bytes page cache to page cache without mapping them into the process: about half the
CPU of writing them from memory-mapped pages on this host. It is Linux only, and some kernels and filesystems
refuse a pair of files (another filesystem on kernels before 5.3, some network filesystems): then nothing is
copied and the caller writes the bytes from memory instead.
"""

from __future__ import annotations

import errno
import os
import weakref
from pathlib import Path

_CANNOT_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


_STEP = 1 << 30  # bytes per call (the kernel may copy fewer; the loop goes on)


def copy_range(source_fd: int, target_fd: int, nbytes: int, source_offset: int) -> int:
    """Copy `nbytes` from `source_fd` at `source_offset` to `target_fd` at its current position. Returns the
    bytes copied: fewer than `nbytes` when the kernel cannot copy between these files (the caller writes the
    rest, from the target's position moved by what was copied)."""
    if not hasattr(os, "copy_file_range"):
        return 0
    done = 0
    while done < nbytes:
        try:
            copied = os.copy_file_range(source_fd, target_fd, min(_STEP, nbytes - done), source_offset + done)
        except OSError as exc:
            if exc.errno in _CANNOT_COPY:
                return done
            raise
        if copied == 0:
            raise ValueError(f"the source file ends before byte {source_offset + nbytes}: did it change during the conversion?")
        done += copied
    return done


class FileBackedMemory:
    """Which memory holds bytes of which file: memory-mapped source tensors, registered while their mapping
    lives (`owner`: the object whose lifetime is the mapping's; after it dies the addresses may belong to
    anything, so the entry goes with it). Lets a writer copy such bytes file to file (copy_range)."""

    def __init__(self):
        self._regions: dict[int, tuple[int, int, Path, int]] = {}  # id(owner) -> (address, bytes, file, offset)

    def add(self, owner, address: int, nbytes: int, path: Path, offset: int) -> None:
        key = id(owner)
        self._regions[key] = (address, nbytes, path, offset)
        weakref.finalize(owner, self._regions.pop, key, None)

    def find(self, address: int, nbytes: int) -> tuple[Path, int] | None:
        """(file, byte offset) of bytes [address, address + nbytes) if one live region holds all of them."""
        for start, size, path, offset in self._regions.values():
            if start <= address and address + nbytes <= start + size:
                return path, offset + address - start
        return None

    def __len__(self) -> int:
        return len(self._regions)
