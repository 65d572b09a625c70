"""Fused vocab-parallel log-prob of the sampled token + full-vocabulary entropy.

Megatron's output layer leaves logits sharded over the vocabulary: rank r of the tensor-parallel
(TP) group holds vocab ids [r * V_local, (r + 1) * V_local). DynaMO needs, per token t,
logp_t = log softmax(z)_target (with gradient, for the loss) and H_t = -sum_v p_v log p_v
(for advantage modulation, usually without gradient), where z = logits / temperature.

Why a custom autograd Function: the naive path (log_softmax, then p * log p) keeps several fp32
copies of [T, V] alive for backward, i.e. gigabytes at Qwen's V = 151,936. Here:
- tokens are processed in chunks; the math is fp32, in place in work buffers reused across chunks
  that hold at most chunk_size x V_local floats in all (fp32 logits: none in backward without the
  entropy gradient, which works in the gradient's own rows);
- forward keeps only per-token scalars (log-partition and entropy) for backward, which recomputes
  the softmax chunk by chunk;
- each rank reduces its shard to per-token partials relative to its LOCAL max, so the whole pass
  needs exactly two collectives over the TP group (MAX of the local maxes, then one SUM of
  [sum-exp, sum p*z, target logit] rescaled to the global max) and never gathers the vocabulary.
  Backward needs no communication: it only uses the global per-token scalars.

Gradients, with p = softmax(z), H = logZ - E_p[z], for one token:
  d logp / dz_v = onehot(target)_v - p_v
  d H    / dz_v = -p_v (log p_v + H)
and d/dlogits = d/dz / temperature.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

_FP32 = torch.float32


def _tp_rank_size(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def _shifted_scaled(raw_cV: Tensor, shift_c: Tensor, inv_t: float) -> Tensor:
    """In place: raw / temperature + shift, as one pass. raw must be an fp32 work buffer: scaling
    the bf16 logits directly would round the quotient to bf16 before it is widened."""
    if inv_t == 1.0:
        return raw_cV.add_(shift_c[:, None])
    return torch.add(shift_c[:, None], raw_cV, alpha=inv_t, out=raw_cV)


def _local_targets(targets_N: Tensor, vocab_start: int, v_local: int) -> tuple[Tensor, Tensor]:
    """Targets relative to this shard, clamped to a safe index, and whether the shard owns them."""
    local_N = targets_N - vocab_start
    owned_N = (local_N >= 0) & (local_N < v_local)
    return local_N.clamp(0, v_local - 1), owned_N


def _forward_partials(logits_NV, targets_N, vocab_start, temperature, chunk_size) -> Tensor:
    """Per-token partials of this shard, [4, N] fp32: local max m, sum exp(z-m),
    sum exp(z-m) (z-m), and the target logit z_t (0 where another shard owns the target).

    sum e (z - m) needs z and e = exp(z - m) at once, so this pass walks half-chunks with two
    fp32 buffers: the same chunk_size * V_local floats as backward's one buffer. (One buffer and
    e * log e instead of e * z would be as exact, but xlogy is ~6x slower than mul on CPU.)
    """
    n_tokens, v_local = logits_NV.shape
    partials_4N = torch.empty(4, n_tokens, dtype=_FP32, device=logits_NV.device)
    step = max(1, min(chunk_size // 2, n_tokens))
    z_buf = torch.empty(step, v_local, dtype=_FP32, device=logits_NV.device)
    e_buf = torch.empty_like(z_buf)
    local_N, owned_N = _local_targets(targets_N, vocab_start, v_local)
    inv_t = 1.0 / temperature
    for start in range(0, n_tokens, step):
        sl = slice(start, min(start + step, n_tokens))
        # fp32 copy into the work buffer (a fresh buffer, so fp32 logits are never modified).
        raw = z_buf[: sl.stop - start].copy_(logits_NV[sl])
        max_c = raw.amax(dim=-1) * inv_t
        z_t = raw.gather(1, local_N[sl, None]).squeeze(1) * inv_t
        z = _shifted_scaled(raw, -max_c, inv_t)  # z - max, with z = logits / temperature
        e = torch.exp(z, out=e_buf[: sl.stop - start])
        partials_4N[0, sl] = max_c
        partials_4N[1, sl] = e.sum(dim=-1)
        partials_4N[2, sl] = z.mul_(e).sum(dim=-1)
        partials_4N[3, sl] = torch.where(owned_N[sl], z_t, 0.0)
    return partials_4N


def _combine_partials(partials_4N: Tensor, tp_group, tp_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Global (logZ, entropy, target logit), each [N], from every shard's partials (2 collectives)."""
    local_max_N, sum_exp_N, sum_ez_N, z_t_N = partials_4N
    global_max_N = local_max_N.clone()
    if tp_size > 1:
        dist.all_reduce(global_max_N, op=dist.ReduceOp.MAX, group=tp_group)
    # Move this shard's sums from its local max m_r to the global max M:
    #   sum e^(z-M) = a * s_r,  sum e^(z-M) (z-M) = a * (w_r + (m_r - M) s_r),  a = e^(m_r - M) <= 1.
    shift_N = local_max_N - global_max_N
    scale_N = torch.exp(shift_N)
    sums_3N = torch.stack([scale_N * sum_exp_N, scale_N * (sum_ez_N + shift_N * sum_exp_N), z_t_N])
    if tp_size > 1:
        dist.all_reduce(sums_3N, op=dist.ReduceOp.SUM, group=tp_group)
    total_exp_N, total_ez_N, target_z_N = sums_3N
    log_total_N = torch.log(total_exp_N)
    log_z_N = global_max_N + log_total_N
    # H = logZ - E_p[z] = log S - E_p[z - M], with E_p[z - M] = total_ez / S.
    entropy_N = log_total_N - total_ez_N / total_exp_N
    return log_z_N, entropy_N, target_z_N


def _chunk_grad(log_p: Tensor, spare: Tensor | None, g_logp, g_ent, ent) -> Tensor:
    """d loss / dz without the one-hot part, in place in log_p [c, V_local] fp32, which it returns.
    g_logp, g_ent, ent are [c] or None, grads already divided by the temperature.

    Only log p needed: -g_logp p. With the entropy term: -p (g_ent (log p + H) + g_logp), which
    needs p and log p at once, so p goes into `spare`. (Writing the product straight into a bf16
    gradient with out= would not save memory: torch computes into an fp32 temporary first.)
    """
    if g_ent is None:
        return log_p.exp_().mul_(-g_logp[:, None])
    p = torch.exp(log_p, out=spare)
    offset = g_ent * ent if g_logp is None else g_ent * ent + g_logp
    return log_p.mul_(-g_ent[:, None]).sub_(offset[:, None]).mul_(p)


def _target_grad(log_p_t: Tensor, g_logp, g_ent, ent) -> Tensor:
    """The full gradient at each row's target entry, [c] fp32, computed from [c] tensors only:
    g_logp (1 - p_t) - g_ent p_t (log p_t + H). Writing it (rather than adding the one-hot
    g_logp to a rounded entry) keeps bf16 gradients to a single rounding."""
    p_t = log_p_t.exp()
    grad_t = g_logp * (1.0 - p_t)
    if g_ent is not None:
        grad_t = grad_t - g_ent * p_t * (log_p_t + ent)
    return grad_t


def _backward_chunks(ctx, grad_logp_N: Tensor | None, grad_ent_N: Tensor | None) -> Tensor:
    """d loss / d logits [N, V_local] in the logits' dtype, recomputing softmax per chunk.

    Work memory: fp32 logits use their own gradient rows as the buffer (nothing extra, one
    [chunk, V_local] buffer for the entropy term); other dtypes one fp32 [chunk, V_local] buffer, or
    two of half a chunk with the entropy term."""
    logits_NV, targets_N, log_z_N, entropy_N = ctx.saved_tensors
    n_tokens, v_local = logits_NV.shape
    inv_t = 1.0 / ctx.temperature
    grad_NV = torch.empty_like(logits_NV)
    device = logits_NV.device
    in_place = logits_NV.dtype == _FP32
    # Keep the work memory at chunk_size * V_local floats: two buffers -> half-chunks.
    two_buffers = grad_ent_N is not None and not in_place
    step = max(1, min(ctx.chunk_size // 2 if two_buffers else ctx.chunk_size, n_tokens))
    work = None if in_place else torch.empty(step, v_local, dtype=_FP32, device=device)
    spare = None if grad_ent_N is None else torch.empty(step, v_local, dtype=_FP32, device=device)
    local_N, owned_N = _local_targets(targets_N, ctx.vocab_start, v_local)
    # Fold 1/temperature into the upstream grads once instead of a pass over [chunk, V].
    g_logp_N = None if grad_logp_N is None else grad_logp_N.to(_FP32) * inv_t
    g_ent_N = None if grad_ent_N is None else grad_ent_N.to(_FP32) * inv_t
    for start in range(0, n_tokens, step):
        end = min(start + step, n_tokens)
        c, sl = end - start, slice(start, end)
        out = grad_NV[sl]
        buf = out if in_place else work[:c]
        log_p = _shifted_scaled(buf.copy_(logits_NV[sl]), -log_z_N[sl], inv_t)
        idx = local_N[sl, None]
        log_p_t = log_p.gather(1, idx).squeeze(1)  # before _chunk_grad consumes log_p
        g_logp = None if g_logp_N is None else g_logp_N[sl]
        g_ent = None if g_ent_N is None else g_ent_N[sl]
        grad_c = _chunk_grad(log_p, None if spare is None else spare[:c], g_logp, g_ent, entropy_N[sl])
        if not in_place:
            out.copy_(grad_c)
        if g_logp is not None:
            # The one-hot part of d logp/dz, only where this shard owns the target (no host sync:
            # other rows rewrite their current value).
            # index_put_, not scatter_: on CPU a bf16 scatter_ makes an fp32 copy of the whole chunk.
            exact_t = _target_grad(log_p_t, g_logp, g_ent, entropy_N[sl]).to(out.dtype)
            keep_t = out.gather(1, idx).squeeze(1)
            rows_c = torch.arange(c, device=device)
            out.index_put_((rows_c, local_N[sl]), torch.where(owned_N[sl], exact_t, keep_t))
    return grad_NV


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    """logits_NV [N, V_local], targets_N [N] -> (logp_N, entropy_N), both fp32."""

    @staticmethod
    def forward(ctx, logits_NV, targets_N, tp_group, temperature, chunk_size, entropy_grad):
        tp_rank, tp_size = _tp_rank_size(tp_group)
        vocab_start = tp_rank * logits_NV.shape[-1]
        partials_4N = _forward_partials(logits_NV, targets_N, vocab_start, temperature, chunk_size)
        log_z_N, entropy_N, target_z_N = _combine_partials(partials_4N, tp_group, tp_size)
        logp_N = target_z_N - log_z_N
        ctx.save_for_backward(logits_NV, targets_N, log_z_N, entropy_N)
        ctx.temperature, ctx.chunk_size, ctx.vocab_start = temperature, chunk_size, vocab_start
        # Unused outputs then get grad None instead of zeros: no wasted pass over [chunk, V].
        ctx.set_materialize_grads(False)
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy_N)
        return logp_N, entropy_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp_N, grad_ent_N):
        if grad_logp_N is None and grad_ent_N is None:
            return None, None, None, None, None, None
        return _backward_chunks(ctx, grad_logp_N, grad_ent_N), None, None, None, None, None


def vocab_parallel_logprobs_entropy(
    logits: Tensor,
    targets: Tensor,
    tp_group=None,
    *,
    temperature: float = 1.0,
    chunk_size: int = 512,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-token log-prob of `targets` and full-vocabulary entropy of softmax(logits / temperature).

    Args:
        logits: [..., V_local] any float dtype (bf16/fp16/fp32), this rank's vocabulary shard:
            ids [r * V_local, (r + 1) * V_local) for TP rank r. Must be finite. Not modified.
        targets: [...] int64 GLOBAL vocab ids. Ids outside [0, V) (e.g. an ignore index on padding)
            are allowed: their logp is -logZ, finite and meaningless; mask them in the loss.
        tp_group: the tensor-parallel process group the vocabulary is sharded over; None = no TP.
        temperature: the sampling temperature; > 0.
        chunk_size: tokens per chunk; the work memory is chunk_size * V_local * 4 bytes (0.29 GiB
            at V_local = 151,936: ~0.05x naive's extra memory at T = 4096, bench/results/logprobs.md).
        entropy_grad: whether the entropy output carries a gradient (off when it only modulates).

    Returns:
        (logp [...] fp32 with grad, entropy [...] fp32), identical on every rank of the TP group.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} + [V_local]")
    lead_shape = targets.shape
    logits_NV = logits.reshape(-1, logits.shape[-1])
    targets_N = targets.reshape(-1).long()
    if logits_NV.shape[0] == 0:
        empty = logits_NV.sum(dim=-1).float()
        return empty.view(lead_shape), empty.detach().view(lead_shape)
    logp_N, entropy_N = _VocabParallelLogprobsEntropy.apply(
        logits_NV, targets_N, tp_group, float(temperature), int(chunk_size), bool(entropy_grad)
    )
    return logp_N.view(lead_shape), entropy_N.view(lead_shape)
