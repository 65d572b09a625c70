"""Write an HF safetensors checkpoint tensor by tensor, in an order known up front, holding none of it.

safetensors' save_file takes a whole shard as a dict of tensors, so a converter using it must hold a shard
(2 GiB by default here, 5 GB in transformers) in memory before writing a byte. The format itself needs no
such buffer: a file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
range of the data section; optional "__metadata__"), then the tensors' raw bytes, back to back, no holes.
Knowing every name, shape and dtype before the first tensor exists (the conversion plan does), the header
can be written first and each tensor streamed to its place as it is produced, from its own memory (a view of
the memory-mapped source, often): no staging copy and a memory bound of what the caller holds.

Shards are written one after the other; each is handed to `on_file_done` once closed (the converter hashes
and fsyncs it in the background meanwhile). Files are read back by safetensors in tests.
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


def _shard_units(unit_bytes: list[int], max_shard_bytes: int) -> list[list[int]]:
    """Consecutive runs of units (indices) of at most max_shard_bytes each, cut only between units (a unit larger
    than that gets a shard of its own), as few shards as that allows and as even as the cuts allow: the
    smallest cap that needs no more shards than max_shard_bytes does."""

    def cut(cap: int) -> list[list[int]]:
        shards, size = [[]], 0
        for i, nbytes in enumerate(unit_bytes):
            if shards[-1] and size + nbytes > cap:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += nbytes
        return shards

    fewest = len(cut(max_shard_bytes))
    low, high = 1, max(max_shard_bytes, 1)  # cut(high) has `fewest` shards; find the smallest such cap
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if len(cut(middle)) <= fewest else (middle + 1, high)
    return cut(high)


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
    """Writes the tensors of `units` (lists of specs; a unit, e.g. one decoder layer, never spans two files)
    into `folder` as shards of at most `max_shard_bytes`, named like transformers' save_pretrained (one shard:
    model.safetensors, no index). Tensors come in the order given, one shard after the other.

    file_region(tensor) -> (path, offset) | None: where a contiguous tensor's bytes already are in a file (a
    view of a memory-mapped source): those are copied file to file by the kernel (os.copy_file_range, half the
    CPU of writing from the mapped pages here), everything else is written from memory. on_file_done(path) is
    called as each shard is closed; on_bytes(n) as tensor bytes are written (a progress bar)."""

    def __init__(self, folder: Path, units: list[list[TensorSpec]], max_shard_bytes: int, on_bytes=None, file_region=None,
                 on_file_done=None):  # fmt: skip
        specs = [spec for unit in units for spec in unit]
        if not specs:
            raise ValueError("no tensor to write")
        if len({s.name for s in specs}) != len(specs):
            raise ValueError("a tensor name appears twice in the checkpoint to write")
        self.folder, self.on_bytes = Path(folder), on_bytes or (lambda n: None)
        self._on_file_done = on_file_done or (lambda path: None)
        unit_bytes = [sum(spec.nbytes for spec in unit) for unit in units]
        self._total_bytes = sum(unit_bytes)
        self._shards = [[spec for i in unit_ids for spec in units[i]] for unit_ids in _shard_units(unit_bytes, max_shard_bytes)]
        n = len(self._shards)
        self.files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = [(shard, spec) for shard, specs in enumerate(self._shards) for spec in specs]
        self._next = 0  # index into _order of the next tensor
        self._out = None  # the shard file being written
        self._file_region = file_region or (lambda tensor: None)
        self._sources: dict[Path, int] = {}  # open source files for copy_file_range: path -> fd

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._close_files()  # after a failure: the caller discards the folder

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor (in the order given at construction); any layout, cast to its spec's dtype."""
        if self._next == len(self._order):
            raise AssertionError(f"expected nothing more, got {name}")
        shard, spec = self._order[self._next]
        if name != spec.name:
            raise AssertionError(f"expected {spec.name} in {self.files[shard]}, got {name}")
        if tensor.numel() != spec.nbytes // spec.dtype.itemsize:
            raise AssertionError(f"expected {spec.name} {spec.shape}, got {name} {tuple(tensor.shape)}")
        if self._out is None:
            # "xb": a new file. Never truncate one (or touch it first): ext4 then writes a truncated file back
            # when it is closed (auto_da_alloc), and close() waits for gigabytes to reach the disk.
            self._out = open(self.folder / self.files[shard], "xb", buffering=0)
            _write_all(self._out, memoryview(_header(self._shards[shard])))
        for block in _blocks(tensor.to(spec.dtype)):
            self._write_block(block)
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != shard:
            self._out.close()
            self._out = None
            self._on_file_done(self.folder / self.files[shard])
        self.on_bytes(spec.nbytes)

    def _write_block(self, block: torch.Tensor) -> None:
        """Append a contiguous block: copied in the kernel from the file holding its bytes where there is one and
        the kernel can, else (or the rest) written from memory."""
        view = _bytes(block)
        region = self._file_region(block)
        copied = copy_range(self._source_fd(region[0]), self._out.fileno(), len(view), region[1]) if region else 0
        _write_all(self._out, view[copied:])

    def close(self) -> list[str]:
        """Write the index; returns the shard file names. Raises if a tensor was not written (the files would be
        incomplete)."""
        self._close_files()
        if self._next < len(self._order):
            left = len(self._order) - self._next
            raise AssertionError(f"{left} tensors were not written, the first is {self._order[self._next][1].name}")
        if len(self.files) > 1:
            weight_map = {spec.name: self.files[shard] for shard, spec in self._order}
            index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return list(self.files)

    def _source_fd(self, path: Path) -> int:
        if path not in self._sources:
            self._sources[path] = os.open(path, os.O_RDONLY)
        return self._sources[path]

    def _close_files(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()
