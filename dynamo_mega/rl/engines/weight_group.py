"""The weight group between the trainer's senders and one rollout engine's workers, for weight broadcasts.

Disaggregated engines (vLLM in other processes, on other GPUs or nodes) receive each weight bucket by a
broadcast over this group instead of through vLLM's RPC channel: NCCL on GPUs, gloo on CPU (how the tests and
benchmarks run it here). The group is built directly on a TCPStore, outside torch.distributed's default world,
so neither side's own process groups (the trainer's Megatron groups, vLLM's TP group) are touched.

One group per engine. Its members: the trainer's S pipeline-stage carriers (the rank that streams a stage's
buckets: TP rank 0 of DP rank 0 of the stage; S = 1 without pipeline parallelism) as ranks 0..S-1, and the
engine's W workers as ranks S + w; they meet at one TCPStore whose server is the stage-0 carrier (the driver).
The bytes travel over S communicators, one per stage: {carrier s as rank 0, worker w as rank 1 + w}. Why not
one communicator over all S + W ranks: a broadcast reaches every member of its communicator, so every carrier
would also receive every other stage's bytes; per stage, each byte goes once from its stage to the workers.

Imported inside vLLM's worker processes too: torch only.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

STORE_PREFIX = "dynamo_mega_weights"


@dataclass(frozen=True)
class GroupAddress:
    """Where and how an engine's weight group meets: small, sent to the other carriers and the workers."""

    host: str  # reachable by every member; the stage-0 carrier serves the TCPStore there
    port: int
    stages: int  # S: trainer senders (pipeline stages), ranks 0..S-1
    workers: int  # W: engine workers, ranks S..S+W-1
    backend: str  # gloo (CPU) or nccl (GPU)
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"rollout.weight_transport backend {self.backend!r}: use gloo (CPU) or nccl (GPU)")
        if self.stages < 1 or self.workers < 1:
            raise ValueError(f"a weight group needs at least one sender and one worker (got {self.stages}, {self.workers})")


def _store(address: GroupAddress, server: bool) -> dist.TCPStore:
    timeout = datetime.timedelta(seconds=address.timeout_s)
    world = address.stages + address.workers
    return dist.TCPStore(address.host, address.port, world, is_master=server, timeout=timeout, wait_for_workers=False)


def _communicator(store: dist.TCPStore, address: GroupAddress, stage: int, rank: int):
    """Stage `stage`'s communicator: its carrier is rank 0, worker w rank 1 + w. Blocks (gloo) until all joined."""
    prefixed = dist.PrefixStore(f"{STORE_PREFIX}/stage{stage}", store)
    size = 1 + address.workers
    if address.backend == "nccl":
        return dist.ProcessGroupNCCL(prefixed, rank, size)
    return dist.ProcessGroupGloo(prefixed, rank, size, datetime.timedelta(seconds=address.timeout_s))


def open_carrier(address: GroupAddress, stage: int):
    """Join as the carrier of pipeline stage `stage` (stage 0 serves the store). Returns (communicator, store):
    the store must outlive the communicator."""
    if not 0 <= stage < address.stages:
        raise ValueError(f"stage {stage} is outside the weight group's {address.stages} stages")
    store = _store(address, server=stage == 0)
    return _communicator(store, address, stage, 0), store


def open_receiver(address: GroupAddress, worker: int):
    """Join as engine worker `worker`: one communicator per stage, in stage order. Returns (communicators, store)."""
    if not 0 <= worker < address.workers:
        raise ValueError(f"worker {worker} is outside the weight group's {address.workers} workers")
    store = _store(address, server=False)
    return [_communicator(store, address, s, 1 + worker) for s in range(address.stages)], store


def broadcast(group, flat: torch.Tensor, src: int = 0) -> None:
    """In place: every rank's `flat` ends up holding rank `src`'s (in a stage communicator: src 0, the carrier)."""
    opts = dist.BroadcastOptions()
    opts.rootRank = src
    group.broadcast([flat], opts).wait()
