"""Verifiable rewards: math-verify scoring in a process pool, with a deadline per pair that a timeout cannot poison.

math-verify bounds its own parse/verify time with signal.alarm, which only works on a process's main thread,
so scoring runs in worker processes (spawned, so no trainer threads or process groups are inherited). Each worker
gives every (response, answer) pair its own timer (`timeout_s`, interrupting Python code); the trainer side backs
that up with deadlines per batch of work and kills a worker stuck past them (uninterruptible C code, e.g. a huge
integer power), so one pathological answer cannot stall a run. A pair that timed out is scored wrong for that call
only: it is never cached, so the answers that shared its chunk keep their real score. Results that did finish are
cached by (response, answer): verification is a pure function of the two strings. User reward functions
(algo.reward, rl/reward_plugins.py) run in the same pool, through `run`, with the same deadlines.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

from dynamo_mega.lifeline import exit_with

GRACE_S = 0.5  # per wait, on top of timeout_s: IPC, and a worker's timer firing only between bytecodes
_BARRIER: threading.Barrier | None = None  # in a worker: the pool's start-up barrier (see MathVerifyReward._start)


class _PairTimeout(BaseException):  # BaseException: math-verify's and sympy's `except Exception` do not swallow it
    pass


def _gold_candidates(answer: str) -> str:
    # Gold answers arrive bare ("8", "\\frac{1}{2}"); math-verify extracts from LaTeX or boxed text.
    return answer if "\\boxed" in answer else f"\\boxed{{{answer}}}"


def _score_one(response: str, answer: str, own_timeouts: bool) -> bool:
    from math_verify import parse, verify

    # own_timeouts=False: the caller's per-pair timer bounds the whole pair; math-verify's alarms would cancel it.
    limit = 5 if own_timeouts else None
    try:
        gold = parse(_gold_candidates(answer), parsing_timeout=limit)
        pred = parse(response, parsing_timeout=limit)
        return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=limit))
    except Exception:  # math-verify raises on malformed LaTeX; a malformed answer is a wrong answer
        return False


def score_pairs(pairs: list[tuple[str, str]], timeout_s: float | None = None) -> list[bool | None]:
    """Worker function: True where `response` states the same answer as `answer` (math-verify). With `timeout_s`,
    each pair has that long (a timer on this process's main thread) and scores None (timed out) when it runs over;
    without, math-verify's own 5 s alarms apply and a timeout scores False."""
    out: list[bool | None] = []
    for response, answer in pairs:
        if timeout_s is None:
            out.append(_score_one(response, answer, own_timeouts=True))
            continue
        state = {"armed": True, "fired": False}

        def on_alarm(signum, frame, state=state):
            if state["armed"]:
                state["fired"] = True
                raise _PairTimeout

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            ok: bool | None = _score_one(response, answer, own_timeouts=False)
            state["armed"] = False
        except _PairTimeout:
            ok = None
        finally:
            state["armed"] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        out.append(None if state["fired"] else ok)
    return out


def _init_worker(trainer_pid: int, barrier: threading.Barrier) -> None:
    """Pool initializer: end with the trainer (dynamo_mega/lifeline.py), keep math-verify quiet (on a timeout it logs
    the whole input, up to megabytes), and pay its imports and grammar loading before any deadline starts."""
    global _BARRIER
    exit_with(trainer_pid)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the worker
    quiet = logging.getLogger("math_verify")
    quiet.handlers[:] = [logging.NullHandler()]
    quiet.propagate, quiet.disabled = False, True
    _BARRIER = barrier
    _score_one("\\boxed{1}", "1", own_timeouts=True)


def _ready(timeout_s: float) -> int:
    """Start-up probe: returns once every worker of the pool has run its initializer (each blocks on the barrier)."""
    assert _BARRIER is not None
    _BARRIER.wait(timeout_s)
    return os.getpid()


class MathVerifyReward:
    """Callable: rewards(responses, answers) -> list of floats (1.0 correct, `wrong_reward` otherwise).

    Timeouts. A pair that runs past `timeout_s` (algo.reward_timeout_s) is scored wrong for this call, counted in
    `timeouts` (pairs, cumulative) and `last_call_timeouts` (pairs, this call), and never cached. Uncached pairs
    go to the pool in C chunks of `chunk_size`, all with one deadline, ceil(C / W) * timeout_s + g after the pool is
    up (chunks run W at a time). A chunk not back by then does not decide its pairs:
    the pool is killed and those P pairs are re-scored one per task, W = `workers` (algo.reward_workers) at a
    time, each wave of W with its own deadline, so the other answers in a slow chunk keep their real score; a wave
    with a stuck worker kills the pool again.

    Bound on the wall time of one `correctness` call, with g = GRACE_S (0.5 s) and S = `startup_s` (one pool start:
    spawning W workers, importing math-verify; waited on only when no pool is up, i.e. the first call and after a
    kill):
        T <= starts * S + ceil(C / W) * timeout_s + g + ceil(P / W) * (timeout_s + g) + (small overhead per kill)
    where starts <= 1 (no pool up at the call) + 1 (a chunk was late) + the phase-2 waves with a stuck worker (a
    pool that does not start within S is not retried in that call: its pairs count as timed out). Each
    term is a wait this code bounds with a deadline; `last_call_bound_s` is the right-hand side for the last call
    (actual start-up time in place of starts * S) so the trainer or a test can check it. Without timeouts, P = 0
    and starts = 0 on a warm pool: T <= ceil(C / W) * timeout_s + g.
    """

    def __init__(
        self, workers: int = 2, timeout_s: float = 5.0, wrong_reward: float = 0.0, chunk_size: int = 64, startup_s: float = 60.0
    ):
        if workers < 1:
            raise ValueError(f"algo.reward_workers={workers} must be >= 1")
        if timeout_s <= 0:
            raise ValueError(f"algo.reward_timeout_s={timeout_s} must be > 0")
        self.workers, self.timeout_s, self.wrong_reward, self.chunk_size = workers, timeout_s, wrong_reward, chunk_size
        self.startup_s = startup_s
        self._pool: ProcessPoolExecutor | None = None
        self._cache: dict[tuple[str, str], bool] = {}
        self.timeouts = 0  # pairs that timed out (scored wrong, not cached), cumulative, for metrics
        self.last_call_timeouts = 0  # pairs that timed out in the last correctness() call
        self.last_call_bound_s = 0.0  # the docstring's bound for the last call, start-ups at their actual time
        self.last_call_seconds = 0.0  # wall time of the last correctness() call
        self.pool_starts = 0  # pools started (the first, and one after each kill), cumulative
        self._startup_spent, self.start_failed = 0.0, False

    def _start(self) -> ProcessPoolExecutor | None:
        """The pool, started (and waited on, up to startup_s) if none is up; None if it did not start in time."""
        if self._pool is not None:
            return self._pool
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(self.workers)
        self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(), barrier))
        self.pool_starts += 1
        probes = [self._pool.submit(_ready, self.startup_s) for _ in range(self.workers)]  # one per worker: they block
        done, _ = wait(probes, timeout=self.startup_s, return_when=FIRST_EXCEPTION)
        if len(done) < len(probes) or any(f.exception() for f in done):
            self.close(kill=True)
            return None
        return self._pool

    def run(self, tasks: list, timeout_s: float, work: Callable = score_pairs) -> list:
        """work(task, self.timeout_s) in the pool for each task (default: a list of pairs to score), all within one
        deadline of timeout_s; None for a task not back by it (pool killed) or when no pool started in this call
        (`start_failed`). rl/reward_plugins.py runs user reward functions here too, with the same timeouts."""
        t0 = time.monotonic()
        pool = None if self.start_failed else self._start()
        self._startup_spent += time.monotonic() - t0
        if pool is None:  # no pool within startup_s: not again this call, its pairs count as timed out
            self.start_failed = True
            return [None] * len(tasks)
        futures = [pool.submit(work, task, self.timeout_s) for task in tasks]
        wait(futures, timeout=timeout_s)
        results = [f.result() if f.done() and f.exception() is None else None for f in futures]
        if any(r is None for r in results):
            self.close(kill=True)  # a worker is stuck (or died): end it, and start afresh when next needed
        return results

    def correctness(self, responses: list[str], answers: list[str]) -> list[bool]:
        if len(responses) != len(answers):
            raise AssertionError(f"{len(responses)} responses but {len(answers)} answers: metadata misaligned")
        start, self._startup_spent, self.last_call_timeouts, self.start_failed = time.monotonic(), 0.0, 0, False
        todo = sorted({(r, a) for r, a in zip(responses, answers) if (r, a) not in self._cache})
        chunks = [todo[i : i + self.chunk_size] for i in range(0, len(todo), self.chunk_size)]
        scored: dict[tuple[str, str], bool] = {}
        late: list[tuple[str, str]] = []
        waves = math.ceil(len(chunks) / self.workers)
        budget = waves * self.timeout_s + GRACE_S if chunks else 0.0
        for chunk, results in zip(chunks, self.run(chunks, budget) if chunks else []):
            if results is None:
                late.extend(chunk)
            else:
                self._keep(chunk, results, scored)
        for i in range(0, len(late), self.workers):  # phase 2: one pair per task, a deadline per wave of W
            wave = late[i : i + self.workers]
            budget += self.timeout_s + GRACE_S
            for pair, results in zip(wave, self.run([[p] for p in wave], self.timeout_s + GRACE_S)):
                self._keep([pair], results or [None], scored)
        self.last_call_bound_s = self._startup_spent + budget
        self.last_call_seconds = time.monotonic() - start
        return [self._cache.get((r, a), scored.get((r, a), False)) for r, a in zip(responses, answers)]

    def _keep(self, pairs: list[tuple[str, str]], results: list[bool | None], scored: dict[tuple[str, str], bool]) -> None:
        """Cache the pairs that were decided; count (and score wrong, uncached) the ones that timed out."""
        for pair, ok in zip(pairs, results, strict=True):
            if ok is None:
                self.timeouts += 1
                self.last_call_timeouts += 1
                scored[pair] = False
            else:
                self._cache[pair] = ok

    def __call__(self, responses: list[str], answers: list[str]) -> list[float]:
        return [1.0 if ok else self.wrong_reward for ok in self.correctness(responses, answers)]

    def close(self, kill: bool = False) -> None:
        if self._pool is not None:
            if kill:  # Python 3.11's executor has no public way to end a busy worker: kill its processes
                for proc in list(getattr(self._pool, "_processes", {}).values()):
                    proc.kill()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
