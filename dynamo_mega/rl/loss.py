"""PPO clipped policy loss with a global token-mean (ALGORITHM.md section 0).

Normalisation contract: every micro-batch loss is sum(token losses) / num_global_tokens, where
num_global_tokens is the valid-token count of the WHOLE global batch (all micro-batches of the
optimizer step, all data-parallel ranks). Summing micro-batch losses (gradient accumulation) and
SUM-all-reducing gradients over DP therefore gives exactly the gradient of the global token mean,
whatever the micro-batch split or DP size. (A DP gradient AVERAGE would divide by dp_size once more:
the caller must sum, or multiply the loss by dp_size when its DDP averages.)

Metrics are returned as sums plus a token count so they can be reduced over micro-batches and
ranks before dividing (`reduce_loss_metrics`); a mean of per-micro-batch means would weight
short micro-batches wrongly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def global_token_count(masks: list[Tensor], dp_group=None) -> float:
    """Valid tokens in all micro-batches' masks of this rank, summed over the DP group.

    masks: this rank's micro-batch masks, each [...] bool/0-1. dp_group None = no DP.
    Integer arithmetic, so every rank gets the identical count.
    """
    device = masks[0].device if masks else torch.device("cpu")
    total = torch.zeros((), dtype=torch.int64, device=device)
    for mask in masks:
        total += (mask != 0).sum()
    if dp_group is not None and dist.get_world_size(group=dp_group) > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=dp_group)
    return float(total.item())


def _clipped_token_loss(ratio, advantages, eps_low, eps_high, dual_clip_c):
    """Token losses and the three clip indicators (all same shape as ratio)."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    # Dual clip: for A < 0 a huge ratio would make -A * ratio unbounded; cap it at -A * c.
    dual_cap = -advantages * dual_clip_c
    is_dual = (advantages < 0) & (loss > dual_cap)
    loss = torch.where(is_dual, dual_cap, loss)
    # "Clipped" = the gradient is zero because the clipped branch won (ratio outside the trust region
    # in the direction the advantage pushes it).
    is_high = (advantages > 0) & (ratio > 1.0 + eps_high)
    is_low = (advantages < 0) & (ratio < 1.0 - eps_low)
    return loss, is_low, is_high, is_dual


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float,
    num_global_tokens: float,
    entropy: Tensor | None = None,
    token_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, asymmetric clip + dual clip, summed and divided by num_global_tokens.

    Args (all [...] of one shape, e.g. [B, S]):
        logp: current log-probs of the sampled tokens, fp32, with grad.
        old_logp: log-probs under the behaviour (pre-update) policy; no grad is taken through it.
        advantages: token advantages (already modulated, if DynaMO modulation is on); detached.
        mask: 1/True on valid (response) tokens.
        eps_low, eps_high: ratio clip range [1 - eps_low, 1 + eps_high].
        dual_clip_c: cap for negative advantages, loss <= -A * c; must be > 1.
        num_global_tokens: `global_token_count` of the whole step (all micro-batches, all DP ranks).
        entropy: optional per-token entropy [...] for the entropy metric only.
        token_weight: optional detached weight >= 0 per token [...] multiplying its loss term: the
            train-inference mismatch correction (rl/mismatch.py); None = 1. It scales the numerator only:
            num_global_tokens stays the count of valid tokens. For weights >= 0 this equals scaling the
            advantages by the same weights (every branch of the clipped loss is linear in A), so it
            commutes with DynaMO's modulation of the advantages.

    Returns:
        loss: 0-dim, sum of masked token losses / num_global_tokens.
        metrics: detached fp32 0-dim sums, "num_tokens" and "<name>_sum" for clipfrac_low,
            clipfrac_high, clipfrac_dual, approx_kl (k3 estimator of KL(old || current)) and, when
            entropy is given, entropy. Reduce them with `reduce_loss_metrics`.
    """
    if dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (the reference uses 10), got {dual_clip_c}")
    if num_global_tokens <= 0:
        raise ValueError(f"num_global_tokens must be > 0, got {num_global_tokens}")
    valid = mask != 0
    mask_f = valid.to(torch.float32)
    # Zero on padding and clamped: an overflowing exp would turn a zero upstream grad into 0 * inf = NaN.
    # Where |log r| > 20 the token is far outside the clip range, so its true gradient is ~0 anyway.
    log_ratio = torch.where(valid, logp.float() - old_logp.detach().float(), 0.0).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    adv = torch.where(valid, advantages.detach().float(), 0.0)
    token_loss, is_low, is_high, is_dual = _clipped_token_loss(ratio, adv, eps_low, eps_high, dual_clip_c)
    if token_weight is not None:
        token_loss = token_loss * token_weight.detach().float()
    loss = (token_loss * mask_f).sum() / num_global_tokens
    with torch.no_grad():
        # k3 = r - 1 - log r >= 0, unbiased for KL(old || current) under samples from old.
        k3 = (ratio - 1.0 - log_ratio) * mask_f
        metrics = {
            "num_tokens": mask_f.sum(),
            "clipfrac_low_sum": (is_low.float() * mask_f).sum(),
            "clipfrac_high_sum": (is_high.float() * mask_f).sum(),
            "clipfrac_dual_sum": (is_dual.float() * mask_f).sum(),
            "approx_kl_sum": k3.sum(),
        }
        if entropy is not None:
            metrics["entropy_sum"] = torch.where(valid, entropy.detach().float(), 0.0).sum()
    return loss, metrics


def reduce_loss_metrics(metrics: Sequence[dict[str, Tensor]], dp_group=None) -> dict[str, float]:
    """Token means of `policy_loss` metrics over micro-batches and the DP group (one all-reduce).

    Returns {"clipfrac_low": ..., ..., "num_tokens": global count}; a "<name>_sum" becomes "<name>", divided by
    the global "num_tokens"; a "<name>_seqsum" (per-sample metrics, e.g. rl/mismatch.py's) becomes "<name>",
    divided by the global "num_seqs".
    """
    if not metrics:
        return {}
    keys = sorted(metrics[0])
    sums_K = torch.stack([torch.stack([m[k].float() for k in keys]) for m in metrics]).sum(dim=0)
    sums_K = sums_K.to(torch.float64)
    if dp_group is not None and dist.get_world_size(group=dp_group) > 1:
        dist.all_reduce(sums_K, op=dist.ReduceOp.SUM, group=dp_group)
    totals = dict(zip(keys, sums_K.tolist(), strict=True))
    out = {"num_tokens": totals["num_tokens"]}
    for suffix, count_key in (("_sum", "num_tokens"), ("_seqsum", "num_seqs")):
        count = totals.get(count_key, 0.0)
        for key in keys:
            if key.endswith(suffix):
                out[key[: -len(suffix)]] = totals[key] / count if count > 0 else 0.0
    return out
