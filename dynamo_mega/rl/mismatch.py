"""Train-inference mismatch correction from the engine's recorded log-probs (ALGORITHM.md section 6,
docs/mismatch.md).

The engine samples response tokens from its own distribution q (another dtype, other kernels, top-p
renormalisation), while the clipped objective is an expectation under the trainer's behaviour policy p (the
pre-update weights the PPO ratio is taken against). Per token, with p_t, q_t the two log-probs of the sampled
token and d_t = p_t - q_t:

    token TIS (truncated importance sampling):  w_t = min(exp(d_t), C)            C = 2 by default
    sequence masking (MIS), per sample s:        keep_s = 0 if exp(mean_{t in s} d_t) is outside [1/tau, tau]
                                                          or max_{t in s} |d_t| > log(token_ratio_max)
    weight of token t of sample s:              c_t = w_t * keep_s                 (1 where a correction is off)

c_t is a constant (no gradient flows through p or q) that multiplies token t's term of the loss. Truncation
trades a bias for a bounded variance: a token the engine found much less likely than the trainer weighs at most C.
The token test is two-sided (max(r_t, 1/r_t)): one token the engine sampled at 1/1000 of the trainer's probability
is as much a sign of a broken sample as the converse.

Denominator: a masked sample's tokens STILL count in the global token-mean denominator (rl/loss.py's
num_global_tokens). They are dropped from the numerator only, like tokens with a zero advantage. Two reasons:
(1) the denominator is fixed from the masks before the step (`global_token_count`), before any log-prob exists;
excluding masked tokens would need every micro-batch's behaviour log-probs on every DP rank before the first
backward, an extra all-reduce inside the loss and, on the single-micro-batch path, an extra forward; (2) the
surviving tokens keep the weight they have with the correction off, so a burst of bad samples shrinks the step
instead of scaling the survivors up. The contract of rl/loss.py is unchanged: 2 micro-batches x 2 ranks give the
gradient of 1 batch x 1 rank (tests/test_mismatch.py).

Metrics, as sums reduced by rl/loss.reduce_loss_metrics (token shares divide by the global token count, sequence
shares by the global sequence count):
- mismatch_kl: k3 estimator of KL(q || p) under the engine's samples, mean over tokens of exp(d) - 1 - d >= 0;
- tis_capped: share of tokens whose ratio exp(d_t) exceeds C (with token TIS on);
- seq_masked: share of samples dropped by either sequence test (with a sequence mask on).

Samples are rows of [B, S], or with packing (parallel/packing.py) the tokens of a row sharing a segment id.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# exp() of a log-ratio beyond this overflows the k3 estimator in fp32; such a token is broken either way.
_MAX_LOG_RATIO = 20.0


def _sample_keys(mask_BS: Tensor, segments_BS: Tensor | None) -> Tensor:
    """Per token, an index of its sample in [0, B * S): the row, or (row, segment) with packing."""
    b, s = mask_BS.shape
    row = torch.arange(b, device=mask_BS.device)[:, None] * s
    if segments_BS is None:
        return row.expand(b, s).reshape(-1)
    return (row + segments_BS.clamp(min=0)).reshape(-1)


@torch.no_grad()
def mismatch_correction(
    behaviour_logp_BS: Tensor,
    rollout_logp_BS: Tensor,
    mask_BS: Tensor,
    *,
    token_is_cap: float | None = None,
    geometric_tau: float | None = None,
    token_ratio_max: float | None = None,
    segments_BS: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Detached per-token loss weights c_t and metric sums for one micro-batch (module docstring).

    Args (all [B, S]):
        behaviour_logp_BS: p_t, the trainer's pre-update log-prob of each target token.
        rollout_logp_BS: q_t, the engine's log-prob of the same token, recorded at sampling time.
        mask_BS: 1/True on response tokens; the weight is 0 elsewhere.
        token_is_cap: C of token TIS, >= 1; None = no token weights.
        geometric_tau: tau > 1 of the geometric-mean sequence test; None = off.
        token_ratio_max: threshold > 1 of the largest token ratio, max(r, 1/r), in a sample; None = off.
        segments_BS: packed rows only, the sample id of each token (-1 on row padding).

    Returns:
        weight_BS: fp32 c_t (1 on kept tokens when every correction is off, 0 off the mask).
        metrics: 0-dim fp32 sums: "mismatch_kl_sum" always; "tis_capped_sum" with token TIS; "num_seqs" and
            "seq_masked_seqsum" with a sequence test.
    """
    for name, value in (("token_is_cap", token_is_cap), ("geometric_tau", geometric_tau), ("token_ratio_max", token_ratio_max)):
        low_ok = value is None or (value >= 1.0 if name == "token_is_cap" else value > 1.0)
        if not low_ok:
            bound = ">= 1" if name == "token_is_cap" else "> 1"
            raise ValueError(f"{name} must be {bound}, got {value}")
    valid = mask_BS != 0
    mask_f = valid.to(torch.float32)
    d = torch.where(valid, behaviour_logp_BS.float() - rollout_logp_BS.float(), 0.0).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    # expm1: exp(d) - 1 - d cancels to 0 in fp32 for |d| below ~1e-4, the size of a healthy engine's mismatch.
    metrics = {"mismatch_kl_sum": ((torch.expm1(d) - d) * mask_f).sum()}
    weight = mask_f.clone()
    if token_is_cap is not None:
        log_cap = math.log(token_is_cap)
        weight = weight * torch.exp(d.clamp(max=log_cap))
        metrics["tis_capped_sum"] = ((d > log_cap) & valid).float().sum()
    if geometric_tau is not None or token_ratio_max is not None:
        keep_BS, num_seqs, num_masked = _sequence_keep(d, mask_f, geometric_tau, token_ratio_max, segments_BS)
        weight = weight * keep_BS
        metrics["num_seqs"] = num_seqs
        metrics["seq_masked_seqsum"] = num_masked
    return weight, metrics


def _sequence_keep(d_BS, mask_BS, geometric_tau, token_ratio_max, segments_BS):
    """(keep_BS in {0, 1}, samples with a response token, how many of them are masked), as fp32."""
    keys = _sample_keys(mask_BS, segments_BS)
    n = mask_BS.numel()
    zeros = torch.zeros(n, dtype=torch.float32, device=d_BS.device)
    count = zeros.index_add(0, keys, mask_BS.reshape(-1))
    drop = torch.zeros(n, dtype=torch.bool, device=d_BS.device)
    if geometric_tau is not None:
        mean_d = zeros.index_add(0, keys, (d_BS * mask_BS).reshape(-1)) / count.clamp(min=1.0)
        drop |= mean_d.abs() > math.log(geometric_tau)
    if token_ratio_max is not None:
        # |d| is 0 off the mask, so padding never raises a sample's maximum.
        max_abs_d = zeros.scatter_reduce(0, keys, (d_BS.abs() * mask_BS).reshape(-1), reduce="amax")
        drop |= max_abs_d > math.log(token_ratio_max)
    is_sample = count > 0
    keep_BS = (~drop).float()[keys].reshape(d_BS.shape)
    return keep_BS, is_sample.float().sum(), (is_sample & drop).float().sum()
