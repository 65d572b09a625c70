"""The Megatron policy at TP=2 (2 gloo processes) equals TP=1: logits, log-probs, gradients, HF export;
and TP=1 equals Hugging Face transformers' Qwen2 on the exported weights."""

from __future__ import annotations

import pytest
import torch
from _gloo import run_gloo

from dynamo_mega.config import ModelConfig

CFG = dict(
    vocab_size=32,
    hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    max_position_embeddings=32,
)


def _run_both(rank: int, world: int, tp: int) -> dict:
    """One spawn per TP size (imports dominate): tied and untied models in the same processes."""
    return {tied: _run_policy(tp, tied) for tied in (True, False)}


def _run_policy(tp: int, tied: bool) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from dynamo_mega.models.qwen_mapping import megatron_to_hf
    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.logprobs import vocab_parallel_logprobs_entropy
    from dynamo_mega.parallel.policy import build_policy, export_hf_state, forward_logits, gather_full_state

    groups = init_parallel(tp, seed=0)
    model, arch = build_policy(ModelConfig(**CFG, tie_word_embeddings=tied), groups, seed=7)
    ids = torch.randint(0, 32, (3, 11), generator=torch.Generator().manual_seed(1))
    logits = forward_logits(model, ids)
    logp, _ = vocab_parallel_logprobs_entropy(logits, ids.roll(-1, 1), groups.tp_group if tp > 1 else None)
    logp.sum().backward()
    shards = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(shards, logits.detach().contiguous(), group=groups.tp_group)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().contiguous()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g, group=groups.tp_group)
            g = torch.cat(parts, dim=p.partition_dim)
        grads[name] = g
    out = {
        "logits": torch.cat(shards, dim=-1),
        "logp": logp.detach(),
        "hf": export_hf_state(model, arch, groups),
        "grads": megatron_to_hf(grads, arch, tp),
        "full": {k: v.shape for k, v in gather_full_state(model, groups).items()},
    }
    parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def results():
    (tp1,) = run_gloo(_run_both, 1, 1)
    return tp1, run_gloo(_run_both, 2, 2)


def _compare(results, tied: bool) -> None:
    ref = results[0][tied]
    for rank_out in (r[tied] for r in results[1]):
        torch.testing.assert_close(rank_out["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rank_out["logp"], ref["logp"], rtol=1e-5, atol=1e-5)
        assert rank_out["hf"].keys() == ref["hf"].keys()
        for name in ref["hf"]:
            torch.testing.assert_close(rank_out["hf"][name], ref["hf"][name], rtol=0, atol=0, msg=name)
        for name in ref["grads"]:  # fp32: only summation order differs
            torch.testing.assert_close(rank_out["grads"][name], ref["grads"][name], rtol=1e-4, atol=1e-6, msg=name)


def test_tp2_equals_tp1_tied(results):
    _compare(results, tied=True)


def test_tp2_equals_tp1_untied(results):
    _compare(results, tied=False)


def test_tp1_matches_transformers_qwen2(results):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dynamo_mega.models.qwen import arch_from_model_config, hf_config_dict

    ref = results[0][False]
    arch = arch_from_model_config(ModelConfig(**CFG, tie_word_embeddings=False))
    hf_model = Qwen2ForCausalLM(Qwen2Config(**hf_config_dict(arch)))
    hf_model.load_state_dict(ref["hf"], strict=True)
    ids = torch.randint(0, 32, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = hf_model.eval()(ids).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=2e-5)
