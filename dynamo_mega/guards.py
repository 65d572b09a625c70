"""Run guards that keep a multi-rank job from corrupting itself or hanging.

- `StopSignal`: SIGTERM (Slurm's warning before a time limit) asks the loop to finish its step, save, exit.
- `on_driver`: work done only on the driver rank (rollouts, rewards, evaluation) whose outcome every rank
  learns: a result, an engine restart (weights must be pushed again, a collective), or a failure that is
  raised on every rank instead of leaving the other ranks blocked in a broadcast.
- `EngineRestarted`: raised after a dead rollout engine was replaced by a fresh one holding the initial weights.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from dynamo_mega.parallel.groups import ParallelGroups


class EngineRestarted(Exception):
    """The driver replaced a dead rollout engine; the trainer's weights must be pushed into it again."""


class DriverFailed(RuntimeError):
    """The driver rank failed; raised on the other ranks with the driver's error message."""


def broadcast(obj, groups: ParallelGroups):
    """Driver -> all ranks (pickled; rollouts are small next to the model)."""
    if groups.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_driver(groups: ParallelGroups, fn: Callable[[], object]):
    """fn() on the driver, its result on every rank. A failure on the driver is raised on every rank."""
    status, error = ("ok", None), None
    if groups.is_driver:
        try:
            status = ("ok", fn())
        except EngineRestarted as exc:
            status, error = ("restarted", None), exc
        except Exception as exc:  # noqa: BLE001 - re-raised below after telling the other ranks
            status, error = ("error", f"{type(exc).__name__}: {exc}"), exc
    kind, value = broadcast(status, groups)
    if error is not None:
        raise error
    if kind == "restarted":
        raise EngineRestarted()
    if kind == "error":
        raise DriverFailed(f"the driver rank failed: {value}")
    return value


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
