"""The engine watchdog wakes callers blocked on a vLLM client whose engine core died (no vLLM engine started:
a stand-in client with the same three attributes the watchdog reads)."""

from __future__ import annotations

import queue
import time
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
from vllm.v1.engine.exceptions import EngineDeadError

from dynamo_mega.rl.engines.vllm_watchdog import watch_engine


def _llm():
    client = SimpleNamespace(resources=SimpleNamespace(engine_dead=False), outputs_queue=queue.Queue(), utility_results={})
    return SimpleNamespace(llm_engine=SimpleNamespace(engine_core=client)), client


def test_blocked_generate_and_rpc_get_engine_dead_error():
    llm, client = _llm()
    pending = Future()
    client.utility_results[7] = pending
    stop = watch_engine(llm, poll_s=0.01)
    time.sleep(0.05)
    assert client.outputs_queue.empty() and not pending.done()  # alive: nothing happens
    client.resources.engine_dead = True  # what vLLM's monitor thread sets when the process dies
    assert isinstance(client.outputs_queue.get(timeout=5), EngineDeadError)  # a waiting generate() wakes up
    with pytest.raises(EngineDeadError):
        pending.result(timeout=5)  # and so does a waiting collective_rpc
    stop.set()


def test_stopped_watchdog_leaves_a_deliberate_shutdown_alone():
    llm, client = _llm()
    stop = watch_engine(llm, poll_s=0.01)
    stop.set()
    time.sleep(0.05)
    client.resources.engine_dead = True  # close() marks the client dead too
    time.sleep(0.05)
    assert client.outputs_queue.empty()


def test_in_process_engine_needs_no_watchdog():
    assert watch_engine(SimpleNamespace(llm_engine=SimpleNamespace(engine_core=object()))) is None
