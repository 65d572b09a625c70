"""Micro-batches through Megatron's schedule for every PP size (no pipelining at PP=1, 1F1B above), the
tied-embedding gradient sum between the first and last stage, and results shared from the last stage.

Every stage of a pipeline holds the same micro-batches (the trainer splits samples over DP ranks only): the
first stage embeds the token ids, later stages take the hidden states received from the previous stage, and
every stage builds the attention mask and positions from the micro-batch. Only the last stage has logits,
so log-probs, the loss and its metrics exist there; `broadcast_from_last_stage` gives them to the others.
At PP=1 the one stage is first and last, and the two other functions are no-ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from dynamo_mega.parallel.groups import ParallelGroups
from dynamo_mega.parallel.policy import forward_logits


def run_schedule(model, micro_batches: list, on_logits: Callable, *, forward_only: bool) -> None:
    """Megatron's schedule for this PP size over `micro_batches` (objects with input_ids [B, S] and segments):
    forward_backward_no_pipelining at PP=1 (forward, then backward, micro-batch after micro-batch), the
    non-interleaved 1F1B schedule above. On the last stage on_logits(i, logits_BSV) is called for micro-batch i
    in order and returns its 0-dim loss, which the schedule back-propagates (forward_only=False; run under
    torch.no_grad() otherwise).

    The model's config must have variable_seq_lengths (micro-batches differ in shape) and
    calculate_per_token_loss (the schedule then leaves the loss as it is, at every PP size: no division by the
    micro-batch count or a token count, which would break the loss contract of train_step.py): parallel/policy.py
    sets both."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    assert model.config.variable_seq_lengths and model.config.calculate_per_token_loss

    def forward_step(data_iterator, stage_model):
        i, mb = next(data_iterator)
        output = forward_logits(stage_model, mb.input_ids, mb.segments)  # hidden states [S, B, H] before the last stage

        def loss_func(logits_BSV):
            # (loss, token count, data): with calculate_per_token_loss the schedule divides by nothing.
            return on_logits(i, logits_BSV), torch.ones((), dtype=torch.int), None

        return output, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(enumerate(micro_batches)),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=max(mb.input_ids.shape[1] for mb in micro_batches),  # unused: stages exchange shapes
        micro_batch_size=max(mb.input_ids.shape[0] for mb in micro_batches),
        forward_only=forward_only,
    )


def allreduce_tied_embedding_grad(model, groups: ParallelGroups) -> None:
    """Tied embeddings at PP > 1: the first stage's embedding and the last stage's output copy are one
    parameter, so both get the SUM of their gradients (what PP=1 accumulates on its single tensor).

    Under Megatron's DDP (the GPU optimizer, parallel/megatron_optimizer.py) the gradient lives in the
    parameter's `main_grad` (a view of the fp32 grad buffer) and `.grad` stays None; it is summed in place there.
    Call this BEFORE the data-parallel gradient reduction: summing over the two stages first and over DP after is
    the global sum whatever the DP sharding of the buffers (the distributed optimizer reduce-scatters them, and
    the embedding need not sit in the same buffer range on both stages)."""
    if groups.embedding_group is None or not model.share_embeddings_and_output_weights:
        return
    weight = model.shared_embedding_or_output_weight()
    if getattr(weight, "main_grad", None) is not None:
        dist.all_reduce(weight.main_grad, group=groups.embedding_group)
        return
    grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
    dist.all_reduce(grad, group=groups.embedding_group)
    weight.grad = grad


def broadcast_from_last_stage(obj, groups: ParallelGroups):
    """`obj` of this pipeline's last stage, on every stage (a picklable object; PP=1: returned as is)."""
    if groups.pp_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=groups.pp_last_rank, group=groups.pp_group)
    return box[0]
