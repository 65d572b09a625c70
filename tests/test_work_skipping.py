"""Exact work skipping (parallel/work_skipping.py): samples with a zero advantage at every token, left out of the
forward/backward but counted in the token mean, give the same update as training on them, at TP=1, TP=2, PP=2
and DP=2 (gloo processes), padded and packed, with DynaMO modulation on (`global` scope: the skipped samples'
entropy range still enters H_min/H_max through a forward-only pass) and off. Two PPO mini-batches as train.rl_step
runs them (the trainer's own rank split, train.this_rank_micro_batches; the second mini-batch's behaviour
log-probs from a no-grad pass before the first step). Controls that the comparison can fail: skipping a sample
with a nonzero advantage, or leaving the skipped samples' entropies out of the modulation statistics, changes the
weights. The behaviour log-prob choice (optim.behaviour_logprobs) is decided as documented, and the engine's
log-probs, where they equal the trainer's, give the update of the recomputed ones."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _gloo import run_gloo
from _policy_batch import policy_batch, tiny_model_config

from dynamo_mega.config import AlgoConfig, Config, ModulationConfig, OptimConfig
from dynamo_mega.parallel import work_skipping

CFG = tiny_model_config()  # 2 layers: one per stage at PP=2
N, S = 12, 14
ZERO = (0, 1, 2, 7, 8)  # samples whose advantage is 0: half of mini-batch 1 (0..5), a third of mini-batch 2 (6..11)
TEMPERATURE = 0.7
# (pack_row_tokens, micro_batch_size): padded rows of 2 (several micro-batches: the global scope's no-grad pass of
# the current policy) and of 64 (one micro-batch: its training forward gives the factors); packed rows of 32 tokens.
LAYOUTS = ((0, 2), (0, 64), (32, 1), (32, 64))


def _batch():
    ids, targets, mask, adv, rollout_logp = policy_batch(N, S)
    adv = adv.clone()
    adv[list(ZERO)] = 0.0
    return ids, targets, mask, adv, rollout_logp


def _update(groups, model, batch, pack: int, micro_size: int, modulation, skip, engine_old: bool = False) -> list[dict]:
    """train.rl_step's update of one rollout batch in two mini-batches. skip: True/False, or a set of sample
    indices to leave out whatever their advantage (the control)."""
    from dynamo_mega.parallel.train_step import engine_logprobs, old_logprobs, policy_step
    from dynamo_mega.train import this_rank_micro_batches

    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the weight change is the (clipped) gradient itself
    ids, targets, mask, adv, rollout_logp = batch
    tokens = SimpleNamespace(input_ids_NS=ids, targets_NS=targets, loss_mask_NS=mask, rollout_logp_NS=rollout_logp)
    t = SimpleNamespace(cfg=SimpleNamespace(optim=OptimConfig(micro_batch_size=micro_size, pack_row_tokens=pack)), groups=groups)
    minis = [torch.arange(0, N // 2), torch.arange(N // 2, N)]
    if isinstance(skip, set):
        splits = [(idx[[int(i) not in skip for i in idx]], idx[[int(i) in skip for i in idx]]) for idx in minis]
    else:
        splits = [work_skipping.split_zero_advantage(idx, adv, skip) for idx in minis]
    plans = [this_rank_micro_batches(t, tokens, adv, train) for train, _ in splits]
    skipped = [[mb for mb in this_rank_micro_batches(t, tokens, adv, zero) if mb.mask.any()] for _, zero in splits]
    if engine_old:
        olds = [None] + [engine_logprobs(micro) for micro in plans[1:]]
    else:
        olds = [None] + [old_logprobs(model, micro, groups, TEMPERATURE) for micro in plans[1:]]
    return [
        policy_step(model, opt, None, micro, groups, algo=AlgoConfig(), temperature=TEMPERATURE, grad_clip=1.0,
                    modulation=modulation, old=old, skipped=zero)
        for micro, old, zero in zip(plans, olds, skipped, strict=True)
    ]  # fmt: skip


def _runs(rank: int, world: int, tp: int, pp: int, runs: list[tuple]) -> list[dict]:
    """Each run (pack, micro_size, modulation, skip[, no_range]) from the same initial weights."""
    from unittest import mock

    from megatron.core import parallel_state

    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy, export_hf_state

    groups = init_parallel(tp, pp, seed=0)
    out = []
    for pack, micro_size, modulation, skip, *no_range in runs:
        model, arch = build_policy(CFG, groups, seed=7)
        patch = mock.patch.object(work_skipping, "needs_entropy_range", lambda m: False) if no_range else mock.MagicMock()
        with patch:
            stats = _update(groups, model, _batch(), pack, micro_size, modulation, skip)
        for st in stats:  # each DP rank reports its own share of the loss
            loss = torch.tensor(st["loss"], dtype=torch.float64)
            torch.distributed.all_reduce(loss, group=groups.dp_group)
            st["loss"] = float(loss)
        out.append({"stats": stats, "after": export_hf_state(model, arch, groups)})
    parallel_state.destroy_model_parallel()
    return out


def _assert_same_update(got: dict, want: dict) -> None:
    for g, w in zip(got["stats"], want["stats"], strict=True):
        assert g["skipped_step"] == w["skipped_step"] == 0.0
        for key in ("loss", "grad_norm", "num_tokens", "modulation_comp_mean", "modulation_stab_mean", "clipfrac_high"):
            if key in w:
                value = w[key] * w["trained_tokens"] / g["trained_tokens"] if key == "clipfrac_high" else w[key]
                assert g[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for name, value in want["after"].items():
        torch.testing.assert_close(got["after"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def _differs(got: dict, want: dict) -> bool:
    return any(not torch.allclose(got["after"][k], v, rtol=1e-4, atol=1e-5) for k, v in want["after"].items())


def _pairs(modulation) -> list[tuple]:
    return [(pack, size, modulation, skip) for pack, size in LAYOUTS for skip in (False, True)]


def _check_pairs(results: list[dict]) -> None:
    for i in range(0, len(results), 2):
        reference, skipped = results[i], results[i + 1]
        assert skipped["stats"][0]["trained_tokens"] < reference["stats"][0]["trained_tokens"]
        _assert_same_update(skipped, reference)


ON = ModulationConfig(scope="global")


@pytest.mark.parametrize("tp,pp,world", [(1, 1, 1), (2, 1, 2), (1, 2, 2), (1, 1, 2)], ids=["tp1", "tp2", "pp2", "dp2"])
def test_skipping_zero_advantage_samples_leaves_the_update_unchanged(tp, pp, world):
    for rank_out in run_gloo(_runs, world, tp, pp, _pairs(ON)):
        _check_pairs(rank_out)


def test_skipping_without_modulation_needs_no_forward_of_the_skipped_samples():
    assert not work_skipping.needs_entropy_range(ModulationConfig(enabled=False))
    assert not work_skipping.needs_entropy_range(ModulationConfig(mu_max=1.0))
    assert work_skipping.needs_entropy_range(ModulationConfig())
    _check_pairs(run_gloo(_runs, 1, 1, 1, _pairs(ModulationConfig(enabled=False)))[0])


def test_an_entropy_range_over_nonzero_advantages_skips_the_forward_too_and_stays_exact():
    """modulation.entropy_range=nonzero_advantage: the zero-advantage samples take part in no factor, so skipping
    them needs no forward-only pass (needs_entropy_range) and the update still equals not skipping them; the
    statistics differ from the default's (the default's update is not reproduced)."""
    nonzero = ModulationConfig(scope="global", entropy_range="nonzero_advantage")
    assert not work_skipping.needs_entropy_range(nonzero)
    for rank_out in run_gloo(_runs, 2, 1, 1, _pairs(nonzero)):  # DP=2: the range is reduced over ranks
        _check_pairs(rank_out)
    default, other = run_gloo(_runs, 1, 1, 1, [(0, 64, ON, False), (0, 64, nonzero, False)])[0]
    assert _differs(other, default)


def test_controls_skipping_a_nonzero_advantage_or_the_entropy_range_changes_the_update():
    runs = [
        (0, 64, ON, False),
        (0, 64, ON, {*ZERO, 3}),  # sample 3 has a nonzero advantage: dropping it must show
        (0, 64, ON, True, "no entropy range"),  # the skipped samples' entropies left out of H_min/H_max
    ]
    reference, wrong_sample, no_range = run_gloo(_runs, 1, 1, 1, runs)[0]
    assert _differs(wrong_sample, reference)
    assert _differs(no_range, reference)


def test_split_keeps_every_sample_with_a_nonzero_advantage():
    adv = torch.tensor([0.0, 1e-12, -0.0, -3.0, 0.0, 2.0])
    idx = torch.arange(6)
    train, zero = work_skipping.split_zero_advantage(idx, adv, True)
    assert train.tolist() == [1, 3, 5] and zero.tolist() == [0, 2, 4]
    train, zero = work_skipping.split_zero_advantage(idx[3:], adv, False)
    assert train.tolist() == [3, 4, 5] and zero.numel() == 0


def test_microbatch_scope_turns_skipping_off():
    optim = OptimConfig()
    assert optim.skip_zero_advantage
    assert work_skipping.skip_zero_advantage(optim, ModulationConfig(scope="global"))
    assert work_skipping.skip_zero_advantage(optim, ModulationConfig(enabled=False, scope="microbatch"))
    assert not work_skipping.skip_zero_advantage(optim, ModulationConfig(scope="microbatch"))
    assert not work_skipping.skip_zero_advantage(OptimConfig(skip_zero_advantage=False), None)


def _cfg(**over) -> Config:
    cfg = Config()
    for dotted, value in over.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


def test_behaviour_logprobs_auto_takes_the_engine_only_where_exact():
    use = work_skipping.engine_behaviour_logprobs
    assert use(_cfg(), [3, 3], 3)  # fp32 both sides, top_p 1, on-policy, no correction
    assert not use(_cfg(), [2, 3], 3)  # a sample from an older policy version
    assert not use(_cfg(rollout__vllm_dtype="bfloat16"), [3], 3)
    assert not use(_cfg(model__params_dtype="bfloat16"), [3], 3)
    assert not use(_cfg(rollout__top_p=0.9), [3], 3)
    assert not use(_cfg(mismatch__token_is=True), [3], 3)
    assert not use(_cfg(rollout__max_staleness=1), [3], 3)  # generated ahead
    assert use(_cfg(optim__behaviour_logprobs="engine", rollout__vllm_dtype="bfloat16"), [1], 3)
    assert not use(_cfg(optim__behaviour_logprobs="recompute"), [3], 3)


def _engine_vs_recompute(rank: int, world: int) -> list[dict]:
    """The second mini-batch's behaviour log-probs from the 'engine' (the trainer's own, plus 1e-7 of noise: what a
    fp32 engine on CPU records) against a no-grad pass."""
    from megatron.core import parallel_state

    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy, export_hf_state
    from dynamo_mega.parallel.train_step import old_logprobs, split_micro_batches

    groups = init_parallel(1, 1, seed=0)
    model, arch = build_policy(CFG, groups, seed=7)
    ids, targets, mask, adv, _ = _batch()
    (logp,), _ = old_logprobs(model, split_micro_batches(ids, targets, mask, adv, torch.zeros(N, S), N), groups, TEMPERATURE)
    noise = 1e-7 * torch.randn(N, S, generator=torch.Generator().manual_seed(1))
    logp = torch.nn.functional.pad(logp, (0, S - logp.shape[1]))  # the micro-batch stops at its last response token
    batch = (ids, targets, mask, adv, torch.where(mask, logp + noise, 0.0))
    out = []
    for engine_old in (False, True):
        model, arch = build_policy(CFG, groups, seed=7)
        stats = _update(groups, model, batch, 0, 64, ON, True, engine_old=engine_old)
        out.append({"stats": stats, "after": export_hf_state(model, arch, groups)})
    parallel_state.destroy_model_parallel()
    return out


def test_engine_logprobs_equal_to_the_trainers_give_the_recomputed_update():
    recomputed, engine = run_gloo(_engine_vs_recompute, 1)[0]
    _assert_same_update(engine, recomputed)
