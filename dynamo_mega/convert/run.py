"""HF safetensors <-> Megatron distributed checkpoint in one process, a few decoder layers at a time.

hf-to-mcore: read a write group of layers' HF tensors (memory-mapped, one shard open) -> megatron layout ->
one megatron save per group into DST itself -> the groups' metadata merged into one torch_dist checkpoint (see
mcore_files.py). Output folder:
    DST/metadata.json, .metadata, part*.distcp              the megatron distributed checkpoint
    DST/hf/                                                 config.json, generation config, tokenizer files
    DST/convert.json                                        what was converted, at which padded vocab
    DST/manifest.sha256.json                                sha256 + size of every file (written last)
mcore-to-hf: one layer's chunks, memory-mapped (distcp_reader.py) -> HF names -> streamed into safetensors shards
of at most --max-shard-size, one after the other (hf_writer.py); config, generation config and tokenizer files
come from SRC/hf/ (or --hf-config).
Both hash and fsync each data file in the background as soon as it is closed (output_dir.FileSealer), and make
the whole folder durable before it appears under its name (output_dir.atomic_output).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from dynamo_mega.convert import hf_files, mcore_files
from dynamo_mega.convert.distcp_reader import DistcpReader
from dynamo_mega.convert.hf_writer import StreamingSafetensorsWriter, TensorSpec
from dynamo_mega.convert.output_dir import FileSealer, atomic_output, byte_progress, check_destination, write_manifest
from dynamo_mega.convert.plan import Plan, check_names_and_shapes, expected_stored, plan_hf_to_mcore, plan_mcore_to_hf
from dynamo_mega.convert.write_groups import DEFAULT_GROUP_BYTES, group_parts
from dynamo_mega.models import qwen_mapping as qm

CONVERT_JSON = "convert.json"
_GATE, _UP, _FC1 = "mlp.gate_proj.weight", "mlp.up_proj.weight", mcore_files.FC1


def hf_to_mcore(
    src: Path,
    dst: Path,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: str | None = None,
    vocab_divisible_by: int = 1,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    write_group_bytes: int = DEFAULT_GROUP_BYTES,
) -> dict:
    """Convert an HF Qwen2/Qwen3 folder into a megatron distributed checkpoint that loads at TP=tp, PP=pp
    (and at any other TP/PP with the same padded vocabulary). Parts of the model whose source tensors fit
    `write_group_bytes` are written by one megatron save (write_groups.py). Returns the plan summary."""
    src, dst = Path(src), Path(dst)
    plan = plan_hf_to_mcore(src, tp, pp, dtype, vocab_divisible_by)
    if dry_run:
        with mcore_files.single_process_megatron():  # the megatron layout must accept every shape as well
            layout = mcore_files.layout_state_dict(plan.arch, plan.padded_rows)
        _check_layout_matches_mapping(layout, plan)
        return plan.summary()
    check_destination(dst, overwrite)
    headers = hf_files.read_headers(src)
    hf_files.check_data_present(src, headers)
    reader = hf_files.HFReader(src, headers)
    arch, cast = plan.arch, lambda t: t.to(plan.dtype)
    with atomic_output(dst, overwrite) as tmp, FileSealer() as sealer:
        with mcore_files.single_process_megatron():  # left before waiting for the sealer: its teardown (~0.2 s) overlaps
            parts = mcore_files.split_parts(mcore_files.layout_state_dict(arch, plan.padded_rows))
            sources = {name: _hf_sources(part, layer, arch) for name, (layer, part) in parts.items()}
            part_bytes = {name: sum(_source_nbytes(plan, n) for n in names) for name, names in sources.items()}
            groups = group_parts([(name, layer) for name, (layer, _) in parts.items()], part_bytes, write_group_bytes)
            saved = []  # (the group's checkpoint Metadata, its first layer)
            with byte_progress(f"hf-to-mcore {src.name}", plan.source_bytes, progress) as advance:
                for part_no, group in enumerate(groups):
                    units = []
                    for name in group:
                        layer, part = parts[name]
                        hf = {n: cast(reader.get(n)) for n in sources[name]}
                        units.append((layer, part, _mcore_tensors(hf, layer, arch, plan.padded_rows)))
                    meta, data_files = mcore_files.save_group(units, tmp, part_no, reader.file_region)
                    for path in data_files:  # hashed and fsynced while the next groups are written
                        sealer.add(path)
                    saved.append((meta, units[0][0]))
                    advance(sum(part_bytes[name] for name in group))
                    del hf, units
            mcore_files.merge_metadata(saved, tmp, arch.num_layers)  # while the last files are sealed
        _carry_hf_files(src, tmp / "hf", plan)
        record = {"direction": "hf-to-mcore", "source": str(src.resolve()), **plan.summary()}
        (tmp / CONVERT_JSON).write_text(json.dumps(record, indent=2) + "\n")
        known = {path.relative_to(tmp).as_posix(): digest for path, digest in sealer.wait().items()}
        write_manifest(tmp, known, {"created_by": "dynamo-mega convert hf-to-mcore"})
    return plan.summary()


def mcore_to_hf(
    src: Path,
    dst: Path,
    *,
    hf_config: Path | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 2 << 30,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = True,
) -> dict:
    """Convert a megatron distributed checkpoint (any TP/PP wrote it) into an HF safetensors folder."""
    src, dst = Path(src), Path(dst)
    stored = mcore_files.stored_tensors(src)
    plan = plan_mcore_to_hf(src, Path(hf_config) if hf_config else None, dtype, stored)
    arch = plan.arch
    with mcore_files.single_process_megatron():
        layout = mcore_files.layout_state_dict(arch, plan.padded_rows)
    model_keys = {k: v[0] for k, v in stored.items() if k.split(".", 1)[0] in ("embedding", "decoder", "output_layer")}
    check_names_and_shapes(model_keys, expected_stored(layout, arch.num_layers), str(src))
    if dry_run:
        return plan.summary()
    check_destination(dst, overwrite)
    parts = list(mcore_files.split_parts(layout).values())
    specs = [_hf_specs(layer, part, arch, plan.dtype, stored) for layer, part in parts]  # one unit per part
    reader = DistcpReader(src)
    with atomic_output(dst, overwrite) as tmp, FileSealer() as sealer:
        total = sum(spec.nbytes for unit in specs for spec in unit)
        with byte_progress(f"mcore-to-hf {src.name}", total, progress) as advance:
            writer = StreamingSafetensorsWriter(tmp, specs, max_shard_bytes, advance, reader.file_region, sealer.add)
            with writer:  # each shard is hashed and fsynced while the next is written
                for layer, part in parts:
                    loaded = mcore_files.read_part(reader, part, layer)
                    for name, tensor in _hf_part(loaded, layer, arch, to_stream=True).items():
                        writer.write(name, tensor)
                writer.close()
        digests = {path.name: digest for path, digest in sealer.wait().items()}
        carried_from = src / "hf" if not hf_config else Path(hf_config) if Path(hf_config).is_dir() else Path(hf_config).parent
        _carry_hf_files(carried_from, tmp, plan)
        write_manifest(tmp, digests, {"created_by": "dynamo-mega convert mcore-to-hf", "source": str(src.resolve())})
    return plan.summary()


def _hf_part(loaded: dict, layer: int | None, arch, to_stream: bool = False) -> dict[str, torch.Tensor]:
    """One part read from megatron (mapping name -> tensor; a layer's fc1 may be RowBlocks (gate, up)) ->
    HF name -> tensor, views of the inputs where the layout allows. The mapping still decides names and
    shapes of gate and up: it splits a meta stand-in of the full fc1. to_stream: q/k/v as per-group views
    in HF element order (the writer streams them group by group; their HF shapes come from the specs)."""
    if layer is None:
        return qm.mcore_to_hf_globals(loaded, arch)
    fc1 = loaded.get(_FC1)
    if isinstance(fc1, mcore_files.RowBlocks):
        loaded = {**loaded, _FC1: torch.empty(fc1.shape, dtype=fc1.dtype, device="meta")}
    hf = qm.mcore_layer_to_hf(loaded, arch, qkv_by_group=to_stream)
    if isinstance(fc1, mcore_files.RowBlocks):
        gate, up = fc1.blocks
        assert (hf[_GATE].shape, hf[_UP].shape) == (gate.shape, up.shape), (hf[_GATE].shape, gate.shape)
        hf[_GATE], hf[_UP] = gate, up
    return {qm.hf_layer_name(layer, s): t for s, t in hf.items()}


def _hf_specs(layer: int | None, part: dict, arch, dtype: torch.dtype, stored: dict) -> list[TensorSpec]:
    """The HF tensors mcore-to-hf writes for one part, in writing order: the mapping run on meta stand-ins."""
    meta = {
        mcore_files.part_suffix(key): torch.empty(entry.data.shape, dtype=stored[entry.key][1], device="meta")
        for key, entry in part.items()
        if type(entry).__name__ != "ShardedObject"
    }
    return [TensorSpec(name, tuple(t.shape), dtype) for name, t in _hf_part(meta, layer, arch).items()]


def _source_nbytes(plan: Plan, name: str) -> int:
    shape, dtype = plan.tensors[name]
    return math.prod(shape) * dtype.itemsize


def _mcore_tensors(hf: dict[str, torch.Tensor], layer: int | None, arch, padded_rows: int) -> dict:
    """One part's HF tensors -> megatron mapping name -> tensor, with a layer's linear_fc1 left as its HF gate
    and up blocks (mcore_files.RowBlocks): the mapping builds it from meta stand-ins, so it still decides the
    shape, and tests check that [gate; up] is what the mapping's merge_fc1 produces at TP=1."""
    if layer is None:
        return qm.hf_to_mcore_globals(hf, arch, padded_rows)
    prefix = len(qm.hf_layer_name(layer, ""))
    hf = {n[prefix:]: t for n, t in hf.items()}
    gate, up = hf[_GATE], hf[_UP]
    mcore = qm.hf_layer_to_mcore({**hf, _GATE: gate.to("meta"), _UP: up.to("meta")}, arch)
    blocks = mcore_files.RowBlocks((gate, up))
    assert mcore[_FC1].shape == blocks.shape, (mcore[_FC1].shape, blocks.shape)
    mcore[_FC1] = blocks
    return mcore


def _hf_sources(part: dict, layer: int | None, arch) -> list[str]:
    """HF tensor names a part is made from."""
    if layer is not None:
        return [qm.hf_layer_name(layer, s) for s in qm.hf_layer_shapes(arch)]
    keys = [mcore_files.part_suffix(k) for k, e in part.items() if type(e).__name__ != "ShardedObject"]
    return [qm.GLOBAL_HF_NAME[k] for k in keys]


def _carry_hf_files(src: Path, out: Path, plan: Plan) -> None:
    """Copy config/tokenizer/generation files; config.json's dtype follows the converted tensors."""
    out.mkdir(exist_ok=True)
    ours = ("convert.json", "manifest.sha256.json")
    carried = [p for p in (hf_files.carried_files(src) if src.is_dir() else []) if p.name not in ours]
    for path in carried:
        if path.name != "config.json":
            shutil.copy(path, out / path.name)
    # config.json is written once, as a new file (rewriting a copied one: ext4 flushes a truncated file on close)
    config = json.loads(next((p for p in carried if p.name == "config.json"), src / "config.json").read_text())
    dtype = str(plan.dtype).removeprefix("torch.")
    config.update({k: dtype for k in ("torch_dtype", "dtype") if k in config} or {"torch_dtype": dtype})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _check_layout_matches_mapping(layout: dict, plan: Plan) -> None:
    """Dry run: megatron's own layout (keys, global shapes) equals what the mapping produces from the source."""
    arch = plan.arch
    meta_hf = {s: torch.empty(shape, device="meta") for s, shape in qm.hf_layer_shapes(arch).items()}
    layer = qm.hf_layer_to_mcore(meta_hf, arch)
    emb = torch.empty(arch.vocab_size, arch.hidden_size, device="meta")
    glob = qm.hf_to_mcore_globals({qm.HF_EMBED: emb, qm.HF_NORM: emb[0], qm.HF_LM_HEAD: emb}, arch, plan.padded_rows)
    for key, entry in layout.items():
        if entry.__class__.__name__ == "ShardedObject":
            continue
        suffix = mcore_files.part_suffix(key)
        produced = layer.get(suffix) if key.startswith(qm.MCORE_LAYER_PREFIX) else glob.get(suffix)
        if produced is None or tuple(produced.shape) != tuple(entry.data.shape):
            got = None if produced is None else tuple(produced.shape)
            raise AssertionError(f"mapping produces {got} for megatron tensor {key}, megatron expects {tuple(entry.data.shape)}")
