"""Rollout-count allocation: how many responses n_i each prompt of a step gets (ALGORITHM.md section 1).

All modes spend exactly `budget` = sum_i n_i with n_low <= n_i <= n_high, are deterministic functions of
their inputs (ties go to the earlier prompt), and so give the same answer on every rank that holds the
same statistics. Modes:
- `uniform`   : GRPO's equal split (budget // N each, the remainder to the first prompts);
- `reference` : the paper's released rule: epoch-stale priorities with its floors, n_low each plus
                proportional water-filling capped at n_high, largest-remainder rounding;
- `optimal`   : the exact integer minimiser of sum_i P_i / n_i, P_i the Beta-posterior mean of p_i(1-p_i)
                (Neyman allocation n_i ~ sqrt(P_i), solved exactly on the integers).
`allocate_with_probes` is the in-step probing variant of `optimal`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from dynamo_mega.rl.prompt_stats import PromptStats

MODES = ("uniform", "reference", "optimal")
# reference-rule constants, from the paper's released code (ALGORITHM.md section 1)
REF_MIN_HISTORY = 4
REF_MASTERED_ACC = 0.85
REF_FLOOR = 0.01
REF_TIE_EPS = 1e-6


def allocate(
    prompt_ids: Sequence[str], stats: PromptStats, *, budget: int, n_low: int, n_high: int, mode: str
) -> list[int]:
    """n_N: rollouts per prompt, in the order of prompt_ids_N, for the given allocation `mode`.

    `reference` reads the history snapshot that stats.refresh_priorities() takes: the training loop calls
    it at every epoch start (before the first refresh every prompt has no priority, so epoch 1 is uniform).
    """
    n = _check_args(prompt_ids, budget=budget, n_low=n_low, n_high=n_high)
    if mode == "uniform":
        counts_N = uniform_counts(n, budget)
    elif mode == "reference":
        k_N, g_N = stats.reference_counts(prompt_ids)
        counts_N = reference_counts(reference_priorities(k_N, g_N), budget=budget, n_low=n_low, n_high=n_high)
    elif mode == "optimal":
        counts_N = optimal_counts(stats.variance_estimates(prompt_ids), budget=budget, n_low=n_low, n_high=n_high)
    else:
        raise ValueError(f"unknown allocation mode {mode!r}; choose one of {', '.join(MODES)}")
    return [int(c) for c in counts_N]


def allocate_with_probes(
    prompt_ids: Sequence[str],
    stats: PromptStats,
    probe_correct: Sequence[Sequence[float]],
    *,
    budget: int,
    n_low: int,
    n_high: int,
) -> list[int]:
    """n_N: total rollouts per prompt (probes included) after n_low probes per prompt were scored.

    probe_correct_N: the n_low probe outcomes (in [0, 1]) of each prompt, already generated. The
    estimate folds them into the history without storing them (the caller's end-of-step update()
    records every sample once), then `optimal` places the rest of the budget; every n_i >= n_low,
    so the probes are never wasted.
    """
    n = _check_args(prompt_ids, budget=budget, n_low=n_low, n_high=n_high)
    if len(probe_correct) != n or any(len(p) != n_low for p in probe_correct):
        raise ValueError(
            f"probe_correct needs exactly n_low={n_low} outcomes for each of the {n} prompts; got sizes "
            f"{[len(p) for p in probe_correct][:10]}"
        )
    succ_N = np.array([float(np.sum(p)) for p in probe_correct])
    var_N = stats.variance_estimates(prompt_ids, succ_N, np.full(n, float(n_low)))
    return [int(c) for c in optimal_counts(var_N, budget=budget, n_low=n_low, n_high=n_high)]


def uniform_counts(n: int, budget: int) -> np.ndarray:
    """n_N: budget // n each, plus one for the first budget % n prompts."""
    counts_N = np.full(n, budget // n, dtype=np.int64)
    counts_N[: budget % n] += 1
    return counts_N


def reference_priorities(k_N: np.ndarray, g_N: np.ndarray) -> np.ndarray:
    """prio_N of the paper's code from k_N successes in g_N rollouts (cumulative, epoch-stale).

    g < 4: 0 (no priority); success rate >= 0.85: 0.01; else max(P + (1 - acc) * 1e-6, 0.01) with the
    unbiased P = k (g - k) / (g (g - 1)).
    """
    k_N = np.asarray(k_N, dtype=np.float64)
    g_N = np.asarray(g_N, dtype=np.float64)
    enough = g_N >= REF_MIN_HISTORY
    g_safe = np.where(enough, g_N, REF_MIN_HISTORY)  # avoids 0/0 where the value is discarded anyway
    acc = k_N / g_safe
    p_var = k_N * (g_safe - k_N) / (g_safe * (g_safe - 1.0))
    prio = np.maximum(p_var + (1.0 - acc) * REF_TIE_EPS, REF_FLOOR)
    prio = np.where(acc >= REF_MASTERED_ACC, REF_FLOOR, prio)
    return np.where(enough, prio, 0.0)


def reference_counts(prio_N: np.ndarray, *, budget: int, n_low: int, n_high: int) -> np.ndarray:
    """n_N of the paper's rule: n_low each, the rest water-filled in proportion to prio_N, capped at n_high.

    Continuous water-filling first (repeatedly split what is left among uncapped prompts in proportion
    to priority, capping at n_high), then largest-remainder rounding, then a round-robin fix-up for any
    unit lost to floating point. Budget left when all priorities are 0 is split evenly (epoch 1: uniform).
    """
    prio_N = np.asarray(prio_N, dtype=np.float64)
    n = prio_N.size
    room = float(n_high - n_low)
    extra_N = np.zeros(n)
    left = float(budget - n * n_low)
    open_N = np.ones(n, dtype=bool)
    while left > 1e-9 and open_N.any():
        weight_N = np.where(open_N, prio_N, 0.0)
        if weight_N.sum() <= 0:  # only zero-priority prompts can still grow: split evenly among them
            weight_N = open_N.astype(np.float64)
        share_N = left * weight_N / weight_N.sum()
        capped_N = open_N & (extra_N + share_N >= room)
        if not capped_N.any():
            extra_N += share_N
            break
        left -= float((room - extra_N[capped_N]).sum())
        extra_N[capped_N] = room
        open_N &= ~capped_N
    return n_low + _round_to_total(extra_N, budget - n * n_low, int(room))


def _round_to_total(x_N: np.ndarray, total: int, cap: int) -> np.ndarray:
    """Integers in [0, cap] summing to `total`, near x_N: floor, then largest remainders, then round-robin."""
    base_N = np.clip(np.floor(x_N + 1e-9), 0, cap).astype(np.int64)
    short = total - int(base_N.sum())
    if short > 0:
        rem_N = np.where(base_N < cap, x_N - base_N, -np.inf)
        order = np.argsort(-rem_N, kind="stable")  # stable: equal remainders favour the earlier prompt
        take = order[: min(short, int((base_N < cap).sum()))]
        base_N[take] += 1
    # round-robin fix-up: only reached when floating point left x_N's sum off `total` by a unit or more
    i = 0
    while (diff := total - int(base_N.sum())) != 0:
        j = i % base_N.size
        if diff > 0 and base_N[j] < cap:
            base_N[j] += 1
        elif diff < 0 and base_N[j] > 0:
            base_N[j] -= 1
        i += 1
    return base_N


def optimal_counts(var_N: np.ndarray, *, budget: int, n_low: int, n_high: int) -> np.ndarray:
    """n_N: the exact integer minimiser of sum_i var_N[i] / n_i, sum n_i = budget, n_low <= n_i <= n_high.

    The objective is separable and convex in each n_i, so the best allocation takes, from n_low upward,
    the budget - N * n_low largest marginal gains var_i / (m (m + 1)) over all candidate steps m -> m+1
    (gains fall as m grows, so each prompt's chosen steps are a prefix: the greedy/water-level optimum).
    Ties: larger gain, then smaller m, then earlier prompt: deterministic, and equal variances (zeros
    included) give uniform counts. Cost: O(N (n_high - n_low) log) time and memory.
    """
    var_N = np.asarray(var_N, dtype=np.float64)
    if var_N.ndim != 1 or not np.all(np.isfinite(var_N)) or np.any(var_N < 0):
        raise ValueError("variance estimates must be a 1-D array of finite values >= 0")
    n = var_N.size
    extra = budget - n * n_low
    steps = n_high - n_low
    counts_N = np.full(n, n_low, dtype=np.int64)
    if extra == 0 or steps == 0:
        return counts_N
    m_S = np.arange(n_low, n_high, dtype=np.float64)  # S = steps candidate increments per prompt
    gain_NS = var_N[:, None] / (m_S * (m_S + 1.0))[None, :]
    prompt_NS = np.broadcast_to(np.arange(n)[:, None], gain_NS.shape)
    step_NS = np.broadcast_to(np.arange(steps)[None, :], gain_NS.shape)
    order = np.lexsort((prompt_NS.ravel(), step_NS.ravel(), -gain_NS.ravel()))  # last key sorts first
    chosen = prompt_NS.ravel()[order[:extra]]
    counts_N += np.bincount(chosen, minlength=n)
    return counts_N


def allocation_objective(counts_N: Sequence[int], var_N: Sequence[float]) -> float:
    """V(n) = sum_i var_i / n_i: the batch gradient-variance proxy that `optimal` minimises."""
    return float(np.sum(np.asarray(var_N, dtype=np.float64) / np.asarray(counts_N, dtype=np.float64)))


def allocation_metrics(counts: Sequence[int], group_rewards: Sequence[Sequence[float]]) -> dict[str, float]:
    """Per-step summary: count histogram (min, p10, median, p90, max, mean, std) and where the budget went.

    group_rewards_N: the rewards of each prompt's responses (len == counts[i]); a response is correct
    when its reward > 0. frac_budget_all_correct / _all_wrong: share of the step's rollouts spent on
    groups whose responses were all correct / all wrong (zero-advantage groups: spend that was wasted).
    grad_var_proxy: mean over prompts of P_i / n_i with P_i the group's realised unbiased p(1-p): the in-run
    value of the variance proxy that `optimal` minimises (lower is better at equal budget).
    """
    counts_N = np.asarray(counts, dtype=np.float64)
    if counts_N.size == 0 or len(group_rewards) != counts_N.size:
        raise ValueError(f"need one reward group per count; got {counts_N.size} counts, {len(group_rewards)} groups")
    sizes = [len(g) for g in group_rewards]
    if any(s != c for s, c in zip(sizes, counts_N)):
        raise ValueError("each reward group must have as many rewards as its prompt's count")
    all_correct_N = np.array([len(g) > 0 and all(r > 0 for r in g) for g in group_rewards])
    all_wrong_N = np.array([len(g) > 0 and all(r <= 0 for r in g) for g in group_rewards])
    total = counts_N.sum()
    p10, p50, p90 = np.percentile(counts_N, [10, 50, 90])
    # Realised unbiased p(1-p) per group (0 for groups of one), then the objective optimal minimises, per prompt.
    k_N = np.array([sum(r > 0 for r in g) for g in group_rewards], dtype=np.float64)
    p_var_N = np.where(counts_N > 1, k_N * (counts_N - k_N) / (counts_N * np.maximum(counts_N - 1, 1)), 0.0)
    return {
        "n_min": float(counts_N.min()),
        "n_p10": float(p10),
        "n_median": float(p50),
        "n_p90": float(p90),
        "n_max": float(counts_N.max()),
        "n_mean": float(counts_N.mean()),
        "n_std": float(counts_N.std()),
        "frac_budget_all_correct": float(counts_N[all_correct_N].sum() / total) if total else 0.0,
        "frac_budget_all_wrong": float(counts_N[all_wrong_N].sum() / total) if total else 0.0,
        "frac_prompts_all_correct": float(all_correct_N.mean()),
        "frac_prompts_all_wrong": float(all_wrong_N.mean()),
        "grad_var_proxy": allocation_objective(counts_N, p_var_N) / counts_N.size,
    }


def _check_args(prompt_ids: Sequence[str], *, budget: int, n_low: int, n_high: int) -> int:
    n = len(prompt_ids)
    if n == 0:
        raise ValueError("allocation needs at least one prompt")
    for name, v in (("budget", budget), ("n_low", n_low), ("n_high", n_high)):
        if not _is_int(v):  # config values read from YAML may be floats or strings: say so plainly
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if n_low < 1 or n_high < n_low:
        raise ValueError(f"need 1 <= n_low <= n_high (got n_low={n_low}, n_high={n_high})")
    if not n_low * n <= budget <= n_high * n:
        raise ValueError(
            f"budget {budget} is outside [n_low*N, n_high*N] = [{n_low * n}, {n_high * n}] for N={n} prompts; "
            "change the rollout budget or the per-prompt bounds n_low/n_high"
        )
    # Datasets are checked for unique ids when loaded, so a repeat here is a sampler bug, not the user's data.
    repeats = [pid for pid, c in Counter(prompt_ids).items() if c > 1]
    assert not repeats, f"internal error (a dynamo_mega bug, please report it): a step holds prompts {repeats[:5]} twice"
    return n


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
