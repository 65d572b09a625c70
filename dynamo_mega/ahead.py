"""A call run in a background thread, its result (or its exception) taken later: the next step's rollouts generated
while this step trains (rollout.max_staleness=1, train.py).

A daemon thread rather than a ThreadPoolExecutor: the executor's threads are joined at interpreter exit, so a
trainer that crashed while the thread waits in a collective on a dead peer would hang instead of exiting.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Ahead(Generic[T]):
    def __init__(self, fn: Callable[..., T], *args, name: str = "dynamo-mega-rollouts-ahead"):
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., T], args: tuple) -> None:
        try:
            self._result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread by result()
            self._error = exc

    def result(self) -> T:
        """Wait for the call; its exception is raised here, in the caller's thread."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result
