"""Write an HF safetensors checkpoint tensor by tensor, in an order known up front, holding none of it.

safetensors' save_file takes a whole shard as a dict of tensors, so a converter using it must hold a shard
(2 GiB by default here, 5 GB in transformers) in memory before writing a byte. The format itself needs no
such buffer: a file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
range of the data section; optional "__metadata__"), then the tensors' raw bytes, back to back, no holes.
Knowing every name, shape and dtype before the first tensor exists (the conversion plan does), the header
can be written first and each tensor streamed to its place as it is produced, from its own memory (a view of
the memory-mapped source, often): no staging copy and a memory bound of what the caller holds.

sha256 (for the manifest) is computed behind the writer on background threads, from the page cache, shards in
parallel (file_hashing.py). Files are read back by safetensors in tests.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dynamo_mega.convert.file_copy import copy_range
from dynamo_mega.convert.file_hashing import BackgroundHasher
from dynamo_mega.convert.hf_files import INDEX, SAFETENSORS_DTYPES, SINGLE

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _shard_specs(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive runs of `specs` of at most max_shard_bytes each (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: list[TensorSpec]) -> bytes:
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for spec in specs:
        if spec.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be written; use one of {list(_DTYPE_NAMES)}")
        span = [offset, offset + spec.nbytes]
        entries[spec.name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": span}
        offset += spec.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors' own writer does
    return struct.pack("<Q", len(raw)) + raw


def _blocks(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """`tensor`'s elements in row-major order as contiguous pieces: itself, its dim-0 slices (e.g. the grouped
    q rows of a fused qkv), or else one contiguous copy."""
    if tensor.is_contiguous():
        yield tensor
    elif tensor.dim() > 1 and tensor[0].is_contiguous():
        yield from tensor.unbind(0)
    else:
        yield tensor.contiguous()


def _bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _write_all(file, view: memoryview) -> None:
    written = 0
    while written < len(view):  # a raw (unbuffered) file may take fewer bytes than given
        written += file.write(view[written:])


class StreamingSafetensorsWriter:
    """Writes the tensors of `specs`, in that order, into `folder` as shards of at most `max_shard_bytes`,
    named like transformers' save_pretrained (one shard: model.safetensors, no index).

    file_region(tensor) -> (path, offset) | None: where a contiguous tensor's bytes already are in a file (a
    view of a memory-mapped source): those are copied file to file by the kernel (os.copy_file_range, half the
    CPU of writing from the mapped pages here), everything else is written from memory."""

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int, on_bytes=None, file_region=None):
        if len({s.name for s in specs}) != len(specs):
            raise ValueError("a tensor name appears twice in the checkpoint to write")
        self.folder, self.on_bytes = Path(folder), on_bytes or (lambda n: None)
        self._shards = _shard_specs(specs, max_shard_bytes)
        n = len(self._shards)
        self.files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = [(i, spec) for i, shard in enumerate(self._shards) for spec in shard]
        self._next = 0
        self._file = None
        self._open_shard = -1
        self._written = 0  # bytes in the open shard
        self._hasher = BackgroundHasher()
        self._followed = None  # the open shard's FollowedFile
        self._file_region = file_region or (lambda tensor: None)
        self._sources: dict[Path, int] = {}  # open source files for copy_file_range: path -> fd

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abandon()

    def _abandon(self) -> None:
        """Stop writing and hashing (no thread is left waiting for bytes); the caller discards the files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._close_sources()
        self._hasher.abandon()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor of the order given at construction; any layout, cast to its spec's dtype."""
        if self._next >= len(self._order):
            raise AssertionError(f"{name}: every tensor of the checkpoint was already written")
        shard, spec = self._order[self._next]
        if name != spec.name or tensor.numel() != spec.nbytes // spec.dtype.itemsize:
            raise AssertionError(f"expected {spec.name} {spec.shape}, got {name} {tuple(tensor.shape)}")
        if shard != self._open_shard:
            self._start_shard(shard)
        for block in _blocks(tensor.to(spec.dtype)):
            region = self._file_region(block)
            if region is None:
                self._write(_bytes(block))
            else:
                self._copy(*region, block)
        self._next += 1
        self.on_bytes(spec.nbytes)

    def close(self) -> dict[str, str]:
        """Finish the last shard and write the index; returns file name -> sha256. Raises if a tensor of the
        order was not written (the files would be incomplete)."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            self._abandon()
            raise AssertionError(f"{len(self._order) - self._next} tensors were not written, the first is {missing}")
        self._end_shard()
        self._close_sources()
        digests = {path.name: digest for path, digest in self._hasher.wait().items()}
        if len(self.files) > 1:
            weight_map = {spec.name: self.files[i] for i, spec in self._order}
            total = sum(spec.nbytes for _, spec in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return digests

    def _start_shard(self, shard: int) -> None:
        self._end_shard()
        self._open_shard = shard
        path = self.folder / self.files[shard]
        self._file = open(path, "wb", buffering=0)
        self._written = 0
        self._followed = self._hasher.follow(path)
        self._write(memoryview(_header(self._shards[shard])))

    def _write(self, view: memoryview) -> None:
        _write_all(self._file, view)
        self._written += len(view)
        self._followed.grew(self._written)

    def _copy(self, path: Path, offset: int, block: torch.Tensor) -> None:
        """`block`'s bytes, which also lie in `path` at `offset`: copied in the kernel, or (where it cannot)
        written from memory."""
        if path not in self._sources:
            self._sources[path] = os.open(path, os.O_RDONLY)
        view = _bytes(block)
        copied = copy_range(self._sources[path], self._file.fileno(), len(view), offset)
        _write_all(self._file, view[copied:])
        self._written += len(view)
        self._followed.grew(self._written)

    def _close_sources(self) -> None:
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()

    def _end_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._followed.close()
