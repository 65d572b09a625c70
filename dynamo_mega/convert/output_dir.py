"""An output folder that either appears complete or not at all, with a sha256 manifest and a byte progress bar.

Everything is written into a hidden sibling `.{name}.partial-{pid}` and renamed onto the destination at the
end (rename is atomic within one filesystem). MANIFEST is written last, before the rename: a folder with a
manifest is complete; one without (from another tool, or a copy cut short) is refused as a destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from dynamo_mega.convert.file_hashing import sha256_file

MANIFEST = "manifest.sha256.json"


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
    """Yield a temp folder next to `dst`; on success it replaces `dst`, on any error it is removed."""
    check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:  # incl. KeyboardInterrupt and megatron's CheckpointException (a BaseException)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = dst.parent / f".{dst.name}.replaced-{os.getpid()}"
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old)
    else:
        tmp.rename(dst)


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
