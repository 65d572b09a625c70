"""Hugging Face checkpoint folders: safetensors (single file or sharded with model.safetensors.index.json).

Reading never holds more than the tensors asked for: shards are opened lazily (memory-mapped by safetensors)
and only one is kept open, so a layer-ordered walk touches one shard at a time. Headers (names, dtypes,
shapes) are read from the safetensors header alone (8-byte little-endian length + JSON), which is what the
dry run uses. Writing: hf_writer.py.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from dynamo_mega.convert.file_copy import FileBackedMemory

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files of an HF folder that are weights (never carried along as-is).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
_WEIGHT_INDEXES = (INDEX, "pytorch_model.bin.index.json")
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass(frozen=True)
class TensorHeader:
    file: str  # shard file name inside the folder
    dtype: torch.dtype
    shape: tuple[int, ...]
    end: int  # byte offset in the file where this tensor's data ends

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The JSON header of a safetensors file (name -> {dtype, shape, data_offsets}) without reading data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {length} is implausible)")
        try:
            header = json.loads(f.read(length))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON: {exc})") from exc
    header.pop("__metadata__", None)
    for h in header.values():
        h["end"] = 8 + length + h["data_offsets"][1]
    return header


def read_headers(folder: Path) -> dict[str, TensorHeader]:
    """Tensor name -> header for every tensor of the folder's safetensors checkpoint."""
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{folder / INDEX}: no weight_map")
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE).is_file():
        weight_map, files = None, [SINGLE]
    elif (folder / "pytorch_model.bin").exists() or (folder / "pytorch_model.bin.index.json").exists():
        raise ValueError(f"{folder}: only safetensors is read; re-save with save_pretrained(safe_serialization=True)")
    else:
        raise ValueError(f"{folder}: no {SINGLE} or {INDEX}; point SRC at a Hugging Face checkpoint folder")
    headers: dict[str, TensorHeader] = {}
    for file in files:
        if not (folder / file).is_file():
            raise ValueError(f"{folder}: shard {file} listed in {INDEX} is missing")
        for name, h in read_safetensors_header(folder / file).items():
            if h["dtype"] not in SAFETENSORS_DTYPES:
                expected = sorted(SAFETENSORS_DTYPES)
                raise ValueError(f"{folder / file}: tensor {name} has dtype {h['dtype']}; expected one of {expected}")
            headers[name] = TensorHeader(file, SAFETENSORS_DTYPES[h["dtype"]], tuple(h["shape"]), h["end"])
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in headers or headers[name].file != file:
                raise ValueError(f"{folder / INDEX}: tensor {name} is mapped to {file}, which does not hold it")
    return headers


def check_data_present(folder: Path, headers: dict[str, TensorHeader]) -> None:
    """Every shard is as long as its header says (a truncated download fails here, before anything is written)."""
    needed: dict[str, int] = {}
    for h in headers.values():
        needed[h.file] = max(needed.get(h.file, 0), h.end)
    for file, end in sorted(needed.items()):
        size = (folder / file).stat().st_size
        if size < end:
            raise ValueError(f"{folder / file} is truncated: {size} bytes, its header needs {end}; re-download it")


class HFReader:
    """Lazy tensor access to an HF folder; keeps at most one shard open (safetensors memory-maps it, and each
    tensor returned is a view of the mapped file: no copy)."""

    def __init__(self, folder: Path, headers: dict[str, TensorHeader]):
        self.folder, self.headers = folder, headers
        self._open_file: str | None = None
        self._handle = None
        self._mapped = FileBackedMemory()  # the live tensors' bytes, for file_region

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        header = self.headers[name]
        if header.file != self._open_file:
            self._handle = safe_open(str(self.folder / header.file), framework="pt")
            self._open_file = header.file
        tensor = self._handle.get_tensor(name)
        if tensor.untyped_storage().nbytes() == header.nbytes:  # its own mapping of the file's bytes
            self._mapped.add(tensor, tensor.data_ptr(), header.nbytes, self.folder / header.file, header.end - header.nbytes)
        return tensor

    def file_region(self, address: int, nbytes: int) -> tuple[Path, int] | None:
        """(file, byte offset) holding bytes [address, address + nbytes) when they lie inside a tensor this
        reader returned that is still alive, else None: lets a writer copy file to file in the kernel."""
        return self._mapped.find(address, nbytes)


def carried_files(folder: Path) -> list[Path]:
    """Top-level files of an HF folder other than weights: config, generation config, tokenizer files, ..."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES) and p.name not in _WEIGHT_INDEXES
    )
