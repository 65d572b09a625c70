"""The policy's fused-SDPA core attention (models/sdpa_attention.py) equals megatron-core's unfused
DotProductAttention: the whole policy's logits and every gradient, on right-padded rows (causal mask) and on packed
rows (block-causal mask), with grouped-query attention; and the module alone with Megatron's own causal default
(mask None) and with query-key layer scaling."""

from __future__ import annotations

import torch
from _gloo import run_gloo

from dynamo_mega.config import ModelConfig

CFG = ModelConfig(
    vocab_size=32,
    hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=2,  # GQA: two query heads per key/value head
    ffn_hidden_size=128,
    max_position_embeddings=32,
)


def _policy_both_ways(rank: int, world: int) -> dict:
    from megatron.core import parallel_state
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from dynamo_mega.models import qwen
    from dynamo_mega.models.sdpa_attention import SdpaDotProductAttention
    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy, forward_logits

    groups = init_parallel(1, seed=0)
    ids = torch.randint(0, 32, (3, 11), generator=torch.Generator().manual_seed(1))
    segments = torch.tensor([[0] * 4 + [1] * 5 + [-1] * 2, [0] * 11, [0] * 2 + [1] * 2 + [2] * 7])
    spec_of = qwen.layer_spec
    out = {}
    for name, core in (("sdpa", SdpaDotProductAttention), ("megatron", DotProductAttention)):

        def spec(arch, use_te=False, core=core):
            s = spec_of(arch, use_te)
            s.submodules.self_attention.submodules.core_attention = core
            return s

        qwen.layer_spec = spec
        try:
            model, _ = build_policy(CFG, groups, seed=7)
        finally:
            qwen.layer_spec = spec_of
        attention = model.decoder.layers[0].self_attention.core_attention
        assert type(attention) is core
        for rows in ("padded", "packed"):
            model.zero_grad()
            logits = forward_logits(model, ids, segments if rows == "packed" else None)
            (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
            out[name, rows] = (logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
    parallel_state.destroy_model_parallel()
    return out


def test_sdpa_policy_equals_megatron_unfused_attention_values_and_gradients():
    out = run_gloo(_policy_both_ways, 1)[0]
    for rows in ("padded", "packed"):
        (logits, grads), (ref_logits, ref_grads) = out["sdpa", rows], out["megatron", rows]
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=f"{rows}: {name}")
        assert any(g.abs().sum() > 0 for g in grads.values())
    assert not torch.equal(out["sdpa", "padded"][0], out["sdpa", "packed"][0]), "the packed mask must change the logits"


def _module_both_ways(rank: int, world: int) -> dict:
    from megatron.core import parallel_state
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from dynamo_mega.models import qwen
    from dynamo_mega.models.sdpa_attention import SdpaDotProductAttention
    from dynamo_mega.parallel.groups import init_parallel

    init_parallel(1, seed=0)
    arch = qwen.arch_from_model_config(CFG)
    config = qwen.transformer_config(arch, tp=1, pp=1, params_dtype=torch.float32, init_std=0.02, device="cpu")
    config.apply_query_key_layer_scaling = True
    config.attention_softmax_in_fp32 = True
    g = torch.Generator().manual_seed(3)
    s, b, hn = 9, 2, arch.head_dim
    q = torch.randn(s, b, 4, hn, generator=g)
    k, v = torch.randn(s, b, 2, hn, generator=g), torch.randn(s, b, 2, hn, generator=g)
    mask = torch.ones(s, s, dtype=torch.bool).triu(1).expand(b, 1, s, s)
    out = {}
    for cls in (SdpaDotProductAttention, DotProductAttention):
        layer = cls(config, layer_number=3, attn_mask_type=AttnMaskType.causal, attention_type="self")
        out[cls.__name__] = layer(q, k, v, mask)
        if cls is SdpaDotProductAttention:
            out["causal_default"] = layer(q, k, v, None)
    parallel_state.destroy_model_parallel()
    return out


def test_sdpa_module_scale_and_causal_default_match_megatron():
    out = run_gloo(_module_both_ways, 1)[0]
    torch.testing.assert_close(out["SdpaDotProductAttention"], out["DotProductAttention"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["causal_default"], out["DotProductAttention"], rtol=1e-5, atol=1e-6)
