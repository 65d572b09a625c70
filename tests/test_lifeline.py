"""Helper processes end with a SIGKILLed trainer: the reward pool's workers (and, via the same lifeline, vLLM's
workers: tests/test_vllm_engine.py) do not live on as orphans."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.reliability  # the failure probes of docs/operations.md: pytest -m reliability

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


_SAVER = """
import json, sys, time
from dynamo_mega.lifeline import arm_spawned_children
if sys.argv[1] == "armed":
    arm_spawned_children()
import psutil
from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue
get_write_results_queue()  # what megatron's checkpoint writer starts on the first save: a spawned Manager server
print(json.dumps([p.pid for p in psutil.Process().children(recursive=True)]), flush=True)
time.sleep(600)
"""


def _spawned_by_sigkilled_owner(mode: str) -> tuple[list[psutil.Process], list[psutil.Process]]:
    owner = subprocess.Popen([sys.executable, "-c", _SAVER, mode], stdout=subprocess.PIPE, text=True)
    try:
        children = [psutil.Process(pid) for pid in json.loads(owner.stdout.readline())]
        assert children, "megatron's writer started no helper process: this test checks nothing"
    finally:
        owner.kill()
        owner.wait()
    _, alive = psutil.wait_procs(children, timeout=20)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:  # this test's own leftovers
        p.kill()
    return children, alive


def test_checkpoint_writer_helpers_exit_when_the_trainer_is_sigkilled():
    """megatron's dist_checkpointing keeps a spawned multiprocessing Manager for the process's life after the first
    save; without `arm_spawned_children` it outlives a SIGKILLed trainer (measured: ~275 MB left running)."""
    children, alive = _spawned_by_sigkilled_owner("armed")
    assert not alive, f"orphaned checkpoint-writer processes: {[p.cmdline()[:3] for p in alive]}"
