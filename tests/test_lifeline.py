"""Helper processes end with a SIGKILLed trainer: the reward pool's workers (and, via the same lifeline, vLLM's
workers: tests/test_vllm_engine.py) do not live on as orphans."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil

_OWNER = """
import json, sys, time
from dynamo_mega.rl.reward import MathVerifyReward
reward = MathVerifyReward(workers=2)
assert reward.correctness(["\\\\boxed{4}"], ["4"]) == [True]
print(json.dumps([p.pid for p in reward._pool._processes.values()]), flush=True)
time.sleep(600)
"""


def test_reward_workers_exit_when_the_trainer_is_sigkilled():
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True)
    try:
        workers = [psutil.Process(pid) for pid in json.loads(owner.stdout.readline())]  # started on demand: >= 1
        assert workers and all(w.is_running() for w in workers)
    finally:
        owner.kill()
        owner.wait()
    start = time.time()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], f"orphaned reward workers: {alive}"
    assert time.time() - start < 30
