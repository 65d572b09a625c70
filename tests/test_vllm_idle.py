"""rl/engines/vllm_idle.py: in a process started as the trainer starts vLLM's (the spawn hook on PYTHONPATH, the
engine's environment), vLLM's shared-memory queue readers busy-wait DYNAMO_MEGA_VLLM_BUSY_LOOP_S, not vLLM's one
second; without the variable vLLM is untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from dynamo_mega.lifeline import SPAWN_HOOK_DIR
from dynamo_mega.rl.engines.vllm_idle import BUSY_LOOP_ENV

_PROBE = """
import json, zmq
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
context = zmq.Context()
reader = SpinCondition(is_reader=True, context=context, notify_address="ipc:///tmp/dynamo_mega_vllm_idle_test")
print(json.dumps({"busy_loop_s": reader.busy_loop_s}))
"""


def _busy_loop_in_child(env_value: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != BUSY_LOOP_ENV}
    env["PYTHONPATH"] = os.pathsep.join([SPAWN_HOOK_DIR, env.get("PYTHONPATH", "")])
    if env_value is not None:
        env[BUSY_LOOP_ENV] = env_value
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["busy_loop_s"]


def test_the_engines_queue_readers_busy_wait_as_configured():
    assert _busy_loop_in_child("0.005") == 0.005
    assert _busy_loop_in_child(None) == 1  # vLLM's own default: the hook changes nothing unless asked
