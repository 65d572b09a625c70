"""Split a step's allocation {prompt: n_i} into request plans for R rollout-engine replicas.

Replicas generate in parallel and the step waits for the slowest, so plans balance the expected
number of generated tokens, cost_i = n_i * L_i with L_i the prompt's mean response length so far.
A prompt's group stays on one replica (it shares the prompt's prefill and KV-cache prefix) unless no
replica can take it whole without breaking the balance bound below.

Balance bound (tested): with T = sum_i cost_i / R (the perfect share) and L_max = max_i L_i over
prompts with n_i > 0, every replica's expected load is <= T + L_max, i.e. within one response of
the ideal, since no plan can do better than T. At most R - 1 groups are cut, so the plans hold at
most (number of prompts) + R - 1 requests.

How: groups in decreasing cost (longest-processing-time order) go whole to the least-loaded open
replica if that keeps it <= T + L_max; otherwise the group is cut so that this replica just reaches
T, the replica is closed, and the rest of the group continues on the next least-loaded one. A closed
replica holds >= T, so while samples remain some open replica holds < T and has room for one more
response: the procedure always places everything, and each cut closes one of at most R - 1 replicas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dynamo_mega.rl.prompt_stats import validate_prompt_ids


def plan_requests(
    prompt_ids: Sequence[str],
    counts: Sequence[int],
    expected_lengths: Sequence[float],
    num_replicas: int,
) -> list[list[tuple[str, int]]]:
    """plans_R: for each replica, (prompt_id, n) requests in prompt order; per prompt the n sum to counts[i].

    prompt_ids_N, counts_N (>= 0; zero-count prompts are left out), expected_lengths_N (> 0, tokens per
    response), num_replicas = R >= 1. Deterministic: ties go to the earlier prompt and lower replica.
    """
    counts_N, lengths_N = _check_plan_args(prompt_ids, counts, expected_lengths, num_replicas)
    pieces_R = _assign(counts_N, lengths_N, num_replicas)
    return [[(prompt_ids[i], n) for i, n in sorted(pieces)] for pieces in pieces_R]


def plan_loads(plans: list[list[tuple[str, int]]], lengths_by_id: dict[str, float]) -> list[float]:
    """load_R: expected generated tokens per replica of `plans` (for metrics and tests)."""
    return [float(sum(n * lengths_by_id[pid] for pid, n in plan)) for plan in plans]


def _assign(counts_N: np.ndarray, lengths_N: np.ndarray, num_replicas: int) -> list[list[tuple[int, int]]]:
    """pieces_R: (prompt index, n) per replica, following the procedure in the module docstring."""
    cost_N = counts_N * lengths_N
    active = counts_N > 0
    share = float(cost_N.sum()) / num_replicas
    cap = share + (float(lengths_N[active].max()) if active.any() else 0.0)
    load_R = np.zeros(num_replicas)
    open_R = np.ones(num_replicas, dtype=bool)
    pieces_R: list[list[tuple[int, int]]] = [[] for _ in range(num_replicas)]
    for i in np.argsort(-cost_N, kind="stable"):
        left = int(counts_N[i])
        length = float(lengths_N[i])
        while left > 0:
            r = _least_loaded(load_R, open_R)
            if load_R[r] + left * length <= cap:
                take = left
            else:  # cut: fill replica r just up to the share T, then close it
                take = min(left, max(1, math.ceil((share - load_R[r]) / length)))
                open_R[r] = False
            pieces_R[r].append((int(i), take))
            load_R[r] += take * length
            left -= take
    return pieces_R


def _least_loaded(load_R: np.ndarray, open_R: np.ndarray) -> int:
    """Index of the least-loaded open replica (lowest index on ties).

    By the module-docstring argument an open replica always exists; should floating point close them
    all, the least-loaded replica overall takes the rest, which keeps the plan complete.
    """
    candidates = np.flatnonzero(open_R)
    if candidates.size == 0:
        return int(np.argmin(load_R))
    return int(candidates[np.argmin(load_R[candidates])])


def _check_plan_args(
    prompt_ids: Sequence[str], counts: Sequence[int], expected_lengths: Sequence[float], num_replicas: int
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, (int, np.integer)) or num_replicas < 1:
        raise ValueError(f"num_replicas must be an integer >= 1, got {num_replicas!r}")
    counts_N = np.asarray(counts)
    lengths_N = np.asarray(expected_lengths, dtype=np.float64)
    n = len(prompt_ids)
    if counts_N.shape != (n,) or lengths_N.shape != (n,):
        raise ValueError(
            f"need one count and one expected length per prompt: {n} prompt ids, counts of shape "
            f"{counts_N.shape}, expected_lengths of shape {lengths_N.shape}"
        )
    if n and (not np.issubdtype(counts_N.dtype, np.integer) or counts_N.min() < 0):
        raise ValueError("counts must be integers >= 0 (rollouts per prompt)")
    if n and (not np.all(np.isfinite(lengths_N)) or lengths_N.min() <= 0):
        raise ValueError(
            "expected_lengths must be finite and > 0; use PromptStats.expected_lengths(), which fills "
            "unseen prompts with the mean over seen ones"
        )
    validate_prompt_ids(prompt_ids)
    return counts_N.astype(np.int64), lengths_N
