"""A fixed random RL batch for policy-step tests: right-padded token ids with a 4-token prompt and responses of
random length, per-sample advantages and rollout log-probs (all seeded, identical in every process); and the tiny
policy those tests train on."""

from __future__ import annotations

import torch

from dynamo_mega.config import ModelConfig


def policy_batch(n: int, s: int, vocab: int = 32):
    """(input_ids [n, s], targets [n, s], mask [n, s], advantages [n], rollout log-probs [n, s])."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, vocab, (n, s), generator=g)
    prompt_len = 4
    lengths = torch.randint(2, s - prompt_len, (n,), generator=g)
    pos = torch.arange(s)
    mask = (pos[None, :] >= prompt_len - 1) & (pos[None, :] < prompt_len - 1 + lengths[:, None])
    adv = torch.randn(n, generator=g)
    rollout_logp = -torch.rand(n, s, generator=g) * mask
    return ids, ids.roll(-1, 1), mask, adv, rollout_logp


def tiny_model_config(**overrides) -> ModelConfig:
    """A Qwen2-shaped policy small enough for several gloo processes on 2 cores (vocab = policy_batch's)."""
    shape = dict(vocab_size=32, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=128, max_position_embeddings=32)  # fmt: skip
    return ModelConfig(**{**shape, **overrides})
