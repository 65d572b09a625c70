"""The policy on megatron-core: build the GPTModel shard of this rank, run it, export HF-named weights.

Forward returns vocab-parallel logits [B, S, V/tp]; log-probs and entropy are computed from them by
parallel/logprobs.py without gathering the vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dynamo_mega.config import ModelConfig
from dynamo_mega.models import qwen
from dynamo_mega.parallel.groups import ParallelGroups

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_policy(model_cfg: ModelConfig, groups: ParallelGroups, *, seed: int):
    """GPTModel for this rank. Weights depend only on `seed` (full weights are initialised on every rank with
    the same CPU generator and sliced), so TP=1 and TP=2 start from identical parameters."""
    from megatron.core.models.gpt import GPTModel

    arch = qwen.arch_from_model_config(model_cfg)
    config = qwen.transformer_config(
        arch, tp=groups.tp_size, pp=1, params_dtype=_DTYPES[model_cfg.params_dtype], init_std=model_cfg.init_std
    )
    torch.manual_seed(seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=qwen.layer_spec(arch, use_te=False),
        vocab_size=qwen.padded_vocab_size(arch.vocab_size, groups.tp_size),
        max_sequence_length=arch.max_position_embeddings,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
    )
    return model.to(groups.device), arch


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
    """Every parameter with its TP shards concatenated in rank order along the partition dim (all ranks)."""
    full = {}
    for name, param in model.named_parameters():
        if getattr(param, "tensor_model_parallel", False) and groups.tp_size > 1:
            shards = [torch.empty_like(param) for _ in range(groups.tp_size)]
            dist.all_gather(shards, param.detach().contiguous(), group=groups.tp_group)
            full[name] = torch.cat(shards, dim=param.partition_dim)
        else:
            full[name] = param.detach().clone()
    return full


def export_hf_state(model, arch: qwen.QwenArch, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """HF-named full tensors (collective over the TP group: call on every rank)."""
    return qwen.megatron_to_hf(gather_full_state(model, groups), arch, groups.tp_size)


def grad_norm_sq_local(model, groups: ParallelGroups) -> torch.Tensor:
    """Sum of squared gradients of this rank's shard, counting TP-replicated parameters once per TP group."""
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            replicated += sq
    if groups.tp_size > 1:
        dist.all_reduce(sharded, group=groups.tp_group)
    return sharded + replicated


def clip_grad_norm_(model, max_norm: float, groups: ParallelGroups) -> float:
    """Clip by the global L2 norm of the full (unsharded) gradient; returns the norm before clipping."""
    norm = grad_norm_sq_local(model, groups).sqrt().item()
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm
