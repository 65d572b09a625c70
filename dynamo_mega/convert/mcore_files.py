"""Megatron distributed checkpoints (megatron.core.dist_checkpointing, torch_dist backend), a few layers at a time.

The torch_dist format stores every tensor by its GLOBAL shape (decoder layers stacked on a leading layer axis,
fc1 as [gate; up], vocab rows padded), so a checkpoint is independent of the TP/PP that wrote it and any TP/PP
loads it. That lets a single process write and read it, with the layout taken from megatron itself: a TP=1,
PP=1 GPTModel built on the meta device (no memory) yields the exact keys, global shapes and factories of its
`sharded_state_dict()`.

Memory bound. megatron's writer stages every tensor of one `dist_checkpointing.save` call in host memory, so
saving the whole model at once would hold the whole model (65 GB for Qwen2.5-32B in bf16). Instead the model
is saved in write groups (write_groups.py: consecutive decoder layers, or the tensors outside them, up to a
byte budget), each by one megatron save into the output folder with the layer axis cut to the group's
layers (its data files named per group, its torch.distributed.checkpoint metadata kept in memory), and the
groups' metadata are merged into the checkpoint's one .metadata (chunk offsets moved back to the layers'
indices). The result is what one save of the whole model writes: tests load it with
`dist_checkpointing.load` into TP/PP models. Reading goes one layer at a time, each tensor a view of its
memory-mapped chunk (distcp_reader.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from dynamo_mega.convert.mcore_writer import WRITER_THREADS, local_torch_dist_strategy
from dynamo_mega.models import qwen
from dynamo_mega.models.qwen_mapping import MCORE_LAYER_PREFIX, split_layer_name


@contextlib.contextmanager
def single_process_megatron() -> Iterator[None]:
    """A world of one process with megatron's parallel state at TP=1, PP=1 (created here if absent)."""
    from megatron.core import parallel_state

    from dynamo_mega.parallel import cpu_compat

    cpu_compat.apply_if_no_gpu()
    made_dist = not dist.is_initialized()
    if made_dist:  # an in-memory store: no port to race for
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    made_mp = False
    try:
        if dist.get_world_size() != 1:
            raise ValueError("checkpoint conversion runs in a single process: do not launch it with torchrun")
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
            made_mp = True
        elif parallel_state.get_tensor_model_parallel_world_size() != 1:
            raise ValueError("checkpoint conversion needs megatron's parallel state at TP=1, PP=1")
        yield
    finally:
        if made_mp:
            parallel_state.destroy_model_parallel()
        if made_dist:
            dist.destroy_process_group()


def layout_state_dict(arch: qwen.QwenArch, padded_rows: int) -> dict:
    """megatron's sharded_state_dict of a TP=1, PP=1 model of `arch` on the meta device: key -> ShardedBase."""
    from megatron.core.models.gpt import GPTModel

    config = qwen.transformer_config(arch, tp=1, pp=1, params_dtype=torch.float32)
    config.use_cpu_initialization = True  # allocate with the ambient (meta) device, never on a GPU
    config.perform_initialization = False
    with torch.device("meta"):
        model = GPTModel(
            config=config,
            transformer_layer_spec=qwen.layer_spec(arch, use_te=False),
            vocab_size=padded_rows,
            max_sequence_length=arch.max_position_embeddings,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
        )
    return model.sharded_state_dict()


def split_parts(layout: dict) -> dict[str, tuple[int | None, dict]]:
    """Layout entries grouped into the units written and read at once: part name -> (layer id or None, entries).

    One part per decoder layer, and one per top-level module outside them (embedding, final norm, output
    layer), so the largest part is max(one layer, one vocab-sized matrix)."""
    parts: dict[str, tuple[int | None, dict]] = {}
    for key, entry in layout.items():
        split = split_layer_name(key, MCORE_LAYER_PREFIX)
        name = f"layer{split[0]}" if split else key.rsplit(".", 1)[0].removesuffix(".word_embeddings")
        parts.setdefault(name, (split[0] if split else None, {}))[1][key] = entry
    return parts


def part_suffix(key: str) -> str:
    """State-dict key -> mapping name: the layer suffix for decoder layers, the full name otherwise."""
    split = split_layer_name(key, MCORE_LAYER_PREFIX)
    return key if split is None else split[1]


# ---------------------------------------------------------------- writing

FC1 = "mlp.linear_fc1.weight"  # stored as [gate; up] (TP=1 layout)


@dataclasses.dataclass(frozen=True)
class RowBlocks:
    """A tensor given as blocks stacked along dim 0, concatenated only if a write needs rows of two blocks.

    megatron writes linear_fc1 as two chunks (gate rows, up rows): handing it the HF gate and up tensors as
    blocks lets each chunk be written straight from the memory-mapped source, where a concatenated fc1
    would be copied once to build it and once more by the writer (a chunk view shares a larger storage)."""

    blocks: tuple[torch.Tensor, ...]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((sum(b.shape[0] for b in self.blocks), *self.blocks[0].shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        pieces, offset = [], 0
        for block in self.blocks:
            lo, hi = max(start, offset), min(stop, offset + block.shape[0])
            if lo < hi:
                pieces.append(block[lo - offset : hi - offset])
            offset += block.shape[0]
        return pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces)

    def materialize(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])


def _real_view(view_meta: torch.Tensor, source: RowBlocks, full: list) -> torch.Tensor:
    """The data a factory's meta view of the full tensor stands for: a row range straight from the blocks,
    or (any other view) the same view of the materialised tensor, built once into `full`."""
    row = int(torch.Size(view_meta.shape[1:]).numel())
    offset = view_meta.storage_offset()
    if view_meta.is_contiguous() and view_meta.shape[1:] == source.shape[1:] and offset % row == 0:
        return source.rows(offset // row, offset // row + view_meta.shape[0])
    if not full:
        full.append(source.materialize())
    return full[0].as_strided(view_meta.shape, view_meta.stride(), offset)


def _filled_entries(part: dict, tensors: dict) -> dict:
    """One part's layout entries with data: `tensors` maps a mapping name to a full tensor or RowBlocks."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    filled, blocks = {}, {}
    for key, entry in part.items():
        if isinstance(entry, ShardedObject):
            filled[key] = entry
            continue
        tensor = tensors[part_suffix(key)]
        assert tuple(tensor.shape) == tuple(entry.data.shape), (key, tensor.shape, entry.data.shape)
        if isinstance(tensor, RowBlocks) and isinstance(entry, ShardedTensor):
            tensor = tensor.materialize()
        if isinstance(tensor, RowBlocks):  # a factory (fc1's gate/up split) splits a meta stand-in
            blocks[key] = tensor
            filled[key] = dataclasses.replace(entry, data=torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"))
        elif isinstance(entry, ShardedTensor):
            filled[key] = dataclasses.replace(entry, data=tensor.contiguous(), dtype=tensor.dtype)
        else:  # a ShardedTensorFactory: builds its ShardedTensors from .data
            filled[key] = dataclasses.replace(entry, data=tensor.contiguous())
    apply_factories(filled)
    for key, source in blocks.items():
        built, full = filled[key], []
        fill = lambda t: dataclasses.replace(t, data=_real_view(t.data, source, full))  # noqa: B023
        filled[key] = [fill(t) for t in built] if isinstance(built, list) else fill(built)
    return filled


def _collapse_layer_axis(sharded_tensor, first_layer: int, num_layers: int):
    """A layer-stacked ShardedTensor [L, ...] at layer i -> the same data at i - first_layer of [num_layers, ...]."""
    if sharded_tensor.prepend_axis_num == 0:
        return sharded_tensor
    assert sharded_tensor.prepend_axis_num == 1, sharded_tensor.key
    layer = sharded_tensor.global_offset[0]
    assert first_layer <= layer < first_layer + num_layers, (sharded_tensor.key, layer, first_layer, num_layers)
    return dataclasses.replace(
        sharded_tensor,
        global_shape=(num_layers,) + tuple(sharded_tensor.global_shape[1:]),
        global_offset=(layer - first_layer,) + tuple(sharded_tensor.global_offset[1:]),
        axis_fragmentations=(num_layers,) + tuple(sharded_tensor.axis_fragmentations[1:]),
    )


_MEGATRON_OWN_FILES = ("metadata.json", "common.pt")  # written by megatron's save itself (common.pt: before 0.19)


def save_group(units: list[tuple[int | None, dict, dict]], out_dir: Path, part_no: int, file_region=None):
    """Save several parts with ONE megatron save into `out_dir`, next to the groups saved before: units are
    (layer or None, part, mapping name -> tensor or RowBlocks). Decoder layers must be consecutive and are
    stored on a layer axis of the group's length (merge_metadata moves them to their place); parts without a
    layer are stored as they are. Returns the save's torch.distributed.checkpoint Metadata, which is kept in
    memory, not written (merge_metadata writes the checkpoint's one .metadata from all groups'), and the data
    files the save wrote.

    Every group writes into the output folder itself, its data files named part{part_no}__*.distcp from the
    start: no group folders to move files out of and delete afterwards (deleting is slow on a busy disk
    mounted with `discard`: each freed block waits for a discard request behind the writeback).
    file_region(address, nbytes) -> (path, offset) | None: where tensor bytes already lie in a source file,
    to be copied file to file (mcore_writer.py)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    layers = [layer for layer, _, _ in units if layer is not None]
    assert not layers or (len(layers) == len(units) and layers == list(range(layers[0], layers[0] + len(layers)))), layers
    first = layers[0] if layers else 0
    collapse = lambda v: _collapse_layer_axis(v, first, len(layers)) if isinstance(v, ShardedTensor) else v
    filled = {}
    for _, part, tensors in units:
        for key, value in _filled_entries(part, tensors).items():
            filled[key] = [collapse(t) for t in value] if isinstance(value, list) else collapse(value)
    for name in _MEGATRON_OWN_FILES:  # the previous group's (the same content): rewriting a file in place
        (out_dir / name).unlink(missing_ok=True)  # would make ext4 flush it to disk on close
    prefix = _part_prefix(part_no)
    strategy = local_torch_dist_strategy(WRITER_THREADS, file_region, data_file_prefix=prefix)
    with _quiet_non_empty_folder_warning():
        dist_checkpointing.save(filled, str(out_dir), sharded_strategy=strategy, validate_access_integrity=False)
    return strategy.metadata, sorted(out_dir.glob(f"{prefix}*.distcp"))


@contextlib.contextmanager
def _quiet_non_empty_folder_warning() -> Iterator[None]:
    """megatron's save warns "Overwriting old incomplete / corrupted checkpoint" when its folder is not empty,
    which after the first group it never is (and nothing is overwritten: each group's files have their own
    names)."""
    import logging

    log = logging.getLogger("megatron.core.dist_checkpointing.serialization")
    drop = lambda record: "Overwriting old incomplete" not in record.getMessage()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def _part_prefix(part_no: int) -> str:
    return f"part{part_no:05d}"


def merge_metadata(groups: list[tuple[object, int | None]], out_dir: Path, num_layers: int) -> None:
    """Write out_dir/.metadata for the whole checkpoint from the groups' Metadata (from save_group, in part
    order), each with the first layer of its group (None: not a layer group).

    Tensors of a layer group get their [L, ...] global size back and their chunk offsets moved by the group's
    first layer; every chunk's file is the group's own part-prefixed data file; everything else is carried
    unchanged."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

    def moved(offsets: torch.Size, first: int) -> torch.Size:
        return torch.Size((offsets[0] + first, *offsets[1:]))

    merged = None
    for part_no, (meta, first) in enumerate(groups):
        tensors = [fqn for fqn, m in meta.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)]
        stacked = set(tensors) if first is not None else set()
        for fqn in stacked:
            m = meta.state_dict_metadata[fqn]
            m.size = torch.Size((num_layers, *m.size[1:]))
            m.chunks = [ChunkStorageMetadata(moved(c.offsets, first), c.sizes) for c in m.chunks]
        storage = {}
        for index, info in meta.storage_data.items():
            if index.fqn in stacked:
                index = MetadataIndex(index.fqn, moved(index.offset, first), index.index)
            storage[index] = dataclasses.replace(info, relative_path=_part_prefix(part_no) + info.relative_path)
        meta.storage_data = storage
        if merged is None:
            merged = meta
            continue
        for fqn, m in meta.state_dict_metadata.items():
            if fqn in merged.state_dict_metadata and isinstance(m, TensorStorageMetadata):
                merged.state_dict_metadata[fqn].chunks.extend(m.chunks)
            else:
                merged.state_dict_metadata[fqn] = m
        merged.storage_data.update(meta.storage_data)
        if getattr(meta, "mcore_data", None):
            merged.mcore_data = {**getattr(merged, "mcore_data", {}), **meta.mcore_data}
    with open(out_dir / ".metadata", "xb") as f:
        pickle.dump(merged, f)


# ---------------------------------------------------------------- reading


def stored_tensors(ckpt_dir: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Checkpoint key -> (global shape, dtype) of every tensor stored, from the metadata only."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (ckpt_dir / "metadata.json").is_file() or not (ckpt_dir / ".metadata").is_file():
        raise ValueError(f"{ckpt_dir} is not a megatron distributed checkpoint (no metadata.json / .metadata)")
    backend = json.loads((ckpt_dir / "metadata.json").read_text()).get("sharded_backend")
    if backend != "torch_dist":
        raise ValueError(f"{ckpt_dir}: sharded_backend {backend!r} is not supported; only torch_dist checkpoints are")
    meta = FileSystemReader(str(ckpt_dir)).read_metadata()
    return {
        fqn: (tuple(m.size), m.properties.dtype)
        for fqn, m in meta.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }


def read_part(reader, part: dict, layer: int | None) -> dict[str, torch.Tensor]:
    """One part from the checkpoint (reader: distcp_reader.DistcpReader): mapping name -> full TP=1 layout
    tensor; layer `layer`'s slice of the stacked tensors; linear_fc1 as RowBlocks (gate rows, up rows), since
    megatron stores those as separate chunks. Views of the files where one stored chunk holds a region, else
    assembled from the chunks that do (a checkpoint written at TP > 1)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    def read(key: str, start: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        if layer is None:
            return reader.read(key, start, shape)
        return reader.read(key, (layer, *start), (1, *shape))[0]

    out = {}
    for key, entry in part.items():
        if isinstance(entry, ShardedObject):
            continue  # _extra_state: nothing for the HF side
        shape, suffix = tuple(entry.data.shape), part_suffix(key)
        if suffix == FC1:
            rows, rest = shape[0] // 2, (0,) * (len(shape) - 1)
            half = (rows, *shape[1:])
            out[suffix] = RowBlocks((read(entry.key, (0, *rest), half), read(entry.key, (rows, *rest), half)))
        else:
            out[suffix] = read(entry.key, (0,) * len(shape), shape)
    return out
