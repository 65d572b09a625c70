"""The converter's own file I/O: the streaming safetensors writer and the memory-mapped torch_dist reader,
checked against the libraries that define the formats (safetensors reads what we write; torch.distributed.
checkpoint and megatron write what we read)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dynamo_mega.convert.distcp_reader import DistcpReader
from dynamo_mega.convert.hf_writer import StreamingSafetensorsWriter, TensorSpec


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 5, 3, 4, generator=g)  # grouped like a fused qkv: [groups, q + 2 heads, head_dim, hidden]
    return {
        "a.bf16": torch.randn(6, 4, generator=g).to(torch.bfloat16),
        "b.q_rows": qkv[:, :3],  # non-contiguous; each group's rows are (the writer writes them group by group)
        "c.transposed": torch.randn(4, 7, generator=g).t(),  # non-contiguous rows: one contiguous copy
        "d.cast": torch.randn(5, generator=g, dtype=torch.float64),  # cast to its spec's dtype while writing
        "e.big": torch.randn(40, 4, generator=g),  # larger than a shard
        "f.scalar": torch.tensor(3.5),
    }


def _specs(tensors):
    shapes = {"b.q_rows": (2 * 3 * 3, 4)}  # the HF shape of the grouped rows
    return [TensorSpec(n, shapes.get(n, tuple(t.shape)), torch.float32 if n == "d.cast" else t.dtype) for n, t in tensors.items()]


@pytest.mark.parametrize("max_shard_bytes", [1 << 20, 200])
def test_streamed_shards_read_back_with_safetensors(tmp_path, max_shard_bytes):
    tensors = _tensors()
    specs = _specs(tensors)
    seen, done = [], []
    with StreamingSafetensorsWriter(tmp_path, [[s] for s in specs], max_shard_bytes, seen.append, None, done.append) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
        files = writer.close()
    assert sum(seen) == sum(s.nbytes for s in specs)
    assert done == [tmp_path / file for file in files]  # each shard handed on once, when it is complete
    read = {}
    for file in files:
        with safe_open(str(tmp_path / file), framework="pt") as f:
            read.update({k: f.get_tensor(k) for k in f.keys()})
    for spec in specs:
        expected = tensors[spec.name].to(spec.dtype).reshape(spec.shape)
        assert read[spec.name].dtype == spec.dtype and torch.equal(read[spec.name], expected), spec.name
    if max_shard_bytes == 200:
        assert len(files) > 2 and "model.safetensors" not in files
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(files)
        assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    else:
        assert files == ["model.safetensors"]


def test_writer_refuses_out_of_order_and_incomplete_output(tmp_path):
    tensors = _tensors()
    (tmp_path / "x").mkdir()
    with pytest.raises(AssertionError, match="expected a.bf16 in model.safetensors, got b.q_rows"):
        with StreamingSafetensorsWriter(tmp_path / "x", [_specs(tensors)], 1 << 20) as writer:
            writer.write("b.q_rows", tensors["b.q_rows"])
    (tmp_path / "y").mkdir()
    writer = StreamingSafetensorsWriter(tmp_path / "y", [_specs(tensors)], 1 << 20)
    writer.write("a.bf16", tensors["a.bf16"])
    with pytest.raises(AssertionError, match="5 tensors were not written, the first is b.q_rows"):
        writer.close()


def test_a_failed_copy_surfaces_and_closes_the_files(tmp_path):
    """The source file a tensor's bytes are copied from is shorter than its region says: the error reaches
    the caller and the writer's files are closed (the caller discards the folder)."""
    import os

    tensors = _tensors()
    short = tmp_path / "short.bin"
    short.write_bytes(b"\0" * 8)
    region = lambda tensor: (short, 0) if tensor.numel() == 6 * 4 else None  # noqa: E731 - a.bf16's 48 bytes
    (tmp_path / "x").mkdir()
    open_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match="the source file ends before byte 48"):
        with StreamingSafetensorsWriter(tmp_path / "x", [_specs(tensors)], 1 << 20, file_region=region) as writer:
            for name, tensor in tensors.items():
                writer.write(name, tensor)
    assert len(os.listdir("/proc/self/fd")) == open_before


def test_shards_are_cut_between_units_as_evenly_as_the_fewest_shards_allow():
    from dynamo_mega.convert.hf_writer import _shard_units

    sizes = [5, 1, 1, 1, 1, 1]
    assert _shard_units(sizes, 6) == [[0], [1, 2, 3, 4, 5]]  # greedy at 6 would give [5, 1] and [1, 1, 1, 1]
    assert _shard_units([2, 2, 2, 2, 2, 2], 10) == [[0, 1, 2], [3, 4, 5]]  # 6 + 6, not 10 + 2
    assert _shard_units([7, 1, 1], 4) == [[0], [1, 2]]  # a unit over the limit gets a shard of its own
    assert _shard_units([1, 1, 1], 100) == [[0, 1, 2]]
    for sizes, limit in [([4, 2, 7, 1, 1, 3, 5, 2], 9), ([1] * 17, 5), ([10, 1, 10, 1], 11)]:
        shards = _shard_units(sizes, limit)
        assert [i for shard in shards for i in shard] == list(range(len(sizes)))  # order kept, nothing lost
        assert all(sum(sizes[i] for i in shard) <= limit for shard in shards if len(shard) > 1)


def test_reader_returns_regions_of_a_strided_record(tmp_path):
    """A tensor torch stores with its strides (a transposed matrix is not cloned): every region read equals
    the same region of the tensor."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    w = torch.arange(35, dtype=torch.float32).view(5, 7).t()
    dcp_save({"w": w, "n": torch.arange(4)}, storage_writer=FileSystemWriter(str(tmp_path)), no_dist=True)
    reader = DistcpReader(tmp_path)
    assert torch.equal(reader.read("w", (0, 0), (7, 5)), w)
    assert torch.equal(reader.read("w", (2, 1), (3, 4)), w[2:5, 1:5])
    assert torch.equal(reader.read("n", (1,), (2,)), torch.arange(1, 3))
    with pytest.raises(ValueError, match="no tensor missing"):
        reader.read("missing", (0,), (1,))


def test_reader_assembles_regions_across_megatron_chunks(tmp_path):
    """A tensor megatron saved as two row chunks (as TP=2 or fc1's gate/up are): a region inside one chunk and
    one across both read back exactly."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from dynamo_mega.convert.mcore_files import single_process_megatron
    from dynamo_mega.convert.mcore_writer import local_torch_dist_strategy

    full = torch.randn(6, 5, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with single_process_megatron():
        state = {f"half{i}": ShardedTensor.from_rank_offsets("w", full[3 * i : 3 * i + 3].clone(), (0, i, 2)) for i in range(2)}
        # one row per chunk, like a layer-stacked tensor: reads of one row look up that row's chunks only
        state.update({f"row{i}": ShardedTensor.from_rank_offsets("s", full[i : i + 1].clone(), (0, i, 6)) for i in range(6)})
        strategy = local_torch_dist_strategy()
        dist_checkpointing.save(state, str(tmp_path), sharded_strategy=strategy, validate_access_integrity=False)
    reader = DistcpReader(tmp_path)
    assert torch.equal(reader.read("w", (0, 0), (6, 5)), full)
    assert torch.equal(reader.read("w", (1, 1), (4, 3)), full[1:5, 1:4])
    inside = reader.read("w", (3, 0), (3, 5))
    assert torch.equal(inside, full[3:])
    assert torch.equal(reader.read("s", (4, 0), (1, 5)), full[4:5])
    assert torch.equal(reader.read("s", (1, 2), (4, 3)), full[1:5, 2:])  # across layers: every chunk is looked at


def test_reader_names_the_file_bytes_behind_a_live_view(tmp_path):
    """file_region (what the HF writer copies file to file from) points at the view's own bytes, for parts
    of a view too, and forgets a mapping once no view of it is left."""
    import gc

    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    w = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    dcp_save({"w": w}, storage_writer=FileSystemWriter(str(tmp_path)), no_dist=True)
    reader = DistcpReader(tmp_path)
    view = reader.read("w", (0, 0), (8, 6))
    for part in (view, view[3:5]):
        path, offset = reader.file_region(part)
        raw = path.read_bytes()[offset : offset + part.numel() * 4]
        assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32).view(part.shape), part)
    assert reader.file_region(view[:, :2]) is None  # not contiguous: written from memory instead
    assert reader.file_region(view.clone()) is None
    del view, part
    gc.collect()
    assert not len(reader._mapped)


@pytest.mark.parametrize("kernel", ["copies", "refuses midway", "has no copy_file_range"])
def test_round_trip_copies_mapped_source_bytes_file_to_file(tmp_path, monkeypatch, kernel):
    """Both directions copy tensor bytes that lie in a source file with copy_file_range (the embedding here is
    1.2 MB, over hf-to-mcore's 1 MB threshold); where the kernel refuses (another filesystem, say) after part
    of a copy, or has no such call, the rest is written from memory. Bit-exact every way."""
    import errno
    import os

    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dynamo_mega.convert.run import hf_to_mcore, mcore_to_hf

    config = Qwen2Config(
        vocab_size=1200, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "hf")
    copied = []
    real_copy = os.copy_file_range

    def copy(source, target, count, offset_src=None, *rest):
        if kernel == "refuses midway" and copied:
            raise OSError(errno.EXDEV, "cross-device")
        copied.append(real_copy(source, target, min(count, 1000) if kernel == "refuses midway" else count, offset_src))
        return copied[-1]

    if kernel == "has no copy_file_range":
        monkeypatch.delattr(os, "copy_file_range")
    else:
        monkeypatch.setattr(os, "copy_file_range", copy)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", tp=2, progress=False)
    to_mcore = sum(copied)
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", progress=False)
    if kernel == "copies":
        assert to_mcore >= 2 * 1200 * 256 * 4  # embedding and lm_head
        assert sum(copied) - to_mcore >= 0.9 * sum(p.numel() * 4 for p in Qwen2ForCausalLM(config).parameters())
    source, back = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert source.keys() == back.keys()
    for name, tensor in source.items():
        assert torch.equal(back[name], tensor), name
