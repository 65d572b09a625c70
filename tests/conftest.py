"""Shared fixtures. Tests build tiny models from configs in code; nothing is downloaded."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_cfg():
    from dynamo_mega.config import ModelConfig

    return ModelConfig(
        vocab_size=32,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        max_position_embeddings=32,
    )
