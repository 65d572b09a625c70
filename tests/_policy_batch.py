"""A fixed random RL batch for policy-step tests: right-padded token ids with a 4-token prompt and responses of
random length, per-sample advantages and rollout log-probs (all seeded, identical in every process)."""

from __future__ import annotations

import torch


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
