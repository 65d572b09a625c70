"""A/B on the tiny CPU task: DynaMO allocation (`optimal`) vs uniform GRPO allocation at the same rollout budget.

Runs the real main job (`dynamo-mega train`, Megatron + vLLM + math-verify) once per (seed, mode), identical
except for `allocation.mode`; the seed fixes the initial weights, the warm-up and the prompt order, so each
pair starts RL from the same policy. Held-out greedy accuracy is recorded every `--eval-every` RL steps against
the rollouts consumed so far (both modes spend exactly prompts_per_step x samples_per_prompt per step).

    python bench/allocation_ab.py                 # 3 seeds x 2 modes; writes bench/results/allocation_ab.{json,md}
    python bench/allocation_ab.py --quick         # 1 seed, a few steps: a smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODES = ("uniform", "optimal")


def run_one(out: Path, seed: int, mode: str, steps: int, eval_every: int, config: str, overrides: list[str]) -> dict:
    cmd = [
        sys.executable, "-m", "dynamo_mega.cli", "train", config, f"run.output_dir={out}", f"run.seed={seed}",
        f"allocation.mode={mode}", f"run.steps={steps}", f"run.eval_every={eval_every}", "run.max_minutes=0",
        "run.progress=false", "checkpoint.resume=none", *overrides,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run {mode} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return collect(out, seed, mode)


def collect(out: Path, seed: int, mode: str) -> dict:
    """Accuracy vs rollouts consumed, and the budget share on zero-variance groups, from a finished run."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    samples = {r["step"]: r["samples"] for r in records if r["phase"] == "train"}
    curve = []
    for r in records:
        if r["phase"] == "eval":
            curve.append({"step": r["step"], "rollouts": sum(n for s, n in samples.items() if s <= r["step"]),
                          "accuracy": r["accuracy"]})
    train = [r for r in records if r["phase"] == "train"]
    waste = statistics.mean(r["frac_budget_all_correct"] + r["frac_budget_all_wrong"] for r in train)
    return {"seed": seed, "mode": mode, "curve": curve, "budget_on_zero_variance_groups": waste}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    # Per-prompt history exists only from a prompt's second visit: a smaller train split gives it more epochs.
    ap.add_argument("--override", nargs="*", default=["data.num_train=1024"], help="extra dotted config overrides")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--collect", default=None, help="only tabulate finished runs found as DIR/<mode>_<seed>/")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.eval_every = [1], 2, 1
    runs = []
    if args.collect:
        for seed in args.seeds:
            for mode in MODES:
                if (Path(args.collect) / f"{mode}_{seed}" / "summary.json").is_file():
                    runs.append(collect(Path(args.collect) / f"{mode}_{seed}", seed, mode))
        args.seeds = sorted({r["seed"] for r in runs})
    else:
        run_all(args, runs)
    report(args, runs)


def run_all(args, runs: list[dict]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for mode in MODES:
                runs.append(run_one(
                    Path(tmp) / f"{mode}_{seed}", seed, mode, args.steps, args.eval_every, args.config, args.override
                ))
                print(json.dumps({k: runs[-1][k] for k in ("seed", "mode")} | {"final": runs[-1]["curve"][-1]}), flush=True)


def report(args, runs: list[dict]) -> None:
    steps = sorted({p["step"] for r in runs for p in r["curve"]})
    table = []
    for step in steps:
        row = {"step": step}
        for mode in MODES:
            accs = [p["accuracy"] for r in runs if r["mode"] == mode for p in r["curve"] if p["step"] == step]
            rollouts = [p["rollouts"] for r in runs if r["mode"] == mode for p in r["curve"] if p["step"] == step]
            row[mode] = {"mean": statistics.mean(accs), "per_seed": accs, "rollouts": rollouts[0] if rollouts else None}
        table.append(row)
    out = {"args": vars(args), "runs": runs, "table": table, "loadavg_1min_at_end": os.getloadavg()[0]}
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"allocation_ab{suffix}.json").write_text(json.dumps(out, indent=1))
    lines = [
        f"Held-out greedy accuracy (mean of seeds {args.seeds}; per-seed values in brackets), {args.config} "
        f"with {' '.join(args.override)}.",
        "",
        "| RL step | rollouts consumed | uniform | optimal (DynaMO) | optimal - uniform |",
        "|---|---|---|---|---|",
    ]
    for row in table:
        u, o = row["uniform"], row["optimal"]
        lines.append(
            f"| {row['step']} | {u['rollouts']} | {u['mean']:.3f} {[round(a, 3) for a in u['per_seed']]} | "
            f"{o['mean']:.3f} {[round(a, 3) for a in o['per_seed']]} | {o['mean'] - u['mean']:+.3f} |"
        )
    for mode in MODES:
        waste = statistics.mean(r["budget_on_zero_variance_groups"] for r in runs if r["mode"] == mode)
        lines.append(f"\n{mode}: mean share of the rollout budget spent on all-correct or all-wrong groups: {waste:.3f}")
    (RESULTS / f"allocation_ab{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
