"""vLLM's engine processes stop busy-waiting shortly after their last message, so the trainer gets its cores back.

vLLM (0.32; on CPU it forces its multiprocess executor) links the engine core and each worker by shared-memory
queues whose readers busy-wait, yielding the CPU in a loop, for one second after every message before they block on
a socket (`shm_broadcast.SpinCondition`, `busy_loop_s=1`, no setting). Colocated, the trainer trains right after each
generation: whenever that takes under a second (the quick start's policy step: a quarter of one), the engine core and
its worker stay runnable through all of it, two busy processes on the trainer's cores.

`install_from_environment` runs first thing in every process the trainer spawns (spawn_hook/sitecustomize.py): when
the engine's environment sets DYNAMO_MEGA_VLLM_BUSY_LOOP_S (vllm_engine.py does), the queues created in that process
busy-wait that long instead. Nothing else changes: a reader that misses the window is woken by vLLM's own socket
notification, as after any idle second. bench/vllm_idle.py measures what the trainer gains.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

BUSY_LOOP_ENV = "DYNAMO_MEGA_VLLM_BUSY_LOOP_S"
_MODULE = "vllm.distributed.device_communicators.shm_broadcast"


def install_from_environment() -> None:
    value = os.environ.get(BUSY_LOOP_ENV)
    if value is not None and _MODULE not in sys.modules:
        sys.meta_path.insert(0, _ShortBusyLoop(float(value)))


class _ShortBusyLoop(importlib.abc.MetaPathFinder):
    """Imports vLLM's shm_broadcast as usual, then makes its SpinCondition readers busy-wait `busy_loop_s`."""

    def __init__(self, busy_loop_s: float):
        self.busy_loop_s = busy_loop_s

    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)  # once: the real finders locate the module
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader.exec_module = _patched(spec.loader.exec_module, self.busy_loop_s)
        return spec


def _patched(exec_module, busy_loop_s: float):
    def exec_and_patch(module) -> None:
        exec_module(module)
        spin_condition = getattr(module, "SpinCondition", None)
        if spin_condition is None:  # another vLLM version: leave it as it is
            return
        original_init = spin_condition.__init__

        def __init__(self, *args, **kwargs):
            kwargs["busy_loop_s"] = busy_loop_s
            original_init(self, *args, **kwargs)

        spin_condition.__init__ = __init__

    return exec_and_patch
