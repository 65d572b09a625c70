"""The weight group (rl/engines/weight_group.py) on its own, next to each process's existing default world: two
trainer senders (pipeline stages 0 and 1, each with its own communicator) broadcast a flat bf16 bucket each to two
"engine workers", which join one communicator per stage. gloo here; tests/gpu/test_weight_group_nccl.py runs the
same with NCCL."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

STAGES, WORKERS = 2, 2


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bucket(stage: int, device: str) -> torch.Tensor:
    return torch.arange(1000, dtype=torch.bfloat16, device=device) + 1000 * stage


def _member(rank: int, port: int, backend: str, out_dir: str) -> None:
    import torch.distributed as dist

    from dynamo_mega.rl.engines.weight_group import GroupAddress, broadcast, open_carrier, open_receiver

    # Each process already has its own default world (as the trainer and vLLM workers do): left untouched.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    device = "cuda" if backend == "nccl" else "cpu"
    address = GroupAddress("127.0.0.1", port, STAGES, WORKERS, backend, timeout_s=60)
    if rank < STAGES:  # ranks 0..S-1: the stages' senders (stage 0 serves the store)
        communicator, _store = open_carrier(address, rank)
        broadcast(communicator, _bucket(rank, device), src=0)
    else:  # ranks S + w: engine workers, receiving each stage's bucket from its sender
        communicators, _store = open_receiver(address, rank - STAGES)
        for stage, communicator in enumerate(communicators):
            flat = torch.zeros(1000, dtype=torch.bfloat16, device=device)
            broadcast(communicator, flat, src=0)
            torch.save(flat.cpu(), os.path.join(out_dir, f"worker{rank - STAGES}_stage{stage}.pt"))
    assert dist.get_world_size() == 1
    dist.destroy_process_group()


def broadcast_to_engine_workers(tmp_path, backend: str) -> None:
    mp.spawn(_member, args=(_port(), backend, str(tmp_path)), nprocs=STAGES + WORKERS, join=True)
    for worker in range(WORKERS):
        for stage in range(STAGES):
            assert torch.equal(torch.load(tmp_path / f"worker{worker}_stage{stage}.pt"), _bucket(stage, "cpu")), (worker, stage)


def test_broadcast_reaches_every_engine_worker(tmp_path):
    broadcast_to_engine_workers(tmp_path, "gloo")


def test_bad_addresses_are_clear_errors():
    from dynamo_mega.rl.engines.weight_group import GroupAddress, open_carrier

    with pytest.raises(ValueError, match="use gloo .CPU. or nccl .GPU."):
        GroupAddress("127.0.0.1", _port(), 1, 1, "mpi")
    with pytest.raises(ValueError, match="at least one sender and one worker"):
        GroupAddress("127.0.0.1", _port(), 1, 0, "gloo")
    with pytest.raises(ValueError, match="outside the weight group's 2 stages"):
        open_carrier(GroupAddress("127.0.0.1", _port(), 2, 1, "gloo"), 2)
