"""PPO clipped loss: closed-form token cases and the normalisation contract
(2 micro-batches x 2 DP ranks == 1 batch x 1 rank, values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from _gloo import run_gloo

from dynamo_mega.rl.loss import global_token_count, policy_loss, reduce_loss_metrics

CLIP = {"eps_low": 0.2, "eps_high": 0.28, "dual_clip_c": 10.0}


def test_token_cases_closed_form():
    # (advantage, ratio) -> (token loss, d loss / d logp, which clip)
    cases = [
        (1.0, 1.0, -1.0, -1.0, None),  # inside the trust region: -A r, grad -A r
        (1.0, 1.5, -1.28, 0.0, "high"),  # A > 0 above 1 + eps_high: clipped, no grad
        (1.0, 0.5, -0.5, -0.5, None),  # A > 0 below 1 - eps_low: not clipped (pessimistic branch)
        (-1.0, 0.5, 0.8, 0.0, "low"),  # A < 0 below 1 - eps_low: clipped
        (-1.0, 1.5, 1.5, 1.5, None),  # A < 0 above 1 + eps_high, below c: unclipped
        (-2.0, 20.0, 20.0, 0.0, "dual"),  # A < 0 and r > c: capped at -A c = 20
    ]
    adv = torch.tensor([c[0] for c in cases])
    old = torch.zeros(len(cases))
    logp = torch.tensor([math.log(c[1]) for c in cases], requires_grad=True)
    mask = torch.ones(len(cases), dtype=torch.bool)
    loss, metrics = policy_loss(logp, old, adv, mask, num_global_tokens=1.0, **CLIP)
    loss.backward()
    # One token per call would be cleaner to read but this checks them all at once:
    expect_loss = sum(c[2] for c in cases)
    assert abs(float(loss) - expect_loss) < 1e-5
    torch.testing.assert_close(logp.grad, torch.tensor([c[3] for c in cases]), atol=1e-5, rtol=0)
    for kind in ("low", "high", "dual"):
        assert float(metrics[f"clipfrac_{kind}_sum"]) == sum(c[4] == kind for c in cases)
    assert float(metrics["num_tokens"]) == len(cases)
    k3 = sum(c[1] - 1 - math.log(c[1]) for c in cases)
    assert abs(float(metrics["approx_kl_sum"]) - k3) < 1e-4


def test_padding_cannot_leak_nan():
    logp = torch.tensor([-1.0, float("-inf"), float("nan")], requires_grad=True)
    old = torch.tensor([-1.2, 0.0, 0.0])
    adv = torch.tensor([1.0, float("nan"), 2.0])
    mask = torch.tensor([True, False, False])
    loss, metrics = policy_loss(logp, old, adv, mask, num_global_tokens=1.0, **CLIP)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_bad_arguments():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="dual_clip_c"):
        policy_loss(x, x, x, x, eps_low=0.2, eps_high=0.2, dual_clip_c=1.0, num_global_tokens=1.0)
    with pytest.raises(ValueError, match="num_global_tokens"):
        policy_loss(x, x, x, x, num_global_tokens=0.0, **CLIP)


def _batch(seed: int = 0, n_seq: int = 8, seq_len: int = 6, vocab: int = 5, dim: int = 4):
    """A tiny linear policy over a fixed feature batch: features [N, S, D], targets, old_logp, adv, mask."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_seq, seq_len, dim, generator=gen)
    targets = torch.randint(0, vocab, (n_seq, seq_len), generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * 0.5
    lengths = torch.randint(1, seq_len + 1, (n_seq,), generator=gen)
    mask = torch.arange(seq_len)[None, :] < lengths[:, None]
    with torch.no_grad():
        old = _logp(weight + 0.3 * torch.randn(vocab, dim, generator=gen), feats, targets)
    adv = torch.randn(n_seq, 1, generator=gen).expand(n_seq, seq_len).clone()
    entropy = torch.rand(n_seq, seq_len, generator=gen)
    return weight, feats, targets, old, adv, mask, entropy


def _logp(weight, feats, targets):
    return torch.log_softmax(feats @ weight.T, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def _run(rows_per_micro_batch: list[slice], dp_group=None):
    """Accumulate micro-batch losses (this rank's rows), SUM-all-reduce the grad and the loss."""
    weight, feats, targets, old, adv, mask, entropy = _batch()
    weight = weight.clone().requires_grad_()
    n_global = global_token_count([mask[rows] for rows in rows_per_micro_batch], dp_group)
    total, metrics = torch.zeros(()), []
    for rows in rows_per_micro_batch:
        logp = _logp(weight, feats[rows], targets[rows])
        loss, m = policy_loss(
            logp, old[rows], adv[rows], mask[rows], num_global_tokens=n_global, entropy=entropy[rows], **CLIP
        )
        loss.backward()
        total += loss.detach()
        metrics.append(m)
    grad = weight.grad.clone()
    if dp_group is not None:
        dist.all_reduce(grad, group=dp_group)
        dist.all_reduce(total, group=dp_group)
    return total, grad, n_global, reduce_loss_metrics(metrics, dp_group)


def _dp_worker(rank: int, world: int):
    half = 8 // world
    base = rank * half
    micro = [slice(base, base + 1), slice(base + 1, base + half)]  # 2 uneven micro-batches
    return _run(micro, dp_group=dist.group.WORLD)


def test_two_micro_batches_two_dp_ranks_equal_one_batch():
    ref_loss, ref_grad, ref_n, ref_metrics = _run([slice(0, 8)])
    for loss, grad, n_tokens, metrics in run_gloo(_dp_worker, 2):
        assert n_tokens == ref_n
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)
        assert metrics.keys() == ref_metrics.keys()
        for key, value in metrics.items():
            assert abs(value - ref_metrics[key]) < 1e-6, key
    # The same split on one rank (gradient accumulation only) as well.
    loss, grad, _, _ = _run([slice(0, 3), slice(3, 8)])
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)
