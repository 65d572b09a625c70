"""Benchmark: the RL training step on CPU (gloo), tokens/s at TP=1 vs TP=2 vs PP=2, for the tiny quick-start
model and a ~100M-parameter Qwen2-shaped model, with a time split.

The step is the trainer's own `policy_step` over 4 micro-batches (a no-grad pass for the old log-probs, then
forward + backward per micro-batch; fused vocab-parallel log-prob + entropy; DynaMO modulation, global scope;
clipped loss; gradient clipping over TP/PP; AdamW); at PP=2 both passes run through Megatron's 1F1B schedule.
Split, each the median of --reps runs in the same processes (TP rows only: at PP=2 a stage has no logits):
  forward   no-grad forward + fused log-prob/entropy of one micro-batch x 4 (the old-log-prob pass),
  fwd+bwd   forward + loss + backward of every micro-batch,
  step      the whole policy_step; "optimizer + rest" = step - forward - fwd+bwd.
Two processes run with 1 thread each; one process with 2 threads (the same 2 cores). The tiny model has 3
layers, so it has no PP=2 row.

    python bench/train_step.py           # writes bench/results/train_step.{json,md}
    python bench/train_step.py --quick   # tiny model only, 1 rep: a smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _timing import free_port, median_time  # bench/ is on sys.path when run as a script

RESULTS = Path(__file__).resolve().parent / "results"

MODELS = {
    "tiny-0.8M": dict(vocab_size=32, hidden_size=128, num_layers=3, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=512, max_position_embeddings=64, batch=(512, 16)),
    "qwen2-100M": dict(vocab_size=32000, hidden_size=768, num_layers=12, num_attention_heads=12, num_query_groups=4,
                       ffn_hidden_size=2048, max_position_embeddings=256, batch=(8, 128)),
}




MICRO_BATCHES = 4


def _worker(rank: int, world: int, port: int, out_dir: str, model_kw: dict, reps: int, pp: int) -> None:
    torch.set_num_threads(2 // world)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from dynamo_mega.config import AlgoConfig, ModelConfig, ModulationConfig
    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy
    from dynamo_mega.parallel.train_step import policy_step, split_micro_batches, token_logprobs

    kw = dict(model_kw)
    n, s = kw.pop("batch")
    groups = init_parallel(world // pp, pp, seed=0)
    model, _ = build_policy(ModelConfig(**kw), groups, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, kw["vocab_size"], (n, s), generator=g)
    mask = torch.ones(n, s, dtype=torch.bool)
    mask[:, : s // 4] = False  # the prompt part
    micro = split_micro_batches(
        ids, ids.roll(-1, 1), mask, torch.randn(n, generator=g), torch.zeros(n, s), n // MICRO_BATCHES
    )

    def forward():
        with torch.no_grad():
            for mb in micro:
                token_logprobs(model, mb, groups, 1.0)

    def fwd_bwd():
        for mb in micro:
            logp, _ = token_logprobs(model, mb, groups, 1.0)
            (-(logp * mb.advantages).sum() / mask.sum()).backward()
        model.zero_grad(set_to_none=True)

    def step():
        policy_step(model, opt, None, micro, groups, algo=AlgoConfig(), temperature=1.0, grad_clip=1.0,
                    modulation=ModulationConfig())

    step()  # warm-up: allocations, AdamW state
    nan = float("nan")
    result = {
        "forward": median_time(forward, reps) if pp == 1 else nan,
        "fwd_bwd": median_time(fwd_bwd, reps) if pp == 1 else nan,
        "step": median_time(step, reps),
    }
    result["tokens"] = int(mask.sum())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def measure(model_kw: dict, tp: int, pp: int, reps: int) -> dict:
    world = tp * pp
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, free_port(), out, model_kw, reps, pp), nprocs=world, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    slowest = {k: max(r[k] for r in ranks) for k in ("forward", "fwd_bwd", "step")}
    return {**slowest, "tokens": ranks[0]["tokens"], "tokens_per_s": ranks[0]["tokens"] / slowest["step"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    models = {"tiny-0.8M": MODELS["tiny-0.8M"]} if args.quick else MODELS
    reps = 1 if args.quick else args.reps
    rows = []
    for name, kw in models.items():
        base = None
        layouts = [(1, 1), (2, 1)] + ([(1, 2)] if kw["num_layers"] % 2 == 0 else [])
        for tp, pp in layouts:
            r = measure(kw, tp, pp, reps)
            base = base or r
            rows.append({"model": name, "tp": tp, "pp": pp, **r, "step_time_vs_tp1": r["step"] / base["step"]})
            print(json.dumps(rows[-1]), flush=True)
    load = os.getloadavg()[0]
    out = {"rows": rows, "reps": reps, "loadavg_1min_at_end": load, "cores": os.cpu_count(), "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"train_step{suffix}.json").write_text(json.dumps(out, indent=1))
    lines = [
        "| model | TP | PP | tokens/step | old-logprob pass (s) | fwd+bwd (s) | step (s) | optimizer+rest (s) | tokens/s "
        "| step time vs TP=1 PP=1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rest = r["step"] - r["forward"] - r["fwd_bwd"]
        fmt = lambda v: "-" if v != v else f"{v:.3f}"  # noqa: E731 - NaN: not measurable at PP > 1
        lines.append(
            f"| {r['model']} | {r['tp']} | {r['pp']} | {r['tokens']} | {fmt(r['forward'])} | {fmt(r['fwd_bwd'])} | "
            f"{r['step']:.3f} | {fmt(rest)} | {r['tokens_per_s']:.0f} | {r['step_time_vs_tp1']:.2f}x |"
        )
    lines.append(f"\nMedian of {reps} runs; 1-minute load average at the end: {load:.1f} on {os.cpu_count()} cores.")
    (RESULTS / f"train_step{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
