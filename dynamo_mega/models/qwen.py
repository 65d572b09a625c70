"""Qwen2 / Qwen2.5 / Qwen3 (dense) on megatron-core: architecture (HF config.json <-> TransformerConfig).

The tensor name and layout mapping (per tensor, per layer, TP shards, vocab padding) lives in
models/qwen_mapping.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # config.py validates through this module: a runtime import would be a cycle
    from dynamo_mega.config import ModelConfig


@dataclass(frozen=True)
class QwenArch:
    """The architecture facts both sides agree on (HF config.json <-> Megatron TransformerConfig)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_layernorm: bool
    head_dim: int
    model_type: str = "qwen2"

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


def arch_from_model_config(m: ModelConfig) -> QwenArch:
    if m.hf_checkpoint is not None:
        return arch_from_hf_config(m.hf_checkpoint)
    if m.hf_config is not None:
        return arch_from_hf_config(m.hf_config)
    return QwenArch(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rope_theta,
        rms_norm_eps=m.rms_norm_eps,
        tie_word_embeddings=m.tie_word_embeddings,
        qkv_bias=m.qkv_bias,
        qk_layernorm=m.qk_layernorm,
        head_dim=m.hidden_size // m.num_attention_heads,
        model_type="qwen3" if m.qk_layernorm else "qwen2",
    )


def arch_from_hf_config(path: str | Path) -> QwenArch:
    """Read a Qwen2/Qwen3 config.json (transformers 4.x `rope_theta` or 5.x `rope_parameters`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"model.hf_config: {path} not found; point it at a Hugging Face config.json or its folder")
    c = json.loads(path.read_text())
    model_type = c.get("model_type")
    if model_type not in ("qwen2", "qwen3"):
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; dynamo_mega handles qwen2 and qwen3 dense models")
    rope = c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    heads = c["num_attention_heads"]
    return QwenArch(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        num_layers=c["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=c.get("num_key_value_heads", heads),
        ffn_hidden_size=c["intermediate_size"],
        max_position_embeddings=c.get("max_position_embeddings", 32768),
        rope_theta=float(rope),
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        qkv_bias=model_type == "qwen2",
        qk_layernorm=model_type == "qwen3",
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        model_type=model_type,
    )


def hf_config_dict(arch: QwenArch, torch_dtype: str = "float32", eos_token_id: int | None = None) -> dict:
    """A transformers/vLLM-loadable config.json for `arch`."""
    cfg = {
        "architectures": ["Qwen3ForCausalLM" if arch.model_type == "qwen3" else "Qwen2ForCausalLM"],
        "model_type": arch.model_type,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": arch.rope_theta},
        "tie_word_embeddings": arch.tie_word_embeddings,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "use_cache": True,
    }
    if eos_token_id is not None:
        cfg["eos_token_id"] = eos_token_id
    return cfg


def transformer_config(
    arch: QwenArch,
    *,
    tp: int,
    pp: int,
    params_dtype: torch.dtype,
    init_std: float = 0.02,
    device: torch.device | str = "cpu",
):
    """Megatron TransformerConfig for `arch` (dropout off: RL recomputes log-probs and needs determinism).
    `device`: where Megatron allocates and initialises the parameters (ParallelGroups.device for the policy): on the
    CPU the full weights come from the CPU generator and are sliced (identical at every TP size); on a GPU Megatron
    initialises each shard there, from its CUDA RNG tracker."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        ffn_hidden_size=arch.ffn_hidden_size,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=params_dtype,  # hidden states sent between stages (PP > 1)
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        init_method_std=init_std,
        use_cpu_initialization=torch.device(device).type == "cpu",
        perform_initialization=True,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        sequence_parallel=False,
    )


def layer_spec(arch: QwenArch, use_te: bool = False):
    """Local (pure megatron-core) layer spec, its core attention computed by torch's fused SDPA
    (models/sdpa_attention.py); Transformer Engine's spec when use_te."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    from dynamo_mega.models.sdpa_attention import SdpaDotProductAttention

    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
    spec = specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SdpaDotProductAttention
    return spec


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 1) -> int:
    """Rows of the vocab-parallel embedding: a multiple of divisible_by * tp.

    Padded rows would be live softmax entries the rollout engine does not have, so the default pads only as
    much as TP needs (Qwen's 151,936 = 2^7 * 1187 needs none up to TP=128)."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple
