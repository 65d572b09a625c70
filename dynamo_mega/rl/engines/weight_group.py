"""A process group between the trainer's sender and one rollout engine's workers, for weight broadcasts.

Disaggregated engines (vLLM in other processes, on other GPUs or nodes) receive each weight bucket by a
broadcast over this group instead of through vLLM's RPC channel: NCCL on GPUs, gloo on CPU (how the tests and
benchmarks run it here). The group is built directly on a TCPStore, outside torch.distributed's default world,
so neither side's own process groups (the trainer's Megatron groups, vLLM's TP group) are touched. One group per
engine: the trainer is rank 0, engine worker w is rank 1 + w.

Imported inside vLLM's worker processes too: torch only.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

STORE_PREFIX = "dynamo_mega_weights"


def open_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float = 300.0):
    """Join (rank 0: create) the weight group; blocks until all `world_size` ranks have joined."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"rollout.weight_transport backend {backend!r}: use gloo (CPU) or nccl (GPU)")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    prefixed = dist.PrefixStore(STORE_PREFIX, store)
    if backend == "nccl":
        group = dist.ProcessGroupNCCL(prefixed, rank, world_size)
    else:
        group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    return group, store  # the store must outlive the group


def broadcast(group, flat: torch.Tensor, src: int = 0) -> None:
    """In place: every rank's `flat` ends up holding rank `src`'s."""
    opts = dist.BroadcastOptions()
    opts.rootRank = src
    group.broadcast([flat], opts).wait()
