"""Fused vocab-parallel log-prob + entropy vs a float64 single-process reference and vs Megatron.

Tolerances (stated, and why):
- fp32 logits: logp, entropy and grads within 2e-5 absolute (fp32 math on |z| up to ~40 / T).
- bf16 logits: logp and entropy within 2e-5 (the math is fp32 on exactly the bf16 values the
  reference sees); grads are returned in bf16, so within one bf16 rounding: rtol 2^-7, atol 1e-5.
- vs Megatron's vocab_parallel_cross_entropy (fp32): 2e-5 absolute on values and grads.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _gloo import run_gloo

from dynamo_mega.parallel.logprobs import vocab_parallel_logprobs_entropy

B, S, V = 3, 11, 38  # N = 33 tokens; V_local = 19 at TP=2 (odd on purpose)
PAD_ID = -100


def _case(seed: int, dtype: torch.dtype):
    """Logits [B, S, V] with varied entropies and one near-one-hot row, padded targets, mask, upstream grads."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=gen) * torch.rand(B, S, 1, generator=gen) * 6
    logits[0, 0, 5] += 40.0  # near-deterministic token: tests the max-shift
    targets = torch.randint(0, V, (B, S), generator=gen)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 4:] = False
    targets[~mask] = PAD_ID
    grad_logp = torch.randn(B, S, generator=gen) * mask
    grad_ent = torch.randn(B, S, generator=gen) * mask
    return logits.to(dtype), targets, mask, grad_logp, grad_ent


def _reference(logits, targets, mask, temperature, grad_logp, grad_ent, entropy_grad):
    """float64 log_softmax/entropy with autograd: (logp, entropy, dloss/dlogits)."""
    x = logits.detach().double().requires_grad_()
    logsm = torch.log_softmax(x / temperature, dim=-1)
    logp = logsm.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    loss = (logp * grad_logp.double()).sum()
    if entropy_grad:
        loss = loss + (entropy * grad_ent.double()).sum()
    loss.backward()
    return logp.detach(), entropy.detach(), x.grad


def _ours(logits_local, targets, tp_group, temperature, chunk, entropy_grad, grad_logp, grad_ent):
    x = logits_local.detach().clone().requires_grad_()
    logp, entropy = vocab_parallel_logprobs_entropy(
        x, targets, tp_group, temperature=temperature, chunk_size=chunk, entropy_grad=entropy_grad
    )
    assert logp.dtype == entropy.dtype == torch.float32
    assert entropy.requires_grad == entropy_grad
    loss = (logp * grad_logp).sum()
    if entropy_grad:
        loss = loss + (entropy * grad_ent).sum()
    loss.backward()
    assert x.grad.dtype == logits_local.dtype
    return logp.detach(), entropy.detach(), x.grad


def _check(got, ref, mask, dtype):
    logp, entropy, grad = got
    ref_logp, ref_entropy, ref_grad = ref
    torch.testing.assert_close(logp.double()[mask], ref_logp[mask], atol=2e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=2e-5, rtol=0)
    assert torch.isfinite(logp).all()
    if dtype == torch.bfloat16:
        torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=2**-7)
    else:
        torch.testing.assert_close(grad.double(), ref_grad, atol=2e-5, rtol=0)


CASES = [  # (dtype, temperature, chunk_size, entropy_grad)
    (torch.float32, 1.0, 1024, False),
    (torch.float32, 0.7, 7, True),
    (torch.float32, 1.3, 1, True),
    (torch.bfloat16, 1.0, 5, False),
    (torch.bfloat16, 0.6, 13, True),
]


@pytest.mark.parametrize("dtype,temperature,chunk,entropy_grad", CASES)
def test_tp1_matches_float64_reference(dtype, temperature, chunk, entropy_grad):
    logits, targets, mask, g_logp, g_ent = _case(0, dtype)
    got = _ours(logits, targets, None, temperature, chunk, entropy_grad, g_logp, g_ent)
    ref = _reference(logits, targets, mask, temperature, g_logp, g_ent, entropy_grad)
    _check(got, ref, mask, dtype)


def test_fp32_logits_not_modified_and_only_entropy_used():
    logits, targets, _, _, g_ent = _case(1, torch.float32)
    before = logits.clone()
    x = logits.clone().requires_grad_()
    _, entropy = vocab_parallel_logprobs_entropy(x, targets, chunk_size=4, entropy_grad=True)
    (entropy * g_ent).sum().backward()  # logp unused: its grad arrives as None
    assert torch.equal(x.detach(), before)
    x64 = logits.double().requires_grad_()
    logsm = torch.log_softmax(x64, -1)
    (-(logsm.exp() * logsm).sum(-1) * g_ent.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=2e-5, rtol=0)


def test_bad_arguments_and_empty_input():
    logits = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs_entropy(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="targets"):
        vocab_parallel_logprobs_entropy(logits, torch.zeros(3, 2, dtype=torch.long))
    logp, entropy = vocab_parallel_logprobs_entropy(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    assert logp.shape == entropy.shape == (0,)


def _tp2_worker(rank: int, world: int, cases):
    """Every case at TP=2 (ours and Megatron's), and Megatron on a 1-rank group for TP=1."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    solo = [dist.new_group([r]) for r in range(world)][rank]
    v_local = V // world
    shard = slice(rank * v_local, (rank + 1) * v_local)
    out = {"ours": [], "megatron_tp2": [], "megatron_tp1": []}
    for dtype, temperature, chunk, entropy_grad in cases:
        logits, targets, _, g_logp, g_ent = _case(0, dtype)
        out["ours"].append(
            _ours(logits[..., shard], targets, tp_group, temperature, chunk, entropy_grad, g_logp, g_ent)
        )
    for key, group, part in (("megatron_tp2", None, shard), ("megatron_tp1", solo, slice(None))):
        logits, targets, _, g_logp, _ = _case(0, torch.float32)
        x = logits[..., part].clone().requires_grad_()
        # None = parallel_state's TP group: the path Megatron's own GPT loss takes.
        loss = vocab_parallel_cross_entropy(x / 0.7, targets, tp_group=group)
        (-loss * g_logp).sum().backward()
        out[key] = (-loss.detach(), x.grad)
    parallel_state.destroy_model_parallel()
    return out


def test_tp2_matches_reference_and_megatron():
    results = run_gloo(_tp2_worker, 2, CASES)
    for i, (dtype, temperature, _chunk, entropy_grad) in enumerate(CASES):
        logits, targets, mask, g_logp, g_ent = _case(0, dtype)
        ref = _reference(logits, targets, mask, temperature, g_logp, g_ent, entropy_grad)
        per_rank = [r["ours"][i] for r in results]
        # Every rank of the TP group gets the same values, bit for bit.
        assert torch.equal(per_rank[0][0], per_rank[1][0]) and torch.equal(per_rank[0][1], per_rank[1][1])
        grad = torch.cat([g for _, _, g in per_rank], dim=-1)
        _check((per_rank[0][0], per_rank[0][1], grad), ref, mask, dtype)
    # Megatron: -CE == our logp on valid tokens (at padding both are finite and meaningless:
    # Megatron returns logZ - max there, we return -logZ).
    logits, targets, mask, g_logp, g_ent = _case(0, torch.float32)
    ours_logp, _, ours_grad = _ours(logits, targets, None, 0.7, 5, False, g_logp, g_ent)
    for key in ("megatron_tp1", "megatron_tp2"):
        meg_logp = results[0][key][0]
        meg_grad = (
            torch.cat([r[key][1] for r in results], dim=-1) if key.endswith("tp2") else results[0][key][1]
        )
        torch.testing.assert_close(meg_logp[mask], ours_logp[mask], atol=2e-5, rtol=0)
        torch.testing.assert_close(meg_grad, ours_grad, atol=2e-5, rtol=0)
