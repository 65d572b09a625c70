"""Write an HF safetensors checkpoint tensor by tensor, in an order known up front, holding none of it.

safetensors' save_file takes a whole shard as a dict of tensors, so a converter using it must hold a shard
(2 GiB by default here, 5 GB in transformers) in memory before writing a byte. The format itself needs no
such buffer: a file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
range of the data section; optional "__metadata__"), then the tensors' raw bytes, back to back, no holes.
Knowing every name, shape and dtype before the first tensor exists (the conversion plan does), the header
can be written first and each tensor streamed to its place as it is produced, from its own memory (a view of
the memory-mapped source, often): no staging copy and a memory bound of what the caller holds.

sha256 (for the manifest) is computed on a second thread from the same buffers as they are written, so
hashing overlaps writing and nothing is read back from disk. Files are read back by safetensors in tests.
"""

from __future__ import annotations

import hashlib
import json
import queue
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dynamo_mega.convert.hf_files import INDEX, SAFETENSORS_DTYPES, SINGLE

HASH_AHEAD_BYTES = 512 << 20  # written but not yet hashed; a larger tensor waits until the queue is empty
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


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
    named like transformers' save_pretrained (one shard: model.safetensors, no index)."""

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int, on_bytes=None):
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
        self._digests: dict[str, str] = {}
        # (memoryview, tensor kept alive until hashed) or (None, file name) at the end of a file; at most
        # HASH_AHEAD_BYTES written but not yet hashed (hashing is the slower side), so memory stays bounded
        self._to_hash: queue.Queue = queue.Queue()
        self._unhashed = 0
        self._unhashed_changed = threading.Condition()
        self._hasher = threading.Thread(target=self._hash_loop, name="sha256", daemon=True)
        self._hash_error: BaseException | None = None
        self._hasher.start()

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # stop the hashing thread; the caller discards the files
            if self._file is not None:
                self._file.close()
                self._file = None
            self._put(None, check=False)
            self._hasher.join()

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
            view = _bytes(block)
            _write_all(self._file, view)
            self._put((view, block))
        self._next += 1
        self.on_bytes(spec.nbytes)

    def close(self) -> dict[str, str]:
        """Finish the last shard and write the index; returns file name -> sha256. Raises if a tensor of the
        order was not written (the files would be incomplete)."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise AssertionError(f"{len(self._order) - self._next} tensors were not written, the first is {missing}")
        self._end_shard()
        self._put(None)
        self._hasher.join()
        if self._hash_error is not None:
            raise self._hash_error
        if len(self.files) > 1:
            weight_map = {spec.name: self.files[i] for i, spec in self._order}
            total = sum(spec.nbytes for _, spec in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return dict(self._digests)

    def _start_shard(self, shard: int) -> None:
        self._end_shard()
        self._open_shard = shard
        self._file = open(self.folder / self.files[shard], "wb", buffering=0)
        header = memoryview(_header(self._shards[shard]))
        _write_all(self._file, header)
        self._put((header, None))

    def _end_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._put((None, self.files[self._open_shard]))

    def _put(self, item, check: bool = True) -> None:
        """Queue `item` for the hashing thread, first waiting until the bytes queued before it fit the budget."""
        if check and self._hash_error is not None:
            raise self._hash_error
        nbytes = 0 if item is None or item[0] is None else len(item[0])
        with self._unhashed_changed:
            self._unhashed_changed.wait_for(lambda: self._unhashed == 0 or self._unhashed + nbytes <= HASH_AHEAD_BYTES)
            self._unhashed += nbytes
        self._to_hash.put(item)

    def _hash_loop(self) -> None:
        sha256 = hashlib.sha256()
        while (item := self._to_hash.get()) is not None:
            view, keep = item
            try:
                if view is None:  # end of file `keep`
                    self._digests[keep] = sha256.hexdigest()
                    sha256 = hashlib.sha256()
                elif self._hash_error is None:
                    sha256.update(view)  # releases the GIL for large buffers
            except BaseException as exc:  # noqa: BLE001 (reported to the writing thread)
                self._hash_error = exc
            finally:
                with self._unhashed_changed:
                    self._unhashed -= 0 if view is None else len(view)
                    self._unhashed_changed.notify()
