"""The converter's save strategy for megatron's torch_dist format: megatron's translation, torch's plain writer.

`dist_checkpointing.save(..., sharded_strategy=local_torch_dist_strategy())` still runs all of megatron's
save (factories, common state, ShardedObjects, metadata.json) and megatron's own key translation and save
planner, so megatron defines every key, shape and chunk of the result. Only the last step differs:
megatron's TorchDistSaveShardedStrategy.save goes through its async machinery (a results queue held by a
spawned Manager process: ~0.1 s per save on a loaded host), fsyncs every file, and torch.save computes a
crc32 of every tensor record. The converter records a sha256 of every output file in its manifest anyway,
so here torch.distributed.checkpoint's synchronous FileSystemWriter writes the same files without fsync
(like safetensors' save_file and transformers' save_pretrained) and without the per-record crc32
(torch.load reads such records; the manifest's sha256 is the integrity check), and hashes each .distcp
file from the bytes as they are written instead of reading the file back. The files are what torch
writes; `dist_checkpointing.load` loads them (tests).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Data files per save, each written by its own thread (and hashed by a helper thread alongside, see
# _HashingStream): hashing (sha256 for the manifest) costs more CPU than the write itself, so one writer per
# core up to 4.
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


_OVERLAP_BYTES = 1 << 20  # smaller writes (zip headers, pickles) are hashed in line


@functools.cache
def _hash_pool() -> ThreadPoolExecutor:
    """Threads that hash large writes while the writing thread writes them (one per writer thread)."""
    return ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="sha256")


class _HashingStream:
    """A binary file opened for writing that also feeds every byte written to sha256, in order.

    torch.save hands its writer memoryviews of the tensors' own memory, so hashing here reads nothing twice;
    the writes are strictly sequential (torch's zip writer streams; torch.distributed.checkpoint only asks
    tell()). A large buffer is hashed on another thread WHILE it is written (both release the GIL), and write
    returns once both are done: the memoryview is only valid during the call (it does not own the tensor),
    and the hash stays in file order. That overlaps the two even when only one file is being written (the
    embedding's), where hashing then writing on one thread would leave the second core idle."""

    def __init__(self, stream):
        self._stream, self._sha256 = stream, hashlib.sha256()

    def write(self, data) -> int:
        if memoryview(data).nbytes < _OVERLAP_BYTES:
            self._sha256.update(data)
            return self._stream.write(data)
        hashed = _hash_pool().submit(self._sha256.update, data)
        try:
            return self._stream.write(data)
        finally:
            hashed.result()

    def hexdigest(self) -> str:
        return self._sha256.hexdigest()

    def __getattr__(self, name):  # tell, flush, fileno, close: the file's own
        return getattr(self._stream, name)


def _hashing_file_system(digests: dict[Path, str]):
    """torch's local FileSystem whose .distcp streams record their sha256 into `digests` once closed and are
    written without per-record crc32 by whichever writer thread opened them."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    class HashingFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path, mode: str):
            with super().create_stream(path, mode) as stream:
                if mode != "wb" or not str(path).endswith(".distcp"):
                    yield stream
                    return
                hashing = _HashingStream(stream)
                with _no_record_crc32():  # called in the writer thread that then torch.saves into it
                    yield hashing
            digests[Path(path)] = hashing.hexdigest()  # not reached when the write failed

    return HashingFileSystem()


def local_torch_dist_strategy(thread_count: int = 1, digests: dict[Path, str] | None = None):
    """A TorchDistSaveShardedStrategy (megatron's `save` accepts only those) whose save writes synchronously,
    in this process, with `thread_count` writer threads (one .distcp file each). The sha256 of each .distcp
    file written goes into `digests` (path -> hex) where torch's writer lets the stream be wrapped; a file
    missing from it must be hashed from disk."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class LocalTorchDistSave(mcore_torch.TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir) -> None:
            # the two translation steps of megatron's TorchDistSaveShardedStrategy.async_save (0.16 to 0.19)
            sharded_state_dict, _, _ = mcore_torch._replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            pyt_state_dict = mcore_torch.mcore_to_pyt_state_dict(sharded_state_dict, False)
            writer = FileSystemWriter(str(checkpoint_dir), sync_files=False, thread_count=thread_count)
            if digests is not None and hasattr(writer, "fs"):
                writer.fs = _hashing_file_system(digests)
            planner = mcore_torch.MCoreSavePlanner(
                dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False
            )
            with _no_record_crc32():
                dcp_save(pyt_state_dict, storage_writer=writer, planner=planner, no_dist=True)

    strategy = LocalTorchDistSave("torch_dist", 1)  # positional: 0.16 has no defaults for them
    strategy.thread_count = thread_count
    return strategy
