"""Run a function on N gloo processes (torch.multiprocessing spawn) and collect what each returns.

The worker must be a module-level function (spawn pickles it by reference). Each rank's return
value is torch.save'd to a temporary file and loaded back in rank order, so tests compare
multi-process results against a single-process reference in the parent.
"""

from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    # One thread per rank: the machine has 2 cores and the ranks run side by side.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world_size: int, *args) -> list:
    """fn(rank, world_size, *args) on world_size spawned processes; returns [result of rank r]."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world_size, _free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world_size)]
