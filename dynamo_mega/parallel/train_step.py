"""One optimizer step of the policy over micro-batches: log-probs, (modulated) advantages, loss, backward,
gradient sync over DP, clipping, AdamW.

Loss normalisation contract (house rule 7): each micro-batch contributes sum(token losses) / G where G is the
valid-token count of the whole step on all DP ranks, and gradients are SUM-all-reduced over DP, so any
micro-batch split and any DP size give the gradient of the same global token mean.

Modulation factors come from the policy being updated, in every PPO mini-batch; the ratio of the loss is against
the behaviour log-probs (`policy_step`'s `old`). The train-inference mismatch correction (rl/mismatch.py) weighs
each token's loss term by the behaviour log-probs against the engine's (MicroBatch.rollout_logp), after the
modulation: the modulation never sees the engine's log-probs, and the weights never see the current ones.

Every pass over the micro-batches, at every PP size, is Megatron's schedule (parallel/pipeline.py: no pipelining at
PP=1, 1F1B above): the loss, modulation and metrics exist on the last stage (at PP=1, the only one) and every rank
gets the last stage's stats.

Samples with a zero advantage at every token may be left out of the training pass (`policy_step`'s `skipped`,
parallel/work_skipping.py): they still count in G, so the update is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dynamo_mega.parallel import pipeline, work_skipping
from dynamo_mega.parallel.groups import ParallelGroups
from dynamo_mega.parallel.logprobs import vocab_parallel_logprobs_entropy
from dynamo_mega.parallel.policy import clip_grad_norm_, forward_logits
from dynamo_mega.rl.loss import global_token_count, policy_loss, reduce_loss_metrics
from dynamo_mega.rl.mismatch import mismatch_correction
from dynamo_mega.rl.modulation import ModulationStats, modulate_micro_batches, modulation_stats


@dataclass
class MicroBatch:
    """A slice of the step's samples, trimmed to its own longest sequence. All tensors [B, S]."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor  # per token (sequence advantage broadcast over response tokens)
    rollout_logp: torch.Tensor
    segments: torch.Tensor | None = None  # packed rows only: sample id within the row, -1 on padding (packing.py)


def split_micro_batches(input_ids_NS, targets_NS, mask_NS, adv_N, rollout_logp_NS, micro_batch_size: int) -> list[MicroBatch]:
    out = []
    for start in range(0, input_ids_NS.shape[0], micro_batch_size):
        sl = slice(start, start + micro_batch_size)
        mask = mask_NS[sl]
        # Positions after the last response token predict nothing we train on (causal model): drop them.
        last = int(mask.any(dim=0).nonzero().max().item()) + 1 if mask.any() else 1
        out.append(
            MicroBatch(
                input_ids=input_ids_NS[sl, :last],
                targets=targets_NS[sl, :last],
                mask=mask[:, :last],
                advantages=adv_N[sl, None].expand(-1, last).float() * mask[:, :last],
                rollout_logp=rollout_logp_NS[sl, :last],
            )
        )
    return out


def empty_micro_batch() -> MicroBatch:
    """One padding token and nothing to learn: lets a rank without samples join the step's collectives."""
    zeros = torch.zeros(1, 1)
    return MicroBatch(zeros.long(), zeros.long(), zeros.bool(), zeros, zeros, segments=torch.full((1, 1), -1))


def token_logprobs(model, mb: MicroBatch, groups: ParallelGroups, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [B, S] with grad, entropy [B, S]) of each position's target under the current policy: one micro-batch's
    forward outside Megatron's schedule, for callers that measure or check the step (bench/, tests). PP=1 only."""
    assert groups.pp_size == 1, "a pipeline stage's forward gives hidden states, not logits: use the schedule"
    logits = forward_logits(model, mb.input_ids, mb.segments)
    tp_group = groups.tp_group if groups.tp_size > 1 else None
    return vocab_parallel_logprobs_entropy(logits, mb.targets, tp_group, temperature=temperature)


@torch.no_grad()
def old_logprobs(model, micro_batches: list[MicroBatch], groups: ParallelGroups, temperature: float):
    """Log-probs and entropies under the model's present weights from one forward-only pass of Megatron's schedule,
    the last stage's result on every stage. Called before a rollout batch's first optimizer step, these are the
    behaviour (pre-update) policy's."""
    return pipeline.broadcast_from_last_stage(_schedule_logprobs(model, micro_batches, groups, temperature), groups)


def engine_logprobs(micro_batches: list[MicroBatch]) -> tuple[list[torch.Tensor], None]:
    """The engine's recorded log-probs (MicroBatch.rollout_logp) as `policy_step`'s `old`, in place of an
    `old_logprobs` pass: exact only where parallel/work_skipping.engine_behaviour_logprobs says so. No entropies:
    `policy_step` takes every entropy from the policy being updated."""
    return [mb.rollout_logp for mb in micro_batches], None


@torch.no_grad()
def _schedule_logprobs(model, micro_batches: list[MicroBatch], groups: ParallelGroups, temperature: float):
    """(log-probs, entropies) per micro-batch, detached, on the last stage; None on the others."""
    model.eval()
    logp, entropy = [], []
    tp_group = groups.tp_group if groups.tp_size > 1 else None

    def on_logits(i: int, logits_BSV: torch.Tensor) -> torch.Tensor:
        lp, ent = vocab_parallel_logprobs_entropy(logits_BSV, micro_batches[i].targets, tp_group, temperature=temperature)
        logp.append(lp.detach())
        entropy.append(ent.detach())
        return torch.zeros((), device=logits_BSV.device)

    pipeline.run_schedule(model, micro_batches, on_logits, forward_only=True)
    return (logp, entropy) if groups.is_last_stage else None


def sync_and_step(model, optimizer, scheduler, groups: ParallelGroups, grad_clip: float) -> tuple[float, bool]:
    """SUM-all-reduce grads over DP, clip, step. A non-finite gradient norm skips the update (returns False)."""
    if hasattr(optimizer, "ddp"):  # GPU: Megatron's grad buffers, optimizer and LR schedule (megatron_optimizer.py)
        return optimizer.step()
    if groups.dp_size > 1:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=groups.dp_group)
    norm = clip_grad_norm_(model, grad_clip, groups)
    ok = math.isfinite(norm)
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return norm, ok


def policy_step(
    model,
    optimizer,
    scheduler,
    micro_batches: list[MicroBatch],
    groups: ParallelGroups,
    *,
    algo,
    temperature: float,
    grad_clip: float,
    modulation=None,
    old: tuple[list[torch.Tensor], list[torch.Tensor] | None] | None = None,
    mismatch=None,
    skipped: list[MicroBatch] | None = None,
) -> dict[str, float]:
    """One optimizer step over `micro_batches`. `modulation`: a ModulationConfig or None. `mismatch`: a
    MismatchConfig or None (no correction; the mismatch metrics are logged either way). `old`: the behaviour
    (pre-update) (log-probs, entropies) per micro-batch, taken before the rollout batch's first optimizer step
    (`old_logprobs`, or `engine_logprobs` where exact); required when an earlier step has already changed the
    weights. None: these weights ARE the behaviour policy. Only the log-probs of `old` are used.
    `skipped`: this rank's samples of the step with a zero advantage at every token, left out of the training pass
    (parallel/work_skipping.py): their tokens count in the global token mean, and where DynaMO's `global` scope
    takes its entropy range over them too, one forward-only pass gives their entropies. The loss metrics are then
    means over the trained tokens (stats `trained_tokens`); `num_tokens` is the normalisation's count.

    The PPO ratio is against `old`; the modulation factors (r_t, pi_t, H_t, ALGORITHM.md sections 2 and 5) come
    from the policy being updated, detached, as in the reference. The training pass is Megatron's schedule for
    this PP size (no pipelining at PP=1, 1F1B above), with each micro-batch's loss in its loss function on the last
    stage; then the tied-embedding gradient sum between the stages, the DP sync, clipping (over all stages) and the
    step. The stats are the last stage's, on every rank."""
    dp_group = groups.dp_group if groups.dp_size > 1 else None
    skipped = skipped or []
    assert not skipped or not work_skipping.microbatch_scope(modulation), "per-micro-batch statistics need every sample"
    # Before any modulation collective, on every path: DP ranks may take different paths below (their
    # micro-batch counts can differ) and must still issue their DP all-reduces in one order.
    num_tokens = global_token_count([mb.mask for mb in micro_batches + skipped], dp_group)  # each stage's DP group
    extra_stats = _skipped_entropy_range(model, skipped, groups, temperature, modulation)
    modulate = _modulator(dp_group, algo, modulation, extra_stats)
    old_logp, advantages, mod_metrics = _prepare_modulation(model, micro_batches, groups, temperature, old, modulation, modulate)
    tp_group = groups.tp_group if groups.tp_size > 1 else None
    losses, metrics = [], []

    def on_logits(i: int, logits_BSV: torch.Tensor) -> torch.Tensor:
        mb = micro_batches[i]
        logp, entropy = vocab_parallel_logprobs_entropy(logits_BSV, mb.targets, tp_group, temperature=temperature)
        # No behaviour log-probs: one micro-batch on the behaviour weights, this training forward IS the pre-update
        # pass (same weights): reuse it instead of running the model twice; current == behaviour, r_t = 1.
        olp = old_logp[i] if old_logp is not None else logp.detach()
        adv = _micro_batch_advantages(i, mb, logp, entropy, olp, advantages, modulate, mod_metrics)
        loss, m = _micro_batch_loss(logp, mb, olp, entropy, adv, algo, num_tokens, mismatch)
        losses.append(loss.item())
        metrics.append(m)
        return loss

    model.train()
    pipeline.run_schedule(model, micro_batches, on_logits, forward_only=False)
    pipeline.allreduce_tied_embedding_grad(model, groups)
    grad_norm, stepped = sync_and_step(model, optimizer, scheduler, groups, grad_clip)
    stats = None
    if groups.is_last_stage:
        stats = _policy_stats(metrics, sum(losses, 0.0), grad_norm, stepped, mod_metrics, dp_group, num_tokens)
    return pipeline.broadcast_from_last_stage(stats, groups)


def _skipped_entropy_range(model, skipped, groups, temperature, modulation) -> list[ModulationStats]:
    """Partial modulation statistics of the skipped samples' tokens under the present weights (last stage; [] on
    the others and where the modulation needs none of them): their entropy range, and max X = 0 (their xi_t = 0)."""
    if not skipped or not work_skipping.needs_entropy_range(modulation):
        return []
    current = _schedule_logprobs(model, skipped, groups, temperature)
    if current is None:
        return []
    return [modulation_stats(ent, torch.zeros_like(ent), mb.mask) for ent, mb in zip(current[1], skipped, strict=True)]


def _prepare_modulation(model, micro_batches, groups, temperature, old, modulation, modulate):
    """(behaviour log-probs per micro-batch, token advantages per micro-batch, modulation metric sums) on the last
    stage, before the training pass. Log-probs None: the training forward of the one micro-batch is the behaviour
    pass. Advantages None: each micro-batch is modulated from its own training forward, in the loss function
    (`_micro_batch_advantages`). Other stages have no logits: (None, None, {})."""
    if old is None and len(micro_batches) == 1:
        return None, None, {}
    if old is not None and not (_global_scope(modulation) and len(micro_batches) > 1):
        return old[0], None, {}  # the training forward of each micro-batch gives its own factors
    # Either these weights are the behaviour policy (one no-grad pass gives logp_old and the factors' inputs), or
    # the `global` scope over several micro-batches needs the CURRENT log-probs and entropies of every micro-batch
    # before the first backward: keeping every micro-batch's autograd graph until then would hold the activations
    # of the whole mini-batch at once (what micro-batching exists to avoid), and the 1F1B schedule interleaves
    # backwards with forwards anyway, so pay one no-grad forward of the current policy (bench/results/train_step.md).
    current = _schedule_logprobs(model, micro_batches, groups, temperature)
    if current is None:
        return None, None, {}
    old_logp = current[0] if old is None else old[0]
    advantages, mod_metrics = modulate(micro_batches, current[0], old_logp, current[1])
    return old_logp, advantages, mod_metrics


def _global_scope(modulation) -> bool:
    """Modulation on, with statistics over the whole step: one micro-batch's factors depend on every forward."""
    return modulation is not None and modulation.enabled and modulation.scope == "global"


def _micro_batch_advantages(i, mb, logp_BS, entropy_BS, old_logp_BS, advantages, modulate, mod_metrics):
    """Micro-batch i's token advantages: precomputed, or modulated from this very training forward (detached),
    with this micro-batch's statistics alone: the `microbatch` scope, or `global` with one micro-batch (then its
    statistics, all-reduced over DP inside `modulate`, are the step's)."""
    if advantages is not None:
        return advantages[i]
    adv, metrics = modulate([mb], [logp_BS.detach()], [old_logp_BS], [entropy_BS.detach()])
    for key, value in metrics.items():
        mod_metrics[key] = mod_metrics.get(key, 0.0) + value
    return adv[0]


def _modulator(dp_group, algo, modulation, extra_stats: list[ModulationStats]):
    """modulate(micro_batches, logp, old_logp, entropy) -> (token advantages per micro-batch, metric sums): DynaMO
    modulation when enabled (factors from logp, entropy; r_t = exp(logp - old_logp)), the plain advantages else.
    `extra_stats`: the skipped samples' statistics, part of the `global` scope's (`_skipped_entropy_range`)."""

    def modulate(micro_batches, logp, old_logp, entropy):
        advantages = [mb.advantages for mb in micro_batches]
        if modulation is None or not modulation.enabled:
            return advantages, {}
        return modulate_micro_batches(
            advantages,
            logp,
            old_logp,
            entropy,
            [mb.mask for mb in micro_batches],
            scope=modulation.scope,
            dp_group=dp_group,
            variant=modulation.variant,
            eps_low=algo.eps_low,
            eps_high=algo.eps_high,
            mu_max=modulation.mu_max,
            lambda_min=modulation.lambda_min,
            gamma=modulation.gamma,
            tau=modulation.tau,
            segments=[mb.segments for mb in micro_batches],
            extra_stats=extra_stats,
            entropy_range=modulation.entropy_range,
        )

    return modulate


def _micro_batch_loss(logp, mb: MicroBatch, olp, ent, adv, algo, num_tokens: float, mismatch=None):
    """Clipped loss of one micro-batch (its share of the global token mean) and its metric sums. The mismatch
    correction's weights come from the behaviour log-probs `olp` (p_t) against the engine's (q_t); they multiply the
    token losses of the (already modulated) advantages `adv`."""
    weight, corr_metrics = mismatch_correction(
        olp, mb.rollout_logp, mb.mask, segments_BS=mb.segments, **_correction_args(mismatch)
    )
    loss, m = policy_loss(
        logp,
        olp,
        adv,
        mb.mask,
        eps_low=algo.eps_low,
        eps_high=algo.eps_high,
        dual_clip_c=algo.dual_clip_c,
        num_global_tokens=max(num_tokens, 1.0),
        entropy=ent,
        token_weight=weight if mismatch is not None and mismatch.corrects() else None,
    )
    m.update(corr_metrics)
    m["mismatch_abs_sum"] = ((olp - mb.rollout_logp).abs() * mb.mask).sum()
    return loss, m


def _correction_args(mismatch) -> dict:
    """rl/mismatch.mismatch_correction's thresholds from a MismatchConfig (None: each correction off)."""
    if mismatch is None:
        return {}
    return {
        "token_is_cap": mismatch.token_is_cap if mismatch.token_is else None,
        "geometric_tau": mismatch.geometric_tau if mismatch.mask_geometric else None,
        "token_ratio_max": mismatch.token_ratio_max if mismatch.mask_token else None,
    }


def _policy_stats(
    metrics, loss_total: float, grad_norm: float, stepped: bool, mod_metrics: dict, dp_group, num_tokens: float
) -> dict[str, float]:
    out = reduce_loss_metrics(metrics, dp_group)
    out["trained_tokens"] = out.pop("num_tokens", 0.0)  # what the loss metrics are means over
    out["num_tokens"] = num_tokens  # the global token mean's count, skipped samples included
    out.update(loss=loss_total, grad_norm=grad_norm, skipped_step=float(not stepped))
    out["logprob_mismatch"] = out.pop("mismatch_abs", 0.0)  # mean |trainer - engine| log-prob per token
    keys = sorted(mod_metrics)  # the same keys on every DP rank (modulation on or off)
    if keys and dp_group is not None and dist.get_world_size(group=dp_group) > 1:  # means over the whole step
        sums = torch.stack([torch.as_tensor(mod_metrics[k], dtype=torch.float64) for k in keys])
        dist.all_reduce(sums, group=dp_group)
        mod_metrics = dict(zip(keys, sums, strict=True))
    for key in ("comp", "stab"):
        if f"{key}_count" in mod_metrics and mod_metrics[f"{key}_count"] > 0:
            out[f"modulation_{key}_mean"] = float(mod_metrics[f"{key}_sum"] / mod_metrics[f"{key}_count"])
    return out


def supervised_step(
    model, optimizer, scheduler, micro_batches: list[MicroBatch], groups: ParallelGroups, grad_clip: float
) -> dict[str, float]:
    """Teacher-forced cross-entropy on the masked (answer) tokens, global token mean (warm-up stage), through
    Megatron's schedule like `policy_step`; the stats are the same on every rank."""
    dp_group = groups.dp_group if groups.dp_size > 1 else None
    num_tokens = max(global_token_count([mb.mask for mb in micro_batches], dp_group), 1.0)
    tp_group = groups.tp_group if groups.tp_size > 1 else None
    losses = []

    def on_logits(i: int, logits_BSV: torch.Tensor) -> torch.Tensor:
        logp, _ = vocab_parallel_logprobs_entropy(logits_BSV, micro_batches[i].targets, tp_group, temperature=1.0)
        loss = -(logp * micro_batches[i].mask).sum() / num_tokens
        losses.append(loss.item())
        return loss

    model.train()
    pipeline.run_schedule(model, micro_batches, on_logits, forward_only=False)
    pipeline.allreduce_tied_embedding_grad(model, groups)
    grad_norm, _ = sync_and_step(model, optimizer, scheduler, groups, grad_clip)
    total = pipeline.broadcast_from_last_stage(sum(losses, 0.0) if groups.is_last_stage else None, groups)
    return {"sft_loss": total, "grad_norm": grad_norm}
