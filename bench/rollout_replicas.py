"""Benchmark: rollout replicas (rl/rollout_service.py) on a generation-heavy config, 1 replica vs 2 replicas.

Side by side in one run, the same prompts and the same per-prompt budget (variable counts, as DynaMO allocates
them) on a random-weight Qwen2-shaped model of ~43M parameters (fp32), every response 96 new tokens (the eos id
is one of 32k tokens, so a random policy almost never stops early):
  (a) 1 process: 1 replica, one vLLM engine of TP=1 (what the trainer ran before: one engine on rank 0);
  (b) 2 gloo ranks, trainer DP=2: 2 replicas of TP=1, one engine per rank, each fed its share by the plan;
  (c) 2 gloo ranks: 1 replica of TP=2 (one engine spanning both ranks), for reference.
Each arm runs `--steps` steps of: generate the allocation (timed) -> refit every replica from the Megatron
policy through the weight bridge (timed per replica) -> a correctness probe: one prompt, greedy, asked twice;
at R = 2 the two requests land on different replicas and must return the same tokens (log-probs: max difference).
Reported per arm (median over the steps after the first): generation time per step, generated tokens/s, replica
imbalance (slowest / mean) by the plan's expected tokens, by generated tokens and by generation time, and refit
time per replica. This machine has 2 cores: at R = 2 both engines share them, so the speed-up measures
contention as much as parallelism (stated in the markdown); the balance and correctness are what must hold.

    python bench/rollout_replicas.py           # writes bench/results/rollout_replicas.{json,md} (~10 min)
    python bench/rollout_replicas.py --quick   # a smaller model and budget: smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=32000, hidden_size=512, num_layers=8, num_attention_heads=8, num_query_groups=2,
             ffn_hidden_size=1536, max_position_embeddings=256, tie_word_embeddings=True)
QUICK_MODEL = dict(MODEL, hidden_size=256, num_layers=2, ffn_hidden_size=512)
ARMS = [("1 replica, TP=1", 1, 1), ("2 replicas, TP=1", 2, 1), ("1 replica, TP=2", 2, 2)]


def _counts(prompts: int, budget: int, seed: int = 0) -> list[int]:
    """Variable n_i in 4..16 summing to `budget`, as an allocation would give them (fixed seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    weights = rng.gamma(2.0, size=prompts)
    counts = np.clip(np.round(weights / weights.sum() * budget), 4, 16).astype(int)
    while counts.sum() != budget:  # repair to the exact budget inside the bounds
        i = rng.integers(prompts)
        step = 1 if counts.sum() < budget else -1
        if 4 <= counts[i] + step <= 16:
            counts[i] += step
    return counts.tolist()


def worker(args) -> None:
    """One arm, under torchrun (or alone): rank 0 writes the arm's JSON to args.out."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from dynamo_mega.config import ModelConfig, RolloutConfig
    from dynamo_mega.models.qwen import hf_config_dict
    from dynamo_mega.parallel.groups import destroy_parallel, init_parallel
    from dynamo_mega.parallel.policy import build_policy, export_hf_state
    from dynamo_mega.rl.engines.vllm_engine import VLLMEngine
    from dynamo_mega.rl.rollout_service import RolloutService
    from dynamo_mega.weight_push import WeightStream

    torch.set_num_threads(1)
    groups = init_parallel(1, seed=0)
    model_cfg = ModelConfig(**(QUICK_MODEL if args.quick else MODEL))
    model, arch = build_policy(model_cfg, groups, seed=0, random_init=True)
    params = sum(p.numel() for p in model.parameters())
    init_dir = Path(args.out).with_suffix(".hf")
    hf_state = export_hf_state(model, arch, groups)
    if groups.is_driver:
        init_dir.mkdir(exist_ok=True)
        (init_dir / "config.json").write_text(json.dumps(hf_config_dict(arch, eos_token_id=1)))
        save_file(hf_state, str(init_dir / "model.safetensors"))
    if dist.is_initialized():
        dist.barrier()
    rollout_cfg = RolloutConfig(vllm_tensor_parallel=args.tp)
    t0 = time.perf_counter()
    service = RolloutService(
        replica_size=args.tp,
        start_engine=lambda replica: VLLMEngine(
            init_dir, dtype="float32", max_model_len=arch.max_position_embeddings, kv_cache_gib=2, tensor_parallel=args.tp
        ),
        make_reward=None,
        decode=lambda token_ids: [""] * len(token_ids),
        weights=WeightStream(model, arch, groups, rollout_cfg).stream,
        max_restarts=0,
    )
    start_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, arch.vocab_size, (32,), generator=g).tolist() for _ in range(args.prompts)]
    counts = _counts(args.prompts, args.budget)
    steps = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        groups_out = service.generate(prompts, counts, max_new_tokens=args.new_tokens, temperature=1.0, seed=step)
        wall = time.perf_counter() - t0
        gen = service.take_metrics()
        with torch.no_grad():  # a new policy version: every replica must hold it
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
        t1 = time.perf_counter()
        service.push(step + 1)
        refit_wall = time.perf_counter() - t1
        refit = service.take_metrics()
        probe = service.generate([prompts[0], prompts[0]], [1, 1], max_new_tokens=16, temperature=0.0)
        service.take_metrics()
        (a,), (b,) = probe
        tokens = sum(len(c.token_ids) for group in groups_out for c in group)
        steps.append(
            {
                "generate_s": wall,
                "tokens": tokens,
                "tokens_per_s": tokens / wall,
                "samples": sum(len(group) for group in groups_out),
                "imbalance_expected": gen["rollout_imbalance_expected"],
                "imbalance_tokens": gen["rollout_imbalance_tokens"],
                "imbalance_time": gen["rollout_imbalance_time"],
                "replica_generate_s": [gen[f"replica{r}/generate_s"] for r in range(service.num_replicas)],
                "replica_samples": [gen[f"replica{r}/samples"] for r in range(service.num_replicas)],
                "refit_wall_s": refit_wall,
                "replica_refit_s": [refit[f"replica{r}/refit_s"] for r in range(service.num_replicas)],
                "probe_same_tokens": a.token_ids == b.token_ids,
                "probe_logprob_diff": max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)),
            }
        )
    service.close()
    if groups.is_driver:
        Path(args.out).write_text(
            json.dumps({"params": params, "engine_start_s": start_s, "counts": counts, "steps": steps}, indent=1)
        )
    destroy_parallel()


def _run_arm(world: int, tp: int, out: Path, args) -> dict:
    flags = ["--worker", "--tp", str(tp), "--out", str(out), "--steps", str(args.steps), "--prompts", str(args.prompts),
             "--budget", str(args.budget), "--new-tokens", str(args.new_tokens)] + (["--quick"] if args.quick else [])
    script = str(Path(__file__).resolve())
    if world == 1:
        cmd = [sys.executable, script, *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), script, *flags]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"arm world={world} tp={tp} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def _summary(name: str, world: int, tp: int, raw: dict) -> dict:
    timed = raw["steps"][1:] or raw["steps"]  # the first step warms the engines up
    med = lambda key: statistics.median(s[key] for s in timed)  # noqa: E731
    replicas = world // tp
    return {
        "arm": name,
        "ranks": world,
        "replicas": replicas,
        "vllm_tp": tp,
        "generate_s": med("generate_s"),
        "tokens_per_s": med("tokens_per_s"),
        "imbalance_expected": med("imbalance_expected"),
        "imbalance_tokens": med("imbalance_tokens"),
        "imbalance_time": med("imbalance_time"),
        "refit_s_per_replica": [statistics.median(s["replica_refit_s"][r] for s in timed) for r in range(replicas)],
        "refit_wall_s": med("refit_wall_s"),
        "probe_same_tokens": all(s["probe_same_tokens"] for s in raw["steps"]),
        "probe_logprob_diff": max(s["probe_logprob_diff"] for s in raw["steps"]),
        "samples_per_step": raw["steps"][0]["samples"],
        "engine_start_s": raw["engine_start_s"],
    }


def _markdown(rows: list[dict], meta: dict) -> str:
    base = rows[0]
    lines = [
        "# Rollout replicas: 1 vs 2 (bench/rollout_replicas.py)",
        "",
        f"Model: random-weight Qwen2 shape, {meta['params'] / 1e6:.1f}M parameters, fp32; {meta['prompts']} prompts of 32 "
        f"tokens, {meta['budget']} samples per step with per-prompt counts 4..16, {meta['new_tokens']} new tokens each "
        f"(temperature 1). Median of {meta['steps'] - 1} steps after a warm-up step. Commit {meta['commit']}, "
        f"{meta['date']}, this 2-core machine, nothing else running.",
        "",
        "| arm | replicas x TP | generation s/step | tokens/s | vs 1 replica | imbalance expected / tokens / time "
        "| refit s per replica | probe: same tokens / max log-prob difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        refit = " / ".join(f"{x:.3f}" for x in r["refit_s_per_replica"])
        lines.append(
            f"| {r['arm']} | {r['replicas']} x {r['vllm_tp']} | {r['generate_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['imbalance_expected']:.3f} / {r['imbalance_tokens']:.3f} / "
            f"{r['imbalance_time']:.3f} | {refit} | {'yes' if r['probe_same_tokens'] else 'NO'} / "
            f"{r['probe_logprob_diff']:.1e} |"
        )
    lines += [
        "",
        "Imbalance = slowest replica / mean over replicas: by the plan's expected tokens (what the planner balances; "
        "the bar is <= 1.1), by tokens actually generated, by generation time. The probe asks for the same prompt "
        "twice, greedy, after each refit; with 2 replicas the two requests run on different engines (with one, in "
        "one batch: fp32 rows of one batch need not agree to the last bit either).",
        "On this 2-core machine one engine already uses both cores (its OpenMP threads); two engines split the same "
        "two cores and add a second engine-core and worker process each, so no speed-up is available here, and the "
        "time imbalance is the two engines' share of the cores, not their work (expected and generated tokens are "
        "balanced). On GPUs each replica has its own devices.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out", default="")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=96)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.steps, args.prompts, args.budget, args.new_tokens = 2, 16, 96, 64
    import tempfile

    rows, raws = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, world, tp in ARMS:
            raw = _run_arm(world, tp, Path(tmp) / f"arm_{world}_{tp}.json", args)
            raws[name] = raw
            rows.append(_summary(name, world, tp, raw))
            print(json.dumps(rows[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    meta = dict(params=raws[ARMS[0][0]]["params"], prompts=args.prompts, budget=args.budget, new_tokens=args.new_tokens,
                steps=args.steps, commit=commit, date=time.strftime("%Y-%m-%d"))
    stem = RESULTS / ("rollout_replicas_quick" if args.quick else "rollout_replicas")
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "arms": rows, "raw": raws}, indent=1))
    stem.with_suffix(".md").write_text(_markdown(rows, meta))
    print(_markdown(rows, meta))


if __name__ == "__main__":
    main()
