"""Benchmark: the policy step with the fused SDPA core attention (models/sdpa_attention.py, the default) against
megatron-core's unfused DotProductAttention, side by side in one process on the same weights and tokens.

Shapes: one PPO mini-batch of the quick start (configs/tiny_cpu.yaml: 0.8M parameters, 128 sequences x 12 tokens)
and of bench/trl_peer.py's generation-heavy config (27.3M, 128 x 96: 32 prompt + 64 response tokens), each the
trainer's policy_step (fused log-prob/entropy, modulation on, clipped loss, backward, AdamW). The two models run
interleaved, rep after rep, so that load from elsewhere hits both alike; medians are reported, and the logits'
largest difference as a check that both compute the same thing.

    python bench/attention.py              # writes bench/results/attention.{json,md}
    python bench/attention.py --reps 1     # a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
from _timing import free_port  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TINY = dict(vocab_size=32, hidden_size=128, num_layers=3, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=512)
GEN = dict(vocab_size=4096, hidden_size=512, num_layers=8, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=1792)
SHAPES = {  # name: (model, sequences, prompt tokens, response tokens)
    "quick start (0.8M, 128 x 12)": (TINY, 128, 6, 6),
    "generation-heavy (27.3M, 128 x 96)": (GEN, 128, 32, 64),
}


@contextlib.contextmanager
def megatron_attention():
    """Build the policy with megatron-core's unfused DotProductAttention in the layer spec (the one swapped out)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from dynamo_mega.models import qwen

    default = qwen.layer_spec

    def spec(arch, use_te=False):
        layer = default(arch, use_te)
        layer.submodules.self_attention.submodules.core_attention = DotProductAttention
        return layer

    qwen.layer_spec = spec
    try:
        yield
    finally:
        qwen.layer_spec = default


def measure(model_kw: dict, n: int, prompt: int, response: int, reps: int) -> dict:
    from dynamo_mega.config import AlgoConfig, ModelConfig, ModulationConfig
    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy, forward_logits
    from dynamo_mega.parallel.train_step import policy_step, split_micro_batches

    s = prompt + response
    cfg = ModelConfig(**model_kw, max_position_embeddings=128)
    groups = init_parallel(1, 1, seed=0)
    models = {"sdpa": build_policy(cfg, groups, seed=0)[0]}
    with megatron_attention():
        models["megatron"] = build_policy(cfg, groups, seed=0)[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, model_kw["vocab_size"], (n, s), generator=g)
    mask = torch.zeros(n, s, dtype=torch.bool)
    mask[:, prompt - 1 : s - 1] = True  # positions predicting the response
    micro = split_micro_batches(ids, ids.roll(-1, 1), mask, torch.randn(n, generator=g), torch.zeros(n, s), n)
    with torch.no_grad():
        diff = (forward_logits(models["sdpa"], ids) - forward_logits(models["megatron"], ids)).abs().max().item()
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}

    def step(name: str) -> None:
        policy_step(
            models[name],
            optims[name],
            None,
            micro,
            groups,
            algo=AlgoConfig(),
            temperature=0.7,
            grad_clip=1.0,
            modulation=ModulationConfig(),
        )

    times = {k: [] for k in models}
    for _ in range(reps + 1):  # the first rep warms up (allocations, AdamW state) and is dropped
        for name in models:
            t0 = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t0)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    med = {k: statistics.median(v[1:] or v) for k, v in times.items()}
    return {
        "tokens": int(mask.sum()),
        "logits_max_abs_diff": diff,
        "megatron_s": med["megatron"],
        "sdpa_s": med["sdpa"],
        "sdpa_vs_megatron": med["sdpa"] / med["megatron"],
        "times": times,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    load_start = os.getloadavg()[0]
    rows = {name: measure(*shape, args.reps) for name, shape in SHAPES.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {
        "commit": commit,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "loadavg_1min_at_start": load_start,
        "loadavg_1min_at_end": os.getloadavg()[0],
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "attention.json").write_text(json.dumps(out, indent=1))
    lines = [
        f"# Policy step: fused SDPA vs megatron-core's unfused core attention (bench/attention.py, commit {commit})",
        "",
        f"One process, {out['threads']} threads, the two interleaved; median of {args.reps} reps after a warm-up. 1-minute "
        f"load average {load_start:.1f} at the start, {out['loadavg_1min_at_end']:.1f} at the end.",
        "",
        "| shape | loss tokens | unfused (s) | SDPA (s) | SDPA / unfused | logits max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['tokens']} | {r['megatron_s']:.3f} | {r['sdpa_s']:.3f} | {r['sdpa_vs_megatron']:.3f}x | "
            f"{r['logits_max_abs_diff']:.1e} |"
        )
    (RESULTS / "attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
