"""An output folder that either appears complete or not at all, with a sha256 manifest and a byte progress bar.

Everything is written into a hidden sibling `.{name}.partial-{pid}`. At the end MANIFEST is written (last),
every file and folder in it is fsynced, it is renamed onto the destination (rename is atomic within one
filesystem) and the parent folder is fsynced, so after a crash or power loss the destination either does not
exist or holds every byte its manifest lists. A folder with a manifest is complete; one without (from another
tool, or a copy cut short) is refused as a destination. Partial folders of runs that died are removed by the
next run into the same destination.

Large files are sealed (hashed, then fsynced) on a thread pool as soon as the writer closes them
(`FileSealer`), while the conversion writes the next ones: hashlib releases the GIL while it hashes, the bytes
come from the page cache, and the writeback of one file overlaps the writing of the next instead of all of it
waiting for the final fsync.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from dynamo_mega.durable import fsync_path, fsync_tree

MANIFEST = "manifest.sha256.json"
_CHUNK = 1 << 20  # bytes read and hashed per call


def sha256_file(path: Path, fsync: bool = False) -> str:
    """sha256 of a file (read through a buffer); fsync: also flush it to disk once it is read."""
    sha256, buffer = hashlib.sha256(), bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            sha256.update(view[:n])
        if fsync:
            os.fsync(f.fileno())
    return sha256.hexdigest()


class FileSealer:
    """Hashes and fsyncs finished output files in the background, one per thread, up to one thread per core.
    `add(path)` once a file is closed for good; `wait()` returns path -> sha256 and raises the first error."""

    def __init__(self, workers: int | None = None):
        self._pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1, thread_name_prefix="sha256")
        self._jobs: dict[Path, Future] = {}

    def __enter__(self) -> FileSealer:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)  # after a failure: no thread outlives the files

    def add(self, path: Path) -> None:
        assert path not in self._jobs, path
        self._jobs[path] = self._pool.submit(sha256_file, path, True)

    def wait(self) -> dict[Path, str]:
        return {path: job.result() for path, job in self._jobs.items()}


def check_destination(dst: Path, overwrite: bool) -> None:
    """Refuse destinations that would mix outputs: non-empty folders (unless --overwrite of a complete one)."""
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"destination {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()):
        if not (dst / MANIFEST).is_file():
            raise ValueError(
                f"destination {dst} is not empty and has no {MANIFEST}: it may be half-written or another tool's "
                "output; remove it or choose another destination"
            )
        if not overwrite:
            raise ValueError(f"destination {dst} already holds a converted checkpoint; pass --overwrite to replace it")
    for stale in dst.parent.glob(f".{dst.name}.partial-*") if dst.parent.is_dir() else []:
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)  # left by a run that was killed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_manifest(folder: Path, known: dict[str, str], extra: dict) -> None:
    """sha256 of every file under `folder` (hashes in `known`, by relative path, are trusted, not recomputed)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"sha256": known.get(rel) or sha256_file(path), "bytes": path.stat().st_size}
    (folder / MANIFEST).write_text(json.dumps({**extra, "files": files}, indent=2) + "\n")


def verify_manifest(folder: Path) -> list[str]:
    """Files whose sha256 or size differs from the manifest (or are missing); empty when intact."""
    manifest = json.loads((folder / MANIFEST).read_text())
    bad = []
    for rel, entry in manifest["files"].items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            bad.append(rel)
    return bad


@contextlib.contextmanager
def atomic_output(dst: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temp folder next to `dst`; on success it is made durable and replaces `dst`, on any error it is
    removed."""
    check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)  # before the rename: the final name never points at bytes that are not on disk
    except BaseException:  # incl. KeyboardInterrupt and megatron's CheckpointException (a BaseException)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        # --overwrite: between these two renames the old output lies at `old` (kept if the process dies there)
        old = dst.parent / f".{dst.name}.replaced-{os.getpid()}"
        dst.rename(old)
        tmp.rename(dst)
        fsync_path(dst.parent)
        shutil.rmtree(old)
    else:
        tmp.rename(dst)
        fsync_path(dst.parent)  # the rename itself is durable


@contextlib.contextmanager
def byte_progress(description: str, total_bytes: int, enabled: bool = True):
    """A rich progress bar over bytes (size, speed, ETA); yields `advance(nbytes)`."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total_bytes)
        yield lambda n: progress.advance(task, n)
