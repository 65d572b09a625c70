"""Run a function on N gloo processes and collect what each returns.

The worker must be a module-level function (it is pickled by reference). Each rank's return value comes back
through torch.save, in rank order, so tests compare multi-process results against a single-process reference
in the parent.

The processes are kept: one pool of `world_size` spawned workers per world size, reused by every later call in
the same pytest session. Importing torch + megatron-core costs ~8-11 s of CPU per process on the 2-core CI
machine, and the suite makes ~45 multi-process calls. Each call still gets a fresh default process group (a
new port) and leaves Megatron's model-parallel state destroyed, so calls do not see each other's groups. A call
in which any rank fails (or dies) kills its pool: the other ranks may be blocked in a collective, and the next
call starts from new processes.
"""

from __future__ import annotations

import atexit
import io
import os
import queue
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CALL_TIMEOUT_S = 900  # one call, all ranks: the slowest gloo test takes ~1 min alone on 2 cores


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(rank: int, world_size: int, tasks, results, parent_pid: int) -> None:
    from dynamo_mega.lifeline import exit_with

    exit_with(parent_pid)  # a SIGKILLed pytest runs no atexit: do not wait for tasks forever
    # megatron.core.timers imports wandb when it is installed (the dev extra has it, for the W&B sink's test),
    # only to offer a timer writer no test uses: ~3 s of CPU per process. Hide it from these workers only.
    sys.modules.setdefault("wandb", None)
    while (task := tasks.get()) is not None:
        port, fn, args = task
        # One thread per rank: the machine has 2 cores and the ranks run side by side.
        torch.set_num_threads(1)
        try:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
            try:
                result = fn(rank, world_size, *args)
            finally:
                if "megatron.core" in sys.modules:
                    from megatron.core import parallel_state

                    parallel_state.destroy_model_parallel()  # the next call's init_parallel builds its own groups
                dist.destroy_process_group()
            buffer = io.BytesIO()
            torch.save(result, buffer)
            results.put((rank, True, buffer.getvalue()))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))


class _Pool:
    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.tasks = [ctx.SimpleQueue() for _ in range(world_size)]
        self.procs = [
            # Not daemonic: megatron's checkpoint writer starts processes of its own. _close_all ends them.
            ctx.Process(target=_serve, args=(rank, world_size, self.tasks[rank], self.results, os.getpid()))
            for rank in range(world_size)
        ]
        for proc in self.procs:
            proc.start()

    def run(self, fn, args: tuple) -> list:
        port = _free_port()
        for task_queue in self.tasks:
            task_queue.put((port, fn, args))
        outputs: dict[int, object] = {}
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while len(outputs) < self.world_size:
            try:
                rank, ok, payload = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"gloo worker rank(s) {dead} of {self.world_size} died (exit codes "
                                       f"{[self.procs[r].exitcode for r in dead]}) while running {fn.__name__}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {self.world_size} gloo ranks took over {CALL_TIMEOUT_S} s") from None
                continue
            if not ok:
                raise RuntimeError(f"{fn.__name__} failed on rank {rank} of {self.world_size}:\n{payload}")
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        return [outputs[r] for r in range(self.world_size)]

    def close(self, *, kill: bool) -> None:
        for proc, task_queue in zip(self.procs, self.tasks):
            if kill or not proc.is_alive():
                proc.kill()
            else:
                task_queue.put(None)
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


_POOLS: dict[int, _Pool] = {}


def _close_all() -> None:
    while _POOLS:
        _POOLS.popitem()[1].close(kill=False)


atexit.register(_close_all)


def run_gloo(fn, world_size: int, *args) -> list:
    """fn(rank, world_size, *args) on world_size gloo processes; returns [result of rank r]."""
    pool = _POOLS.get(world_size)
    if pool is None:
        pool = _POOLS[world_size] = _Pool(world_size)
    try:
        return pool.run(fn, args)
    except BaseException:
        del _POOLS[world_size]
        pool.close(kill=True)
        raise
