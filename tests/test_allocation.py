"""Rollout allocation: budget, bounds, determinism, exactness of `optimal`, the paper's worked example."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_mega.rl.allocation import (
    allocate,
    allocate_with_probes,
    allocation_metrics,
    allocation_objective,
    optimal_counts,
    reference_counts,
    reference_priorities,
    uniform_counts,
)
from dynamo_mega.rl.prompt_stats import PromptStats

MODES = ("uniform", "reference", "optimal")
WORKED_K = [0, 0, 0, 1, 2, 4, 6, 8, 8, 10, 12, 14, 15, 16, 16, 16]


def _stats_from_history(k, g, **kw) -> tuple[list[str], PromptStats]:
    """Prompt ids p0.. with k[i] successes out of g[i] rollouts, refreshed for the reference mode."""
    stats = PromptStats(**kw)
    ids = [f"p{i}" for i in range(len(k))]
    for pid, ki, gi in zip(ids, k, g):
        if gi:
            stats.update([pid] * gi, [1] * ki + [0] * (gi - ki), [100] * gi)
    stats.refresh_priorities()
    return ids, stats


# ---------------------------------------------------------------- the reference rule
def test_reference_worked_example():
    # Priorities (G=16, P = k(16-k)/240): k=0 and k>=14 (acc >= 0.85) -> 0.01; k=1 -> 0.0625,
    # k=2 -> 0.1167, k=4,12 -> 0.2, k=6,10 -> 0.25, k=8 -> 0.2667 (+ (1-acc)*1e-6). Each prompt gets 8,
    # 128 remain. Water-filling: 128/1.6925 per unit priority puts k=6,8,8,10 over the 16-extra cap;
    # the next round caps k=4,12; the last 32 go 123.5 per unit: k=2 -> 14.40, k=1 -> 7.72, each 0.01
    # prompt -> 1.23. Floors sum to 29; the 3 largest remainders are k=1, k=2 and the first 0.01 prompt.
    ids, stats = _stats_from_history(WORKED_K, [16] * 16)
    got = allocate(ids, stats, budget=256, n_low=8, n_high=24, mode="reference")
    assert got == [10, 9, 9, 16, 23, 24, 24, 24, 24, 24, 24, 9, 9, 9, 9, 9]


def test_reference_priority_rules():
    prio = reference_priorities(np.array([0, 2, 3, 1, 17, 8]), np.array([0, 3, 20, 20, 20, 16]))
    assert prio[0] == 0 and prio[1] == 0  # fewer than 4 rollouts: no priority
    assert prio[2] == pytest.approx(3 * 17 / (20 * 19) + 0.85e-6)
    assert prio[3] == pytest.approx(1 * 19 / (20 * 19) + 0.95e-6)
    assert prio[4] == 0.01  # acc 0.85: mastered
    assert prio[5] == pytest.approx(64 / 240 + 0.5e-6)
    assert reference_priorities(np.array([0]), np.array([16]))[0] == 0.01  # never solved: floor


def test_reference_first_epoch_is_uniform():
    stats = PromptStats()
    ids = [f"p{i}" for i in range(10)]
    stats.update(ids * 16, [1, 0] * 80, [5] * 160)  # history exists, but no epoch refresh yet
    assert allocate(ids, stats, budget=160, n_low=8, n_high=24, mode="reference") == [16] * 10


def test_reference_zero_priority_prompts_get_n_low_when_others_can_absorb():
    got = reference_counts(np.array([0.0, 0.2, 0.1]), budget=30, n_low=2, n_high=64)
    assert got.tolist() == [2, 18, 10]


# ---------------------------------------------------------------- properties of every mode
history = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=12).map(
    lambda rows: [(min(a, b), max(a, b)) for a, b in rows]
)


@settings(max_examples=60, deadline=None)
@given(history, st.integers(1, 8), st.integers(0, 20), st.floats(0, 1), st.sampled_from(MODES))
def test_budget_bounds_determinism(hist, n_low, width, frac, mode):
    k, g = zip(*hist)
    ids, stats = _stats_from_history(k, g, prior_alpha=0.5, prior_beta=0.5)
    n_high = n_low + width
    budget = len(ids) * n_low + round(frac * len(ids) * width)
    got = allocate(ids, stats, budget=budget, n_low=n_low, n_high=n_high, mode=mode)
    assert sum(got) == budget
    assert all(n_low <= c <= n_high for c in got) and all(type(c) is int for c in got)
    assert got == allocate(list(ids), stats, budget=budget, n_low=n_low, n_high=n_high, mode=mode)


def _brute_force(var, budget, n_low, n_high) -> float:
    best = np.inf
    for combo in itertools.product(range(n_low, n_high + 1), repeat=len(var)):
        if sum(combo) == budget:
            best = min(best, allocation_objective(combo, var))
    return best


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 0.25), min_size=1, max_size=4),
    st.integers(1, 4),
    st.integers(0, 5),
    st.floats(0, 1),
)
def test_optimal_equals_brute_force(var, n_low, width, frac):
    n_high = n_low + width
    budget = len(var) * n_low + round(frac * len(var) * width)
    got = optimal_counts(np.array(var), budget=budget, n_low=n_low, n_high=n_high)
    assert got.sum() == budget
    assert allocation_objective(got, var) <= _brute_force(var, budget, n_low, n_high) * (1 + 1e-12) + 1e-15


@settings(max_examples=60, deadline=None)
@given(history, st.sampled_from([(8, 24), (2, 64), (4, 8)]))
def test_optimal_objective_not_above_reference_or_uniform(hist, bounds):
    k, g = zip(*hist)
    ids, stats = _stats_from_history(k, g)
    n_low, n_high = bounds
    budget = len(ids) * (n_low + n_high) // 2
    var = stats.variance_estimates(ids)
    objective = {m: allocation_objective(allocate(ids, stats, budget=budget, n_low=n_low, n_high=n_high, mode=m), var)
                 for m in MODES}
    assert objective["optimal"] <= objective["reference"] * (1 + 1e-12)
    assert objective["optimal"] <= objective["uniform"] * (1 + 1e-12)


def test_optimal_with_equal_variances_is_uniform():
    assert optimal_counts(np.full(5, 0.1), budget=42, n_low=2, n_high=20).tolist() == uniform_counts(5, 42).tolist()
    assert optimal_counts(np.zeros(3), budget=9, n_low=1, n_high=9).tolist() == [3, 3, 3]


def test_counts_follow_the_prompt_order():
    # defect 1/2 guard: counts belong to ids, not to batch positions; permuting the ids permutes the counts
    # distinct k with no k / 16-k pair, so no two prompts tie under either mode's weights
    ids, stats = _stats_from_history([1, 3, 8, 12, 6, 9], [16] * 6)
    perm = [4, 2, 0, 5, 1, 3]
    for mode in ("reference", "optimal"):
        base = dict(zip(ids, allocate(ids, stats, budget=60, n_low=2, n_high=30, mode=mode)))
        shuffled_ids = [ids[p] for p in perm]
        got = allocate(shuffled_ids, stats, budget=60, n_low=2, n_high=30, mode=mode)
        assert got == [base[pid] for pid in shuffled_ids]


# ---------------------------------------------------------------- probing
def test_probing_spends_exact_budget_and_favours_uncertain_prompts():
    stats = PromptStats(prior_alpha=0.5, prior_beta=0.5)
    ids = ["solved", "mixed", "hopeless"]
    probes = [[1] * 4, [1, 0, 1, 0], [0] * 4]
    got = allocate_with_probes(ids, stats, probes, budget=36, n_low=4, n_high=20)
    assert sum(got) == 36 and min(got) >= 4
    assert got[1] > got[0] and got[1] > got[2]
    assert stats.step == 0 and len(stats) == 0  # probes are not recorded by the allocator
    with pytest.raises(ValueError, match="exactly n_low=4 outcomes"):
        allocate_with_probes(ids, stats, [[1] * 4, [1] * 3, [0] * 4], budget=36, n_low=4, n_high=20)


# ---------------------------------------------------------------- validation and metrics
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 10}, r"budget 10 is outside \[n_low\*N, n_high\*N\] = \[16, 48\]"),
        ({"budget": 49}, "outside"),
        ({"n_low": 0}, "1 <= n_low <= n_high"),
        ({"n_high": 3}, "1 <= n_low <= n_high"),
        ({"budget": 20.0}, "budget must be an integer"),
        ({"mode": "neyman"}, "unknown allocation mode 'neyman'; choose one of uniform, reference, optimal"),
    ],
)
def test_argument_errors(kwargs, message):
    args = {"budget": 32, "n_low": 8, "n_high": 24, "mode": "optimal", **kwargs}
    with pytest.raises(ValueError, match=message):
        allocate(["a", "b"], PromptStats(), **args)


def test_duplicate_ids_in_a_batch_are_an_internal_error():
    """The dataset's ids were checked when loaded: a repeat inside a step is our bug, never the user's data."""
    with pytest.raises(AssertionError, match="internal error.*'a'"):
        allocate(["a", "b", "a"], PromptStats(), budget=48, n_low=8, n_high=24, mode="uniform")


def test_allocation_metrics():
    counts = [2, 4, 6, 8]
    groups = [[1, 1], [0, -1, 0, 0], [1, 0, 0, 1, 0, 0], [1] * 8]
    m = allocation_metrics(counts, groups)
    assert m["frac_budget_all_correct"] == pytest.approx(10 / 20)
    assert m["frac_budget_all_wrong"] == pytest.approx(4 / 20)
    assert m["frac_prompts_all_correct"] == 0.5 and m["frac_prompts_all_wrong"] == 0.25
    assert (m["n_min"], m["n_max"], m["n_mean"], m["n_median"]) == (2, 8, 5, 5)
    with pytest.raises(ValueError, match="as many rewards"):
        allocation_metrics([2, 3], [[1, 1], [1]])
