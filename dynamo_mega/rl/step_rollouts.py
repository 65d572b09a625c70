"""One step's rollouts, by allocation mode: who gets how many samples, in how many generation rounds.

- allocated (uniform, reference, optimal): one round; n_i from rl/allocation.py on the history so far.
- probing: round 1 samples n_low per prompt, scores them, folds them into the estimate (without storing them),
  and round 2 spends the rest of the same step's budget where `optimal` says; every sample is trained on.
- dapo: DAPO dynamic sampling, the baseline practitioners use instead of an allocator: samples_per_prompt
  each, groups whose rewards are all equal are dropped, more prompts are drawn until prompts_per_step groups
  are kept or `dapo_max_rounds` rounds were generated. Dropped groups were generated, so they are counted.

The engine and the reward are behind `generate(prompts, counts, round) -> scored RolloutBatch`, so this file is
the allocation logic alone (tested with a fake generator). Every sample ever generated counts toward
`rollouts_generated`: that is the budget a comparison of modes has to be made at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from dynamo_mega.data import Prompt
from dynamo_mega.rl.allocation import allocate, allocate_with_probes
from dynamo_mega.rl.prompt_stats import PromptStats
from dynamo_mega.rl.rollout import RolloutBatch, regroup

Generate = Callable[[list[Prompt], list[int], int], RolloutBatch]  # (prompts, counts, round) -> scored batch


@dataclass
class StepRollouts:
    batch: RolloutBatch  # what the step trains on, group after group
    prompts: list[Prompt]  # the prompt of each group of `batch`
    rollouts_generated: int  # every sample generated this step: probes and dropped DAPO groups included
    tokens_generated: int
    rounds: int
    metrics: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict:
        """Plain lists and numbers (a checkpoint's trainer state loads with torch.load(weights_only=True)); the
        prompts by id."""
        return {
            "batch": asdict(self.batch),
            "prompt_ids": [p.id for p in self.prompts],
            "rollouts_generated": self.rollouts_generated,
            "tokens_generated": self.tokens_generated,
            "rounds": self.rounds,
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_state_dict(cls, state: dict, prompts_by_id: dict[str, Prompt]) -> StepRollouts:
        return cls(
            RolloutBatch(**state["batch"]),
            [prompts_by_id[i] for i in state["prompt_ids"]],
            state["rollouts_generated"],
            state["tokens_generated"],
            state["rounds"],
            dict(state["metrics"]),
        )


def _consumed(batches: list[RolloutBatch]) -> tuple[int, int]:
    return sum(len(b) for b in batches), sum(len(t) for b in batches for t in b.response_tokens)


def allocated(
    prompts: list[Prompt], stats: PromptStats, generate: Generate, *, mode: str, budget: int, n_low: int, n_high: int
) -> StepRollouts:
    counts = allocate([p.id for p in prompts], stats, budget=budget, n_low=n_low, n_high=n_high, mode=mode)
    batch = generate(prompts, counts, 0)
    return StepRollouts(batch, prompts, *_consumed([batch]), rounds=1)


def probing(
    prompts: list[Prompt], stats: PromptStats, generate: Generate, *, budget: int, n_low: int, n_high: int
) -> StepRollouts:
    """n_low probes each, then the rest of `budget` by `optimal` on history + probes; groups = probes + rest."""
    probes = generate(prompts, [n_low] * len(prompts), 0)
    bounds = np.cumsum([0, *probes.group_sizes])
    probe_correct = [[float(ok) for ok in probes.correct[a:b]] for a, b in zip(bounds, bounds[1:])]
    totals = allocate_with_probes([p.id for p in prompts], stats, probe_correct, budget=budget, n_low=n_low, n_high=n_high)
    more = [i for i, n in enumerate(totals) if n > n_low]
    batches, members = [probes], [[(0, i)] for i in range(len(prompts))]
    if more:
        rest = generate([prompts[i] for i in more], [totals[i] - n_low for i in more], 1)
        batches.append(rest)
        for j, i in enumerate(more):
            members[i].append((1, j))
    batch = regroup(batches, members)
    zero_variance = [len(set(outcomes)) == 1 for outcomes in probe_correct]
    metrics = {"probe_frac_zero_variance": float(np.mean(zero_variance))}
    return StepRollouts(batch, prompts, *_consumed(batches), rounds=len(batches), metrics=metrics)


def dapo(
    prompts: list[Prompt],
    draw: Callable[[int], list[Prompt]],
    generate: Generate,
    *,
    samples_per_prompt: int,
    max_rounds: int,
    min_groups: int,
) -> StepRollouts:
    """DAPO dynamic sampling. `draw(k)` gives k more prompts from the sampler (later rounds); a prompt already
    generated this step (possible across an epoch boundary) is not generated again. If the rounds run out with
    fewer than min_groups informative groups, dropped groups top the batch up to min_groups (they carry zero
    advantage) so the step still has one group per PPO mini-batch."""
    target, seen = len(prompts), {p.id for p in prompts}
    batches, kept, dropped, round_prompts = [], [], [], prompts
    for round_no in range(max_rounds):
        batch = generate(round_prompts, [samples_per_prompt] * len(round_prompts), round_no)
        batches.append(batch)
        bounds = np.cumsum([0, *batch.group_sizes])
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            informative = len(set(batch.rewards[a:b])) > 1
            (kept if informative else dropped).append((len(batches) - 1, i, round_prompts[i]))
        if len(kept) >= target or round_no + 1 == max_rounds:
            break
        round_prompts = [p for p in draw(target) if p.id not in seen]
        seen.update(p.id for p in round_prompts)
        if not round_prompts:
            break
    groups_kept = min(len(kept), target)
    chosen = kept[:target] + dropped[: max(0, min_groups - groups_kept)]
    batch = regroup(batches, [[(b, i)] for b, i, _ in chosen])
    metrics = {"dapo_groups_kept": float(groups_kept), "dapo_prompts_drawn": float(sum(len(b.group_sizes) for b in batches))}
    return StepRollouts(batch, [p for _, _, p in chosen], *_consumed(batches), rounds=len(batches), metrics=metrics)


def step_metrics(stats: PromptStats, out: StepRollouts) -> dict[str, float]:
    """What the step consumed and how good the history's estimates were (read BEFORE this step's update):
    rollouts/tokens generated (probes and dropped DAPO groups included), and for prompts seen before, the mean
    |posterior success rate - this step's realised rate|."""
    b = out.batch
    bounds = np.cumsum([0, *b.group_sizes])
    ids = [p.id for p in out.prompts]
    realised = [sum(b.correct[lo:hi]) / max(hi - lo, 1) for lo, hi in zip(bounds, bounds[1:])]
    seen = stats.visits(ids) > 0
    metrics = {
        "rollouts_generated": float(out.rollouts_generated),
        "tokens_generated": float(out.tokens_generated),
        "generation_rounds": float(out.rounds),
        "frac_prompts_seen_before": float(seen.mean()),
        **out.metrics,
    }
    if seen.any():
        err = np.abs(stats.success_means(ids) - np.asarray(realised))[seen]
        metrics["estimate_abs_error"] = float(err.mean())
    return metrics
