"""Export stream of the resharding weight bridge: a live TP/PP/DP-sharded megatron GPTModel -> HF-named tensors
in flat, dtype-homogeneous buckets of a configured size, ready for a rollout engine's weight loader.

- Plan first: each bucket's HF names, shapes and flat offsets are known before a byte moves; every block of a
  (gathered) megatron shard is then copied straight into its place in the bucket (models/qwen_bridge_layout.py:
  q/k/v and gate/up split, vocab padding trimmed, dtype cast, all in the one strided copy). No whole megatron
  or HF tensor is ever built.
- TP: not per tensor but in chunks of about 1/`gather_chunks` of the largest bucket (cut between tensors, or
  between rows of a larger tensor): a chunk's local shards are packed into this rank's slot of a chunk buffer
  and gathered in place by one async all_gather, GATHER_RING buffers in turn, so packing the next chunk and
  copying a gathered one into the bucket run while gloo moves another. Each rank's rows are views of a buffer.
- PP: each stage streams only the layers it holds, named by their global layer id; `iter_pipeline_buckets`
  forwards the later stages' buckets point to point to the first stage, where the engine is fed (rpc and ipc
  transports; the broadcast transport sends from every stage: parallel/pipeline_broadcast.py).
- DP: replicas hold identical weights, so only data-parallel rank 0 yields buckets (nothing is sent twice).
- A tied output layer (the last stage's copy of the embedding when PP > 1) is skipped.
- target_tp=(m, r): each HF tensor is cut down to the block vLLM's TP rank r of m holds (vLLM's loaders are
  not wired to take such blocks yet: the receivers send whole tensors).

Bucket sizing is by gathered megatron bytes; a single tensor larger than the bucket gets a bucket of its own.
Memory: the stream reuses one bucket buffer sized once for the largest bucket and, at TP > 1, GATHER_RING chunk
buffers of about 1/gather_chunks of a bucket each (`BucketBuffers`, optionally kept across calls): peak extra
memory is 1 bucket at TP=1 and 1 + GATHER_RING/gather_chunks buckets at TP > 1 (1.25 with the defaults), plus
what the collective backend stages internally (gloo: a copy of each gathered chunk in flight; measured by
bench/weight_sync.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dynamo_mega.models import qwen_bridge_layout as bl
from dynamo_mega.models import qwen_mapping as qm
from dynamo_mega.models.qwen import QwenArch

DEFAULT_BUCKET_BYTES = 512 << 20


@dataclass
class Bucket:
    """HF-named tensors packed back to back in one flat 1-D buffer of a single dtype. Streams reuse the buffer:
    a bucket is valid until the stream is asked for the next one."""

    flat: torch.Tensor
    names: list[str]
    shapes: list[torch.Size]
    offsets: list[int]  # element offset of each tensor in `flat`
    version: int  # policy version these weights belong to

    @property
    def dtype(self) -> torch.dtype:
        return self.flat.dtype

    @property
    def numel(self) -> int:
        return self.flat.numel()

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


@dataclass(frozen=True, eq=False)
class _Layout:
    """One bucket, planned before any byte moves: HF names, shapes and flat offsets, and where each megatron
    tensor's units (models/qwen_bridge_layout.py) sit in the flat buffer: (element offset, view box)."""

    group: list[_Param]
    names: list[str]
    shapes: list[torch.Size]  # whole HF tensors, or target-TP slices
    offsets: list[int]
    units: dict[str, list[tuple[int, bl.Box]]]  # megatron global name -> per unit (offset, box in its view)
    total: int  # elements


def _layout(group: list[_Param], arch: QwenArch, target_tp: tuple[int, int] | None) -> _Layout:
    names, shapes, offsets, units, total = [], [], [], {}, 0
    for p in group:
        placed = units[p.global_name] = []
        for unit in bl.units(p.global_name, arch):
            boxes = [
                ((0,) * len(unit.hf_shape), unit.hf_shape) if target_tp is None else bl.vllm_tp_box(n, arch, *target_tp)
                for n in unit.hf_names
            ]
            assert all(box == boxes[0] for box in boxes), boxes  # side-by-side tensors are cut alike
            placed.append((total, bl.view_box(unit, boxes[0])))
            for name in unit.hf_names:
                names.append(name)
                shapes.append(torch.Size(boxes[0][1]))
                offsets.append(total)
                total += shapes[-1].numel()
    return _Layout(group, names, shapes, offsets, units, total)


def _sharded(p: _Param, tp_size: int) -> bool:
    return tp_size > 1 and qm.partition_dim(p.mapping_key) is not None


class BucketBuffers:
    """The stream's reused byte buffers: the bucket being filled, and the TP all_gather output, each sized for
    the largest bucket of the plan. Memory that was never touched costs page faults and kernel zeroing on
    first write (measured here: a copy into fresh memory runs at about a third of a copy into touched memory),
    so buffers are never allocated per bucket. By default each `iter_buckets` call makes its own and frees them
    at the end; a caller that syncs every step may pass one `BucketBuffers` to every call to keep them (and
    their pages) between syncs, at the cost of holding that memory. (On GPUs torch's caching allocator already
    keeps freed blocks, so per-call buffers cost nothing there.)"""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, what: str, numel: int, dtype: torch.dtype, device: torch.device, reserve_bytes: int) -> torch.Tensor:
        """A flat [numel] tensor of `dtype` at the start of buffer `what` ("bucket", "gather<i>"), (re)allocated
        with `reserve_bytes` (the most any bucket of the stream needs) when missing or too small."""
        nbytes = numel * dtype.itemsize
        buf = self.buffers.get(what)
        if buf is None or buf.numel() < nbytes or buf.device != torch.device(device):
            self.buffers.pop(what, None)  # free the old one before allocating: never two at once
            buf = self.buffers[what] = torch.empty(max(nbytes, reserve_bytes), dtype=torch.uint8, device=device)
        return buf[:nbytes].view(dtype)


def _all_gather_flat(out: torch.Tensor, local: torch.Tensor, group, async_op: bool = False):
    """One all_gather into the flat `out`; `local` may be a view of this rank's slot of `out` (in place).
    async_op: return the work handle instead of waiting (gloo runs it on its own thread)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    return gather(out, local, group=group, async_op=async_op)


DEFAULT_GATHER_CHUNKS = 8  # bench (b), TP=2 gloo, 2 cores, kept buffers: 0.76x -> 0.83x bare all_gather (1 -> 8 chunks)
GATHER_RING = 2  # chunk buffers in flight: one gathering while the previous one is copied into the bucket


@dataclass(frozen=True, eq=False)
class _Slice:
    """Dim-0 rows [start, start + rows) of a TP-sharded parameter's local shard: the unit a gather chunk holds."""

    param: _Param
    start: int
    rows: int

    @property
    def numel(self) -> int:
        return self.rows * (self.param.param.numel() // self.param.param.shape[0])

    def local(self) -> torch.Tensor:
        return self.param.param.detach().narrow(0, self.start, self.rows)


def _plan_chunks(sharded: list[_Param], arch: QwenArch, target: int) -> list[list[_Slice]]:
    """Consecutive chunks of the bucket's TP-sharded tensors, each closed once it holds >= `target` local
    elements: a tensor larger than that is cut between rows (at multiples of its `shard_row_granule`), so a
    chunk holds at most `target` + one granule and a bucket at most ceil(its size / target) chunks."""
    chunks: list[list[_Slice]] = [[]]
    size = 0
    for p in sharded:
        rows = p.param.shape[0]
        per_row = p.param.numel() // rows
        granule = bl.shard_row_granule(p.global_name, arch, rows)
        start = 0
        while start < rows:
            if size >= target:
                chunks.append([])
                size = 0
            granules = -(-(target - size) // (granule * per_row))  # just enough to reach the target
            take = min(rows - start, granules * granule)
            chunks[-1].append(_Slice(p, start, take))
            size += take * per_row
            start += take
    return [c for c in chunks if c]


@torch.no_grad()
def _shards(
    layout: _Layout,
    chunks: list[list[_Slice]],
    tp_size: int,
    tp_group,
    dtype: torch.dtype,
    buffers: BucketBuffers,
    chunk_reserve: int,
) -> Iterator[tuple[_Param, torch.Tensor, int, int]]:
    """(param, shard rows, TP rank, first row) for every shard part the bucket needs. The TP-sharded tensors
    are gathered chunk by chunk (`_plan_chunks`), each chunk by one async all_gather into one of GATHER_RING
    chunk-sized buffers [tp_size * chunk elements] (so memory is a few chunks, not a bucket): a chunk's local
    rows are cast and packed into this rank's slot of its buffer (the gather runs in place) while the previous
    chunk's gather runs, and the caller copies a gathered chunk into the bucket while the next one gathers. A
    buffer is refilled only after its chunk was yielded in full. Every rank's rows are views of the buffer. A
    replicated tensor is its local copy, once, yielded after the first gathers started (its copy overlaps them)."""
    rank = dist.get_rank(tp_group) if chunks else 0
    device = layout.group[0].param.device
    in_flight = []  # (chunk, its buffer, its element count per rank, work handle), oldest first

    def launch(i: int) -> None:
        chunk = chunks[i]
        n = sum(s.numel for s in chunk)
        region = buffers.take(f"gather{i % GATHER_RING}", n * tp_size, dtype, device, chunk_reserve)
        local = region[rank * n : (rank + 1) * n]
        offset = 0
        for s in chunk:
            local[offset : offset + s.numel].view(s.rows, *s.param.param.shape[1:]).copy_(s.local())
            offset += s.numel
        in_flight.append((chunk, region, n, _all_gather_flat(region, local, tp_group, async_op=True)))

    def finish() -> Iterator[tuple[_Param, torch.Tensor, int, int]]:
        chunk, region, n, work = in_flight.pop(0)
        work.wait()
        offset = 0
        for s in chunk:
            shape = (s.rows, *s.param.param.shape[1:])
            for r in range(tp_size):
                at = r * n + offset
                yield s.param, region[at : at + s.numel].view(shape), r, s.start
            offset += s.numel

    for i in range(min(GATHER_RING, len(chunks))):
        launch(i)
    for p in layout.group:
        if not _sharded(p, tp_size):
            yield p, p.param.detach(), 0, 0
    for i in range(GATHER_RING, len(chunks)):
        yield from finish()  # frees buffer i % GATHER_RING
        launch(i)
    while in_flight:
        yield from finish()


def _copy_overlap(dst: torch.Tensor, dst_origin: tuple[int, ...], piece: bl.Piece) -> None:
    """Copy the part of `piece` inside the box `dst` covers (`dst_origin` in the unit's view), casting to dst's
    dtype in the same pass."""
    dst_view, src_view = dst, piece.src
    for dim, (d0, dn, s0, sn) in enumerate(zip(dst_origin, dst.shape, piece.origin, piece.src.shape)):
        lo, hi = max(d0, s0), min(d0 + dn, s0 + sn)
        if lo >= hi:
            return
        if (lo, hi) != (d0, d0 + dn):
            dst_view = dst_view.narrow(dim, lo - d0, hi - lo)
        if (lo, hi) != (s0, s0 + sn):
            src_view = src_view.narrow(dim, lo - s0, hi - lo)
    dst_view.copy_(src_view)


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
    target_tp: tuple[int, int] | None = None,
    buffers: BucketBuffers | None = None,
    fresh_buffers: bool = False,
    gather_chunks: int = DEFAULT_GATHER_CHUNKS,
) -> Iterator[Bucket]:
    """Yield this stage's weights as HF-named buckets. Collective over the TP group: every TP rank of the
    stage must iterate to the end (all of them receive the same buckets). DP ranks > 0 yield nothing.

    A bucket is valid until the next one is requested: its buffer is then reused (send or clone it first;
    `fresh_buffers=True` gives every bucket its own memory, for callers that keep them, e.g. `list(...)`).
    buffers: keep the stream's buffers across calls (see BucketBuffers); None: this call's own.
    dtype: cast every tensor to it (the engine's dtype: the engine would cast on load anyway, so its weights
    come out identical) and fill buckets regardless of the model's own dtypes; None keeps each tensor's.
    target_tp=(m, r): every HF tensor is only the block vLLM's TP rank r of m holds (models/qwen_bridge_layout.py
    `vllm_tp_box`), under its HF name; None: whole tensors.
    gather_chunks: at TP > 1, split each bucket's all_gather into up to this many async ones (cut between
    tensors), so packing and copying overlap the communication; 1: one gather per bucket."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive (got {bucket_bytes})")
    if dp_rank != 0:
        return
    groups = plan_buckets(_stage_params(model, arch), tp_size, bucket_bytes, dtype)
    layouts = [layout for layout in (_layout(g, arch, target_tp) for g in groups) if layout.names]
    if not layouts:
        return

    def dtype_of(layout: _Layout) -> torch.dtype:
        return dtype or layout.group[0].param.dtype

    bucket_reserve = max(lay.total * dtype_of(lay).itemsize for lay in layouts)
    sharded = [[p for p in lay.group if _sharded(p, tp_size)] for lay in layouts]
    target = -(-max(sum(p.param.numel() for p in ps) for ps in sharded) // max(1, gather_chunks))  # local elements
    chunk_plans = [_plan_chunks(ps, arch, max(1, target)) for ps in sharded]
    chunk_reserve = max(  # bytes of the largest gathered chunk: every ring buffer's size
        (sum(s.numel for s in c) * tp_size * dtype_of(lay).itemsize for lay, plan in zip(layouts, chunk_plans) for c in plan),
        default=0,
    )
    buffers = BucketBuffers() if buffers is None else buffers
    device = layouts[0].group[0].param.device  # GPU stays on GPU
    for layout, chunks in zip(layouts, chunk_plans):
        bucket_dtype = dtype_of(layout)
        if fresh_buffers:
            flat = torch.empty(layout.total, dtype=bucket_dtype, device=device)
        else:
            flat = buffers.take("bucket", layout.total, bucket_dtype, device, bucket_reserve)
        for param, shard, rank, start in _shards(layout, chunks, tp_size, tp_group, bucket_dtype, buffers, chunk_reserve):
            placed = layout.units[param.global_name]
            for piece in bl.shard_pieces(param.global_name, shard, arch, rank, start, param.param.shape[0]):
                offset, (origin, shape) = placed[piece.unit]
                _copy_overlap(flat[offset : offset + torch.Size(shape).numel()].view(shape), origin, piece)
        yield Bucket(flat, list(layout.names), list(layout.shapes), list(layout.offsets), version)


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
    received = None  # one receive buffer, reused like iter_buckets' (a bucket is valid until the next is asked for)
    # Where the later stages' buckets live: the GPU under NCCL (which only moves CUDA tensors), else the host.
    on_gpu = dist.get_backend(pp_group) == dist.Backend.NCCL
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    for stage in range(1, pp_size):
        src = dist.get_global_rank(pp_group, stage)
        while True:
            box = [None]
            dist.recv_object_list(box, src=src, group=pp_group)
            if box[0] is None:
                break
            names, shapes, offsets, version, dtype, numel = box[0]
            nbytes = numel * dtype.itemsize
            if received is None or received.numel() < nbytes:
                received = None  # free the smaller buffer before allocating the larger one
                received = torch.empty(nbytes, dtype=torch.uint8, device=device)
            flat = received[:nbytes].view(dtype)
            dist.recv(flat, src=src, group=pp_group)
            yield Bucket(flat, names, shapes, offsets, version)
