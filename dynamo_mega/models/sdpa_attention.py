"""The policy's core attention: megatron-core's local `DotProductAttention` computed by torch's fused
`scaled_dot_product_attention` (flash / memory-efficient kernels on CPU and GPU) instead of its unfused
baddbmm + masked softmax + bmm.

Same inputs, outputs, parameters (none) and checkpoint layout as the module it replaces in the local layer spec
(`models.qwen.layer_spec`); the same math to fp32 round-off (tests/test_sdpa_attention.py). Why: the unfused path
materialises [b, heads, s, s] scores, probabilities and their gradients, plus the GQA key/value repeat. On the
2-core CPU the whole policy step takes 0.94x as long at 96 tokens per sequence (bench/results/attention.md; no
change at 12), and on a GPU without Transformer Engine the unfused path is what ran out of memory at 8 x 1024 tokens
(docs/gpu.md).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SdpaDotProductAttention(DotProductAttention):
    """[sq, b, np, hn] query, [sk, b, ng, hn] key/value, Megatron's bool mask (True = masked out, [b, 1, sq, sk],
    or None for causal) -> context [sq, b, np * hn]."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.softmax_type != "vanilla" or self.scale_mask_softmax.window_size is not None:
            raise NotImplementedError("SdpaDotProductAttention: plain softmax attention only (no softmax offset, no window)")
        # With apply_query_key_layer_scaling Megatron divides the scale by the layer number and its softmax multiplies
        # the scores back: the product is the scale the scores get.
        self.scores_scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ) -> torch.Tensor:
        assert packed_seq_params is None and attention_bias is None, "packed_seq_params / attention_bias: not supported"
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        dropout = self.attention_dropout.p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout else contextlib.nullcontext():
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=None if attention_mask is None else attention_mask.logical_not(),
                dropout_p=dropout,
                is_causal=attention_mask is None,
                scale=self.scores_scale,
                enable_gqa=k.size(1) != q.size(1),
            )
        sq, b = query.size(0), query.size(1)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
