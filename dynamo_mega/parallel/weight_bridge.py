"""Export stream of the resharding weight bridge: a live TP/PP/DP-sharded megatron GPTModel -> HF-named tensors
in flat, dtype-homogeneous buckets of a configured size, ready for a rollout engine's weight loader.

- TP: the local shards of every tensor in a bucket are flattened into one buffer and gathered with ONE
  all_gather per bucket (not per tensor); each rank's slice is then viewed back and concatenated along the
  tensor's partition dim (models/qwen_mapping.py says which).
- PP: each stage streams only the layers it holds, named by their global layer id; `iter_pipeline_buckets`
  forwards the later stages' buckets point to point to the first stage, where the engine is fed.
- DP: replicas hold identical weights, so only data-parallel rank 0 yields buckets (nothing is sent twice).
- Names and layouts come from models/qwen_mapping.py: fused qkv / gate-up are split into HF names, vocab
  padding is trimmed, a tied output layer (the last stage's copy of the embedding when PP > 1) is skipped.

Bucket sizing is by gathered megatron bytes; a single tensor larger than the bucket gets a bucket of its own.
Peak extra memory: the gathered shards of one bucket + the packed HF bucket + one full tensor being mapped
(about 2 x bucket_bytes + the largest tensor).
Not done here: receivers (vLLM colocated / NCCL broadcast) and emitting target-TP slices directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dynamo_mega.models import qwen_mapping as qm
from dynamo_mega.models.qwen import QwenArch

DEFAULT_BUCKET_BYTES = 512 << 20


@dataclass
class Bucket:
    """HF-named tensors packed back to back in one flat 1-D buffer of a single dtype."""

    flat: torch.Tensor
    names: list[str]
    shapes: list[torch.Size]
    offsets: list[int]  # element offset of each tensor in `flat`
    version: int  # policy version these weights belong to

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, view into `flat`) pairs; no copies."""
        for name, shape, offset in zip(self.names, self.shapes, self.offsets):
            yield name, self.flat[offset : offset + shape.numel()].view(shape)


@dataclass(frozen=True, eq=False)
class _Param:
    global_name: str  # megatron name with the GLOBAL layer id
    mapping_key: str  # layer suffix or non-layer name: what qwen_mapping.partition_dim takes
    param: torch.Tensor

    def gathered_bytes(self, tp_size: int, dtype: torch.dtype | None = None) -> int:
        n = self.param.numel() * (self.param.element_size() if dtype is None else dtype.itemsize)
        return n * tp_size if qm.partition_dim(self.mapping_key) is not None else n


def _stage_params(model, arch: QwenArch) -> list[_Param]:
    """This stage's parameters in model order, with global layer ids; the tied output copy left out."""
    global_ids = {local: layer.layer_number - 1 for local, layer in enumerate(model.decoder.layers)}
    out = []
    for name, param in model.named_parameters():
        split = qm.split_layer_name(name, qm.MCORE_LAYER_PREFIX)
        if split is None:
            if name == qm.OUTPUT and arch.tie_word_embeddings:
                continue  # PP > 1: the last stage's copy of the embedding; HF has no lm_head for tied models
            out.append(_Param(name, name, param))
        else:
            local, suffix = split
            out.append(_Param(f"{qm.MCORE_LAYER_PREFIX}{global_ids[local]}.{suffix}", suffix, param))
    return out


def plan_buckets(
    params: list[_Param], tp_size: int, bucket_bytes: int, dtype: torch.dtype | None = None
) -> list[list[_Param]]:
    """Consecutive groups whose gathered size fits `bucket_bytes` (an oversized tensor alone). Without a target
    `dtype` a group also needs one dtype, so a model mixing dtypes (fp32 norms beside bf16 matrices, as
    megatron's local layer spec builds them) breaks into several small buckets per layer."""
    groups: list[list[_Param]] = []
    size = 0
    for p in params:
        nbytes = p.gathered_bytes(tp_size, dtype)
        same_dtype = dtype is not None or (groups and groups[-1][0].param.dtype == p.param.dtype)
        fits = groups and same_dtype and size + nbytes <= bucket_bytes
        if fits:
            groups[-1].append(p)
            size += nbytes
        else:
            groups.append([p])
            size = nbytes
    return groups


@torch.no_grad()
def _gathered(group: list[_Param], tp_size: int, tp_group, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(global megatron name, TP-concatenated tensor in `dtype`) for a group, after ONE all_gather of all its
    shards. Each full tensor is built only when it is reached, so at most one lives beside the gathered buffer."""
    sharded = [p for p in group if tp_size > 1 and qm.partition_dim(p.mapping_key) is not None]
    sharded_ids = {id(p) for p in sharded}
    rank_flats: list[torch.Tensor] = []
    if sharded:
        local_flat = torch.cat([p.param.detach().to(dtype).reshape(-1) for p in sharded])
        rank_flats = [torch.empty_like(local_flat) for _ in range(tp_size)]
        dist.all_gather(rank_flats, local_flat, group=tp_group)
        del local_flat
    offset = 0
    for p in group:
        if id(p) not in sharded_ids:
            yield p.global_name, p.param.detach().to(dtype)
            continue
        n = p.param.numel()
        shards = [flat[offset : offset + n].view(p.param.shape) for flat in rank_flats]
        offset += n
        yield p.global_name, torch.cat(shards, dim=qm.partition_dim(p.mapping_key))


def _hf_layout(group: list[_Param], arch: QwenArch, tp_size: int) -> tuple[list[str], list[torch.Size], list[int], int]:
    """HF names, shapes and flat offsets a group maps to (the mapping run on meta tensors), and the total."""
    meta = {}
    for p in group:
        shape = list(p.param.shape)
        dim = qm.partition_dim(p.mapping_key)
        if dim is not None:
            shape[dim] *= tp_size
        meta[p.global_name] = torch.empty(shape, dtype=p.param.dtype, device="meta")
    hf = qm.megatron_to_hf(meta, arch, tp_size)
    names, shapes, offsets, total = list(hf), [t.shape for t in hf.values()], [], 0
    for shape in shapes:
        offsets.append(total)
        total += shape.numel()
    return names, shapes, offsets, total


def iter_buckets(
    model,
    arch: QwenArch,
    *,
    tp_size: int,
    tp_group=None,
    dp_rank: int = 0,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    version: int = 0,
    dtype: torch.dtype | None = None,
) -> Iterator[Bucket]:
    """Yield this stage's weights as HF-named buckets. Collective over the TP group: every TP rank of the
    stage must iterate to the end (all of them receive the same buckets). DP ranks > 0 yield nothing.

    dtype: cast every tensor to it (the engine's dtype: the engine would cast on load anyway, so its weights
    come out identical) and fill buckets regardless of the model's own dtypes; None keeps each tensor's."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive (got {bucket_bytes})")
    if dp_rank != 0:
        return
    for group in plan_buckets(_stage_params(model, arch), tp_size, bucket_bytes, dtype):
        names, shapes, offsets, total = _hf_layout(group, arch, tp_size)
        if not names:
            continue
        bucket_dtype = dtype or group[0].param.dtype
        flat = torch.empty(total, dtype=bucket_dtype, device=group[0].param.device)  # GPU stays on GPU
        where = {n: (o, s) for n, o, s in zip(names, offsets, shapes)}
        for name, full in _gathered(group, tp_size, tp_group, bucket_dtype):
            for hf_name, tensor in qm.megatron_to_hf({name: full}, arch, tp_size).items():
                offset, shape = where[hf_name]
                flat[offset : offset + shape.numel()].view(shape).copy_(tensor)
        yield Bucket(flat, names, shapes, offsets, version)


def iter_pipeline_buckets(
    stage_buckets: Iterator[Bucket], *, pp_group, pp_rank: int, pp_size: int, carries: bool
) -> Iterator[Bucket]:
    """PP > 1: every stage's buckets, in stage order, on the first stage's carrier (the rank that feeds the
    engine). `stage_buckets`: this rank's `iter_buckets` stream; carries: this rank moves its stage's stream
    (TP rank 0 of DP rank 0, one per stage, all in one pipeline group). Every other rank only drives its
    stream's TP collectives and yields nothing; a later stage's carrier sends each bucket (layout, then the
    flat tensor) point to point to the first stage's carrier, which receives them after its own buckets.
    Collective like `iter_buckets`: every rank must iterate to the end."""
    if not carries:
        for _ in stage_buckets:
            pass
        return
    first = dist.get_global_rank(pp_group, 0)
    if pp_rank > 0:
        for b in stage_buckets:
            meta = (b.names, b.shapes, b.offsets, b.version, b.flat.dtype, b.flat.numel())
            dist.send_object_list([meta], dst=first, group=pp_group)
            dist.send(b.flat.contiguous(), dst=first, group=pp_group)
        dist.send_object_list([None], dst=first, group=pp_group)  # end of this stage's stream
        return
    yield from stage_buckets
    for stage in range(1, pp_size):
        src = dist.get_global_rank(pp_group, stage)
        while True:
            box = [None]
            dist.recv_object_list(box, src=src, group=pp_group)
            if box[0] is None:
                break
            names, shapes, offsets, version, dtype, numel = box[0]
            flat = torch.empty(numel, dtype=dtype)
            dist.recv(flat, src=src, group=pp_group)
            yield Bucket(flat, names, shapes, offsets, version)
