"""The converter's save strategy for megatron's torch_dist format: megatron's translation, torch's plain writer.

`dist_checkpointing.save(..., sharded_strategy=local_torch_dist_strategy())` still runs all of megatron's
save (factories, common state, ShardedObjects, metadata.json) and megatron's own key translation and save
planner, so megatron defines every key, shape and chunk of the result. Only the last step differs:
megatron's TorchDistSaveShardedStrategy.save goes through its async machinery (a results queue held by a
spawned Manager process: ~0.1 s per save on a loaded host), fsyncs every file as it is written, and torch.save
computes a crc32 of every tensor record. Here torch.distributed.checkpoint's synchronous FileSystemWriter
writes the same files without the per-record crc32 (torch.load reads such records; the manifest's sha256 is the
integrity check) and without fsync in the save itself (the converter fsyncs each file in the background once it
is closed, output_dir.py), and tensor bytes that already lie in a source file are copied file to file. The
files are what torch writes; `dist_checkpointing.load` loads them (tests).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dynamo_mega.convert.file_copy import copy_range

# Data files per save, each written by one of torch's writer threads: one per core, up to 4.
WRITER_THREADS = max(1, min(4, os.cpu_count() or 1))


@contextlib.contextmanager
def _no_record_crc32() -> Iterator[None]:
    """torch.save without the crc32 of each zip record, in THIS thread (torch's config is per thread)."""
    from torch.utils.serialization import config

    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


_COPY_MIN_BYTES = 1 << 20  # smaller writes (zip headers, pickles) are written from memory


def _address(data) -> int:
    """Address of the first byte of a buffer (torch.save hands its writer memoryviews of tensor memory)."""
    return int(np.frombuffer(data, dtype=np.uint8).ctypes.data)


class _CopyingStream:
    """A binary file opened for writing where bytes that already lie in a source file (`file_region(address,
    nbytes) -> (path, offset) | None`: a memory-mapped HF tensor) are copied file to file by the kernel
    (os.copy_file_range: about half the CPU of writing them from the mapped pages here); everything else is
    written as usual. Writes are sequential (torch's zip writer streams; torch.distributed.checkpoint asks
    tell() between items), so a copy is placed at the current position and the buffered file is then moved
    past it."""

    def __init__(self, stream, file_region):
        self._stream, self._file_region = stream, file_region
        self._sources: dict[Path, int] = {}  # path -> fd

    def write(self, data) -> int:
        nbytes = memoryview(data).nbytes
        region = self._file_region(_address(data), nbytes) if nbytes >= _COPY_MIN_BYTES else None
        if region is None:
            return self._stream.write(data)
        path, offset = region
        if path not in self._sources:
            self._sources[path] = os.open(path, os.O_RDONLY)
        self._stream.flush()
        start = self._stream.tell()
        target = self._stream.fileno()
        os.lseek(target, start, os.SEEK_SET)
        copied = copy_range(self._sources[path], target, nbytes, offset)
        if copied < nbytes:  # the kernel cannot copy between these files: the rest from memory
            os.lseek(target, start + copied, os.SEEK_SET)
            view = memoryview(data).cast("B")[copied:]
            while len(view):
                view = view[os.write(target, view) :]
        self._stream.seek(start + nbytes)  # the buffered file's own position catches up with the copy
        return nbytes

    def close_sources(self) -> None:
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()

    def __getattr__(self, name):  # tell, flush, fileno, seek, close: the file's own
        return getattr(self._stream, name)


def _copying_file_system(file_region, data_file_prefix: str, kept_metadata: list | None):
    """torch's local FileSystem whose .distcp streams copy source bytes file to file (_CopyingStream, where
    `file_region` is given), are written without per-record crc32 by whichever writer thread opened them and
    are named `data_file_prefix` + torch's name. kept_metadata: the .metadata torch would write is appended
    there (its pickled bytes) instead of being written."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    def is_metadata(path, suffix: str = "") -> bool:
        return kept_metadata is not None and str(path).endswith(".metadata" + suffix)

    class CopyingFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path, mode: str):
            if mode == "wb" and is_metadata(path, ".tmp"):
                buffer = io.BytesIO()
                yield buffer
                kept_metadata.append(buffer.getvalue())
                return
            if mode != "wb" or not str(path).endswith(".distcp"):
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            path = Path(path).with_name(data_file_prefix + Path(path).name)
            with super().create_stream(path, mode) as stream, _no_record_crc32():  # in the thread that saves into it
                if file_region is None:
                    yield stream
                    return
                copying = _CopyingStream(stream, file_region)
                try:
                    yield copying
                finally:
                    copying.close_sources()

        def exists(self, path) -> bool:
            return False if is_metadata(path) else super().exists(path)

        def rename(self, path, new_path) -> None:
            if not is_metadata(path, ".tmp"):
                super().rename(path, new_path)

    return CopyingFileSystem()


def local_torch_dist_strategy(thread_count: int = 1, file_region=None, data_file_prefix: str | None = None):
    """A TorchDistSaveShardedStrategy (megatron's `save` accepts only those) whose save writes synchronously,
    in this process, with `thread_count` writer threads (one .distcp file each). file_region(address, nbytes)
    -> (path, offset) | None names source files holding tensor bytes, which are then copied file to file.

    data_file_prefix: the save is one part of a checkpoint written by several saves into one folder (mcore_files
    .save_group): its data files get this prefix, and its .metadata is not written but kept as
    `strategy.metadata` (a torch.distributed.checkpoint Metadata) for the caller to merge."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class LocalTorchDistSave(mcore_torch.TorchDistSaveShardedStrategy):
        metadata = None

        def save(self, sharded_state_dict, checkpoint_dir) -> None:
            # the two translation steps of megatron's TorchDistSaveShardedStrategy.async_save (0.16 to 0.19)
            sharded_state_dict, _, _ = mcore_torch._replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            pyt_state_dict = mcore_torch.mcore_to_pyt_state_dict(sharded_state_dict, False)
            writer = FileSystemWriter(str(checkpoint_dir), sync_files=False, thread_count=thread_count)
            kept = [] if data_file_prefix is not None else None
            if file_region is not None or kept is not None:
                if not hasattr(writer, "fs"):  # the converter writes through it (torch 2.13 has it)
                    raise RuntimeError("this torch's FileSystemWriter has no `fs` attribute; upgrade torch")
                writer.fs = _copying_file_system(file_region, data_file_prefix or "", kept)
            planner = mcore_torch.MCoreSavePlanner(
                dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False
            )
            with _no_record_crc32():
                dcp_save(pyt_state_dict, storage_writer=writer, planner=planner, no_dist=True)
            if kept is not None:
                if len(kept) != 1:
                    raise RuntimeError(f"expected torch to produce one .metadata, got {len(kept)}")
                self.metadata = pickle.loads(kept[0])

    strategy = LocalTorchDistSave("torch_dist", 1)  # positional: 0.16 has no defaults for them
    strategy.thread_count = thread_count
    return strategy
