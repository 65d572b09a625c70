"""Benchmark: what vLLM's idle busy-wait costs the colocated trainer (rl/engines/vllm_idle.py), side by side.

Two engines on the quick start's model (configs/tiny_cpu.yaml's shape, random weights, vLLM on CPU), one with
vLLM's own queue busy-wait (1 s after every message) and one with the trainer's (DYNAMO_MEGA_VLLM_BUSY_LOOP_S,
5 ms). Per rep and engine: generate the quick start's step (64 prompts x 8 samples, 6 new tokens, seeded), then at
once the trainer's policy step on one PPO mini-batch of the quick start (128 sequences x 12 tokens: Megatron
forward/backward, fused log-prob/entropy, modulation, AdamW) on the same 2 cores, then 1.5 s of rest so that the
other engine's processes are blocked again. Also the policy step with no engine having generated for 1.5 s
(the floor). Medians of --reps.

    python bench/vllm_idle.py                 # writes bench/results/vllm_idle.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _timing import free_port  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BUSY_LOOPS = {"vLLM's (1 s)": "1", "trainer's (5 ms)": "0.005"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=12)
    args = ap.parse_args()
    from safetensors.torch import save_file

    from dynamo_mega.config import AlgoConfig, ModelConfig, ModulationConfig
    from dynamo_mega.models.qwen import hf_config_dict
    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy, export_hf_state
    from dynamo_mega.parallel.train_step import policy_step, split_micro_batches
    from dynamo_mega.rl.engines.vllm_engine import VLLMEngine
    from dynamo_mega.rl.engines.vllm_idle import BUSY_LOOP_ENV

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    groups = init_parallel(1, seed=0)
    cfg = ModelConfig(
        vocab_size=32,
        hidden_size=128,
        num_layers=3,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=512,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    model, arch = build_policy(cfg, groups, seed=0)
    model_dir = Path(tempfile.mkdtemp(prefix="vllm_idle_"))
    (model_dir / "config.json").write_text(json.dumps(hf_config_dict(arch, eos_token_id=1)))
    save_file(export_hf_state(model, arch, groups), str(model_dir / "model.safetensors"))
    engines = {}
    for name, busy_loop in BUSY_LOOPS.items():
        os.environ[BUSY_LOOP_ENV] = busy_loop  # read by the engine's processes as they start
        engines[name] = VLLMEngine(model_dir, dtype="float32", max_model_len=32)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 32, (128, 12), generator=g)
    mask = torch.zeros(128, 12, dtype=torch.bool)
    mask[:, 5:11] = True
    micro = split_micro_batches(ids, ids.roll(-1, 1), mask, torch.randn(128, generator=g), torch.zeros(128, 12), 128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    prompts = [[2 + i % 10, 12, 2 + (i * 7) % 10, 13, 2 + (i * 3) % 10, 11] for i in range(64)]

    def train() -> float:
        t0 = time.perf_counter()
        policy_step(
            model, opt, None, micro, groups, algo=AlgoConfig(), temperature=0.7, grad_clip=1.0, modulation=ModulationConfig()
        )
        return time.perf_counter() - t0

    times = {f"{k}: {part}": [] for k in engines for part in ("generate", "policy step right after")}
    times["policy step, engines idle"] = []
    load_start = os.getloadavg()[0]
    for rep in range(args.reps + 1):  # the first rep warms up and is dropped
        for name, engine in engines.items():
            t0 = time.perf_counter()
            engine.generate(prompts, [8] * 64, max_new_tokens=6, temperature=0.7, seed=1000 * rep)
            gen_s = time.perf_counter() - t0
            step_s = train()
            if rep:
                times[f"{name}: generate"].append(gen_s)
                times[f"{name}: policy step right after"].append(step_s)
            time.sleep(1.5)
        step_s = train()
        if rep:
            times["policy step, engines idle"].append(step_s)
    for engine in engines.values():
        engine.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {
        "commit": commit,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "median_s": med,
        "times": times,
        "loadavg_1min_at_start": load_start,
        "loadavg_1min_at_end": os.getloadavg()[0],
        "cores": os.cpu_count(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vllm_idle.json").write_text(json.dumps(out, indent=1))
    floor = med["policy step, engines idle"]
    lines = [
        f"# vLLM's idle busy-wait against the colocated trainer (bench/vllm_idle.py, commit {commit})",
        "",
        f"Median of {args.reps} reps, trainer with {out['threads']} threads on {out['cores']} cores; 1-minute load average "
        f"{load_start:.1f} at the start, {out['loadavg_1min_at_end']:.1f} at the end.",
        "",
        "| engine queue busy-wait | generate (s) | policy step right after (s) | vs engines idle |",
        "|---|---|---|---|",
    ]
    for name in engines:
        step = med[f"{name}: policy step right after"]
        lines.append(f"| {name} | {med[f'{name}: generate']:.3f} | {step:.3f} | {step / floor:.2f}x |")
    lines.append(f"| (no generate for 1.5 s) | - | {floor:.3f} | 1.00x |")
    (RESULTS / "vllm_idle.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
