"""Helper processes (vLLM engine processes, reward workers, checkpoint-writer helpers) end when the trainer is gone.

A SIGKILLed trainer (OOM killer, `kill -9`, a node agent) runs no cleanup, and its children are re-parented
and live on, holding cores and GPU memory that the resumed run then competes with. Each helper process calls
`exit_with(trainer_pid)` once; a daemon thread polls the trainer and exits the helper when it has gone.
`arm_spawned_children` makes every Python process the trainer spawns from then on do so at interpreter start.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path


def _started(pid: int) -> float | None:
    """The process's start time, or None once it has exited (a zombie counts as exited)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except psutil.NoSuchProcess:
        return None


TRAINER_PID_ENV = "DYNAMO_MEGA_TRAINER_PID"  # set in the environment vLLM's processes are spawned with


SPAWN_HOOK_DIR = str(Path(__file__).with_name("spawn_hook"))  # holds the sitecustomize.py that arms children


def arm_spawned_children() -> None:
    """From now on, every Python process this one spawns (and theirs) exits with it: megatron's checkpoint writer
    starts a multiprocessing Manager on first save, vLLM spawns its engine core and workers, and a SIGKILLed
    trainer would leave them all running. Forked children inherit no threads; those that live long (the reward
    pool's workers) arm themselves in their initializer."""
    os.environ[TRAINER_PID_ENV] = str(os.getpid())
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != SPAWN_HOOK_DIR]
    os.environ["PYTHONPATH"] = os.pathsep.join([SPAWN_HOOK_DIR, *paths])


def arm_from_environment() -> None:
    """In a process spawned by a trainer (spawn_hook/sitecustomize.py runs this at interpreter start): exit with the
    trainer whose pid the environment names. No-op without the variable, and in multiprocessing's resource tracker,
    which must outlive the trainer to clean up after it and exits by itself once its last user has gone."""
    pid = os.environ.get(TRAINER_PID_ENV)
    if pid and int(pid) != os.getpid() and not any("resource_tracker" in a for a in sys.orig_argv):
        exit_with(int(pid))


def exit_with(pid: int, poll_s: float = 1.0) -> None:
    """Exit this process (status 1) once process `pid` has exited, or now if it already has. The start time tells
    it from a later process that is given the same pid."""
    started = _started(pid)
    if started is None:
        os._exit(1)

    def poll() -> None:
        while True:
            time.sleep(poll_s)
            if _started(pid) != started:
                os._exit(1)

    threading.Thread(target=poll, daemon=True, name="dynamo-mega-lifeline").start()
