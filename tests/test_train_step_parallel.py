"""The full RL policy step (old log-probs, DynaMO modulation with global scope, clipped loss, DP gradient sum,
TP-aware clipping, AdamW) at DP=2, at TP=2 (2 gloo processes) and at TP=2 x DP=2 (4) equals one process on the same batch; a
non-finite gradient skips the update and is reported. Two PPO mini-batches (modulation from the policy being
updated, behaviour log-probs taken before the first step) at DP=2 equal one process, with the ranks on different
paths (one micro-batch: the training forward is reused; two: a no-grad pass of the current policy first)."""

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


def _batch():
    return policy_batch(N, S)


def _step(rank: int, world: int, tp: int, micro_batch_size: int, nan_grad: bool = False) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy, export_hf_state
    from dynamo_mega.parallel.train_step import policy_step, split_micro_batches

    groups = init_parallel(tp, seed=0)
    model, arch = build_policy(CFG, groups, seed=7)
    # Plain SGD: the weight change is the (clipped) gradient itself. Adam's first step, lr * sign(g), would turn
    # round-off in near-zero gradients into full-size differences.
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ids, targets, mask, adv, rollout_logp = _batch()
    mine = slice(groups.dp_rank, None, groups.dp_size)  # the trainer's stride over DP ranks
    micro = split_micro_batches(ids[mine], targets[mine], mask[mine], adv[mine], rollout_logp[mine], micro_batch_size)
    if nan_grad:
        next(model.parameters()).register_hook(lambda g: torch.full_like(g, float("nan")))
    before = export_hf_state(model, arch, groups)
    stats = policy_step(
        model, opt, None, micro, groups, algo=AlgoConfig(), temperature=1.0, grad_clip=1.0,
        modulation=ModulationConfig(scope="global"),
    )
    losses = [torch.zeros(()) for _ in range(groups.dp_size)]  # each DP rank holds its share of the loss
    dist.all_gather(losses, torch.tensor(stats["loss"], dtype=torch.float32), group=groups.dp_group)
    out = {"stats": stats, "loss_total": float(sum(losses)), "before": before, "after": export_hf_state(model, arch, groups)}
    parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def reference():
    return run_gloo(_step, 1, 1, N)[0]  # one process, one micro-batch (the forward-reuse path)


def _compare(out: dict, ref: dict) -> None:
    # Reduction order differs (DP sum of per-rank grads, TP all-reduces): fp32 round-off only.
    assert out["stats"]["skipped_step"] == 0.0
    for key in ("grad_norm", "entropy", "approx_kl", "clipfrac_high", "clipfrac_low", "num_tokens"):
        assert out["stats"][key] == pytest.approx(ref["stats"][key], rel=1e-5, abs=1e-7), key
    assert out["loss_total"] == pytest.approx(ref["loss_total"], rel=1e-5, abs=1e-7)
    for name, value in ref["after"].items():
        torch.testing.assert_close(out["after"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(ref["before"][k], ref["after"][k]) for k in ref["after"]), "the step must change weights"


def test_two_dp_ranks_two_micro_batches_each_equal_one_process(reference):
    results = run_gloo(_step, 2, 1, 3)  # DP=2, 6 samples per rank in micro-batches of 3
    for out in results:
        _compare(out, reference)


def test_tensor_parallel_two_equals_one_process(reference):
    results = run_gloo(_step, 2, 2, 5)  # TP=2 (DP=1), micro-batches of 5, 5, 2
    for out in results:
        _compare(out, reference)


def test_tensor_parallel_two_by_data_parallel_two_equals_one_process(reference):
    results = run_gloo(_step, 4, 2, 3)  # TP=2 x DP=2 on 4 processes, 6 samples per DP rank in micro-batches of 3
    for out in results:
        _compare(out, reference)


def _two_mini_batches(rank: int, world: int, sizes: tuple[int, ...]) -> dict:
    """Mini-batches of samples 0..5 and 6..11, this rank's stride of each in micro-batches of sizes[rank]; every
    behaviour log-prob taken before the first optimizer step, as train.rl_step does."""
    from megatron.core import parallel_state

    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy, export_hf_state
    from dynamo_mega.parallel.train_step import old_logprobs, policy_step, split_micro_batches

    groups = init_parallel(1, seed=0)
    model, arch = build_policy(CFG, groups, seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    batch = _batch()
    minis = []
    for lo in (0, N // 2):
        idx = torch.arange(lo, lo + N // 2)[groups.dp_rank :: groups.dp_size]
        minis.append(split_micro_batches(*(x[idx] for x in batch), sizes[rank]))
    olds = [old_logprobs(model, micro, groups, 1.0) for micro in minis]
    stats = [
        policy_step(model, opt, None, micro, groups, algo=AlgoConfig(), temperature=1.0, grad_clip=1.0,
                    modulation=ModulationConfig(scope="global"), old=old)
        for micro, old in zip(minis, olds, strict=True)
    ]
    out = {"stats": stats, "after": export_hf_state(model, arch, groups)}
    parallel_state.destroy_model_parallel()
    return out


def test_two_mini_batches_two_dp_ranks_equal_one_process():
    ref = run_gloo(_two_mini_batches, 1, (N // 2,))[0]  # one micro-batch per mini-batch: the reuse path
    for out in run_gloo(_two_mini_batches, 2, (3, 2)):  # rank 0: one micro-batch of 3; rank 1: 2 + 1
        for got, want in zip(out["stats"], ref["stats"], strict=True):
            assert got["skipped_step"] == 0.0
            for key in ("grad_norm", "entropy", "approx_kl", "num_tokens"):
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
        for name, value in ref["after"].items():
            torch.testing.assert_close(out["after"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_non_finite_gradient_skips_the_update():
    out = run_gloo(_step, 1, 1, N, True)[0]
    assert out["stats"]["skipped_step"] == 1.0
    for name, value in out["before"].items():
        assert torch.equal(out["after"][name], value), name
