"""Pipeline parallelism: the RL policy step (old log-probs from a forward-only schedule pass, DynaMO modulation
with global scope on the last stage, clipped loss through Megatron's 1F1B schedule, tied-embedding gradient sum
between the stages, clipping over both stages, SGD), then old_logprobs and a supervised step, at PP=2 (2 gloo
processes, 2 layers per stage) equal one process on the same micro-batches, with tied and untied embeddings;
every stage reports the same stats; the weight bridge's pipeline stream brings every stage's weights to the
first stage. Two PPO mini-batches (modulation from the policy being updated: a forward-only pass of the current
weights for `global` scope, the training forward for `microbatch`) at PP=2 equal PP=1."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _gloo import run_gloo
from _policy_batch import policy_batch

from dynamo_mega.config import AlgoConfig, ModelConfig, ModulationConfig

CFG = ModelConfig(
    vocab_size=32, hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
    max_position_embeddings=32,
)
N, S, MICRO = 12, 14, 5  # samples, padded length, micro-batch size (micro-batches of 5, 5, 2)


def _batch():
    return policy_batch(N, S)


def _steps(rank: int, world: int, pp: int, tied: bool) -> dict:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy, export_hf_state
    from dynamo_mega.parallel.train_step import old_logprobs, policy_step, split_micro_batches, supervised_step

    groups = init_parallel(1, pp, seed=0)
    model, arch = build_policy(replace(CFG, tie_word_embeddings=tied), groups, seed=7)
    layout = (get_forward_backward_func().__name__, [layer.layer_number for layer in model.decoder.layers])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the weight change is the clipped gradient itself
    micro = split_micro_batches(*_batch(), MICRO)
    before = export_hf_state(model, arch, groups)
    stats = policy_step(
        model, opt, None, micro, groups, algo=AlgoConfig(), temperature=1.0, grad_clip=1.0,
        modulation=ModulationConfig(scope="global"),
    )
    logp, entropy = old_logprobs(model, micro, groups, temperature=0.7)
    sft = supervised_step(model, opt, None, micro, groups, grad_clip=0.5)
    after = export_hf_state(model, arch, groups)
    streamed = {}
    if pp > 1:  # what push_weights feeds the driver's engine: every stage's buckets, small buckets to test the loop
        from dynamo_mega.parallel.weight_bridge import iter_buckets, iter_pipeline_buckets

        stage = iter_buckets(model, arch, tp_size=1, bucket_bytes=64 << 10)
        for b in iter_pipeline_buckets(stage, pp_group=groups.pp_group, pp_rank=groups.pp_rank, pp_size=pp, carries=True):
            streamed.update((name, t.clone()) for name, t in b.tensors())
    out = {"stats": stats, "logp": logp, "entropy": entropy, "sft": sft, "before": before, "after": after}
    out.update(layout=layout, streamed=streamed)
    parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def runs(request):
    return run_gloo(_steps, 1, 1, request.param)[0], run_gloo(_steps, 2, 2, request.param)


def test_pipeline_two_stages_equal_one_process(runs):
    ref, stages = runs
    assert ref["stats"]["skipped_step"] == 0.0 and "modulation_comp_mean" in ref["stats"]
    schedule = "forward_backward_pipelining_without_interleaving"
    assert [s["layout"] for s in stages] == [(schedule, [1, 2]), (schedule, [3, 4])]
    for name, value in ref["before"].items():  # PP=2 starts from the PP=1 parameters, bit for bit
        assert torch.equal(stages[0]["before"][name], value), name
    for out in stages:
        assert out["stats"].keys() == ref["stats"].keys()
        for key, value in ref["stats"].items():
            assert out["stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        for key, value in ref["sft"].items():
            assert out["sft"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        for mine, theirs in zip(out["logp"] + out["entropy"], ref["logp"] + ref["entropy"], strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
        assert out["after"].keys() == ref["after"].keys()
        for name, value in ref["after"].items():
            torch.testing.assert_close(out["after"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(ref["before"][k], ref["after"][k]) for k in ref["after"]), "the steps must change weights"
    assert stages[1]["streamed"] == {}  # the last stage sent its buckets to the first one
    assert stages[0]["streamed"].keys() == ref["after"].keys()
    for name, value in stages[0]["after"].items():
        assert torch.equal(stages[0]["streamed"][name], value), name
    assert stages[0]["stats"] == stages[1]["stats"] and stages[0]["sft"] == stages[1]["sft"]  # identical on every rank


def _two_mini_batches(rank: int, world: int, pp: int, scope: str) -> dict:
    """Mini-batches of samples 0..5 and 6..11 in micro-batches of MICRO (5 + 1), every behaviour log-prob taken
    before the first optimizer step, as train.rl_step does."""
    from megatron.core import parallel_state

    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy, export_hf_state
    from dynamo_mega.parallel.train_step import old_logprobs, policy_step, split_micro_batches

    groups = init_parallel(1, pp, seed=0)
    model, arch = build_policy(CFG, groups, seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    batch = _batch()
    minis = [split_micro_batches(*(x[lo : lo + N // 2] for x in batch), MICRO) for lo in (0, N // 2)]
    olds = [old_logprobs(model, micro, groups, 1.0) for micro in minis]
    stats = [
        policy_step(model, opt, None, micro, groups, algo=AlgoConfig(), temperature=1.0, grad_clip=1.0,
                    modulation=ModulationConfig(scope=scope), old=old)
        for micro, old in zip(minis, olds, strict=True)
    ]
    out = {"stats": stats, "after": export_hf_state(model, arch, groups)}
    parallel_state.destroy_model_parallel()
    return out


@pytest.mark.parametrize("scope", ["global", "microbatch"])
def test_pipeline_two_mini_batches_equal_one_process(scope):
    ref = run_gloo(_two_mini_batches, 1, 1, scope)[0]
    for out in run_gloo(_two_mini_batches, 2, 2, scope):
        for got, want in zip(out["stats"], ref["stats"], strict=True):
            assert got.keys() == want.keys() and "modulation_stab_mean" in got
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        for name, value in ref["after"].items():
            torch.testing.assert_close(out["after"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def _tied_main_grad_sum(rank: int, world: int) -> dict:
    """Megatron DDP's layout (the GPU optimizer): the gradient in `main_grad`, `.grad` None."""
    from megatron.core import parallel_state

    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.pipeline import allreduce_tied_embedding_grad
    from dynamo_mega.parallel.policy import build_policy

    groups = init_parallel(1, world, seed=0)
    model, _ = build_policy(replace(CFG, tie_word_embeddings=True), groups, seed=7)
    weight = model.shared_embedding_or_output_weight()
    weight.main_grad = torch.full(weight.shape, float(rank + 1))
    allreduce_tied_embedding_grad(model, groups)
    out = {"main_grad": weight.main_grad.clone(), "grad": weight.grad}
    parallel_state.destroy_model_parallel()
    return out


def test_tied_embedding_gradient_in_megatron_main_grad_is_summed_over_the_stages():
    stages = run_gloo(_tied_main_grad_sum, 2)
    for out in stages:
        assert out["grad"] is None  # Megatron's optimizer reads main_grad only
        assert torch.equal(out["main_grad"], torch.full_like(out["main_grad"], 3.0))  # 1 (first stage) + 2 (last)
