"""Training data files: the shipped MATH train split loads (rows without answers are refused by name, or skipped
with data.drop_bad_rows), and problems are rendered through the real Qwen chat template."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_mega.config import DataConfig
from dynamo_mega.data import Prompt, load_splits, render_chat

REPO = Path(__file__).resolve().parents[1]
MATH = dict(source="file", train_path=str(REPO / "data/math_train/train.json"), prompt_key="problem", id_key=None)


def test_math_train_needs_bad_rows_dropped():
    with pytest.raises(ValueError, match=r"row 886: empty answer .*data.drop_bad_rows=true"):
        load_splits(DataConfig(**MATH))
    train, held_out = load_splits(DataConfig(**MATH, drop_bad_rows=True))
    assert len(train) == 7470 and held_out == []
    assert len({p.id for p in train}) == len(train) and all(p.answer for p in train)


def test_render_chat_uses_the_tokenizers_template():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO / "data/tokenizers/qwen2.5-math-1.5b")
    (p,) = render_chat([Prompt("a", "What is 2+3?", "5")], tokenizer, "Box it.")
    assert p.id == "a" and p.answer == "5"
    assert p.prompt == "<|im_start|>system\nBox it.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
