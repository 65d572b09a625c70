"""The learning-rate schedule shared by both optimizers (torch AdamW on CPU, Megatron's on GPU): linear warm-up,
then constant, linear or cosine decay to min_lr. A pure function of the step, so either optimizer's state is just
the step count."""

from __future__ import annotations

import math

LR_DECAYS = ("constant", "linear", "cosine")


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, decay: str, min_ratio: float) -> float:
    """Multiplier of the peak lr after `step` optimizer steps (0-based): ramps to 1 over warmup_steps, then
    decays from 1 to min_ratio at total_steps (held there after)."""
    if decay not in LR_DECAYS:
        raise ValueError(f"optim.lr_decay={decay!r}: use one of {', '.join(LR_DECAYS)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape
