"""A bench-only reward term for bench/off_policy.py's generation-heavy config: a random-weight policy never
answers right, so math-verify gives every sample 0 and the policy step would have no advantage to train on. The
share of digits in the response varies between samples, so every group has a spread of rewards and the step
does the full forward and backward a learning run does. Not a task reward: it measures time only."""

from __future__ import annotations


def digit_share(completions: list[str], **kwargs) -> list[float]:
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]
