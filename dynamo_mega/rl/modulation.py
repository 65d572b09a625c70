"""DynaMO token-level advantage modulation (ALGORITHM.md section 2).

    A'_t = A_t * beta_comp_t * beta_stab_t        (both factors detached: they carry no gradient)

Compensation (A_t > 0 only): confident tokens have small softmax gradients, so low-entropy tokens
get up to mu_max times their advantage:
    beta_comp_t = 1 + (mu_max - 1) * (H_max - H_t) / (H_max - H_min + 1e-8)
Stabilisation: damp the tokens whose update would move the entropy most, using the first-order
entropy change of a policy-gradient step on token t
    dH_t = -xi_t * (pi_t Lambda_t - mean_{t' in seq} pi_t' Lambda_t'),  xi_t = I_t r_t A_t,
    Lambda_t = logp_t + H_t,  I_t = 1 when the PPO clip does not zero the token's gradient,
    x_t = |dH_t| / (max |dH| + 1e-8),
    beta_stab_t = lambda_min + (1 - lambda_min) * sigmoid(-gamma (x_t - tau)).
`legacy` variant (an older reference variant: a sequence-level sum with pi^2 and no centring). Our
reading of that one-line description: every valid token of a sequence gets
    |dH_seq| = |sum_{t in seq} xi_t pi_t^2 Lambda_t|.

Statistics H_min, H_max, max |dH| are taken over valid tokens of the SCOPE:
- `microbatch` (the reference): each micro-batch's own statistics; results depend on the number of
  GPUs and the token cap per micro-batch;
- `global` (default): reduced over ALL micro-batches of the optimizer step and MAX-all-reduced over
  the data-parallel group, so factors do not depend on the micro-batch split or DP size. Every
  sequence must lie whole inside one micro-batch (the centred mean runs along the last dim).
Valid tokens include those with a zero advantage (the reference takes its entropy range over every position of
the micro-batch): they set H_min/H_max, while their X_t is exactly 0 (xi_t = 0), so they never move max X. A
policy step that leaves zero-advantage samples out of its training pass (parallel/work_skipping.py) therefore
still supplies their entropy range (`extra_stats`), and turns the skipping off in the `microbatch` scope, where
which samples share a micro-batch decides the statistics.

Which log-probs: the factors need logp_t, pi_t = exp(logp_t), H_t and r_t = exp(logp_t - logp_old_t), with
logp_t and H_t from the policy being updated (detached) and logp_old_t from the behaviour policy, as in the
reference. parallel/train_step.policy_step does this in every PPO mini-batch (ALGORITHM.md section 5):
- one optimizer step per rollout batch (the current policy IS the behaviour one): logp = old_logp, r_t = 1,
  from the pass that already yields logp_old and H (for one micro-batch, the training forward itself);
- several mini-batches (logp_old of all of them taken before the rollout batch's first step): `microbatch`
  scope, or one micro-batch, modulates each micro-batch from its own training forward, at no extra cost;
  `global` scope over several micro-batches needs every micro-batch's current values before the first
  backward, so a no-grad forward of the current policy runs first (at PP > 1 a forward-only schedule pass,
  for any number of micro-batches) rather than keeping the graphs of the whole mini-batch alive.
Under pipeline parallelism all of this runs on the last stage (where logp and H live), with that stage's DP
group; every rank of a TP group computes the same factors.

Call sequence for one optimizer step with micro-batches m (see `modulate_micro_batches`):
    dh[m]    = entropy_change(logp[m], old_logp[m], entropy[m], adv[m], mask[m], ...)
    part[m]  = modulation_stats(entropy[m], dh[m], mask[m])
    stats    = reduce_modulation_stats(part, dp_group)           # global scope only
    adv2[m], metrics[m] = modulate_advantages(adv[m], entropy[m], dh[m], mask[m], stats or part[m], ...)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

VARIANTS = ("centred", "legacy")
SCOPES = ("global", "microbatch")


class ModulationStats(NamedTuple):
    """Scope statistics, each a 0-dim fp32 tensor; an empty scope is (+inf, -inf, 0)."""

    entropy_min: Tensor
    entropy_max: Tensor
    dh_max: Tensor


def _clip_active(ratio_BS: Tensor, adv_BS: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """I_t: 1 where the PPO clip leaves the token's gradient alive, given the sign of A_t."""
    up = (adv_BS > 0) & (ratio_BS <= 1.0 + eps_high)
    down = (adv_BS < 0) & (ratio_BS >= 1.0 - eps_low)
    return (up | down).to(torch.float32)


def _sequence_sum(x_BS: Tensor, segments_BS: Tensor | None) -> Tensor:
    """Per token, the sum of x over the token's own sequence: the whole row, or with packing the tokens of the
    row that share its segment id (segments_BS >= 0 inside samples; padding must carry x = 0)."""
    if segments_BS is None:
        return x_BS.sum(dim=-1, keepdim=True).expand_as(x_BS)
    b, s = x_BS.shape
    key = (segments_BS.clamp(min=0) + s * torch.arange(b, device=x_BS.device)[:, None]).reshape(-1)
    sums = torch.zeros(b * s, dtype=x_BS.dtype, device=x_BS.device).index_add_(0, key, x_BS.reshape(-1))
    return sums[key].reshape(b, s)


@torch.no_grad()
def entropy_change(
    logp_BS: Tensor,
    old_logp_BS: Tensor,
    entropy_BS: Tensor,
    advantages_BS: Tensor,
    mask_BS: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    variant: str = "centred",
    segments_BS: Tensor | None = None,
) -> Tensor:
    """X_BS = |dH_t| >= 0, the estimated entropy change per token, 0 on padding.

    All inputs [B, S] (last dim = one whole sequence, or with packing several, told apart by segments_BS);
    logp/old_logp/entropy fp32 per token; see the module docstring for which pass they should come from.
    """
    if variant not in VARIANTS:
        raise ValueError(f"modulation variant must be one of {VARIANTS}, got {variant!r}")
    valid = mask_BS != 0
    mask_f = valid.to(torch.float32)
    logp = torch.where(valid, logp_BS.float(), 0.0)
    log_ratio = torch.where(valid, logp - old_logp_BS.float(), 0.0).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    adv = torch.where(valid, advantages_BS.float(), 0.0)
    xi = _clip_active(ratio, adv, eps_low, eps_high) * ratio * adv
    pi = torch.exp(logp)
    lam = logp + torch.where(valid, entropy_BS.float(), 0.0)
    if variant == "legacy":
        dh_seq = -_sequence_sum(xi * pi * pi * lam * mask_f, segments_BS)
        return dh_seq.abs() * mask_f
    q = pi * lam
    q_mean = _sequence_sum(q * mask_f, segments_BS) / _sequence_sum(mask_f, segments_BS).clamp(min=1.0)
    return (xi * (q - q_mean)).abs() * mask_f


@torch.no_grad()
def modulation_stats(entropy_BS: Tensor, abs_dh_BS: Tensor, mask_BS: Tensor) -> ModulationStats:
    """This micro-batch's partial statistics over its valid tokens."""
    valid = mask_BS != 0
    ent = entropy_BS.float()
    inf = torch.tensor(float("inf"), device=ent.device)
    if ent.numel() == 0:
        return ModulationStats(entropy_min=inf, entropy_max=-inf, dh_max=torch.zeros((), device=ent.device))
    return ModulationStats(
        entropy_min=torch.where(valid, ent, inf).amin(),
        entropy_max=torch.where(valid, ent, -inf).amax(),
        dh_max=torch.where(valid, abs_dh_BS.float(), 0.0).amax(),
    )


@torch.no_grad()
def reduce_modulation_stats(partials: Sequence[ModulationStats], dp_group=None) -> ModulationStats:
    """Combine micro-batch partials, then MAX-all-reduce over the DP group (None = this rank only).

    One collective: the minimum is reduced as the maximum of its negation. Every rank of the group
    must call it.
    """
    assert partials, "every rank needs at least one (possibly all-padding) micro-batch"
    packed_M3 = torch.stack([torch.stack([-p.entropy_min, p.entropy_max, p.dh_max]) for p in partials])
    packed_3 = packed_M3.amax(dim=0)
    if dp_group is not None and dist.get_world_size(group=dp_group) > 1:
        dist.all_reduce(packed_3, op=dist.ReduceOp.MAX, group=dp_group)
    return ModulationStats(entropy_min=-packed_3[0], entropy_max=packed_3[1], dh_max=packed_3[2])


def _compensation(entropy_BS, adv_BS, stats: ModulationStats, mu_max: float) -> Tensor:
    """beta_comp in [1, mu_max]; 1 where A <= 0. The clamp only acts if the statistics came from
    another pass than the per-token entropy (then H_t may lie outside [H_min, H_max])."""
    span = stats.entropy_max - stats.entropy_min
    frac = ((stats.entropy_max - entropy_BS.float()) / (span + 1e-8)).clamp(0.0, 1.0)
    # An empty scope has span = inf - inf: leave factors at 1 (no host sync, unlike an `if`).
    frac = torch.where(torch.isfinite(span), frac, 0.0)
    return torch.where(adv_BS > 0, 1.0 + (mu_max - 1.0) * frac, 1.0)


def _stabilisation(abs_dh_BS, stats: ModulationStats, lambda_min, gamma, tau) -> Tensor:
    """beta_stab in [lambda_min, 1]: a sigmoid decay in the normalised entropy change."""
    x = abs_dh_BS.float() / (stats.dh_max + 1e-8)
    # sigmoid(-g (x - tau)) == 1 / (1 + exp(g (x - tau))), without overflow for large g.
    return lambda_min + (1.0 - lambda_min) * torch.sigmoid(-gamma * (x - tau))


@torch.no_grad()
def modulate_advantages(
    advantages_BS: Tensor,
    entropy_BS: Tensor,
    abs_dh_BS: Tensor,
    mask_BS: Tensor,
    stats: ModulationStats,
    *,
    mu_max: float = 1.2,
    lambda_min: float = 0.6,
    gamma: float = 50.0,
    tau: float = 0.99,
) -> tuple[Tensor, dict[str, Tensor]]:
    """A'_BS = A * beta_comp * beta_stab on valid tokens (padding unchanged), detached fp32.

    Returns (A', metrics) with metrics as 0-dim fp32 sums and counts (reduce by summing):
    comp_sum / comp_count (mean compensation over A > 0 tokens), stab_sum / stab_count and
    stab_strong_sum (tokens damped below the midpoint (1 + lambda_min) / 2) over A != 0 tokens.
    """
    if mu_max < 1.0 or not 0.0 <= lambda_min <= 1.0:
        raise ValueError(f"need mu_max >= 1 and 0 <= lambda_min <= 1, got {mu_max}, {lambda_min}")
    valid = mask_BS != 0
    adv = advantages_BS.float()
    comp = torch.where(valid, _compensation(entropy_BS, adv, stats, mu_max), 1.0)
    stab = torch.where(valid, _stabilisation(abs_dh_BS, stats, lambda_min, gamma, tau), 1.0)
    modulated = torch.where(valid, adv * comp * stab, adv)
    pos = (valid & (adv > 0)).float()
    nonzero = (valid & (adv != 0)).float()
    metrics = {
        "comp_sum": (comp * pos).sum(),
        "comp_count": pos.sum(),
        "stab_sum": (stab * nonzero).sum(),
        "stab_count": nonzero.sum(),
        "stab_strong_sum": ((stab < 0.5 * (1.0 + lambda_min)).float() * nonzero).sum(),
    }
    return modulated, metrics


def modulate_micro_batches(
    advantages: Sequence[Tensor],
    logp: Sequence[Tensor],
    old_logp: Sequence[Tensor],
    entropy: Sequence[Tensor],
    masks: Sequence[Tensor],
    *,
    scope: str = "global",
    dp_group=None,
    variant: str = "centred",
    eps_low: float,
    eps_high: float,
    mu_max: float = 1.2,
    lambda_min: float = 0.6,
    gamma: float = 50.0,
    tau: float = 0.99,
    segments: Sequence[Tensor | None] | None = None,
    extra_stats: Sequence[ModulationStats] = (),
    entropy_range: str = "step",
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """The whole call sequence for one optimizer step; lists hold one [B_m, S_m] tensor per micro-batch
    (`segments`: per micro-batch, the packed-sample ids of parallel/packing.py, or None for one sample per row).
    `extra_stats` ("global" scope only): partial statistics of this rank's tokens of the step that are not
    modulated here, folded into the shared statistics (the zero-advantage samples a policy step leaves out of its
    training pass, parallel/work_skipping.py). `entropy_range`: "step" takes H_min/H_max over every valid token of
    the scope (the reference); "nonzero_advantage" over the tokens with a nonzero advantage only, so samples whose
    advantage is zero everywhere play no part in any factor (and need no forward pass when skipped).

    Returns (modulated advantages per micro-batch, metric sums over this rank's micro-batches).
    With scope "global" every DP rank must call it (one MAX all-reduce).
    """
    if scope not in SCOPES:
        raise ValueError(f"modulation scope must be one of {SCOPES}, got {scope!r}")
    assert scope == "global" or not extra_stats, "only the global scope has statistics beyond its micro-batches"
    segments = segments if segments is not None else [None] * len(masks)
    dh = [
        entropy_change(lp, olp, ent, adv, m, eps_low=eps_low, eps_high=eps_high, variant=variant, segments_BS=seg)
        for lp, olp, ent, adv, m, seg in zip(logp, old_logp, entropy, advantages, masks, segments, strict=True)
    ]
    ranged = masks  # the tokens the statistics are taken over
    if entropy_range == "nonzero_advantage":  # their X_t is 0 anyway: only the entropy range changes
        ranged = [m * (adv != 0) for m, adv in zip(masks, advantages, strict=True)]
    partials = [modulation_stats(ent, x, m) for ent, x, m in zip(entropy, dh, ranged, strict=True)]
    shared = reduce_modulation_stats([*partials, *extra_stats], dp_group) if scope == "global" else None
    out, totals = [], {}
    for adv, ent, x, m, part in zip(advantages, entropy, dh, masks, partials, strict=True):
        stats = shared if shared is not None else part
        mod, metrics = modulate_advantages(
            adv, ent, x, m, stats, mu_max=mu_max, lambda_min=lambda_min, gamma=gamma, tau=tau
        )
        out.append(mod)
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value
    return out, totals
