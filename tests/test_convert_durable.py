"""Durable conversion output: every file and folder is fsynced before the output appears under its name, and a
conversion killed (SIGKILL) at any point leaves no destination behind, only a hidden partial folder that the
next run into the same destination removes before it converts again."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dynamo_mega.convert import output_dir

pytestmark = pytest.mark.reliability  # the failure probes of docs/operations.md: pytest -m reliability

CONFIG = dict(
    vocab_size=151, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
)  # fmt: skip
# Small write groups and shards: several data files per output, so a kill can fall between two of them.
SMALL = {"hf-to-mcore": ["--write-group-size", "100KB"], "mcore-to-hf": ["--max-shard-size", "100KB"]}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """root/hf (a tiny Qwen2, sharded) and root/mcore (its conversion)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dynamo_mega.convert.run import hf_to_mcore

    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**CONFIG)).save_pretrained(root / "hf", max_shard_size="200KB")
    hf_to_mcore(root / "hf", root / "mcore", progress=False)
    return root


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_sealer_hashes_and_fsyncs_every_file_it_is_given(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(_fd_path(fd)), real_fsync(fd)))
    contents = {tmp_path / f"f{i}": os.urandom(n) for i, n in enumerate((0, 10, 3 << 20))}
    for path, data in contents.items():
        path.write_bytes(data)
    with output_dir.FileSealer(workers=2) as sealer:
        for path in contents:
            sealer.add(path)
        assert sealer.wait() == {path: hashlib.sha256(data).hexdigest() for path, data in contents.items()}
    assert sorted(synced) == sorted(str(path) for path in contents)
    with output_dir.FileSealer() as sealer, pytest.raises(FileNotFoundError):
        sealer.add(tmp_path / "missing")
        sealer.wait()


@pytest.mark.parametrize("direction", ["hf-to-mcore", "mcore-to-hf"])
def test_every_file_and_folder_is_fsynced_before_the_output_is_renamed_into_place(sources, tmp_path, monkeypatch, direction):
    """Fails without the fsyncs: the rename would make the output look complete while its bytes may be only in
    the page cache (a power loss then leaves a destination with a manifest and missing data)."""
    from dynamo_mega.cli import main

    events = []  # ("fsync", path) and ("rename", source, target), in order
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", _fd_path(fd))), real_fsync(fd)))
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a), str(b))), real_rename(a, b)))
    src = sources / ("hf" if direction == "hf-to-mcore" else "mcore")
    dst = tmp_path / "out"
    assert main(["convert", direction, str(src), str(dst), "--no-progress", *SMALL[direction]]) == 0
    renames = [i for i, event in enumerate(events) if event[0] == "rename" and event[2] == str(dst)]
    assert len(renames) == 1, events
    at = renames[0]
    partial = Path(events[at][1])
    synced_before = {event[1] for event in events[:at] if event[0] == "fsync"}
    on_disk = [dst, *dst.rglob("*")]
    assert len([p for p in on_disk if p.is_file()]) >= 6
    missing = [p for p in on_disk if str(partial / p.relative_to(dst)) not in synced_before]
    assert not missing, f"not fsynced before the rename: {missing}"
    assert ("fsync", str(tmp_path)) in events[at + 1 :]  # the rename itself reaches the disk
    assert output_dir.verify_manifest(dst) == []


# Runs the conversion CLI in a process that stops (touches MARKER and sleeps) at a chosen point, to be killed there.
_PAUSING_CLI = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dynamo_mega.convert import output_dir

    marker, point = Path(sys.argv[1]), sys.argv[2]

    def pause():
        marker.touch()
        time.sleep(600)

    if point == "after the first data file":
        add = output_dir.FileSealer.add
        output_dir.FileSealer.add = lambda self, path: (add(self, path), pause())
    else:  # "before the rename": every byte written and fsynced, the manifest too
        fsync_tree = output_dir.fsync_tree
        output_dir.fsync_tree = lambda folder: (fsync_tree(folder), pause())
    from dynamo_mega.cli import main

    sys.exit(main(sys.argv[3:]))
    """
)


KILL_POINTS = [
    ("hf-to-mcore", "after the first data file"),
    ("hf-to-mcore", "before the rename"),
    ("mcore-to-hf", "after the first data file"),
]


@pytest.mark.parametrize("direction,point", KILL_POINTS)
def test_a_killed_conversion_leaves_no_output_and_a_rerun_succeeds(sources, tmp_path, direction, point):
    from dynamo_mega.cli import main

    src = sources / ("hf" if direction == "hf-to-mcore" else "mcore")
    dst, marker = tmp_path / "out", tmp_path / "paused"
    argv = ["convert", direction, str(src), str(dst), "--no-progress", *SMALL[direction]]
    proc = subprocess.Popen([sys.executable, "-c", _PAUSING_CLI, str(marker), point, *argv], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, f"the conversion ended before the kill point: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "the conversion never reached the kill point"
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no handler, no cleanup
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    partials = list(tmp_path.glob(".out.partial-*"))
    assert not dst.exists()  # the only name a reader looks at, with or without a manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([marker.name, partials[0].name]), list(tmp_path.iterdir())
    data = [p for p in partials[0].iterdir() if p.suffix in (".distcp", ".safetensors")]
    assert data, "killed before any data file was written: the test did not test a kill mid-write"
    if point == "before the rename":
        assert (partials[0] / output_dir.MANIFEST).is_file()  # killed as late as can be: still not at the name

    assert main(argv) == 0
    assert not list(tmp_path.glob(".out.partial-*"))  # the dead run's folder is removed
    assert output_dir.verify_manifest(dst) == []
