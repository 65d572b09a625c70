"""Memory planner against a hand calculation on a small, round-numbered model, and its verdicts."""

from __future__ import annotations

import pytest

from dynamo_mega.cli import main
from dynamo_mega.models.qwen import QwenArch
from dynamo_mega.planner import (
    GIB,
    PlanInputs,
    layout_problems,
    plan_memory,
    rollout_layout,
    suggest_layouts,
    total_params,
)

ARCH = QwenArch(
    vocab_size=1000,
    hidden_size=1024,
    num_layers=4,
    num_attention_heads=8,
    num_query_groups=2,
    ffn_hidden_size=4096,
    max_position_embeddings=4096,
    rope_theta=1e4,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    qkv_bias=True,
    qk_layernorm=False,
    head_dim=128,
)


def test_plan_matches_hand_calculation():
    p = PlanInputs(tp=2, pp=2, gpus=8, gpu_mem_gib=80, seq_len=1024, micro_batch=2, recompute="selective", vllm_tp=2)
    # One layer: q,k,v = 1024 x (8 + 2*2) heads x 128 = 1,572,864 (+ 1,536 bias); o = 1,048,576; SwiGLU 3 x 1024 x 4096
    # = 12,582,912 -> 15,205,888 split over TP; 2 RMSNorms = 2,048 replicated.
    per_rank_layer = 15_205_888 / 2 + 2_048
    first = 2 * per_rank_layer + 1000 * 1024 / 2  # 2 layers + half the embedding
    last = 2 * per_rank_layer + 1000 * 1024 / 2 + 1024  # 2 layers + half the output layer + final norm
    dp = 8 // (2 * 2)
    act_layer = 1024 * 2 * 1024 * 34 / 2  # s*b*h*34/t
    first_total = first * (2 + 4 + 12 / dp) + act_layer * 4  # 1F1B: stage 0 holds PP=2 micro-batches x 2 layers
    logits = 2 * 1024 * 500 * 6  # b*s*V/t x (bf16 + fp32 grad)
    last_total = last * (2 + 4 + 12 / dp) + act_layer * 2 + logits
    assert first_total > last_total  # so stage 0 is the peak
    plan = plan_memory(ARCH, p)
    assert plan.params_per_gpu == pytest.approx(first)
    assert plan.weights == pytest.approx(first * 2 / GIB)
    assert plan.optimizer == pytest.approx(first * 12 / dp / GIB)
    assert plan.activations == pytest.approx(act_layer * 4 / GIB)
    assert plan.train_peak == pytest.approx(first_total / GIB + 2.0)
    n = 4 * (15_205_888 + 2_048) + 2 * 1000 * 1024 + 1024
    assert total_params(ARCH) == n
    assert plan.vllm_weights == pytest.approx(n * 2 / 2 / GIB)
    kv_per_token = 2 * 4 * (2 // 2) * 128 * 2  # K and V, 4 layers, 1 query group per vLLM rank, bf16
    assert plan.kv_cache == pytest.approx(40 - n * 2 / 2 / GIB)
    assert plan.kv_tokens == int((40 - n / GIB) * GIB // kv_per_token)
    resident = first * (2 + 4 + 12 / dp) / GIB
    assert plan.rollout_peak == pytest.approx(40 + resident + 2.0) and plan.fits


def test_recompute_modes_order_and_no_fit_verdict():
    base = dict(tp=1, pp=1, gpus=1, seq_len=4096, micro_batch=8)
    acts = {
        r: plan_memory(ARCH, PlanInputs(**base, gpu_mem_gib=80, recompute=r)).activations for r in ("none", "selective", "full")
    }
    assert acts["none"] > acts["selective"] > acts["full"]
    # full: 2 bytes x s*b*h per layer + one layer's 34 x s*b*h while it is recomputed
    assert acts["full"] == pytest.approx((4 * 2 + 34) * 4096 * 8 * 1024 / GIB)
    tiny_gpu = plan_memory(ARCH, PlanInputs(**base, recompute="none", gpu_mem_gib=4))
    assert not tiny_gpu.fits and any("training phase" in n for n in tiny_gpu.notes)


def test_layout_problems_and_suggestions():
    assert layout_problems(ARCH, 4, 1, 8) == ["tensor_parallel=4 does not divide num_query_groups=2"]
    assert "pipeline_parallel=3" in layout_problems(ARCH, 1, 3, 6)[0]
    assert "not a multiple" in layout_problems(ARCH, 2, 2, 6)[0]
    # 0.6 GiB GPUs, vLLM given 0.3 of each: TP=1 PP=1 needs 0.74 GiB while generating (0.49 of resident training
    # state); splitting the model over 2 GPUs fits, and TP=2 PP=1 is preferred over TP=1 PP=2 (no pipeline bubble).
    p = PlanInputs(
        tp=1,
        pp=1,
        gpus=8,
        gpu_mem_gib=0.6,
        seq_len=1024,
        micro_batch=1,
        recompute="full",
        vllm_memory_fraction=0.3,
        overhead_gib=0,
    )
    assert not plan_memory(ARCH, p).fits
    fitting = suggest_layouts(ARCH, p)
    assert [(m.inputs.tp, m.inputs.pp) for m in fitting][:3] == [(2, 1), (1, 2), (2, 2)]
    assert all(m.fits for m in fitting)


def test_plan_cli_exit_codes(capsys):
    assert main(["plan", "configs/qwen2.5_math_1.5b.yaml"]) == 0
    out = capsys.readouterr().out
    assert "TP=1 PP=1 DP=8" in out and "FITS" in out
    # verl's 8 x 96 GB Qwen2.5-32B layout without offloading the training state does not fit
    code = main(
        ["plan", "configs/qwen2.5_32b.yaml", "parallel.pipeline_parallel=1", "rollout.vllm_tensor_parallel=8", "--gpus", "8"]
    )
    assert code == 1 and "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", "configs/qwen2.5_32b.yaml", "parallel.tensor_parallel=3"]) == 2
    assert "does not divide num_attention_heads=40" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config, gpus, vllm_tp, replicas, per_node",
    [
        ("configs/qwen2.5_math_1.5b.yaml", 8, 1, 8, 8),
        ("configs/qwen2.5_math_7b.yaml", 16, 2, 8, 4),
        ("configs/qwen2.5_32b.yaml", 32, 4, 8, 2),
        ("configs/qwen3_32b.yaml", 32, 4, 8, 2),
        ("configs/qwen2.5_72b.yaml", 64, 8, 8, 1),
    ],
)
def test_plan_counts_the_rollout_replicas_the_trainer_starts(capsys, config, gpus, vllm_tp, replicas, per_node):
    # R = W / vLLM TP engines, GPUs per node / vLLM TP of them per node (launch.procs_per_node = 8 in every recipe)
    code = main(["plan", config])
    out = capsys.readouterr().out
    assert code == 0
    line = f"Rollout: {replicas} vLLM replicas of TP={vllm_tp} ({per_node} per 8-GPU node), all {gpus} ranks generate"
    assert line in out


def test_rollout_layout_line():
    base = dict(tp=1, pp=1, seq_len=1024, micro_batch=1, gpu_mem_gib=80)
    p = PlanInputs(**base, gpus=16, vllm_tp=2)  # per 8-GPU node unless told otherwise
    assert (p.rollout_replicas, p.replicas_per_node) == (8, 4)
    plan = plan_memory(ARCH, p)
    assert rollout_layout(plan) == (
        f"Rollout: 8 vLLM replicas of TP=2 (4 per 8-GPU node), all 16 ranks generate (each GPU holds 1/2 of one "
        f"engine); KV cache {plan.kv_tokens:,} tokens per engine"
    )
    # memory per GPU does not depend on the replica count: each GPU holds 1/vLLM TP of one engine
    one_node = plan_memory(ARCH, PlanInputs(**base, gpus=2, vllm_tp=2))
    assert (one_node.vllm_weights, one_node.kv_tokens) == (plan.vllm_weights, plan.kv_tokens)
    wide = PlanInputs(**base, gpus=16, vllm_tp=8, gpus_per_node=4)  # one engine over two 4-GPU nodes
    assert (wide.rollout_replicas, wide.replicas_per_node) == (2, 0.5)
    assert "2 vLLM replicas of TP=8 (each spanning 2 4-GPU nodes)" in rollout_layout(plan_memory(ARCH, wide))
    odd = PlanInputs(**base, gpus=12, vllm_tp=4, gpus_per_node=6)
    assert "3 vLLM replicas of TP=4 (engines straddle 6-GPU nodes)" in rollout_layout(plan_memory(ARCH, odd))
    # a vLLM TP that does not divide the GPUs or the heads: no replica layout, the layout problems say why
    assert layout_problems(ARCH, 1, 1, 6, vllm_tp=4) == ["6 GPUs are not a multiple of vllm_tensor_parallel=4"]
    assert layout_problems(ARCH, 1, 1, 48, vllm_tp=16) == ["vllm_tensor_parallel=16 does not divide num_attention_heads=8"]
    single = rollout_layout(plan_memory(ARCH, PlanInputs(**base, gpus=1)))
    assert single.startswith("Rollout: 1 vLLM replica of TP=1 (1 per 1-GPU node), the one rank generates (each GPU runs")


def test_disaggregated_plan_counts_training_and_rollout_gpus_apart(capsys):
    """rollout.colocated=false: the training GPUs hold the training phase alone, the rollout GPUs vLLM alone."""
    overrides = ["rollout.colocated=false", "rollout.dedicated_gpus_per_node=4", "rollout.vllm_gpu_memory_utilization=0.9"]
    assert main(["plan", "configs/qwen2.5_math_7b.yaml", *overrides]) == 0
    out = capsys.readouterr().out
    assert "on 16 training + 8 rollout GPUs x 80 GiB" in out and "disaggregated" in out
    assert "Rollout: 4 vLLM replicas of TP=2 on 8 GPUs of their own (4 per node beside 8 training GPUs)" in out
    base = dict(tp=2, pp=1, seq_len=4096, micro_batch=1, gpu_mem_gib=80, gpus=16, vllm_tp=2)
    colocated = plan_memory(ARCH, PlanInputs(**base))
    apart = plan_memory(ARCH, PlanInputs(**base, colocated=False, rollout_gpus=8))
    assert apart.train_peak == colocated.train_peak
    # colocated, the rollout phase also holds the resident training state; apart, vLLM's share alone
    assert colocated.rollout_peak - apart.rollout_peak == pytest.approx(colocated.weights + colocated.grads + colocated.optimizer)
    assert layout_problems(ARCH, 1, 1, 6, vllm_tp=4, colocated=False) == []  # the engines split the rollout GPUs
