"""Read regions of a torch_dist checkpoint's tensors straight from its memory-mapped data files.

torch.distributed.checkpoint's own reader copies every byte three times (file -> read buffer -> torch.load's
new storage -> the destination), which made reading cost more than writing the HF side. A tensor record in a
.distcp file is what torch.save writes: an uncompressed zip whose storage record ("*/data/0") holds the raw
bytes. So a stored chunk can be a tensor VIEW of the file's pages: torch.load with map_location="meta" reads
only the record's small pickle (dtype, shape, strides; ~5 KB, never the data), zipfile finds where the raw
bytes start, and torch.frombuffer maps them. Nothing is copied until the caller writes the tensor somewhere.

Each chunk maps only its own byte range, and the mapping lives exactly as long as the tensors viewing it, so
host memory follows what the caller holds (one layer), not the file sizes. Records this cannot view (a
transform such as compression, a compressed zip entry, several storages) are read with torch.load instead.
"""

from __future__ import annotations

import functools
import io
import mmap
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dynamo_mega.convert.file_copy import FileBackedMemory

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header: 30 bytes, name and extra lengths last


@dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int  # where the torch.save record starts in `file`
    length: int
    transformed: bool


class _ByteRange(io.RawIOBase):
    """A read-only, seekable file object over bytes [start, start + length) of a mapped file."""

    def __init__(self, buffer: memoryview):
        self._buffer, self._pos = buffer, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._buffer)}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, out) -> int:
        n = max(0, min(len(out), len(self._buffer) - self._pos))
        out[:n] = self._buffer[self._pos : self._pos + n]
        self._pos += n
        return n


class DistcpReader:
    """Tensor regions of a torch_dist checkpoint folder, by checkpoint key and global offsets."""

    def __init__(self, ckpt_dir: Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder = Path(ckpt_dir)
        metadata = FileSystemReader(str(self.folder)).read_metadata()
        self.dtypes: dict[str, torch.dtype] = {}
        self._chunks: dict[str, list[_Chunk]] = {}
        self._by_layer: dict[str, dict[int, list[_Chunk]]] = {}
        self._metas: dict[tuple[bytes, ...], torch.Tensor] = {}  # record description -> meta tensor
        self._mapped = FileBackedMemory()  # the live mappings' bytes, for file_region
        for fqn, m in metadata.state_dict_metadata.items():
            if isinstance(m, TensorStorageMetadata):
                self.dtypes[fqn] = m.properties.dtype
                self._chunks[fqn] = []
        for index, info in metadata.storage_data.items():
            if index.fqn in self._chunks:
                chunk_meta = _find_chunk(metadata.state_dict_metadata[index.fqn].chunks, tuple(index.offset))
                self._chunks[index.fqn].append(
                    _Chunk(
                        tuple(index.offset),
                        tuple(chunk_meta.sizes),
                        info.relative_path,
                        info.offset,
                        info.length,
                        bool(getattr(info, "transform_descriptors", None)),
                    )
                )

        for fqn, chunks in self._chunks.items():
            if chunks and all(len(c.sizes) > 1 and c.sizes[0] == 1 for c in chunks):
                self._by_layer[fqn] = {}
                for c in chunks:
                    self._by_layer[fqn].setdefault(c.offsets[0], []).append(c)

    def read(self, fqn: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """Region [offsets, offsets + sizes) of stored tensor `fqn`: a view of the file's memory when one stored
        chunk holds all of it, else a new tensor assembled from the chunks that overlap it."""
        if fqn not in self._chunks:
            raise ValueError(f"{self.folder}: no tensor {fqn} in the checkpoint")
        dtype = self.dtypes[fqn]
        candidates = self._candidates(fqn, offsets[0]) if sizes[0] == 1 else self._chunks[fqn]
        overlapping = [c for c in candidates if _overlap(c.offsets, c.sizes, offsets, sizes) is not None]
        for chunk in overlapping:
            if all(co <= o and o + s <= co + cs for co, cs, o, s in zip(chunk.offsets, chunk.sizes, offsets, sizes)):
                return _narrow(self._chunk_tensor(chunk, dtype), chunk.offsets, offsets, sizes)
        out = torch.empty(sizes, dtype=dtype)
        covered = 0
        for chunk in overlapping:
            lo, hi = _overlap(chunk.offsets, chunk.sizes, offsets, sizes)
            region = tuple(h - lo_ for lo_, h in zip(lo, hi))
            source = _narrow(self._chunk_tensor(chunk, dtype), chunk.offsets, lo, region)
            _narrow(out, offsets, lo, region).copy_(source)
            covered += source.numel()
        if covered != out.numel():  # chunks never overlap, so a shortfall means part of the region is not stored
            raise ValueError(f"{self.folder}: the stored chunks of {fqn} do not cover {sizes} at {offsets}")
        return out

    def file_region(self, tensor: torch.Tensor) -> tuple[Path, int] | None:
        """(file, byte offset) holding a contiguous tensor's bytes when it is (part of) a view this reader
        returned and whose mapping is still alive, else None. Lets a writer copy file to file in the kernel
        (os.copy_file_range) instead of reading the mapped pages into a write."""
        if not tensor.is_contiguous():
            return None
        return self._mapped.find(tensor.data_ptr(), tensor.numel() * tensor.element_size())

    def _register(self, chunk: _Chunk, mapped: mmap.mmap, address: int, nbytes: int, data_start: int) -> None:
        self._mapped.add(mapped, address, nbytes, self.folder / chunk.file, chunk.offset + data_start)

    def _candidates(self, fqn: str, first: int) -> list[_Chunk]:
        """Chunks of `fqn` that may hold index `first` of dim 0: for a layer-stacked tensor (every chunk one
        layer deep) that layer's chunks, without scanning every layer's; otherwise all of them."""
        by_layer = self._by_layer.get(fqn)
        return self._chunks[fqn] if by_layer is None else by_layer.get(first, [])

    def _chunk_tensor(self, chunk: _Chunk, dtype: torch.dtype) -> torch.Tensor:
        path = self.folder / chunk.file
        start = chunk.offset - chunk.offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets are page aligned
        with open(path, "rb") as f:
            # ACCESS_COPY: a writable (private) mapping, so torch.frombuffer does not warn; nothing writes to it.
            mapped = mmap.mmap(f.fileno(), chunk.offset + chunk.length - start, offset=start, access=mmap.ACCESS_COPY)
        record = memoryview(mapped)[chunk.offset - start :]
        on_view = functools.partial(self._register, chunk)
        tensor = None if chunk.transformed else _view_record(record, mapped, chunk.offset - start, self._metas, on_view)
        if tensor is None:
            tensor = torch.load(_ByteRange(record), map_location="cpu", weights_only=True)
        if tensor.dtype != dtype or tuple(tensor.shape) != chunk.sizes:
            raise ValueError(
                f"{self.folder / chunk.file}: record at byte {chunk.offset} holds {tuple(tensor.shape)} {tensor.dtype}, "
                f"the checkpoint metadata says {chunk.sizes} {dtype}"
            )
        return tensor


def _view_record(record: memoryview, mapped: mmap.mmap, record_start: int, metas: dict, on_view) -> torch.Tensor | None:
    """A torch.save record's tensor as a view of `mapped`, or None when its layout does not allow one;
    on_view(mapped, address, nbytes, offset in the record) is told where the tensor's bytes are.

    `metas` caches the meta tensor per record description (the pickle and byte order records): the layers of
    one stacked tensor are described identically, and torch.load costs ~5 ms of Python per record even when
    it reads no data."""
    with zipfile.ZipFile(_ByteRange(record)) as archive:
        infos = archive.infolist()
    spans = {i.filename: _stored_span(record, i) for i in infos}
    if any(span is None for span in spans.values()):
        return None
    # (not zipfile's read: it checks each entry's crc32, which the converter's own writer leaves out)
    described = tuple(bytes(record[slice(*spans[name])]) for name in sorted(spans) if name.endswith(("/data.pkl", "/byteorder")))
    meta = metas.get(described)
    if meta is None:
        meta = metas[described] = torch.load(_ByteRange(record), map_location="meta", weights_only=True)
    storages = [name for name in spans if "/data/" in name and not name.endswith("/")]
    if not isinstance(meta, torch.Tensor) or len(storages) != 1:
        return None
    data_start, data_stop = spans[storages[0]]
    nbytes = meta.untyped_storage().nbytes()
    if data_stop - data_start != nbytes:
        return None
    if nbytes == 0:
        return torch.empty(meta.shape, dtype=meta.dtype)
    raw = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=record_start + data_start)
    on_view(mapped, raw.data_ptr(), nbytes, data_start)
    return raw.view(meta.dtype).as_strided(meta.shape, meta.stride(), meta.storage_offset())


def _stored_span(record: memoryview, info: zipfile.ZipInfo) -> tuple[int, int] | None:
    """[start, stop) of an uncompressed zip entry's bytes within `record`; None for a compressed one."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    header = _LOCAL_HEADER.unpack_from(record, info.header_offset)
    if header[0] != b"PK\x03\x04":
        return None
    start = info.header_offset + _LOCAL_HEADER.size + header[9] + header[10]
    return start, start + info.file_size


def _find_chunk(chunks, offsets: tuple[int, ...]):
    for c in chunks:
        if tuple(c.offsets) == offsets:
            return c
    raise ValueError(f"checkpoint metadata: storage entry at {offsets} has no chunk")


def _overlap(a_off, a_size, b_off, b_size):
    lo = tuple(max(x, y) for x, y in zip(a_off, b_off))
    hi = tuple(min(x + xs, y + ys) for x, xs, y, ys in zip(a_off, a_size, b_off, b_size))
    return None if any(h <= low for low, h in zip(lo, hi)) else (lo, hi)


def _narrow(t: torch.Tensor, t_offsets, offsets, sizes) -> torch.Tensor:
    """The region [offsets, offsets + sizes) (global coordinates) of `t`, which starts at `t_offsets`."""
    for dim, (base, o, s) in enumerate(zip(t_offsets, offsets, sizes)):
        if o != base or s != t.shape[dim]:
            t = t.narrow(dim, o - base, s)
    return t
