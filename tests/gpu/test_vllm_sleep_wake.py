"""GPU only (skipped without CUDA): the colocated engine's sleep/wake. Level 1 frees the KV cache and keeps the
weights; level 2 frees the weights too, which the next bucket sync restores. Checked against the trainer's
log-probs of a fixed sequence and against the GPU memory the sleep gives back."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM sleep mode needs a CUDA GPU")

SEQ = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 2]


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_memory_and_wake_restores_the_policy(tmp_path, level):
    from safetensors.torch import save_file

    from dynamo_mega.config import ModelConfig
    from dynamo_mega.models.qwen import hf_config_dict
    from dynamo_mega.parallel.groups import destroy_parallel, init_parallel
    from dynamo_mega.parallel.logprobs import vocab_parallel_logprobs_entropy
    from dynamo_mega.parallel.policy import build_policy, export_hf_state, forward_logits
    from dynamo_mega.parallel.weight_bridge import iter_buckets
    from dynamo_mega.rl.engines.vllm_engine import VLLMEngine

    groups = init_parallel(1, seed=0)
    cfg = ModelConfig(vocab_size=256, hidden_size=256, num_layers=2, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=512, max_position_embeddings=64)
    model, arch = build_policy(cfg, groups, seed=0)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(arch, eos_token_id=1)))
    save_file({k: v.cpu() for k, v in export_hf_state(model, arch, groups).items()}, str(tmp_path / "model.safetensors"))
    engine = VLLMEngine(tmp_path, dtype="float32", max_model_len=64, gpu_memory_utilization=0.3, sleep_level=level)
    try:
        free_awake = torch.cuda.mem_get_info()[0]
        engine.sleep()
        assert engine.asleep and torch.cuda.mem_get_info()[0] > free_awake + (64 << 20)
        engine.load_buckets(iter_buckets(model, arch, tp_size=1, version=1), version=1)  # wakes, then loads
        assert not engine.asleep and engine.worker_versions() == [1]
        ids = torch.tensor([SEQ], device=groups.device)
        with torch.no_grad():
            ours, _ = vocab_parallel_logprobs_entropy(forward_logits(model.eval(), ids)[:, :-1], ids[:, 1:])
        torch.testing.assert_close(torch.tensor(engine.score([SEQ])[0]), ours[0].cpu(), rtol=0, atol=1e-4)
    finally:
        engine.close()
        destroy_parallel()
