"""The GPU recipes in configs/: each loads with the config loader, carries the DynaMO paper's RL settings, has a
layout whose sizes divide the model (heads, query groups, layers, FFN, vocabulary without padding, GPUs) and
passes the memory planner on 80 GiB GPUs.

Recipes are loaded with training=False: they use pipeline parallelism and data files, which the training
step's own validation still refuses on CPU; these checks are the planner's and the layout's."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_mega.config import load_config
from dynamo_mega.models.qwen import arch_from_model_config
from dynamo_mega.planner import inputs_from_config, layout_problems, plan_memory

RECIPES = sorted(str(p) for p in Path("configs").glob("qwen*.yaml"))
EXPECTED = {"qwen2.5_math_1.5b", "qwen2.5_math_7b", "qwen2.5_32b", "qwen3_32b", "qwen2.5_72b"}


def test_every_recipe_is_here():
    assert {Path(r).stem for r in RECIPES} == EXPECTED


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_layout_and_memory(path):
    cfg = load_config(path, training=False)
    arch = arch_from_model_config(cfg.model)
    gpus = cfg.launch.nodes * cfg.launch.procs_per_node
    inputs = inputs_from_config(cfg, gpus, gpu_mem_gib=80)
    assert layout_problems(arch, inputs.tp, inputs.pp, gpus, inputs.vllm_tp) == []
    assert inputs.dp >= 1 and inputs.tp <= cfg.launch.procs_per_node  # TP inside a node
    assert inputs.seq_len <= arch.max_position_embeddings
    plan = plan_memory(arch, inputs)
    assert plan.fits, plan.notes
    assert plan.kv_tokens >= 16 * inputs.seq_len  # each engine holds at least 16 full-length sequences


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_uses_the_paper_settings(path):
    cfg = load_config(path, training=False)
    r, al, a = cfg.rollout, cfg.allocation, cfg.algo
    assert (r.prompts_per_step, r.samples_per_prompt, r.temperature) == (512, 16, 1.0)
    assert (al.mode, al.n_low, al.n_high) == ("optimal", 8, 24)
    assert r.prompts_per_step % cfg.optim.mini_batches == 0 and r.prompts_per_step // cfg.optim.mini_batches == 32
    assert (cfg.optim.lr, a.eps_low, a.eps_high) == (1e-6, 0.2, 0.28)
    assert cfg.model.params_dtype == "bfloat16" and r.colocated and cfg.parallel.distributed_optimizer
    assert cfg.launch.executor == "slurm" and cfg.eval.interval > 0
