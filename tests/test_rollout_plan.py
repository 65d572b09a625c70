"""Request plans for rollout replicas: completeness, the stated balance bound, whole groups."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_mega.rl.rollout_plan import plan_loads, plan_requests


def _check_plan(ids, counts, lengths, replicas, plans):
    assert len(plans) == replicas
    total = Counter()
    for plan in plans:
        on_replica = [pid for pid, _ in plan]
        assert len(on_replica) == len(set(on_replica)), "a prompt appears twice on one replica"
        assert on_replica == sorted(on_replica, key=ids.index), "requests keep prompt order"
        for pid, n in plan:
            assert n > 0
            total[pid] += n
    assert dict(total) == {pid: c for pid, c in zip(ids, counts) if c > 0}
    loads = plan_loads(plans, dict(zip(ids, lengths)))
    active = [length for length, c in zip(lengths, counts) if c > 0]
    share = sum(c * length for c, length in zip(counts, lengths)) / replicas
    bound = share + (max(active) if active else 0.0)
    assert max(loads) <= bound * (1 + 1e-9)
    pieces = sum(len(plan) for plan in plans)
    assert pieces <= len(active) + replicas - 1
    return loads


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 64), st.floats(1.0, 4000.0)), min_size=1, max_size=40),
    st.integers(1, 9),
)
def test_complete_balanced_and_deterministic(groups, replicas):
    ids = [f"p{i}" for i in range(len(groups))]
    counts = [c for c, _ in groups]
    lengths = [length for _, length in groups]
    plans = plan_requests(ids, counts, lengths, replicas)
    _check_plan(ids, counts, lengths, replicas, plans)
    assert plans == plan_requests(ids, counts, lengths, replicas)


def test_single_replica_keeps_everything_whole_in_order():
    ids = ["a", "b", "c"]
    assert plan_requests(ids, [3, 0, 5], [10.0, 20.0, 30.0], 1) == [[("a", 3), ("c", 5)]]


def test_groups_stay_whole_when_they_can():
    ids = [f"p{i}" for i in range(8)]
    plans = plan_requests(ids, [16] * 8, [100.0] * 8, 4)
    assert all(len(plan) == 2 and all(n == 16 for _, n in plan) for plan in plans)


def test_a_group_larger_than_a_share_is_split():
    ids = ["huge", "s1", "s2", "s3"]
    counts, lengths = [64, 8, 8, 8], [1000.0, 100.0, 100.0, 100.0]
    plans = plan_requests(ids, counts, lengths, 2)
    loads = _check_plan(ids, counts, lengths, 2, plans)
    assert sum(1 for plan in plans for pid, _ in plan if pid == "huge") == 2  # one cut, R - 1 = 1
    assert sum(1 for plan in plans for pid, _ in plan if pid != "huge") == 3  # small groups stay whole
    assert max(loads) <= 66400 / 2 + 1000  # T + L_max


def test_balance_at_training_scale():
    # 512 prompts x ~16 rollouts on 8 replicas: the bound T + L_max is a fraction of a percent of T
    rng = np.random.default_rng(0)
    ids = [f"q{i}" for i in range(512)]
    counts = rng.integers(8, 25, size=512).tolist()
    lengths = rng.lognormal(6.5, 0.6, size=512).tolist()
    loads = _check_plan(ids, counts, lengths, 8, plan_requests(ids, counts, lengths, 8))
    assert max(loads) / (sum(loads) / 8) < 1.005


def test_more_replicas_than_samples():
    plans = plan_requests(["a"], [2], [5.0], 4)
    assert max(plans, key=len) == [("a", 1)] and sum(len(p) for p in plans) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((["a"], [1], [1.0], 0), "num_replicas must be an integer >= 1"),
        ((["a", "b"], [1], [1.0, 1.0], 2), "one count and one expected length per prompt"),
        ((["a"], [-1], [1.0], 2), "counts must be integers >= 0"),
        ((["a"], [1.5], [1.0], 2), "counts must be integers >= 0"),
        ((["a"], [1], [0.0], 2), "expected_lengths must be finite and > 0"),
        ((["a", "a"], [1, 1], [1.0, 1.0], 2), "share id 'a'"),
    ],
)
def test_argument_errors(args, message):
    with pytest.raises(ValueError, match=message):
        plan_requests(*args)
