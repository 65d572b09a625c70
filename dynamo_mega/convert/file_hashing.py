"""sha256 of the files a conversion writes, computed on background threads while the conversion goes on.

Hashing (OpenSSL's sha256: ~1.2 GB/s per core on this host) costs more CPU than writing the same bytes, so it
must run beside the writing, not after it. Files are hashed from the page cache, where they were just
written: the writer never keeps a buffer alive for the hasher, a file being written is hashed up to what was
written so far (`follow`), and several files are hashed at once on up to one thread per core. Reading back
costs a copy from the page cache into one reused buffer per thread (~0.2 s per GB here), much less than
the serial hash it lets run in parallel.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

_CHUNK = 16 << 20  # bytes read and hashed at a time


def sha256_file(path: Path) -> str:
    return _hash_growing(Path(path), _Growth(done=True))


class _Growth:
    """How far a file being written has got: bytes written so far, and whether it is complete."""

    def __init__(self, done: bool = False):
        self.written, self.done = 0, done
        self.changed = threading.Condition()

    def wait_beyond(self, hashed: int) -> tuple[int, bool]:
        """Block until more than `hashed` bytes are written or the file is done: (written, done)."""
        with self.changed:
            self.changed.wait_for(lambda: self.done or self.written > hashed)
            return self.written, self.done


def _hash_growing(path: Path, growth: _Growth) -> str:
    sha256, hashed = hashlib.sha256(), 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            written, done = growth.wait_beyond(hashed)
            limit = None if done else written  # a complete file is read to its end, whatever was announced
            while limit is None or hashed < limit:
                want = _CHUNK if limit is None else min(_CHUNK, limit - hashed)
                n = f.readinto(view[:want])
                if not n:
                    break
                sha256.update(view[:n])  # releases the GIL
                hashed += n
            if done:
                return sha256.hexdigest()


class FollowedFile:
    """A file being written and hashed behind the writer: call `grew` after each write, `close` at the end."""

    def __init__(self, growth: _Growth):
        self._growth = growth

    def grew(self, written_total: int) -> None:
        with self._growth.changed:
            self._growth.written = written_total
            self._growth.changed.notify_all()

    def close(self) -> None:
        with self._growth.changed:
            self._growth.done = True
            self._growth.changed.notify_all()


class BackgroundHasher:
    """sha256 of output files on up to `workers` threads (default: one per core): whole files (`submit`) or
    files still being written (`follow`). Files are hashed in the order given."""

    def __init__(self, workers: int | None = None):
        self._pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1, thread_name_prefix="sha256")
        self._futures: dict[Path, Future] = {}
        self._followed: list[FollowedFile] = []

    def submit(self, path: Path) -> None:
        self._futures[path] = self._pool.submit(_hash_growing, path, _Growth(done=True))

    def follow(self, path: Path) -> FollowedFile:
        """Hash `path` as it is written (the file must exist); the writer reports progress on the result."""
        growth = _Growth()
        self._futures[path] = self._pool.submit(_hash_growing, path, growth)
        self._followed.append(FollowedFile(growth))
        return self._followed[-1]

    def wait(self) -> dict[Path, str]:
        """Block until every file is hashed; path -> sha256 (as given, before any rename). Raises the first
        hashing error."""
        digests = {path: future.result() for path, future in self._futures.items()}
        self._pool.shutdown()
        return digests

    def abandon(self) -> None:
        """After a failure: release every follower (so no thread waits for bytes that never come) and stop."""
        for followed in self._followed:
            followed.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
