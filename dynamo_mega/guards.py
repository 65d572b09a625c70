"""Run guards that keep a multi-rank job from corrupting itself or hanging.

- `StopSignal`: SIGTERM (Slurm's warning before a time limit) asks the loop to finish its step, save, exit.
- `sigterm_stops_start_up`: SIGTERM before the loop runs (nothing to save yet) stops at once, with a message.
- `broadcast`: a choice made on the driver (e.g. the checkpoint to resume from) shared with every rank.
(Rollout failures are told to every rank by the rollout service: rl/rollout_service.py.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from dynamo_mega.parallel.groups import ParallelGroups


def broadcast(obj, groups: ParallelGroups):
    """Driver -> all ranks (pickled: small objects only)."""
    if groups.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class StopSignal:
    """Records SIGTERM; the loop polls `agreed` once per step so that every rank stops at the same step."""

    def __init__(self, enabled: bool):
        self.requested = False
        self._previous = None
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, groups: ParallelGroups, also: bool = False) -> bool:
        """True on every rank if any rank was signalled or passed also=True (e.g. its own clock says the time
        budget is spent: ranks' clocks differ, and a rank that stops alone would leave the others hanging)."""
        if groups.world_size == 1:
            return self.requested or also
        flag = torch.tensor([float(self.requested or also)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


STARTUP_SIGTERM_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


@contextlib.contextmanager
def sigterm_stops_start_up():
    """While the job starts (parallel groups, data, model, vLLM engines), SIGTERM raises SystemExit(143) after one
    line saying so: the `finally` blocks on the way out close what was started, and the processes spawned so far
    follow the trainer through their lifeline. Python's default would end the process silently mid-start."""

    def handle(signum, frame):
        if os.environ.get("RANK", "0") == "0":
            print(
                "dynamo-mega: SIGTERM during start-up: stopped before the first step (nothing to save)",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(STARTUP_SIGTERM_EXIT)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
