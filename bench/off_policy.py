"""Synchronous vs one-step-off-policy generation (rollout.max_staleness 0 vs 1), side by side in one run.

Two parts, each running the real main job (`dynamo-mega train`: Megatron + vLLM + math-verify) once per (config,
seed, arm), identical except for the arm:
- tiny: configs/tiny_cpu.yaml from ONE shared warmed-up start (a supervised warm-up run once, saved with
  warmup.save_hf_dir; every run loads it with model.hf_checkpoint), seeds 0..2 (prompt order and rollout sampling):
  held-out accuracy against rollouts consumed and against RL wall time; the allocator's estimate error.
- heavy: a generation-heavy config (a 25M-parameter Qwen2-shaped policy, random weights, 64 new tokens per
  response, no warm-up): step time, the time the loop waited for rollouts, and how much generation the training
  hid. A random policy never answers right, so the reward there adds a bench-only term that varies between
  samples (the share of digits, bench/trl_peer.py's digit_share_reward): the policy step has work (math-verify's
  reward is 0 for every sample).

Arms: sync (max_staleness=0), ahead (max_staleness=1), ahead_tis (max_staleness=1 + token TIS, the correction
the off-policy samples call for; docs/async.md). Every wall time counts this machine's 2 cores, which generation
(vLLM's engine process) and training share: on a GPU cluster the two run on separate devices (docs/async.md).

    python bench/off_policy.py                   # tiny (3 seeds x arms) + heavy; bench/results/off_policy.{json,md}
    python bench/off_policy.py --quick           # a few steps each: a smoke test of the script (*_quick.*)
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
ARMS = {
    "sync": ["rollout.max_staleness=0"],
    "ahead": ["rollout.max_staleness=1"],
    "ahead_tis": ["rollout.max_staleness=1", "mismatch.token_is=true"],
}
# 25.2M parameters: 8 layers of hidden 512 (GQA 8 heads / 4 groups, SwiGLU 1536); answers with running totals;
# 16 prompts x 4 samples of 64 new tokens per step.
HEAVY = [
    "model.hidden_size=512",
    "model.num_layers=8",
    "model.num_attention_heads=8",
    "model.num_query_groups=4",
    "model.ffn_hidden_size=1536",
    "model.max_position_embeddings=96",
    "data.show_work=running_totals",
    "rollout.prompts_per_step=16",
    "rollout.samples_per_prompt=4",
    "rollout.max_new_tokens=64",
    "allocation.mode=uniform",
    "optim.mini_batches=1",
    "optim.micro_batch_size=16",
    "warmup.enabled=false",
    "run.eval_every=0",
    "run.eval_prompts=16",
    "algo.reward=[{fn: math_verify}, {fn: bench/trl_peer.py:digit_share_reward, weight: 1.0}]",
]


def _train(out: Path, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "dynamo_mega.cli", "train", "configs/tiny_cpu.yaml", f"run.output_dir={out}"]
    cmd += ["run.max_minutes=0", "run.progress=false", "checkpoint.resume=none", "checkpoint.interval=0", *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{out.name} failed:\n{proc.stderr[-3000:]}")
    return time.time() - t0


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def run_tiny(args, work: Path) -> list[dict]:
    warm = work / "warm_hf"
    if not (warm / "model.safetensors").is_file():
        _train(work / "warm", ["run.steps=0", f"warmup.save_hf_dir={warm}"])
    runs = []
    for seed in args.seeds:
        for arm in args.arms:
            out = work / f"tiny_{arm}_{seed}"
            overrides = [f"model.hf_checkpoint={warm}", "warmup.enabled=false", f"run.seed={seed}", f"rollout.seed={seed}"]
            overrides += [f"run.steps={args.steps}", f"run.eval_every={args.eval_every}", *ARMS[arm]]
            wall = _train(out, overrides)
            runs.append({"part": "tiny", "arm": arm, "seed": seed, "process_s": wall, **_summarise(_records(out))})
            print(f"tiny {arm} seed {seed}: {runs[-1]['final_accuracy']:.3f} in {runs[-1]['rl_s']:.0f} s", flush=True)
    return runs


def run_heavy(args, work: Path) -> list[dict]:
    runs = []
    for arm in args.heavy_arms:
        out = work / f"heavy_{arm}"
        wall = _train(out, [*HEAVY, f"run.steps={args.heavy_steps}", *ARMS[arm]])
        runs.append({"part": "heavy", "arm": arm, "seed": 0, "process_s": wall, **_summarise(_records(out))})
        print(f"heavy {arm}: {runs[-1]['step_s']:.1f} s/step", flush=True)
    return runs


def _summarise(records: list[dict]) -> dict:
    """The accuracy curve against rollouts and RL seconds, and the per-step time split (first step left out of
    the means: it generates synchronously in every arm)."""
    train = [r for r in records if r["phase"] == "train"]
    curve = []
    for r in records:
        if r["phase"] == "eval":  # step 0: before RL; the last: after it
            done = [x for x in train if x["step"] <= r["step"]]
            curve.append(
                {
                    "step": r["step"],
                    "accuracy": r["accuracy"],
                    "rollouts": sum(x["rollouts_generated"] for x in done),
                    "rl_s": sum(_step_s(x) for x in done),
                }
            )
    steady = train[1:] or train
    return {
        "curve": curve,
        "final_accuracy": curve[-1]["accuracy"] if curve else None,
        "rl_s": sum(_step_s(x) for x in train),
        "step_s": _mean([_step_s(x) for x in steady]),
        "generate_s": _mean([x.get("time_rollout", 0) + x.get("time_reward", 0) for x in steady]),
        "train_s": _mean([x["time_train"] for x in steady]),
        "wait_s": _mean([x["time_rollout_wait"] for x in steady]),
        "hidden_s": _mean([x.get("rollout_hidden_s", 0.0) for x in steady]),
        "staleness": _mean([x["staleness"] for x in train]),
        "estimate_abs_error": _mean([x["estimate_abs_error"] for x in train if "estimate_abs_error" in x]),
        "tis_capped": _mean([x["tis_capped"] for x in train if "tis_capped" in x]),
        "mismatch_kl": _mean([x["mismatch_kl"] for x in train if "mismatch_kl" in x]),
        "grad_norm_max": max((x["grad_norm"] for x in train), default=None),
        "response_tokens_per_s": _mean([x["response_tokens_per_s"] for x in steady]),
    }


def _step_s(r: dict) -> float:
    """A step's wall time: waiting for rollouts + training + weight sync (generation ahead overlaps the training)."""
    return r["time_rollout_wait"] + r["time_train"] + r["time_sync"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few steps per run, one seed: checks the script")
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_off_policy"))
    ap.add_argument("--arms", nargs="+", default=["sync", "ahead"], choices=list(ARMS), help="tiny task's arms")
    ap.add_argument("--heavy-arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--parts", nargs="+", default=["tiny", "heavy"], choices=["tiny", "heavy"])
    args = ap.parse_args()
    args.seeds = [0] if args.quick else [0, 1, 2]
    args.steps, args.eval_every, args.heavy_steps = (4, 2, 3) if args.quick else (175, 25, 8)
    work = Path(args.work) / ("quick" if args.quick else "full")
    t0, load_start = time.time(), os.getloadavg()[0]
    runs = (run_tiny(args, work) if "tiny" in args.parts else []) + (run_heavy(args, work) if "heavy" in args.parts else [])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True)
    out = {
        "commit": commit + ("+uncommitted" if dirty.stdout.strip() else ""),
        "quick": args.quick,
        "seeds": args.seeds,
        "tiny_steps": args.steps,
        "heavy_steps": args.heavy_steps,
        "heavy_overrides": HEAVY,
        "bench_wall_s": time.time() - t0,
        "loadavg_1min": [load_start, os.getloadavg()[0]],  # at the start and the end: others' work shows here
        "runs": runs,
    }
    stem = "off_policy_quick" if args.quick else "off_policy"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=1))
    (RESULTS / f"{stem}.md").write_text(markdown(out))
    print((RESULTS / f"{stem}.md").read_text())


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _stat(runs: list[dict], key: str, digits: int = 3) -> str:
    vals = [r[key] for r in runs if r.get(key) is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return _fmt(vals[0], digits)
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.pstdev(vals):.{digits}f}"


def markdown(out: dict) -> str:
    runs = out["runs"]
    lines = [
        "# Synchronous vs one-step-off-policy generation",
        "",
        f"`python bench/off_policy.py{' --quick' if out['quick'] else ''}` at commit {out['commit']}, "
        f"{out['bench_wall_s'] / 60:.1f} min; 1-minute load average {out['loadavg_1min'][0]:.1f} at the start and "
        f"{out['loadavg_1min'][1]:.1f} at the end on 2 cores (above ~2.5: other work ran beside it and the times are "
        "not comparable with a quiet machine's). Generation (vLLM's engine process) and "
        "training share those 2 cores, so generation ahead competes with the training it overlaps: this measures "
        "the loop, not the gain on separate GPUs (docs/async.md works that out from phase times).",
        "",
    ]
    tiny = [r for r in runs if r["part"] == "tiny"]
    if tiny:
        lines += [
            f"## Tiny task (configs/tiny_cpu.yaml, one shared warm start, {out['tiny_steps']} RL steps, "
            f"seeds {out['seeds']}; mean ± std over seeds)",
            "",
            "| arm | held-out before | held-out after | rollouts | RL s | s/step | generation s/step | train s/step "
            "| waited s/step | hidden s/step | allocator estimate error | max grad norm |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for arm in dict.fromkeys(r["arm"] for r in tiny):
            rs = [r for r in tiny if r["arm"] == arm]
            before = [{"b": r["curve"][0]["accuracy"]} for r in rs if r["curve"]]
            rollouts = [{"n": r["curve"][-1]["rollouts"]} for r in rs if r["curve"]]
            lines.append(
                f"| {arm} | {_stat(before, 'b')} | {_stat(rs, 'final_accuracy')} | {_stat(rollouts, 'n', 0)} | "
                f"{_stat(rs, 'rl_s', 0)} | {_stat(rs, 'step_s', 2)} | {_stat(rs, 'generate_s', 2)} | "
                f"{_stat(rs, 'train_s', 2)} | {_stat(rs, 'wait_s', 2)} | {_stat(rs, 'hidden_s', 2)} | "
                f"{_stat(rs, 'estimate_abs_error')} | {_stat(rs, 'grad_norm_max', 2)} |"
            )
        lines += ["", "Held-out accuracy along the run (mean over seeds): step: accuracy @ rollouts, RL seconds", ""]
        for arm in dict.fromkeys(r["arm"] for r in tiny):
            rs = [r for r in tiny if r["arm"] == arm and r["curve"]]
            points = []
            for i, point in enumerate(rs[0]["curve"]):
                acc = statistics.mean(r["curve"][i]["accuracy"] for r in rs)
                secs = statistics.mean(r["curve"][i]["rl_s"] for r in rs)
                points.append(f"{point['step']}: {acc:.3f} @ {point['rollouts']:.0f}, {secs:.0f} s")
            lines.append(f"- {arm}: " + "; ".join(points))
        lines.append("")
    heavy = [r for r in runs if r["part"] == "heavy"]
    if heavy:
        lines += [
            f"## Generation-heavy config (25.2M parameters, 16 x 4 samples of 64 new tokens, {out['heavy_steps']} steps; "
            "means over steps 2..)",
            "",
            "| arm | s/step | generation s/step | train s/step | waited s/step | hidden s/step "
            "| overlap (hidden / generation) | response tokens/s | speed vs sync |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        base = next((r["step_s"] for r in heavy if r["arm"] == "sync"), None)
        for r in heavy:
            overlap = r["hidden_s"] / r["generate_s"] if r["generate_s"] else None
            speed = base / r["step_s"] if base and r["step_s"] else None
            lines.append(
                f"| {r['arm']} | {_fmt(r['step_s'], 2)} | {_fmt(r['generate_s'], 2)} | {_fmt(r['train_s'], 2)} | "
                f"{_fmt(r['wait_s'], 2)} | {_fmt(r['hidden_s'], 2)} | {_fmt(overlap, 2)} | "
                f"{_fmt(r['response_tokens_per_s'], 0)} | {_fmt(speed, 2)}x |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
