"""Write an HF safetensors checkpoint tensor by tensor, in an order known up front, holding none of it.

safetensors' save_file takes a whole shard as a dict of tensors, so a converter using it must hold a shard
(2 GiB by default here, 5 GB in transformers) in memory before writing a byte. The format itself needs no
such buffer: a file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
range of the data section; optional "__metadata__"), then the tensors' raw bytes, back to back, no holes.
Knowing every name, shape and dtype before the first tensor exists (the conversion plan does), the header
can be written first and each tensor streamed to its place as it is produced, from its own memory (a view of
the memory-mapped source, often): no staging copy and a memory bound of what the caller holds.

Shards written side by side each get a thread of their own (the caller's thread checks names, order and shapes
and queues the bytes). sha256 (for the manifest) is computed behind the writer on background threads, from the
page cache, two files at a time per thread (file_hashing.py). Files are read back by safetensors in tests.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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


def _shard_units(unit_bytes: list[int], max_shard_bytes: int) -> list[list[int]]:
    """Consecutive runs of units (indices) of at most max_shard_bytes each, cut only between units (a unit larger
    than that gets a shard of its own), as few shards as that allows and as even as the cuts allow: the
    smallest cap that needs no more shards than max_shard_bytes does (shards of even size are hashed in
    parallel in even time)."""

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


_QUEUED_BYTES = 256 << 20  # per shard: tensor bytes handed to its thread, not yet written (or one larger tensor)


def _write_pieces(out: _OpenShard, pieces: list[tuple[torch.Tensor, tuple[int, int] | None]]) -> None:
    """On the shard's thread: append the blocks, each copied in the kernel from (source fd, offset) where given
    and possible, else written from memory."""
    for block, source in pieces:
        view = _bytes(block)
        if source is None:
            out.write(view)
            continue
        grew = lambda done: out.followed.grew(out.written + done)  # noqa: E731 - the hasher follows big copies
        copied = copy_range(source[0], out.file.fileno(), len(view), source[1], grew)
        _write_all(out.file, view[copied:])
        out.advanced(len(view))


class _OpenShard:
    """One shard file being written on a thread of its own (several shards are written side by side): the next
    of its tensors, bytes written, its hash follower, and the writes queued for its thread."""

    def __init__(self, path: Path, header: bytes, hasher: BackgroundHasher):
        # "xb": a new file. Never truncate one (or touch it first): ext4 then writes a truncated file back when
        # it is closed (auto_da_alloc), and close() waits for gigabytes to reach the disk.
        self.file = open(path, "xb", buffering=0)
        self.followed, self.next, self.written = hasher.follow(path), 0, 0
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"write-{path.name}")
        self._queued: deque[tuple[Future, int]] = deque()  # (write, its bytes), oldest first
        self.write(memoryview(header))

    def submit(self, job, nbytes: int) -> None:
        """Run job() on the shard's thread after the writes before it; first wait (raising their errors) until at
        most _QUEUED_BYTES are queued, so the caller holds at most that much tensor memory alive per shard."""
        while self._queued and sum(n for _, n in self._queued) + nbytes > _QUEUED_BYTES:
            self._queued.popleft()[0].result()
        self._queued.append((self._thread.submit(job), nbytes))

    def finish(self) -> None:
        """Wait for every queued write (raising the first error); the last one queued closes the file."""
        while self._queued:
            self._queued.popleft()[0].result()
        self._thread.shutdown()

    def stop(self) -> None:
        """After a failure: drop the queued writes, wait for the running one, close the file."""
        self._thread.shutdown(wait=True, cancel_futures=True)
        self._queued.clear()
        self.file.close()

    def write(self, view: memoryview) -> None:
        _write_all(self.file, view)
        self.advanced(len(view))

    def advanced(self, nbytes: int) -> None:
        self.written += nbytes
        self.followed.grew(self.written)

    def close(self) -> None:
        self.file.close()
        self.followed.close()


class StreamingSafetensorsWriter:
    """Writes the tensors of `units` (lists of specs; a unit, e.g. one decoder layer, never spans two files)
    into `folder` as shards of at most `max_shard_bytes`, named like transformers' save_pretrained (one shard:
    model.safetensors, no index). Within a shard tensors come in the order given; shards may be written side
    by side (`unit_order` says how, so that several are hashed at once).

    file_region(tensor) -> (path, offset) | None: where a contiguous tensor's bytes already are in a file (a
    view of a memory-mapped source): those are copied file to file by the kernel (os.copy_file_range, half the
    CPU of writing from the mapped pages here), everything else is written from memory."""

    def __init__(self, folder: Path, units: list[list[TensorSpec]], max_shard_bytes: int, on_bytes=None, file_region=None):
        specs = [spec for unit in units for spec in unit]
        if not specs:
            raise ValueError("no tensor to write")
        if len({s.name for s in specs}) != len(specs):
            raise ValueError("a tensor name appears twice in the checkpoint to write")
        self.folder, self.on_bytes = Path(folder), on_bytes or (lambda n: None)
        self._unit_bytes = [sum(spec.nbytes for spec in unit) for unit in units]
        self._shard_of_unit, self._shards = {}, []
        for shard, unit_ids in enumerate(_shard_units(self._unit_bytes, max_shard_bytes)):
            self._shards.append([spec for i in unit_ids for spec in units[i]])
            self._shard_of_unit.update({i: shard for i in unit_ids})
        n = len(self._shards)
        self.files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._place = {spec.name: (shard, i) for shard, specs in enumerate(self._shards) for i, spec in enumerate(specs)}
        self._open: dict[int, _OpenShard] = {}  # shards with tensors still to come
        self._done: set[int] = set()  # shards with every tensor given
        self._finishing: list[_OpenShard] = []  # shards whose threads may still be writing them
        self._hasher = BackgroundHasher()
        self._file_region = file_region or (lambda tensor: None)
        self._sources: dict[Path, int] = {}  # open source files for copy_file_range: path -> fd

    def unit_order(self, side_by_side: int | None = None) -> list[int]:
        """Indices of the units in an order to write them: up to `side_by_side` shards (default: one per core,
        the hasher's threads) grow at once, the one with the fewest bytes so far first; a shard's units in
        their order."""
        width = max(1, side_by_side or os.cpu_count() or 1)
        units_of = [[u for u, s in sorted(self._shard_of_unit.items()) if s == shard] for shard in range(len(self._shards))]
        order, growing, next_shard = [], {}, 0  # growing: open shard -> bytes given to it so far
        while next_shard < len(units_of) or growing:
            while next_shard < len(units_of) and len(growing) < width:
                growing[next_shard] = 0
                next_shard += 1
            shard = min(growing, key=lambda s: (growing[s], s))
            unit = units_of[shard].pop(0)
            order.append(unit)
            growing[shard] += self._unit_bytes[unit]
            if not units_of[shard]:
                del growing[shard]
        return order

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abandon()

    def _abandon(self) -> None:
        """Stop writing and hashing (no thread is left waiting for bytes); the caller discards the files."""
        for shard in [*self._open.values(), *self._finishing]:
            shard.stop()
        self._open.clear()
        self._finishing.clear()
        self._close_sources()
        self._hasher.abandon()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor of its shard (in the order given at construction); any layout, cast to its spec's
        dtype."""
        if name not in self._place:
            raise AssertionError(f"{name}: not a tensor of this checkpoint")
        shard, index = self._place[name]
        expected = self._next_index(shard)
        spec = self._shards[shard][index]
        if index != expected:
            want = self._shards[shard][expected] if expected < len(self._shards[shard]) else None
            raise AssertionError(f"expected {want.name if want else 'nothing more'} in {self.files[shard]}, got {name}")
        if tensor.numel() != spec.nbytes // spec.dtype.itemsize:
            raise AssertionError(f"expected {spec.name} {spec.shape}, got {name} {tuple(tensor.shape)}")
        if shard not in self._open:
            self._open[shard] = _OpenShard(self.folder / self.files[shard], _header(self._shards[shard]), self._hasher)
        out = self._open[shard]
        pieces = []  # (contiguous block, (source fd, offset) where its bytes lie in a file, or None)
        for block in _blocks(tensor.to(spec.dtype)):
            region = self._file_region(block)  # here, in the caller's thread, which registers the source regions
            pieces.append((block, region and (self._source_fd(region[0]), region[1])))
        out.submit(functools.partial(_write_pieces, out, pieces), spec.nbytes)
        out.next += 1
        if out.next == len(self._shards[shard]):
            out.submit(out.close, 0)
            del self._open[shard]
            self._done.add(shard)
            self._finishing.append(out)
        self.on_bytes(spec.nbytes)

    def _next_index(self, shard: int) -> int:
        if shard in self._done:
            return len(self._shards[shard])
        return self._open[shard].next if shard in self._open else 0

    def close(self) -> dict[str, str]:
        """Write the index; returns file name -> sha256. Raises if a tensor was not written (the files would be
        incomplete)."""
        missing = [specs[self._next_index(shard)].name for shard, specs in enumerate(self._shards) if shard not in self._done]
        if missing:
            left = sum(len(specs) - self._next_index(shard) for shard, specs in enumerate(self._shards))
            self._abandon()
            raise AssertionError(f"{left} tensors were not written, the first is {missing[0]}")
        try:
            while self._finishing:
                self._finishing[0].finish()  # raises the first error of its writes
                self._finishing.pop(0)
        except BaseException:
            self._abandon()  # also without a `with`: no writer or hashing thread is left waiting
            raise
        self._close_sources()
        digests = {path.name: digest for path, digest in self._hasher.wait().items()}
        if len(self.files) > 1:
            weight_map = {spec.name: self.files[shard] for shard, specs in enumerate(self._shards) for spec in specs}
            total = sum(self._unit_bytes)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return dict(sorted(digests.items()))

    def _source_fd(self, path: Path) -> int:
        if path not in self._sources:
            self._sources[path] = os.open(path, os.O_RDONLY)
        return self._sources[path]

    def _close_sources(self) -> None:
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()
