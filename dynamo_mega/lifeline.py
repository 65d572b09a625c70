"""Helper processes (vLLM workers, reward workers) end when the trainer process is gone.

A SIGKILLed trainer (OOM killer, `kill -9`, a node agent) runs no cleanup, and its children are re-parented
and live on, holding cores and GPU memory that the resumed run then competes with. Each helper process calls
`exit_with(trainer_pid)` once; a daemon thread polls the trainer and exits the helper when it has gone.
"""

from __future__ import annotations

import os
import threading
import time


def _started(pid: int) -> float | None:
    """The process's start time, or None once it has exited (a zombie counts as exited)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except psutil.NoSuchProcess:
        return None


TRAINER_PID_ENV = "DYNAMO_MEGA_TRAINER_PID"  # set in the environment vLLM's processes are spawned with


def arm_from_environment() -> None:
    """In a process spawned for a trainer's vLLM engine (rl/engines/spawn_hook/sitecustomize.py runs this at
    interpreter start): exit with the trainer whose pid the environment names. No-op without the variable."""
    pid = os.environ.get(TRAINER_PID_ENV)
    if pid:
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
