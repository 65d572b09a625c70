"""Turn a dead vLLM engine core into an error instead of a hang.

vLLM (0.32) runs the engine core in its own process. Its synchronous client notices the process dying in a
monitor thread, marks itself dead and stops its output thread, but a caller already blocked in `LLM.generate`
(waiting on the client's output queue) or in `collective_rpc` (waiting on a utility future) is never woken:
the trainer would wait forever. The watchdog polls the client's dead flag and wakes both kinds of waiter with
vLLM's own EngineDeadError, which the trainer's restart path handles (`generate` in train.py).
"""

from __future__ import annotations

import threading


def watch_engine(llm, poll_s: float = 0.5) -> threading.Event | None:
    """Start a daemon thread that raises EngineDeadError in whoever waits on `llm` once its engine core dies.

    Returns the event that stops the thread (set it before a deliberate shutdown, which also marks the client
    dead), or None when the engine runs in-process (its errors already reach the caller)."""
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    resources = getattr(client, "resources", None)
    if resources is None or not hasattr(client, "outputs_queue") or not hasattr(client, "utility_results"):
        return None
    stop = threading.Event()

    def poll() -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        while not stop.wait(poll_s):
            if resources.engine_dead:
                client.outputs_queue.put_nowait(EngineDeadError())
                for future in list(client.utility_results.values()):
                    if not future.done():
                        future.set_exception(EngineDeadError())
                return

    threading.Thread(target=poll, daemon=True, name="dynamo-mega-engine-watchdog").start()
    return stop
