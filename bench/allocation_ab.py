"""DynaMO's effect, side by side in one run: uniform GRPO, DAPO dynamic sampling and the allocation modes, at an
equal rollout budget per step, on a mixed-difficulty task (levels 2x9, 3x9, 3x99: see TASK).

Runs the real main job (`dynamo-mega train`, Megatron + vLLM + math-verify) once per (seed, arm), identical except
for the arm's settings; the seed fixes the initial weights, the warm-up, the prompt order and the rollout
sampling seed, so every arm of a seed starts RL from the same policy: the seed's warm-up runs once and is saved as an
HF folder (warmup.save_hf_dir) that every arm loads (model.hf_checkpoint). Arms:
    uniform, dapo, reference, optimal, probing   (allocation.mode; modulation on)
    uniform_nomod                                 (allocation.mode=uniform, modulation.enabled=false)
Rollouts consumed count EVERY generated sample (probes and DAPO's dropped groups included), from the trainer's own
per-step `rollouts_generated` / `tokens_generated` metrics. The accuracy threshold is fixed by a stated rule before
looking at the other arms: --threshold-frac (0.9) of uniform GRPO's mean final held-out accuracy.

    python bench/allocation_ab.py                    # 3 seeds x 6 arms; writes bench/results/allocation_ab.{json,md}
    python bench/allocation_ab.py --quick            # 1 seed, 2 arms, a few steps: a smoke test of the script
    python bench/allocation_ab.py --collect DIR      # tabulate finished runs found as DIR/<arm>_<seed>/
    python bench/allocation_ab.py --task quickstart --arms uniform_nomod uniform optimal_nomod optimal --steps 175
                                                     # the quick start's own task and schedule (allocation_ab_quickstart.*)
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
    "uniform": ["allocation.mode=uniform"],
    "dapo": ["allocation.mode=dapo"],
    "reference": ["allocation.mode=reference"],
    "optimal": ["allocation.mode=optimal"],
    "probing": ["allocation.mode=probing"],
    "uniform_nomod": ["allocation.mode=uniform", "modulation.enabled=false"],
    "optimal_nomod": ["allocation.mode=optimal", "modulation.enabled=false"],
    # How much a prompt group weighs in the loss, named explicitly (ALGORITHM.md section 4): equal whatever its n_i,
    # or in proportion to n_i (tokens). The arms above take the default: tokens up to commit 9ae3e86, equal after
    # (results files name their commit).
    "optimal_equal": ["allocation.mode=optimal", "allocation.prompt_weight=equal"],
    "probing_equal": ["allocation.mode=probing", "allocation.prompt_weight=equal"],
    "optimal_tokens": ["allocation.mode=optimal", "allocation.prompt_weight=tokens"],
    "probing_tokens": ["allocation.mode=probing", "allocation.prompt_weight=tokens"],
}
# The task: configs/tiny_cpu.yaml with three difficulty levels in equal shares (NxM = chains of N operands in [0, M]):
# 2x9 (200 problems: what the policy masters), 3x9 (the quick start's chains: learnable) and 3x99 (beyond this policy),
# 480 RL training prompts (7.5 steps per epoch, so history-based modes get history), 240 held-out prompts (80 per
# level). The seed's warm-up trains on a superset (2,400 prompts: make_splits gives the same held-out set and, per
# level, a superset of the train prompts) until held-out greedy accuracy reaches 0.42.
TASK = [
    "data.levels=[2x9,3x9,3x99]",
    "data.num_train=480",
    "data.num_eval=240",
    "rollout.samples_per_prompt=8",
    "allocation.n_low=4",
    "allocation.n_high=16",
]
WARMUP = ["data.num_train=2400", "warmup.stop_accuracy=0.42", "warmup.max_steps=1000"]
# --task quickstart: configs/tiny_cpu.yaml as it is (3x9 chains, 3,500 train / 500 held-out prompts, its own warm-up
# to 0.13 held-out), so an arm's run is the quick start's job with the arm's overrides.
TASKS = {"mixed": (TASK, WARMUP), "quickstart": ([], [])}


def _train(out: Path, seed: int, args, extra: list[str]) -> None:
    cmd = [
        sys.executable,
        "-m",
        "dynamo_mega.cli",
        "train",
        args.config,
        f"run.output_dir={out}",
        f"run.seed={seed}",
        f"run.eval_every={args.eval_every}",
        "run.max_minutes=0",
        "run.progress=false",
        "checkpoint.resume=none",
        *TASKS[args.task][0],
        *extra,
        *args.override,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{out.name} failed:\n{proc.stderr[-3000:]}")


def warm_start(seed: int, args) -> Path:
    """The seed's supervised warm-up, run once and saved as an HF folder that every arm of the seed starts from."""
    folder = Path(args.work) / f"warm_{seed}_hf"
    if not (folder / "model.safetensors").is_file():
        warmup = TASKS[args.task][1]
        _train(Path(args.work) / f"warm_{seed}", seed, args, [*warmup, "run.steps=0", f"warmup.save_hf_dir={folder}"])
    return folder


def run_one(out: Path, seed: int, arm: str, args) -> dict:
    t0 = time.time()
    start = [f"model.hf_checkpoint={warm_start(seed, args)}", "warmup.enabled=false"]
    _train(out, seed, args, [f"run.steps={args.steps}", f"rollout.seed={seed}", *start, *ARMS[arm]])
    return collect(out, seed, arm) | {"wall_s": time.time() - t0}


def collect(out: Path, seed: int, arm: str) -> dict:
    """The curve (held-out accuracy against rollouts and tokens consumed) and per-step allocation facts of a run."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r["phase"] == "train"]
    curve = []
    for r in records:
        if r["phase"] == "eval":
            done = [x for x in train if x["step"] <= r["step"]]
            levels = {k: v for k, v in r.items() if k.startswith("accuracy_level_")}
            curve.append(
                {
                    "step": r["step"],
                    "accuracy": r["accuracy"],
                    **levels,
                    "rollouts": sum(x["rollouts_generated"] for x in done),
                    "tokens": sum(x["tokens_generated"] for x in done),
                }
            )

    def mean(key: str) -> float | None:
        vals = [x[key] for x in train if key in x]
        return statistics.mean(vals) if vals else None

    def spread(key: str) -> float | None:
        vals = [x[key] for x in train if key in x]
        return statistics.pstdev(vals) if len(vals) > 1 else None

    return {
        "seed": seed,
        "arm": arm,
        "curve": curve,
        "budget_on_zero_variance_groups": zero_variance_share(train),
        "first_step_frac_all_correct": train[0]["frac_prompts_all_correct"] if train else None,
        "first_step_frac_all_wrong": train[0]["frac_prompts_all_wrong"] if train else None,
        "grad_var_proxy": mean("grad_var_proxy"),
        "n_std": mean("n_std"),
        "estimate_abs_error": mean("estimate_abs_error"),
        "entropy_mean": mean("entropy"),
        "entropy_std": spread("entropy"),
        "grad_norm_mean": mean("grad_norm"),
        "grad_norm_std": spread("grad_norm"),
        "grad_norm_max": max((x["grad_norm"] for x in train), default=None),
        "rl_s": sum(x.get("time_rollout", 0) + x.get("time_reward", 0) + x["time_train"] + x["time_sync"] for x in train),
    }


def zero_variance_share(train: list[dict]) -> float:
    """Share of all generated rollouts that carried no gradient: groups trained on whose rewards were all equal, plus
    (DAPO) every group generated and never trained on (the dropped all-equal ones and any beyond the batch)."""
    wasted = sum(
        (x["frac_budget_all_correct"] + x["frac_budget_all_wrong"]) * x["samples"] + x["rollouts_generated"] - x["samples"]
        for x in train
    )
    return wasted / sum(x["rollouts_generated"] for x in train)


def rollouts_to_reach(run: dict, threshold: float) -> float | None:
    """Rollouts consumed at the first evaluation whose accuracy reaches the threshold (None: never reached)."""
    return next((p["rollouts"] for p in run["curve"] if p["accuracy"] >= threshold), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    ap.add_argument("--task", choices=list(TASKS), default="mixed", help="mixed: the three levels of TASK (default)")
    ap.add_argument("--override", nargs="*", default=[], help="extra dotted config overrides, after the task's")
    ap.add_argument("--threshold-frac", type=float, default=0.9)
    ap.add_argument("--work", default=None, help="run folders, kept for --collect (default runs/bench_allocation_ab[_TASK])")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--collect", default=None, help="only tabulate finished runs found as DIR/<arm>_<seed>/")
    args = ap.parse_args()
    args.work = args.work or "runs/bench_allocation_ab" + ("" if args.task == "mixed" else f"_{args.task}")
    if args.quick:
        args.seeds, args.arms, args.steps, args.eval_every = [1], ["uniform", "probing"], 2, 1
    runs = []
    if args.collect:
        for seed in args.seeds:
            for arm in args.arms:
                if (Path(args.collect) / f"{arm}_{seed}" / "summary.json").is_file():
                    runs.append(collect(Path(args.collect) / f"{arm}_{seed}", seed, arm))
    else:
        for seed in args.seeds:
            for arm in args.arms:
                runs.append(run_one(Path(args.work) / f"{arm}_{seed}", seed, arm, args))
                print(json.dumps({"seed": seed, "arm": arm, "final": runs[-1]["curve"][-1]}), flush=True)
    report(args, runs)


def _fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def report(args, runs: list[dict]) -> None:
    arms = [a for a in args.arms if any(r["arm"] == a for r in runs)]
    by_arm = {a: [r for r in runs if r["arm"] == a] for a in arms}
    base = by_arm.get("uniform") or runs
    threshold = args.threshold_frac * statistics.mean(r["curve"][-1]["accuracy"] for r in base)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    )
    summary = {}
    for arm, rs in by_arm.items():
        reach = [rollouts_to_reach(r, threshold) for r in rs]
        finals = [r["curve"][-1]["accuracy"] for r in rs]
        summary[arm] = {
            "rollouts_to_threshold_per_seed": reach,
            "rollouts_to_threshold_mean": statistics.mean(reach) if all(x is not None for x in reach) else None,
            "final_accuracy_mean": statistics.mean(finals),
            "final_accuracy_per_seed": finals,
            "final_rollouts_mean": statistics.mean(r["curve"][-1]["rollouts"] for r in rs),
            "final_tokens_mean": statistics.mean(r["curve"][-1]["tokens"] for r in rs),
            **{
                k: statistics.mean(r[k] for r in rs) if all(r[k] is not None for r in rs) else None
                for k in (
                    "budget_on_zero_variance_groups",
                    "grad_var_proxy",
                    "n_std",
                    "estimate_abs_error",
                    "entropy_mean",
                    "entropy_std",
                    "grad_norm_mean",
                    "grad_norm_std",
                    "grad_norm_max",
                    "first_step_frac_all_correct",
                    "first_step_frac_all_wrong",
                )
            },
        }
    uni = summary.get("uniform", {}).get("rollouts_to_threshold_mean")
    for s in summary.values():
        mine = s["rollouts_to_threshold_mean"]
        s["rollouts_to_threshold_vs_uniform"] = mine / uni if mine is not None and uni else None
    out = {
        "args": vars(args),
        "task_overrides": TASKS[args.task][0],
        "commit": commit,
        "dirty_tree": dirty,
        "threshold": threshold,
        "summary": summary,
        "runs": runs,
        "loadavg_1min_at_end": os.getloadavg()[0],
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = ("" if args.task == "mixed" else f"_{args.task}") + ("_quick" if args.quick else "")
    (RESULTS / f"allocation_ab{suffix}.json").write_text(json.dumps(out, indent=1))
    (RESULTS / f"allocation_ab{suffix}.md").write_text(markdown(args, out, by_arm) + "\n")
    print(markdown(args, out, by_arm))


def markdown(args, out: dict, by_arm: dict) -> str:
    s, thr = out["summary"], out["threshold"]
    lines = [
        f"# Allocation A/B: {len(args.seeds)} seeds x {len(by_arm)} arms (commit {out['commit']}"
        f"{', uncommitted changes' if out['dirty_tree'] else ''})",
        "",
        f"Task: {args.config} with {' '.join(out['task_overrides'] + list(args.override)) or 'no overrides'}; "
        f"{args.steps} RL steps, 64 prompts x 8 rollouts budget per step; held-out greedy accuracy "
        f"({'240 prompts, 80 per level' if args.task == 'mixed' else 'the config held-out set'}) every "
        f"{args.eval_every} steps. Rollouts count every generated sample (probes, DAPO's dropped groups). Loss: global "
        "token mean, a prompt group weighted by allocation.prompt_weight (each arm's setting, else the default of the "
        "commit: tokens, in proportion to n_i, up to 9ae3e86; equal after; ALGORITHM.md section 4).",
        "",
        f"Threshold: {args.threshold_frac} x uniform's mean final accuracy = {thr:.3f}.",
        "",
        "| arm | rollouts to threshold (per seed) | mean | vs uniform | final acc (per seed) | rollouts consumed | "
        "tokens generated | budget without signal (zero-var or dropped) | grad-var proxy | mean n_std | estimate error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, x in s.items():
        per = ", ".join("not reached" if v is None else f"{v:.0f}" for v in x["rollouts_to_threshold_per_seed"])
        mean = "not reached by all" if x["rollouts_to_threshold_mean"] is None else f"{x['rollouts_to_threshold_mean']:.0f}"
        finals = ", ".join(f"{a:.3f}" for a in x["final_accuracy_per_seed"])
        lines.append(
            f"| {arm} | {per} | {mean} | {_fmt(x['rollouts_to_threshold_vs_uniform'], 2)} | {x['final_accuracy_mean']:.3f} "
            f"({finals}) | {x['final_rollouts_mean']:.0f} | {x['final_tokens_mean']:.0f} | "
            f"{_fmt(x['budget_on_zero_variance_groups'])} | {_fmt(x['grad_var_proxy'], 4)} | {_fmt(x['n_std'], 2)} | "
            f"{_fmt(x['estimate_abs_error'])} |"
        )
    levels = sorted(
        {k[len("accuracy_level_") :] for r in out["runs"] for p in r["curve"] for k in p if k.startswith("accuracy_level_")}
    )
    lines += ["", "## Held-out accuracy against rollouts consumed (mean over seeds; per level NxM = N operands in [0, M])", ""]
    lines += [
        "| arm | step | rollouts | tokens | accuracy | " + " | ".join(levels) + " |",
        "|---|---|---|---|---|" + "---|" * len(levels),
    ]
    for arm, rs in by_arm.items():
        for i, p in enumerate(rs[0]["curve"]):
            pts = [r["curve"][i] for r in rs if len(r["curve"]) > i]
            avg = {k: statistics.mean(q.get(k, float("nan")) for q in pts) for k in p if k != "step"}
            lv = " | ".join(_fmt(avg.get(f"accuracy_level_{n}")) for n in levels)
            lines.append(f"| {arm} | {p['step']} | {avg['rollouts']:.0f} | {avg['tokens']:.0f} | {avg['accuracy']:.3f} | {lv} |")
    lines += [
        "",
        "## Modulation on vs off (uniform allocation), mean over seeds",
        "",
        "| arm | final acc | entropy mean | entropy std over steps | grad norm mean | grad norm std | grad norm max |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ("uniform", "uniform_nomod"):
        if arm in s:
            x = s[arm]
            lines.append(
                f"| {arm} | {x['final_accuracy_mean']:.3f} | {_fmt(x['entropy_mean'])} | {_fmt(x['entropy_std'])} | "
                f"{_fmt(x['grad_norm_mean'])} | {_fmt(x['grad_norm_std'])} | {_fmt(x['grad_norm_max'])} |"
            )
    u = s.get("uniform", {})
    lines += [
        "",
        f"At the first RL step (uniform arm, mean over seeds): all-correct prompts {_fmt(u.get('first_step_frac_all_correct'))}, "
        f"all-wrong {_fmt(u.get('first_step_frac_all_wrong'))}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
