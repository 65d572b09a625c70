"""Sequence packing: the row plan covers every sample once within the token budget and balances DP ranks;
the same samples packed or padded give the same loss, metrics and gradients through the full policy step."""

from __future__ import annotations

import pytest
import torch
from _gloo import run_gloo
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_mega.config import AlgoConfig, ModelConfig, ModulationConfig
from dynamo_mega.parallel import packing
from dynamo_mega.rl.modulation import entropy_change

CFG = ModelConfig(
    vocab_size=32, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
    max_position_embeddings=64,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=60), st.integers(40, 128), st.integers(1, 4))
def test_row_plan_is_complete_within_budget_and_balanced(lengths, row_tokens, dp_size):
    rows = packing.plan_rows(lengths, row_tokens)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= row_tokens for row in rows)
    per_rank = packing.balance_rows(rows, lengths, dp_size)
    assert sorted(map(tuple, (r for rank in per_rank for r in rank))) == sorted(map(tuple, rows))
    loads = [sum(lengths[i] for row in rank for i in row) for rank in per_rank]
    heaviest_row = max(sum(lengths[i] for i in row) for row in rows)
    assert max(loads) - min(loads) <= heaviest_row  # the LPT bound
    if len(rows) >= dp_size:
        assert all(per_rank), "every rank gets a row when there are enough"


def test_too_long_sample_is_a_clear_error():
    with pytest.raises(ValueError, match="raise optim.pack_row_tokens to at least 50"):
        packing.plan_rows([10, 50, 3], 32)


def _batch(n=10, s=20):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 32, (n, s), generator=g)
    prompt = torch.randint(2, 6, (n,), generator=g)
    resp = torch.randint(1, 12, (n,), generator=g)
    pos = torch.arange(s)
    mask = (pos[None, :] >= prompt[:, None] - 1) & (pos[None, :] < (prompt + resp - 1)[:, None])
    return ids, ids.roll(-1, 1), mask, torch.randn(n, generator=g), -torch.rand(n, s, generator=g) * mask


def test_entropy_change_by_segment_equals_one_sample_per_row():
    g = torch.Generator().manual_seed(0)
    ids, _, mask, adv, old = _batch()
    logp, ent = old + 0.05 * torch.randn(old.shape, generator=g), torch.rand(old.shape, generator=g) * mask
    kw = dict(eps_low=0.2, eps_high=0.28)
    for variant in ("centred", "legacy"):
        padded = entropy_change(logp, old, ent, adv[:, None] * mask, mask, variant=variant, **kw)
        rows = packing.plan_rows(packing.sample_lengths(mask), 32)
        lengths = packing.sample_lengths(mask)
        for row in rows:
            sl = [slice(0, n) for n in (lengths[i] for i in row)]
            cat = [torch.cat([x[i, s] for i, s in zip(row, sl)])[None] for x in (logp, old, ent, adv[:, None] * mask, mask)]
            seg = torch.cat([torch.full((lengths[i],), k) for k, i in enumerate(row)])[None]
            packed = entropy_change(*cat, variant=variant, segments_BS=seg, **kw)
            torch.testing.assert_close(packed[0], torch.cat([padded[i, s] for i, s in zip(row, sl)]), rtol=1e-6, atol=1e-7)


def _step(rank: int, world: int, packed: bool) -> dict:
    from megatron.core import parallel_state

    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy, export_hf_state
    from dynamo_mega.parallel.train_step import policy_step, split_micro_batches

    groups = init_parallel(1, seed=0)
    model, arch = build_policy(CFG, groups, seed=11)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the weight change is the gradient itself
    ids, targets, mask, adv, rollout_logp = _batch()
    if packed:
        rows = packing.plan_rows(packing.sample_lengths(mask), 24)
        micro = packing.pack_micro_batches(rows, ids, targets, mask, adv, rollout_logp, rows_per_micro_batch=2)
        assert len(micro) > 1 and any(len(r) > 1 for r in rows), "the test must really pack"
    else:
        micro = split_micro_batches(ids, targets, mask, adv, rollout_logp, 4)
    before = export_hf_state(model, arch, groups)
    stats = policy_step(
        model, opt, None, micro, groups, algo=AlgoConfig(), temperature=1.0, grad_clip=0.0,
        modulation=ModulationConfig(scope="global"),
    )
    after = export_hf_state(model, arch, groups)
    parallel_state.destroy_model_parallel()
    return {"stats": stats, "grads": {k: before[k] - after[k] for k in after}}


def test_packed_equals_padded_loss_and_gradients():
    padded = run_gloo(_step, 1, False)[0]
    packed = run_gloo(_step, 1, True)[0]
    for key in ("loss", "grad_norm", "entropy", "num_tokens", "modulation_comp_mean", "modulation_stab_mean", "logprob_mismatch"):
        assert packed["stats"][key] == pytest.approx(padded["stats"][key], rel=1e-5, abs=1e-7), key
    assert padded["stats"]["grad_norm"] > 0
    for name, g in padded["grads"].items():
        torch.testing.assert_close(packed["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
