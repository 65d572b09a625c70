"""User reward functions for `algo.reward` (docs/rewards.md), written as for TRL's GRPOTrainer.

Each takes the response texts as `completions` and the sample's dataset columns as keyword lists aligned with
them (`answer`, `prompts`, ...), and returns one float per completion. Add one to math-verify with a weight:

    dynamo-mega train configs/tiny_cpu.yaml \
        'algo.reward=[{fn: math_verify}, {fn: examples/format_reward.py:format_reward, weight: 0.1}]'
"""

from __future__ import annotations

import re

_BOXED = "\\boxed{"


def _boxed_contents(text: str) -> list[str | None]:
    """The contents of every \\boxed{...} in text, in order; None for one whose braces never close."""
    out: list[str | None] = []
    start = text.find(_BOXED)
    while start != -1:
        depth, i = 1, start + len(_BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        out.append(text[start + len(_BOXED) : i - 1] if depth == 0 else None)
        start = text.find(_BOXED, i)
    return out


def format_reward(completions: list[str], **kwargs) -> list[float]:
    """1.0 when the response states exactly one answer, as one closed \\boxed{...} with something in it; else 0.0."""
    rewards = []
    for text in completions:
        boxes = _boxed_contents(text)
        rewards.append(1.0 if len(boxes) == 1 and boxes[0] else 0.0)
    return rewards


def exact_boxed_answer(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.0 when the last \\boxed{...} holds the dataset's `answer` column character for character (spaces aside):
    a stricter check than math-verify's, showing how a function reads a column."""
    rewards = []
    for text, gold in zip(completions, answer, strict=True):
        boxes = [b for b in _boxed_contents(text) if b is not None]
        said = re.sub(r"\s+", "", boxes[-1]) if boxes else None
        rewards.append(1.0 if said is not None and said == re.sub(r"\s+", "", str(gold)) else 0.0)
    return rewards
