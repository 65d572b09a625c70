"""Golden values at a fixed seed (house rule 8): a change that moves the numerics of the policy step (log-probs,
DynaMO modulation, the clipped loss and its normalisation, clipping, the update) or of the RL loop around it
(allocation, rewards, advantages, weight refits) fails here, where the parallel tests, which compare layouts with
each other, would not notice.

Policy step: three optimizer steps as train.rl_step runs them, modulation on (`global` scope, the default): one
mini-batch of the whole batch in three micro-batches, then two PPO mini-batches whose behaviour log-probs are both
taken before the first of them (the second step's ratio r_t != 1). Pinned: each step's loss, grad norm, entropy,
approx KL and mean modulation factors, and a checksum of the weights' change (SGD with lr 1: the change is the
clipped gradient itself; Adam's first step, lr * sign(g), would hide the gradient's values). PP=1 and PP=2 (2 gloo
processes, 2 layers per stage) must give the same golden values.

RL loop: configs/tiny_cpu.yaml shortened (a 40-step warm-up, 3 RL steps) through train.train, rollouts sampled
from the policy by a test-double engine (tests/_policy_sampler.py; vLLM's sampling is not reproducible across
CPUs). Pinned: each step's loss, grad norm and mean reward, and the held-out accuracy before and after RL.

Policy-step values recorded at commit d710caa (unchanged by bb3d5c0, which put PP=1 through Megatron's schedule,
and within tolerance after the fused SDPA attention of models/sdpa_attention.py). RL-loop values re-recorded with
that attention (c27a408; first recorded at bb3d5c0): step 1's loss moved by 4e-6 relative, its grad norm by 1.6%
(the second PPO mini-batch sees Adam's first update, lr * sign(g), whose signs round-off flips where g is near 0),
rewards and held-out accuracies not at all. Tolerance rel 1e-5: fp32 reduction order differs between x86 CPUs (and
between the pipeline layouts) at about 1e-6; a change of the numerics moves them far more. The RL loop samples
tokens, so a different draw (a probability moved across a uniform draw by round-off: rare) changes its whole trajectory and
fails loudly rather than slightly. When the values move on purpose, re-record them here AND re-measure the
README/docs numbers that depend on them (docs/results.md: the quick start).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _gloo import run_gloo
from _policy_batch import policy_batch, tiny_model_config
from _policy_sampler import run_tiny_train

from dynamo_mega.config import AlgoConfig, ModulationConfig

CFG = tiny_model_config(num_layers=4, tie_word_embeddings=True)
N, S, MICRO = 12, 14, 5  # samples, padded length, micro-batch size
TEMPERATURE = 0.7  # the quick start's: the log-probs and entropies are of logits / 0.7
STAT_KEYS = ("loss", "grad_norm", "entropy", "approx_kl", "modulation_comp_mean", "modulation_stab_mean")
# HF-named parameters whose change is pinned: the tied embedding, a first-stage and a last-stage weight.
CHECKED = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight")


def _golden_run(rank: int, world: int, pp: int) -> dict:
    from megatron.core import parallel_state

    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy, export_hf_state
    from dynamo_mega.parallel.train_step import old_logprobs, policy_step, split_micro_batches

    groups = init_parallel(1, pp, seed=0)
    model, arch = build_policy(CFG, groups, seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    batch = policy_batch(N, S)
    before = export_hf_state(model, arch, groups)

    def step(micro, old=None) -> dict:
        return policy_step(
            model,
            opt,
            None,
            micro,
            groups,
            algo=AlgoConfig(),
            temperature=TEMPERATURE,
            grad_clip=1.0,
            modulation=ModulationConfig(),
            old=old,
        )

    stats = [step(split_micro_batches(*batch, MICRO))]
    minis = [split_micro_batches(*(x[lo : lo + N // 2] for x in batch), MICRO) for lo in (0, N // 2)]
    olds = [None] + [old_logprobs(model, micro, groups, TEMPERATURE) for micro in minis[1:]]  # as rl_step does
    stats += [step(micro, old) for micro, old in zip(minis, olds, strict=True)]
    after = export_hf_state(model, arch, groups)
    parallel_state.destroy_model_parallel()
    delta = {name: (after[name] - before[name]).double() for name in CHECKED}
    total_l1 = sum(float((after[k] - before[k]).double().abs().sum()) for k in after)
    return {
        "stats": [{k: s[k] for k in STAT_KEYS} for s in stats],
        "delta": {name: (float(d.sum()), float(d.abs().sum())) for name, d in delta.items()},
        "delta_l1": total_l1,
    }


# Recorded at commit d710caa (see the module docstring).
GOLDEN_STATS = [
    {
        "loss": 0.2390221692621708,
        "grad_norm": 2.219969666474952,
        "entropy": 3.3309796442751023,
        "approx_kl": 0.0,
        "modulation_comp_mean": 1.076507806777954,
        "modulation_stab_mean": 0.9959182739257812,
    },
    {
        "loss": 0.4536813646554947,
        "grad_norm": 4.83965006493892,
        "entropy": 3.183513416963465,
        "approx_kl": 0.0,
        "modulation_comp_mean": 1.190109133720398,
        "modulation_stab_mean": 0.9887650609016418,
    },
    {
        "loss": 0.06997901760041714,
        "grad_norm": 2.956126601666487,
        "entropy": 2.96128421359592,
        "approx_kl": 0.24866535045482493,
        "modulation_comp_mean": 1.0633587837219238,
        "modulation_stab_mean": 0.9907784461975098,
    },
]
GOLDEN_DELTA = {  # name: (sum, abs-sum) of the weights' change over the three steps
    "model.embed_tokens.weight": (-0.4774571763118729, 38.62477683403995),
    "model.layers.0.self_attn.q_proj.weight": (0.0009997067627409706, 0.28007006855295913),
    "model.layers.3.mlp.down_proj.weight": (0.041774445184273645, 5.4034536139370175),
}
GOLDEN_DELTA_L1 = 229.34073213934562  # abs-sum of the change of every parameter


def _check(out: dict) -> None:
    assert len(out["stats"]) == len(GOLDEN_STATS)
    for got, want in zip(out["stats"], GOLDEN_STATS, strict=True):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-8), key
    for name, (signed, l1) in GOLDEN_DELTA.items():
        got_signed, got_l1 = out["delta"][name]
        assert got_l1 == pytest.approx(l1, rel=1e-5), name
        # A signed sum cancels: its error is relative to the size of the change, not to the sum.
        assert got_signed == pytest.approx(signed, abs=1e-5 * l1), name
    assert out["delta_l1"] == pytest.approx(GOLDEN_DELTA_L1, rel=1e-5)


def test_policy_steps_match_golden_values_one_process():
    _check(run_gloo(_golden_run, 1, 1)[0])


def test_policy_steps_match_golden_values_two_pipeline_stages():
    stages = run_gloo(_golden_run, 2, 2)
    for out in stages:
        _check(out)
    assert stages[0]["stats"] == stages[1]["stats"]  # every stage reports the last stage's stats


# ---- a few RL steps of the loop (train.train), rollouts from the policy itself ----------------------------------

RL_OVERRIDES = [
    "run.steps=3",
    "run.eval_every=0",
    "run.eval_prompts=32",
    "run.progress=false",
    "run.tensorboard=false",
    "run.log_samples=0",
    "rollout.prompts_per_step=8",
    "rollout.samples_per_prompt=4",
    "allocation.n_low=2",
    "allocation.n_high=8",
    "optim.mini_batches=2",
    "warmup.max_steps=40",
    "warmup.batch_size=64",
    "warmup.eval_every=1000",  # no evaluation inside the warm-up: it runs its 40 steps
    "warmup.stop_accuracy=1.0",
    "data.num_operands=2",
    "data.operators=+",
    "data.num_train=68",
    "data.num_eval=32",
    "algo.reward_workers=1",
]
RL_STEP_KEYS = ("loss", "grad_norm", "reward_mean", "samples")


def _rl_golden(run_dir: Path) -> dict:
    """configs/tiny_cpu.yaml, shortened, through train.train with every rollout replica's vLLM engine replaced by
    tests/_policy_sampler.py; the loop and everything else as in a real run (allocation, math-verify in its process
    pool, advantages, policy steps, weight refits, checkpoint). Its per-step metrics and held-out accuracies."""
    records = run_tiny_train(run_dir, RL_OVERRIDES)
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [{k: r[k] for k in RL_STEP_KEYS} for r in records if r["phase"] == "train"]
    return {"steps": steps, "accuracy": {k: v for k, v in summary.items() if k.startswith("accuracy")}}


# Recorded at c27a408, with models/sdpa_attention.py (see the module docstring).
GOLDEN_RL_STEPS = [
    {"loss": -0.02633347176015377, "grad_norm": 5.060224574214054, "reward_mean": 0.6875, "samples": 32.0},
    {"loss": -0.04487024433910847, "grad_norm": 2.6460676002031454, "reward_mean": 0.375, "samples": 32.0},
    {"loss": -0.041224037297070026, "grad_norm": 5.820312285211077, "reward_mean": 0.75, "samples": 32.0},
]
GOLDEN_RL_ACCURACY = {"accuracy_init": 0.0, "accuracy_before_rl": 0.03125, "accuracy_after_rl": 0.1875}  # of 32


def test_rl_steps_match_golden_values(tmp_path):
    out = _rl_golden(tmp_path / "run")
    assert out["accuracy"] == GOLDEN_RL_ACCURACY  # counts of right answers: exact
    assert len(out["steps"]) == len(GOLDEN_RL_STEPS)
    for step, (got, want) in enumerate(zip(out["steps"], GOLDEN_RL_STEPS, strict=True), start=1):
        assert (got["samples"], got["reward_mean"]) == (want["samples"], want["reward_mean"]), f"step {step}"
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-8), f"step {step}"
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), f"step {step}"
