"""One step's rollouts by mode, with a fake generator whose rewards are fixed per prompt: probes are folded in
and trained on, the budget is exact, DAPO drops zero-variance groups and counts every rollout it generated."""

import numpy as np
import pytest

from dynamo_mega.data import Prompt
from dynamo_mega.rl import step_rollouts
from dynamo_mega.rl.prompt_stats import PromptStats
from dynamo_mega.rl.rollout import RolloutBatch


def fake_generate(pass_rate: dict[str, float], calls: list):
    """counts[i] samples of prompts[i]; sample j of a prompt with pass rate p is correct iff j < p * n (so a
    group is all-equal exactly when p is 0 or 1). Responses carry (round, j) so regrouping can be checked."""

    def generate(prompts, counts, round_no):
        calls.append((round_no, [p.id for p in prompts], list(counts)))
        b = RolloutBatch([], [], [], [], [], [], [], policy_version=3)
        for p, n in zip(prompts, counts, strict=True):
            assert n >= 1
            b.group_sizes.append(n)
            for j in range(n):
                b.prompt_ids.append(p.id)
                b.answers.append(p.answer)
                b.prompt_tokens.append([1, 2])
                b.response_tokens.append([round_no, j])
                b.rollout_logprobs.append([0.0, 0.0])
                b.finished.append(True)
                b.rewards.append(1.0 if (j + 0.5) / n < pass_rate[p.id] else 0.0)
                b.correct.append(b.rewards[-1] == 1.0)
                b.versions.append(b.policy_version)
        return b

    return generate


def _prompts(rates):
    return [Prompt(f"p{i}", "q", f"a{i}") for i in range(len(rates))], {f"p{i}": r for i, r in enumerate(rates)}


def test_probing_spends_the_budget_where_probes_disagree():
    prompts, rates = _prompts([0.0, 1.0, 0.5, 0.5, 1.0, 0.0, 0.5, 0.25])
    calls = []
    out = step_rollouts.probing(prompts, PromptStats(0.5, 0.5), fake_generate(rates, calls), budget=64, n_low=4, n_high=16)
    b = out.batch
    assert out.rollouts_generated == len(b) == 64 and out.rounds == 2  # probes included, nothing thrown away
    assert calls[0] == (0, [p.id for p in prompts], [4] * 8)
    sizes = dict(zip([p.id for p in prompts], b.group_sizes))
    assert min(sizes["p2"], sizes["p3"], sizes["p6"]) > max(sizes["p0"], sizes["p1"], sizes["p4"], sizes["p5"])
    # every sample stays with its own prompt and answer; each group is its probes then its extra samples
    start = 0
    for p, n in zip(prompts, b.group_sizes):
        assert b.prompt_ids[start : start + n] == [p.id] * n and b.answers[start : start + n] == [p.answer] * n
        assert [r[0] for r in b.response_tokens[start : start + n]] == [0] * 4 + [1] * (n - 4)
        start += n
    assert out.metrics["probe_frac_zero_variance"] == pytest.approx(4 / 8)


def test_probing_with_no_room_left_generates_one_round():
    prompts, rates = _prompts([0.5, 0.5])
    calls = []
    out = step_rollouts.probing(prompts, PromptStats(), fake_generate(rates, calls), budget=8, n_low=4, n_high=16)
    assert out.rounds == 1 and len(calls) == 1 and out.batch.group_sizes == [4, 4]


def test_dapo_drops_zero_variance_groups_and_counts_them():
    everything, rates = _prompts([0.5, 1.0, 0.0, 0.5, 0.5, 1.0, 0.5, 0.5, 0.5])
    prompts, pool = everything[:4], iter(everything[4:])
    calls = []
    out = step_rollouts.dapo(
        prompts,
        lambda k: [next(pool) for _ in range(k)],
        fake_generate(rates, calls),
        samples_per_prompt=8,
        max_rounds=3,
        min_groups=1,
    )
    assert [c[1] for c in calls] == [["p0", "p1", "p2", "p3"], ["p4", "p5", "p6", "p7"]]
    assert [p.id for p in out.prompts] == ["p0", "p3", "p4", "p6"]  # the first 4 informative groups
    assert out.rollouts_generated == 64 and len(out.batch) == 32  # dropped groups were generated: counted
    assert out.metrics["dapo_groups_kept"] == 4


def test_dapo_round_cap_tops_up_to_min_groups():
    prompts, rates = _prompts([1.0, 0.0, 1.0, 0.5])
    calls = []
    out = step_rollouts.dapo(prompts, lambda k: [], fake_generate(rates, calls), samples_per_prompt=4, max_rounds=3, min_groups=2)
    assert len(calls) == 1 and [p.id for p in out.prompts] == ["p3", "p0"]
    assert out.metrics["dapo_groups_kept"] == 1


def test_dapo_does_not_generate_a_prompt_twice_in_a_step():
    prompts, rates = _prompts([1.0, 1.0])
    calls = []
    out = step_rollouts.dapo(
        prompts,
        lambda k: prompts[:1] + [Prompt("x", "q", "ax")],
        fake_generate({**rates, "x": 0.5}, calls),
        samples_per_prompt=2,
        max_rounds=2,
        min_groups=1,
    )
    assert calls[1][1] == ["x"] and [p.id for p in out.prompts] == ["x"]


def test_allocated_uses_history():
    prompts, rates = _prompts([0.5, 1.0])
    stats = PromptStats(0.5, 0.5)
    stats.update(["p0"] * 8 + ["p1"] * 8, [0, 1] * 4 + [1] * 8, [2] * 16)
    out = step_rollouts.allocated(prompts, stats, fake_generate(rates, []), mode="optimal", budget=16, n_low=4, n_high=12)
    assert out.batch.group_sizes[0] > out.batch.group_sizes[1] and sum(out.batch.group_sizes) == 16
    assert np.isclose(out.rollouts_generated, 16)
