"""Helpers shared by the benchmarks: wall-clock medians and a free local port for gloo rendezvous."""

from __future__ import annotations

import socket
import statistics
import time


def median_time(fn, reps: int) -> float:
    """Median wall-clock seconds of `reps` calls of fn()."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
