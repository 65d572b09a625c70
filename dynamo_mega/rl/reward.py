"""Verifiable rewards: math-verify scoring in a process pool with a timeout.

math-verify bounds its own parse/verify time with signal.alarm, which only works on a process's main thread,
so scoring runs in worker processes (spawned, so no trainer threads or process groups are inherited). A chunk
that exceeds the timeout scores as wrong and the pool is rebuilt, so one pathological answer cannot stall a run.
Results are cached by (response, answer): verification is a pure function of the two strings.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from dynamo_mega.lifeline import exit_with


def _gold_candidates(answer: str) -> str:
    # Gold answers arrive bare ("8", "\\frac{1}{2}"); math-verify extracts from LaTeX or boxed text.
    return answer if "\\boxed" in answer else f"\\boxed{{{answer}}}"


def score_pairs(pairs: list[tuple[str, str]]) -> list[bool]:
    """Worker function: True where `response` states the same answer as `answer` (math-verify)."""
    from math_verify import parse, verify

    out = []
    for response, answer in pairs:
        try:
            gold = parse(_gold_candidates(answer))
            pred = parse(response)
            out.append(bool(gold) and bool(pred) and bool(verify(gold, pred)))
        except Exception:  # math-verify raises on malformed LaTeX; a malformed answer is a wrong answer
            out.append(False)
    return out


class MathVerifyReward:
    """Callable: rewards(responses, answers) -> list of floats (1.0 correct, `wrong_reward` otherwise)."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, wrong_reward: float = 0.0, chunk_size: int = 64):
        if workers < 1:
            raise ValueError(f"algo.reward_workers={workers} must be >= 1")
        self.workers, self.timeout_s, self.wrong_reward, self.chunk_size = workers, timeout_s, wrong_reward, chunk_size
        self._pool: ProcessPoolExecutor | None = None
        self._cache: dict[tuple[str, str], bool] = {}
        self.timeouts = 0  # chunks that timed out (scored wrong), for metrics

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # Workers end with the trainer even when it is SIGKILLed (dynamo_mega/lifeline.py).
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=mp.get_context("spawn"), initializer=exit_with, initargs=(os.getpid(),)
            )
        return self._pool

    def correctness(self, responses: list[str], answers: list[str]) -> list[bool]:
        if len(responses) != len(answers):
            raise AssertionError(f"{len(responses)} responses but {len(answers)} answers: metadata misaligned")
        todo = sorted({(r, a) for r, a in zip(responses, answers) if (r, a) not in self._cache})
        chunks = [todo[i : i + self.chunk_size] for i in range(0, len(todo), self.chunk_size)]
        first_use = self._pool is None
        futures = [self._executor().submit(score_pairs, c) for c in chunks]
        # Backstop over math-verify's own per-call alarms: chunks run `workers` at a time, and a fresh pool
        # first pays for spawning and importing math-verify.
        waves = -(-len(chunks) // self.workers)
        deadline = time.monotonic() + self.timeout_s * max(waves, 1) + (60.0 if first_use else 0.0)
        for chunk, fut in zip(chunks, futures):
            try:
                results = fut.result(timeout=max(deadline - time.monotonic(), 0.1))
            except FutureTimeout:
                self.timeouts += 1
                results = [False] * len(chunk)
            self._cache.update(zip(chunk, results))
        if any(not f.done() for f in futures):
            self.close(kill=True)  # a worker is stuck: end it and start afresh next call
        return [self._cache[(r, a)] for r, a in zip(responses, answers)]

    def __call__(self, responses: list[str], answers: list[str]) -> list[float]:
        return [1.0 if ok else self.wrong_reward for ok in self.correctness(responses, answers)]

    def close(self, kill: bool = False) -> None:
        if self._pool is not None:
            if kill:  # Python 3.11's executor has no public way to end a busy worker: terminate its processes
                for proc in list(getattr(self._pool, "_processes", {}).values()):
                    proc.terminate()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
