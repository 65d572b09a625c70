"""Training from a Hugging Face checkpoint on a data file: a tiny random Qwen2 saved by transformers with the real
Qwen2.5-Math tokenizer, problems rendered through its chat template, math-verify rewards, two RL steps through the
CLI; the policy starts from the checkpoint's weights exactly (also at PP=2, without the random init)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _gloo import run_gloo

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "tokenizers" / "qwen2.5-math-1.5b"
PROBLEMS = [
    ("What is 2 + 3?", "5"),
    ("Compute $7 \\times 6$.", "42"),
    ("What is half of 18?", "9"),
    ("Simplify $\\frac{6}{8}$.", "\\frac{3}{4}"),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("hf") / "tiny-qwen2"
    config = Qwen2Config(
        vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out, safe_serialization=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, out / name)
    return out


def _exported(rank: int, world: int, hf_dir: str) -> dict:
    from megatron.core import parallel_state

    from dynamo_mega.config import ModelConfig
    from dynamo_mega.convert.live import load_hf_into_model
    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy, export_hf_state

    groups = init_parallel(1, world, seed=0)  # PP = world size
    model, arch = build_policy(ModelConfig(hf_checkpoint=hf_dir), groups, seed=5, random_init=False)
    load_hf_into_model(model, Path(hf_dir), arch, groups.tp_rank, groups.tp_size)
    out = export_hf_state(model, arch, groups)
    if world > 1 and groups.is_last_stage:  # the last stage's copy of the tied embedding, which it computes logits with
        out["output copy"] = model.output_layer.weight.detach()[: arch.vocab_size].clone()
    parallel_state.destroy_model_parallel()
    return out


@pytest.mark.parametrize("pp", [1, 2])
def test_policy_starts_from_the_checkpoint(checkpoint, pp):
    from safetensors.torch import load_file

    ours = run_gloo(_exported, pp, str(checkpoint))[-1]
    theirs = load_file(str(checkpoint / "model.safetensors"))
    theirs.pop("lm_head.weight", None)  # tied: the file may or may not carry the shared tensor
    if pp > 1:
        assert torch.equal(ours.pop("output copy"), theirs["model.embed_tokens.weight"])
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name


def test_two_rl_steps_on_a_data_file(checkpoint, tmp_path):
    rows = [{"id": f"p{i}", "problem": q, "answer": a} for i, (q, a) in enumerate(PROBLEMS)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "dynamo_mega.cli", "train", "configs/tiny_cpu.yaml", f"run.output_dir={out}",
        f"model.hf_checkpoint={checkpoint}", "data.source=file", f"data.train_path={data}", f"data.eval_path={data}",
        "data.prompt_key=problem", "warmup.enabled=false", "run.steps=2", "run.eval_every=0", "run.progress=false",
        "run.log_samples=100", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8",
        "allocation.n_low=1", "allocation.n_high=4", "optim.micro_batch_size=8",
        # periodic benchmark evaluation inside the run: one MATH-500 problem, greedy, 8 tokens
        "eval.interval=2", "eval.benchmarks=[math500]", "eval.max_problems=1", "eval.max_new_tokens=8",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["phase"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(r["samples"] == 8 for r in train)
    assert all(r["logprob_mismatch"] < 1e-3 for r in train)  # the engine holds the trainer's (checkpoint) weights
    bench = [r for r in records if r["phase"] == "benchmarks"]
    assert [r["step"] for r in bench] == [2] and 0.0 <= bench[0]["math500/pass@1"] <= 1.0
    assert json.loads((out / "eval" / "step_000002.json").read_text())["benchmarks"][0]["problems"] == 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in rows}
    for s in samples:
        # The chat template's turns (special tokens are dropped when the log decodes the prompt).
        assert f"user\n{by_id[s['prompt_id']]['problem']}\nassistant\n" in s["prompt"] and "\\boxed{}" in s["prompt"]
        assert s["answer"] == by_id[s["prompt_id"]]["answer"]
