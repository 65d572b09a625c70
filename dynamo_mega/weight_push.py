"""The trainer's side of a weight refit: the weight bridge's bucket stream at any TP/PP/DP, and how the driver's
own engine takes it by the engine's transport (rollout.weight_transport). The rollout service
(rl/rollout_service.py) calls both and fans the stream out to the other replicas' engines."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from dynamo_mega.config import RolloutConfig
from dynamo_mega.parallel.groups import ParallelGroups
from dynamo_mega.parallel.pipeline_broadcast import DriverStream, StageCarrier
from dynamo_mega.parallel.weight_bridge import Bucket, BucketBuffers, iter_buckets, iter_pipeline_buckets


class WeightStream:
    """`stream(version)`: this rank's part of one pass over the policy's weights, HF-named buckets of
    rollout.weight_bucket_mb in the engine's dtype (collective: one TP all-gather per chunk; at PP > 1 the later
    stages' buckets go point to point to the driver, or, with the broadcast transport, each stage's carrier
    sends its own: parallel/pipeline_broadcast.py). The driver's stream yields every bucket of the model once;
    every other rank must drive its stream to the end (`drain`)."""

    def __init__(self, model: torch.nn.Module, arch, groups: ParallelGroups, rollout: RolloutConfig):
        self.model, self.arch, self.groups, self.rollout = model, arch, groups, rollout
        # The bucket buffers are kept between refits on CPU: writing into memory that was never touched runs at
        # about a third of the speed of rewriting kept pages (bench/weight_sync.py). Costs one bucket (plus two
        # gather chunks, 1/4 bucket by default, at TP > 1) of host memory. On GPUs torch's caching allocator
        # keeps freed blocks anyway: None (per-refit buffers).
        self.buffers = None if groups.device.type == "cuda" else BucketBuffers()
        self._carrier: StageCarrier | None = None  # broadcast transport at PP > 1, a later stage's sender

    def stream(self, version: int) -> Iterator[Bucket]:
        g = self.groups
        buckets = iter_buckets(
            self.model,
            self.arch,
            tp_size=g.tp_size,
            tp_group=g.tp_group if g.tp_size > 1 else None,
            dp_rank=g.dp_rank,
            bucket_bytes=self.rollout.weight_bucket_mb << 20,
            version=version,
            dtype=getattr(torch, self.rollout.vllm_dtype),  # what the engine holds: one dtype, full-size buckets
            buffers=self.buffers,
        )
        if g.pp_size == 1:
            return buckets
        carries = g.tp_rank == 0 and g.dp_rank == 0
        if carries and self.rollout.weight_transport == "broadcast":  # one sender per stage
            if g.is_driver:
                return DriverStream(buckets, pp_group=g.pp_group, pp_size=g.pp_size)
            if self._carrier is None:
                self._carrier = StageCarrier(pp_group=g.pp_group, stage=g.pp_rank)
            return self._carrier.stream(buckets)
        return iter_pipeline_buckets(buckets, pp_group=g.pp_group, pp_rank=g.pp_rank, pp_size=g.pp_size, carries=carries)


def drain(buckets) -> None:
    """Drive a stream to its end without using it (its collectives still run), e.g. after a failed push."""
    if isinstance(buckets, DriverStream):
        buckets.drain()
    else:
        for _ in buckets:
            pass


def feed_engine(engine, buckets, version: int, pp_size: int) -> None:
    """The driver's stream into its own engine by the engine's transport. With the broadcast transport at PP > 1
    (a DriverStream) the engine's weight group is announced to the stage carriers first. On a failure the caller
    drains the rest of the stream (`drain`), so the TP/PP peers finish its collectives."""
    if isinstance(buckets, DriverStream):
        _announce_weight_group(engine, buckets, pp_size)
    engine.push(buckets, version)


def _announce_weight_group(engine, stream: DriverStream, pp_size: int) -> None:
    """When the engine has no weight group (first push, or restarted), a new one with every stage's carrier as a
    sender; its address goes to the carriers first, since they must join while the engine's workers do. Host:
    MASTER_ADDR, where torchrun's rank 0 (this process) runs, so the other nodes' carriers reach it."""
    address = None
    if not engine.has_weight_group:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        address = engine.weight_group_address(backend, host, stages=pp_size)
    stream.announce(address)
    if address is not None:
        engine.open_weight_group(address.backend, address=address)
