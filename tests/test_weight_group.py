"""The weight group (rl/engines/weight_group.py) on its own: a group built on a private TCPStore next to an
existing default world, and a broadcast of a flat bf16 bucket from the trainer (rank 0) to two "engine workers".
gloo here; tests/gpu/test_weight_group_nccl.py runs the same with NCCL."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _member(rank: int, world: int, port: int, backend: str, out_dir: str) -> None:
    import torch.distributed as dist

    from dynamo_mega.rl.engines.weight_group import broadcast, open_group

    # Each process already has its own default world (as the trainer and vLLM workers do): left untouched.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    device = "cuda" if backend == "nccl" else "cpu"
    group, _store = open_group("127.0.0.1", port, rank, world, backend, timeout_s=60)
    flat = torch.arange(1000, dtype=torch.bfloat16, device=device)
    if rank > 0:
        flat.zero_()
    broadcast(group, flat, src=0)
    torch.save(flat.cpu(), os.path.join(out_dir, f"rank{rank}.pt"))
    assert dist.get_world_size() == 1
    dist.destroy_process_group()


def broadcast_to_engine_workers(tmp_path, backend: str) -> None:
    mp.spawn(_member, args=(3, _port(), backend, str(tmp_path)), nprocs=3, join=True)
    want = torch.arange(1000, dtype=torch.bfloat16)
    for rank in range(3):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), want), rank


def test_broadcast_reaches_every_engine_worker(tmp_path):
    broadcast_to_engine_workers(tmp_path, "gloo")


def test_unknown_backend_is_a_clear_error():
    from dynamo_mega.rl.engines.weight_group import open_group

    with pytest.raises(ValueError, match="use gloo .CPU. or nccl .GPU."):
        open_group("127.0.0.1", _port(), 0, 1, "mpi")
