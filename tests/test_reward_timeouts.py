"""Rewards a timeout cannot poison (issue 19): a chunk that passes its deadline does not score (or cache) its other
answers wrong, a call's wall time stays within the bound MathVerifyReward states, timeouts are counted per pair,
and math-verify's printing of huge inputs does not reach the terminal."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest

from dynamo_mega.rl.reward import GRACE_S, MathVerifyReward

pytestmark = pytest.mark.reliability  # the failure probes of docs/operations.md: pytest -m reliability

TIMEOUT_S, WORKERS, STARTUP_S = 2.0, 2, 20.0
GOOD = [(f"\\boxed{{{v}}}", str(v)) for v in range(100, 140)]
ADVERSARIAL = [("9**9**9**9", "8"), ("\\boxed{(10^{100})!}", "8"), ("\\boxed{10^{10^{8}}}", "8")]
MIX = GOOD[:20] + ADVERSARIAL + GOOD[20:]  # one chunk of 43: the adversarial pairs make it late


@pytest.fixture(scope="module")
def reward():
    r = MathVerifyReward(workers=WORKERS, timeout_s=TIMEOUT_S, startup_s=STARTUP_S)
    assert r.correctness(["\\boxed{1}"], ["1"]) == [True]  # the pool is up, as in the user's report
    yield r
    r.close(kill=True)


def _worst_case_s(r: MathVerifyReward, pairs: int, starts: int) -> float:
    """The class docstring's bound with every pair of every chunk late (P = pairs) and start-ups at startup_s."""
    chunks = math.ceil(pairs / r.chunk_size)
    return starts * r.startup_s + math.ceil(chunks / r.workers) * r.timeout_s + GRACE_S \
        + math.ceil(pairs / r.workers) * (r.timeout_s + GRACE_S) + 0.5 * starts  # 0.5 s: killing the pool


def _score(r: MathVerifyReward, pairs):
    starts, start = r.pool_starts, time.monotonic()
    out = r.correctness([p for p, _ in pairs], [a for _, a in pairs])
    elapsed = time.monotonic() - start
    assert elapsed <= r.last_call_bound_s + 0.5, f"{elapsed:.1f}s over the stated bound {r.last_call_bound_s:.1f}s"
    assert elapsed <= _worst_case_s(r, len(pairs), 1 + r.pool_starts - starts)
    return dict(zip(pairs, out)), elapsed


def test_a_late_chunk_keeps_its_correct_answers_and_caches_no_timeout(reward):
    before = reward.timeouts
    for _ in range(2):  # the rescore must agree: nothing wrong was cached
        starts = reward.pool_starts
        got, elapsed = _score(reward, MIX)
        assert reward.pool_starts == starts + 1  # the late chunk's busy worker was killed, a fresh pool re-scored it
        assert [got[p] for p in GOOD] == [True] * len(GOOD)
        assert [got[p] for p in ADVERSARIAL] == [False] * len(ADVERSARIAL)
        assert reward.last_call_timeouts == len(ADVERSARIAL)  # pairs, not chunks
        assert not set(ADVERSARIAL) & set(reward._cache)
        assert all(reward._cache[p] for p in GOOD)
    assert reward.timeouts - before == 2 * len(ADVERSARIAL)  # cumulative, for the trainer's metrics


def test_a_call_without_timeouts_is_bounded_by_its_chunk_waves(reward):
    pairs = [(f"\\boxed{{{v}}}", str(v)) for v in range(1000, 1130)] + [("\\boxed{3}", "4")]  # 3 chunks
    got, elapsed = _score(reward, pairs)
    assert list(got.values()) == [True] * 130 + [False]
    assert reward.last_call_timeouts == 0
    assert reward.last_call_bound_s == pytest.approx(math.ceil(3 / WORKERS) * TIMEOUT_S + GRACE_S)  # warm pool: no start
    assert _score(reward, pairs)[1] < 0.5  # all cached


def test_only_adversarial_pairs_each_time_out_on_their_own(reward):
    got, _ = _score(reward, ADVERSARIAL + [("\\boxed{8}", "8")])
    assert got[("\\boxed{8}", "8")] is True and reward.last_call_timeouts == len(ADVERSARIAL)
    assert list(got.values()).count(True) == 1


_QUIET = r"""
import logging, os, sys
from dynamo_mega.rl.reward import MathVerifyReward
if __name__ == "__main__":
    r = MathVerifyReward(workers=2, timeout_s=1.0, startup_s=20.0)
    huge = "\\boxed{10^{10^{8}}}" + " x" * 100_000  # 200 kB: math-verify logs such inputs whole on a timeout
    print(r.correctness([huge, "\\boxed{8}"], ["8", "8"]), flush=True)
    pool = r._start()
    pool.submit(print, "P" * 100_000).result()
    pool.submit(logging.getLogger("math_verify.parser").warning, "W" * 100_000).result()
    pool.submit(os.write, 2, b"E" * 100_000).result()
    r.close()
"""


def test_workers_print_nothing_of_the_input():
    done = subprocess.run([sys.executable, "-c", _QUIET], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[False, True]"
    assert len(done.stderr) < 2000, f"{len(done.stderr)} bytes on stderr: {done.stderr[:300]}"
