"""allocation.prompt_weight=equal: every prompt group weighs alike in the global token-mean loss whatever its n_i.

Scaling a group's advantages by c > 0 must be exactly weighting its token losses by c (the clipped loss is
positively homogeneous in the advantage, dual clip included), so the gradient is the equal-weight one; and with
equal group sizes (uniform GRPO, DAPO) nothing changes."""

from __future__ import annotations

import pytest
import torch

from dynamo_mega.rl.advantage import equal_prompt_weights, group_advantages
from dynamo_mega.rl.loss import policy_loss

CLIP = dict(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)


def test_weights_make_each_group_weigh_as_a_mean_sized_one():
    sizes = [4, 16, 4, 8]
    w = equal_prompt_weights(sizes)
    assert w.shape == (32,) and torch.isclose(w.sum(), torch.tensor(32.0))
    per_group = [chunk.sum().item() for chunk in w.split(sizes)]
    assert per_group == [8.0, 8.0, 8.0, 8.0]
    assert torch.equal(equal_prompt_weights([8, 8, 8]), torch.ones(24))


def test_scaled_advantages_are_weighted_token_losses_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    sizes = [2, 6, 4]
    rewards = torch.tensor([1.0, 0.0, 1, 0, 0, 0, 0, 1, 1, 1, 0, 1])
    adv_N = group_advantages(rewards, sizes)
    w_N = equal_prompt_weights(sizes)
    old = -torch.rand(12, 5, generator=g) - 0.1
    # ratios both inside and far outside the clip range, both signs of the advantage: every branch of the loss
    logp_base = old + torch.randn(12, 5, generator=g) * 0.6
    mask = torch.rand(12, 5, generator=g) > 0.2
    logp_a = logp_base.clone().requires_grad_(True)
    scaled, _ = policy_loss(logp_a, old, (adv_N * w_N)[:, None].expand(12, 5), mask, num_global_tokens=50.0, **CLIP)
    scaled.backward()
    logp_b = logp_base.clone().requires_grad_(True)
    weighted, _ = policy_loss(
        logp_b, old, adv_N[:, None].expand(12, 5), mask, num_global_tokens=50.0, token_weight=w_N[:, None].expand(12, 5), **CLIP
    )
    weighted.backward()
    torch.testing.assert_close(scaled, weighted)
    torch.testing.assert_close(logp_a.grad, logp_b.grad)
    assert not torch.allclose(w_N, torch.ones(12)) and logp_a.grad.abs().sum() > 0


def test_the_loop_weights_prompts_as_configured(tmp_path):
    """train.train with the policy-sampling engine double: prompts come back with history from step 3 on, and once
    the allocator gives them unequal n_i the two weightings must differ; before, they must agree exactly."""
    from _policy_sampler import run_tiny_train
    from test_golden_step import RL_OVERRIDES

    # 8 prompts per step: an epoch every 2 steps. Three operands: groups with mixed rewards among the unequal ones (with
    # two, every group the allocator resized was all-correct here, and the weightings rightly agreed).
    overrides = [*RL_OVERRIDES, "run.steps=6", "data.num_train=16", "data.num_operands=3"]
    steps = {}
    for weight in ("tokens", "equal"):
        records = run_tiny_train(tmp_path / weight, [*overrides, f"allocation.prompt_weight={weight}"])
        steps[weight] = [r for r in records if r["phase"] == "train"]
    tokens, equal = steps["tokens"], steps["equal"]
    first = next((i for i, r in enumerate(tokens) if r["n_std"] > 0 and r["loss"] != 0), None)
    assert first is not None, "no step with unequal group sizes and a nonzero loss: the test would not see a difference"
    for before in range(first):  # every group the same size so far: identical runs
        assert tokens[before]["loss"] == equal[before]["loss"], before
    t, e = tokens[first], equal[first]
    assert (t["n_std"], t["reward_mean"]) == (e["n_std"], e["reward_mean"])  # the same allocation and samples...
    assert t["loss"] != e["loss"]  # ...weighted differently
    # Golden values (house rule 8, as tests/test_golden_step.py: rel 1e-5, per machine kind): a change to either
    # weighting, which the equal-sized groups of that file's RL run cannot see, fails here. Recorded with the code of
    # db13672.
    assert (first + 1, t["loss"], e["loss"]) == (
        4,
        pytest.approx(LOOP_GOLDEN["tokens"], rel=1e-5),
        pytest.approx(LOOP_GOLDEN["equal"], rel=1e-5),
    )


LOOP_GOLDEN = {"tokens": -0.022298539057374, "equal": -0.021778407972306013}  # step 4's loss
