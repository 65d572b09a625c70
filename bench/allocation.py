"""Benchmark: how close each allocation mode gets to the variance-optimal rollout allocation.

Part 1 (proxy). A simulated run: a dataset of D prompts with TRUE pass rates p_i(t), visited in
shuffled epochs of N prompts per step, budget 16 N rollouts per step. Every mode allocates from the
ESTIMATES it would have in training (its own PromptStats, fed with the Bernoulli outcomes its own
allocation produced; `reference` reads the epoch-refreshed cumulative history, probing spends n_low
probes first). Scored with the true rates: V(n) = sum_i p_i (1 - p_i) / n_i, against V_uniform (equal
split) and V_oracle (the exact optimum computed from the true p_i), summed over steps:
    ratio_uniform = sum_t V_t / sum_t V_uniform_t,   ratio_oracle = sum_t V_t / sum_t V_oracle_t.
Scenarios: static mix (30% never solved, 20% always solved, rest Beta(2, 2)), static Beta(2, 2) (no
degenerate prompts), drifting (each p_i follows a logistic learning curve over the run). Bounds 8..24
(the paper's) and 2..64. Also a prior-strength sweep for the `optimal` mode.

Part 2 (does the proxy track real gradient variance?). A tiny softmax bandit policy in torch: prompt i is
a K-armed bandit whose correct arms have total probability p_i. For allocations of one static-mix batch
(uniform, reference, optimal, oracle) the Monte Carlo variance (trace of the covariance) of the batch
policy gradient is measured for three estimators: per-prompt-mean REINFORCE with a leave-one-out
baseline (the estimator the proxy is derived for), per-prompt-mean GRPO (mean/std-normalised
advantages), and GRPO with the trainer's global token-mean. Reported as ratios to uniform, next to
the proxy's ratio.

    python bench/allocation.py            # writes bench/results/allocation.{json,md}
    python bench/allocation.py --quick    # small sizes, smoke test of the script itself
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dynamo_mega.rl.allocation import allocate, allocate_with_probes, optimal_counts, uniform_counts
from dynamo_mega.rl.prompt_stats import PromptStats

RESULTS = Path(__file__).resolve().parent / "results"
AVG_ROLLOUTS = 16
BOUNDS = ((8, 24), (2, 64))


@dataclass(frozen=True)
class ModeSpec:
    """One allocation configuration as the trainer would run it."""

    name: str
    mode: str  # uniform | reference | optimal
    prior: float = 0.5  # Beta(prior, prior)
    decay: float = 1.0
    probe: bool = False


MODES = (
    ModeSpec("uniform", "uniform"),
    ModeSpec("reference", "reference"),
    ModeSpec("optimal", "optimal"),
    ModeSpec("optimal_decay0.9", "optimal", decay=0.9),
    ModeSpec("probing", "optimal", probe=True),
    ModeSpec("probing_decay0.9", "optimal", decay=0.9, probe=True),
)
PRIOR_SWEEP = tuple(ModeSpec(f"optimal_prior{a}", "optimal", prior=a) for a in (0.1, 0.25, 0.5, 1.0, 2.0))


# ---------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Scenario:
    name: str
    pass_rate: Callable[[int], np.ndarray]  # step -> p_D (true pass rates of all D prompts)


def static_mix(rng: np.random.Generator, d: int) -> np.ndarray:
    """p_D: 30% never solved, 20% always solved, 50% Beta(2, 2), shuffled."""
    p = np.concatenate([np.zeros(int(0.3 * d)), np.ones(int(0.2 * d)), rng.beta(2, 2, d - int(0.3 * d) - int(0.2 * d))])
    return rng.permutation(p)


def drifting_curves(rng: np.random.Generator, d: int, steps: int) -> Callable[[int], np.ndarray]:
    """step -> p_D: p_i(t) = sigmoid(a_i + s_i t / steps): most prompts improve, at different speeds.

    Starting logits a ~ N(-2.5, 2) (many prompts start unsolved, a few start solved); slopes
    s ~ U(0, 8) (some never move, the fastest gain 8 logits over the run).
    """
    a_D = rng.normal(-2.5, 2.0, d)
    s_D = rng.uniform(0.0, 8.0, d)
    return lambda t: 1.0 / (1.0 + np.exp(-(a_D + s_D * t / steps)))


def scenarios(rng: np.random.Generator, d: int, steps: int) -> list[Scenario]:
    mix = static_mix(rng, d)
    beta = rng.beta(2, 2, d)
    return [
        Scenario("static_mix", lambda t: mix),
        Scenario("static_beta22", lambda t: beta),
        Scenario("drifting", drifting_curves(rng, d, steps)),
    ]


# ---------------------------------------------------------------------------- part 1: the proxy
def simulate(scn: Scenario, spec: ModeSpec, bounds: tuple[int, int], *, d: int, n: int, steps: int, seed: int) -> dict:
    """Per-step V, V_uniform, V_oracle for one mode; batches are shared across modes (same seed)."""
    n_low, n_high = bounds
    budget = AVG_ROLLOUTS * n
    order_rng = np.random.default_rng(seed)  # the data sampler: identical for every mode
    draw_rng = np.random.default_rng(seed + 1)  # rollout outcomes: depend on the mode's own counts
    stats = PromptStats(prior_alpha=spec.prior, prior_beta=spec.prior, decay=spec.decay)
    ids_D = np.array([f"q{i}" for i in range(d)])
    perm, v, v_uni, v_opt = np.empty(0, dtype=np.int64), [], [], []
    for t in range(steps):
        if perm.size < n:  # epoch boundary: new shuffle, refresh the reference rule's priorities
            perm = order_rng.permutation(d)
            stats.refresh_priorities()
        rows, perm = perm[:n], perm[n:]
        ids = ids_D[rows].tolist()
        p_N = scn.pass_rate(t)[rows]
        var_N = p_N * (1.0 - p_N)
        if spec.probe:
            probes = draw_rng.random((n, n_low)) < p_N[:, None]
            counts = np.array(allocate_with_probes(ids, stats, probes.astype(float).tolist(),
                                                   budget=budget, n_low=n_low, n_high=n_high))
        else:
            counts = np.array(allocate(ids, stats, budget=budget, n_low=n_low, n_high=n_high, mode=spec.mode))
        correct = draw_rng.random(int(counts.sum())) < np.repeat(p_N, counts)
        sample_ids = np.repeat(np.array(ids), counts).tolist()
        stats.update(sample_ids, correct.astype(float), np.full(correct.size, 100))
        v.append(float(np.sum(var_N / counts)))
        v_uni.append(float(np.sum(var_N / uniform_counts(n, budget))))
        v_opt.append(float(np.sum(var_N / optimal_counts(var_N, budget=budget, n_low=n_low, n_high=n_high))))
    return {"v": v, "v_uniform": v_uni, "v_oracle": v_opt}


def summarise(runs: list[dict], steps_per_epoch: int) -> dict[str, float]:
    """Ratios of summed V over steps (all steps, the first epoch, the rest), pooled over seeds."""
    out: dict[str, float] = {}
    for part, sl in (("all", slice(None)), ("epoch1", slice(0, steps_per_epoch)), ("later", slice(steps_per_epoch, None))):
        v = sum(sum(r["v"][sl]) for r in runs)
        out[f"{part}_ratio_uniform"] = v / sum(sum(r["v_uniform"][sl]) for r in runs)
        out[f"{part}_ratio_oracle"] = v / sum(sum(r["v_oracle"][sl]) for r in runs)
    return out


def run_proxy(args: argparse.Namespace, specs: tuple[ModeSpec, ...], bounds_list) -> list[dict]:
    """One summary row per (scenario, bounds, mode); every seed re-draws the scenario's prompts."""
    rows = []
    for scn_idx in range(3):
        for bounds in bounds_list:
            for spec in specs:
                runs = []
                for seed in range(args.seeds):
                    scn = scenarios(np.random.default_rng(1000 + seed), args.prompts, args.steps)[scn_idx]
                    runs.append(simulate(scn, spec, bounds, d=args.prompts, n=args.batch, steps=args.steps, seed=seed))
                rows.append({"scenario": scn.name, "bounds": f"{bounds[0]}..{bounds[1]}", "mode": spec.name,
                             **asdict(spec), **summarise(runs, args.prompts // args.batch)})
    return rows
