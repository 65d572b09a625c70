"""DynaMO modulation with several PPO mini-batches (ALGORITHM.md section 5): every optimizer step takes r_t, pi_t
and H_t from the policy being updated, r_t against the behaviour log-probs taken before the rollout batch's first
step. With one mini-batch the step is unchanged (a direct computation, bit for bit, and golden values); `global`
scope is invariant to the micro-batch split; `microbatch` scope uses each micro-batch's own current forward."""

from __future__ import annotations

import pytest
import torch
from _gloo import run_gloo
from _policy_batch import policy_batch

from dynamo_mega.config import AlgoConfig, ModelConfig, ModulationConfig

CFG = ModelConfig(
    vocab_size=32, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
    max_position_embeddings=32,
)
N, S = 12, 14  # samples, padded length
HALF = N // 2  # two mini-batches of 6 samples
ALGO = AlgoConfig()


def _setup():
    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy

    groups = init_parallel(1, seed=0)
    model, arch = build_policy(CFG, groups, seed=7)
    # Plain SGD with lr 1 and clip 1: a unit-norm first step, large enough that the second mini-batch sees r_t != 1.
    return groups, model, arch, torch.optim.SGD(model.parameters(), lr=1.0)


def _micro(lo: int, hi: int, size: int):
    from dynamo_mega.parallel.train_step import split_micro_batches

    return split_micro_batches(*(x[lo:hi] for x in policy_batch(N, S)), size)


def _modulate(micro, logp, old_logp, entropy, scope: str):
    from dynamo_mega.rl.modulation import modulate_micro_batches

    mods, _ = modulate_micro_batches(
        [mb.advantages for mb in micro], logp, old_logp, entropy, [mb.mask for mb in micro], scope=scope,
        eps_low=ALGO.eps_low, eps_high=ALGO.eps_high,
    )
    return mods


def _direct_step(model, opt, micro, groups, scope: str) -> float:
    """The one-mini-batch step as the trainer has always done it, spelled out: factors from the pre-update pass
    (the training forward itself for one micro-batch) with logp = logp_old, i.e. r_t = 1. Returns the loss."""
    from dynamo_mega.parallel.train_step import old_logprobs, sync_and_step, token_logprobs
    from dynamo_mega.rl.loss import global_token_count, policy_loss

    if len(micro) == 1:
        model.train()
        logp0, entropy0 = token_logprobs(model, micro[0], groups, 1.0)
        live, old_logp, entropy = [logp0], [logp0.detach()], [entropy0.detach()]
    else:
        live, (old_logp, entropy) = None, old_logprobs(model, micro, groups, 1.0)
    advantages = _modulate(micro, old_logp, old_logp, entropy, scope)
    num_tokens = global_token_count([mb.mask for mb in micro])
    model.train()
    total = 0.0
    for i, mb in enumerate(micro):
        logp = live[i] if live is not None else token_logprobs(model, mb, groups, 1.0)[0]
        loss, _ = policy_loss(
            logp, old_logp[i], advantages[i], mb.mask, eps_low=ALGO.eps_low, eps_high=ALGO.eps_high,
            dual_clip_c=ALGO.dual_clip_c, num_global_tokens=num_tokens,
        )
        loss.backward()
        total += loss.item()
    sync_and_step(model, opt, None, groups, 1.0)
    return total


def _one_mini_batch(rank: int, world: int, size: int, scope: str) -> dict:
    from dynamo_mega.parallel.policy import export_hf_state
    from dynamo_mega.parallel.train_step import policy_step

    out = {}
    for how in ("policy_step", "direct"):
        groups, model, arch, opt = _setup()
        micro = _micro(0, N, size)
        if how == "direct":
            loss = _direct_step(model, opt, micro, groups, scope)
            out[how] = {"loss": loss}
        else:
            out[how] = policy_step(model, opt, None, micro, groups, algo=ALGO, temperature=1.0, grad_clip=1.0,
                                   modulation=ModulationConfig(scope=scope))
        out[how]["after"] = export_hf_state(model, arch, groups)
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    return out


def _two_mini_batches(rank: int, world: int, size: int, scope: str) -> dict:
    """Two optimizer steps on mini-batches of HALF samples, behaviour log-probs of both taken before the first one
    (as train.rl_step does). Records the advantages every micro-batch's loss used, and what modulation computes
    from an independent no-grad pass of the current policy (expected) and from the behaviour pass (stale)."""
    from dynamo_mega.parallel import train_step
    from dynamo_mega.parallel.policy import export_hf_state

    groups, model, arch, opt = _setup()
    minis = [_micro(0, HALF, size), _micro(HALF, N, size)]
    olds = [train_step.old_logprobs(model, micro, groups, 1.0) for micro in minis]
    used, original = [], train_step._micro_batch_loss

    def recording(logp, mb, olp, ent, adv, *rest):
        used.append(adv.detach().clone())
        return original(logp, mb, olp, ent, adv, *rest)

    out = {"expected": [], "stale": [], "log_ratio_max": [], "entropy": [], "stats": []}
    train_step._micro_batch_loss = recording
    try:
        for micro, (old_logp, old_entropy) in zip(minis, olds, strict=True):
            cur_logp, cur_entropy = train_step.old_logprobs(model, micro, groups, 1.0)  # the weights of this step
            out["expected"].append(_modulate(micro, cur_logp, old_logp, cur_entropy, scope))
            out["stale"].append(_modulate(micro, old_logp, old_logp, old_entropy, scope))
            out["log_ratio_max"].append(max(float((c - o)[mb.mask].abs().max()) for c, o, mb in zip(
                cur_logp, old_logp, micro, strict=True)))
            masks = [mb.mask for mb in micro]
            out["entropy"].append(float(sum((e * m).sum() for e, m in zip(cur_entropy, masks, strict=True))
                                        / sum(m.sum() for m in masks)))
            out["stats"].append(train_step.policy_step(
                model, opt, None, micro, groups, algo=ALGO, temperature=1.0, grad_clip=1.0,
                modulation=ModulationConfig(scope=scope), old=(old_logp, old_entropy),
            ))
    finally:
        train_step._micro_batch_loss = original
    out["used"] = [used[: len(minis[0])], used[len(minis[0]) :]]
    out["after"] = export_hf_state(model, arch, groups)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    return out


# From the trainer before modulation used the current policy (commit 16ebd4d): policy_step, one mini-batch.
GOLDEN = {
    (N, "global"): {"loss": 0.23723790049552917, "grad_norm": 1.3199293140292712},
    (5, "global"): {"loss": 0.23723791725933552, "grad_norm": 1.3199292759447103},
    (5, "microbatch"): {"loss": 0.24217681400477886, "grad_norm": 1.3182095293042282},
}


@pytest.mark.parametrize(("size", "scope"), list(GOLDEN))
def test_one_mini_batch_is_unchanged(size, scope):
    out = run_gloo(_one_mini_batch, 1, size, scope)[0]
    got, direct = out["policy_step"], out["direct"]
    assert got["loss"] == direct["loss"]
    for name, value in direct["after"].items():
        assert torch.equal(got["after"][name], value), name
    for key, value in GOLDEN[(size, scope)].items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


_RUNS: dict = {}


def _run(size: int, scope: str) -> dict:
    if (size, scope) not in _RUNS:
        _RUNS[(size, scope)] = run_gloo(_two_mini_batches, 1, size, scope)[0]
    return _RUNS[(size, scope)]


@pytest.mark.parametrize(("size", "scope"), [(2, "global"), (HALF, "global"), (2, "microbatch")])
def test_every_mini_batch_modulates_from_the_policy_being_updated(size, scope):
    # size 2: three micro-batches per mini-batch (global: a no-grad pass of the current policy first; microbatch:
    # each micro-batch's own training forward); size HALF: one micro-batch, the training forward is reused.
    out = _run(size, scope)
    assert out["log_ratio_max"][0] == 0.0  # the first step's weights are the behaviour policy
    assert out["log_ratio_max"][1] > 1e-2, "the first step must move the policy: r_t != 1 in the second"
    for used, expected in zip(out["used"], out["expected"], strict=True):
        for got, want in zip(used, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    stale_gap = max(float((u - s).abs().max()) for u, s in zip(out["used"][1], out["stale"][1], strict=True))
    assert stale_gap > 1e-3, "the second step must not use the pre-update factors"
    for stats, entropy in zip(out["stats"], out["entropy"], strict=True):  # the metric: the current policy's
        assert stats["entropy"] == pytest.approx(entropy, rel=1e-5)


def test_global_scope_invariant_to_micro_batch_split_across_mini_batches():
    whole = _run(HALF, "global")
    for size in (1, 2):
        out = _run(size, "global")
        for name, value in whole["after"].items():
            torch.testing.assert_close(out["after"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        for got, want in zip(out["stats"], whole["stats"], strict=True):
            for key in ("loss", "grad_norm", "entropy", "approx_kl", "modulation_comp_mean", "modulation_stab_mean"):
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
