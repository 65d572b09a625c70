"""The policy on megatron-core: build the GPTModel shard of this rank, run it, export HF-named weights.

Forward returns vocab-parallel logits [B, S, V/tp]; log-probs and entropy are computed from them by
parallel/logprobs.py without gathering the vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dynamo_mega.config import ModelConfig
from dynamo_mega.models import qwen
from dynamo_mega.models import qwen_mapping as qm
from dynamo_mega.parallel.groups import ParallelGroups

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_policy(model_cfg: ModelConfig, groups: ParallelGroups, *, seed: int, random_init: bool = True):
    """GPTModel (this rank's TP shard of its pipeline stage). Weights depend only on `seed` (full weights are
    initialised on every rank with the same CPU generator and sliced), so TP=1 and TP=2 start from identical
    parameters; at PP > 1 the whole PP=1 model is built first, with the same seed, and the stage's tensors
    copied out of it, so every pipeline layout starts from the same parameters too (one full model per rank
    for a moment). random_init=False: the caller loads weights over the model (an HF checkpoint); at PP > 1
    the stage is then left uninitialised and no full model is built."""
    arch = qwen.arch_from_model_config(model_cfg)
    dtype = _DTYPES[model_cfg.params_dtype]
    torch.manual_seed(seed)
    full = None
    if groups.pp_size == 1 or random_init:
        config = _config(arch, model_cfg, groups, pp=1, dtype=dtype)
        full = _gpt_model(config, arch, groups.tp_size, pre_process=True, post_process=True)
    if groups.pp_size == 1:
        return full.to(groups.device), arch
    rng = torch.get_rng_state()
    config = _config(arch, model_cfg, groups, pp=groups.pp_size, dtype=dtype)
    config.perform_initialization = False  # every tensor is copied from `full` below (or loaded by the caller)
    # Megatron would sum the tied output copy with the embedding over the embedding group at build time, via
    # weight.data.cuda(); this flag skips that step (it has no other effect on the local layer spec) and the
    # copy gets the embedding's values below instead.
    config.init_model_with_meta_device = True
    stage = _gpt_model(config, arch, groups.tp_size, pre_process=groups.is_first_stage, post_process=groups.is_last_stage)
    if full is not None:
        _copy_stage_from_full(stage, full, arch.tie_word_embeddings)
    torch.set_rng_state(rng)
    return stage.to(groups.device), arch


def _config(arch: qwen.QwenArch, model_cfg: ModelConfig, groups: ParallelGroups, *, pp: int, dtype: torch.dtype):
    """TransformerConfig of the policy, allocated on this rank's device, set up for Megatron's schedule
    (parallel/pipeline.py), which runs every pass of the policy step at every PP size."""
    config = qwen.transformer_config(
        arch, tp=groups.tp_size, pp=pp, params_dtype=dtype, init_std=model_cfg.init_std, device=groups.device
    )
    config.variable_seq_lengths = True  # micro-batches are trimmed to their own length: stages exchange shapes
    # The loss is already the global token mean (rl/loss.py): the schedule must not rescale it, and Megatron's DDP
    # (the GPU optimizer) must SUM gradients over DP, which it does only with this flag (else it scales by 1 / DP).
    config.calculate_per_token_loss = True
    return config


def _gpt_model(config, arch: qwen.QwenArch, tp: int, *, pre_process: bool, post_process: bool):
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=qwen.layer_spec(arch, use_te=False),
        vocab_size=qwen.padded_vocab_size(arch.vocab_size, tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
    )


@torch.no_grad()
def _copy_stage_from_full(stage, full, tied: bool) -> None:
    """Copy every parameter of a pipeline stage from the PP=1 model (local layer ids -> global ones; the tied
    output copy of the last stage <- the embedding)."""
    source = dict(full.named_parameters())
    global_ids = {local: layer.layer_number - 1 for local, layer in enumerate(stage.decoder.layers)}
    for name, param in stage.named_parameters():
        split = qm.split_layer_name(name, qm.MCORE_LAYER_PREFIX)
        if split is not None:
            name = f"{qm.MCORE_LAYER_PREFIX}{global_ids[split[0]]}.{split[1]}"
        elif name == qm.OUTPUT and tied:
            name = qm.EMBED
        param.copy_(source[name])


def causal_mask(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """[B, 1, S, S] bool, True where attention is masked out (Megatron's convention).

    Right padding only: pad positions come after every real token, so the causal mask alone keeps them from
    influencing real positions, and their outputs are dropped by the loss mask."""
    return torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1).expand(batch, 1, seq, seq)


def packed_causal_mask(segments_BS: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool, True where masked: causal, and no attention across packed samples of a row
    (segments_BS: sample id per token; row padding, -1, only sees earlier padding)."""
    b, s = segments_BS.shape
    other_sample = segments_BS[:, None, :, None] != segments_BS[:, None, None, :]
    return causal_mask(b, s, segments_BS.device) | other_sample


def forward_logits(model, input_ids_BS: torch.Tensor, segments_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Vocab-parallel logits [B, S, V/tp] for right-padded token ids [B, S], or packed rows when segments_BS
    (sample id per token, parallel/packing.py) is given."""
    b, s = input_ids_BS.shape
    position_ids = torch.arange(s, device=input_ids_BS.device).expand(b, s)
    mask = causal_mask(b, s, input_ids_BS.device) if segments_BS is None else packed_causal_mask(segments_BS)
    return model(input_ids_BS, position_ids, mask)


@torch.no_grad()
def gather_full_state(model, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """Every parameter with its TP shards concatenated in rank order along the partition dim (all ranks).
    At PP > 1: the whole model, named with global layer ids, gathered from every stage (the last stage's copy
    of a tied embedding left out, as at PP=1)."""
    full = {}
    for name, param in model.named_parameters():
        if getattr(param, "tensor_model_parallel", False) and groups.tp_size > 1:
            shards = [torch.empty_like(param) for _ in range(groups.tp_size)]
            dist.all_gather(shards, param.detach().contiguous(), group=groups.tp_group)
            full[name] = torch.cat(shards, dim=param.partition_dim)
        else:
            full[name] = param.detach().clone()
    if groups.pp_size == 1:
        return full
    global_ids = {local: layer.layer_number - 1 for local, layer in enumerate(model.decoder.layers)}
    stage = {}
    for name, tensor in full.items():
        split = qm.split_layer_name(name, qm.MCORE_LAYER_PREFIX)
        if split is not None:
            stage[f"{qm.MCORE_LAYER_PREFIX}{global_ids[split[0]]}.{split[1]}"] = tensor.cpu()
        elif not (name == qm.OUTPUT and model.share_embeddings_and_output_weights):
            stage[name] = tensor.cpu()
    stages = [None] * groups.pp_size
    dist.all_gather_object(stages, stage, group=groups.pp_group)
    return {k: v.to(groups.device) for part in stages for k, v in part.items()}


def export_hf_state(model, arch: qwen.QwenArch, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """HF-named full tensors (collective over the TP group: call on every rank)."""
    return qm.megatron_to_hf(gather_full_state(model, groups), arch, groups.tp_size)


def grad_norm_sq_local(model, groups: ParallelGroups) -> torch.Tensor:
    """Sum of squared gradients of the whole model: this rank's shard, counting TP-replicated parameters once
    per TP group, and at PP > 1 summed over the pipeline stages (the last stage's copy of a tied embedding,
    marked `shared` by megatron, counted once, on the first stage)."""
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None or getattr(p, "shared", False):
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            replicated += sq
    if groups.tp_size > 1:
        dist.all_reduce(sharded, group=groups.tp_group)
    total = sharded + replicated
    if groups.pp_size > 1:
        total = total.to(groups.device)  # NCCL reduces device tensors only (a no-op on CPU)
        dist.all_reduce(total, group=groups.pp_group)
    return total.cpu()


def clip_grad_norm_(model, max_norm: float, groups: ParallelGroups) -> float:
    """Clip by the global L2 norm of the full (unsharded) gradient; returns the norm before clipping."""
    norm = grad_norm_sq_local(model, groups).sqrt().item()
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm
