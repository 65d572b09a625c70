"""A real train-inference mismatch on CPU: the vLLM engine in bf16 under the fp32 trainer, with the mismatch
correction (docs/mismatch.md, ALGORITHM.md section 6) on and off, on the tiny task, 3 seeds.

Runs the real main job (`dynamo-mega train`, Megatron + vLLM + math-verify) once per (seed, arm), identical except
for the arm's settings. One supervised warm-up (seed 0, fp32 engine, the tiny config's own warm-up rule) runs first and
is saved as an HF folder (warmup.save_hf_dir) that every run loads (model.hf_checkpoint, warmup.enabled=false): all
twelve runs start RL from the same policy; the seed (run.seed and rollout.seed) fixes the prompt order and the
sampling. Arms:
    fp32          rollout.vllm_dtype=float32                       the reference: engine and trainer agree
    bf16          rollout.vllm_dtype=bfloat16                      no correction
    bf16_tis      + mismatch.token_is=true                         token TIS, C = 2 (default cap)
    bf16_tis_geo  + mismatch.mask_geometric=true                   + geometric sequence masking, tau = 2 (default)
The held-out evaluation inside a run is greedy decoding on the run's own engine, so a bf16 arm is also evaluated in
bf16. To separate what training did from what the bf16 engine's greedy decoding does, each bf16 run's final checkpoint
is converted to HF (dynamo-mega convert mcore-to-hf) and evaluated once more on an fp32 engine (a 0-step run).

Stability, per run: the largest gradient norm (before clipping), skipped optimizer steps (non-finite), the largest
approx KL, and `collapsed`, a rule stated before the runs: the final held-out accuracy falls below the accuracy before
RL (the shared warm start's), or more than 0.10 below the run's own peak.

    python bench/mismatch_bf16.py --jobs 3 --commit 7f4488c   # what ran: 3 seeds x 4 arms, 30 RL steps, seeds in
                                                              # parallel; writes bench/results/mismatch_bf16.{json,md}
    python bench/mismatch_bf16.py --quick                     # 1 seed, 4 arms, 2 steps: a smoke test (*_quick.*)
    python bench/mismatch_bf16.py --collect DIR               # tabulate finished runs found as DIR/<arm>_<seed>/
The trainer runs from a git archive of --commit (default HEAD) under runs/src_<commit>, never the working tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PYTHON = str(REPO / ".venv" / "bin" / "python")
# The code under test: a snapshot of HEAD (git archive), so uncommitted edits others make in the working tree during
# the runs never reach them; `python -m dynamo_mega.cli` from the snapshot imports the snapshot's package (the
# current directory comes before the editable install's finder). Set by main().
SRC = REPO
CLI = [PYTHON, "-m", "dynamo_mega.cli"]
ARMS = {
    "fp32": ["rollout.vllm_dtype=float32"],
    "bf16": ["rollout.vllm_dtype=bfloat16"],
    "bf16_tis": ["rollout.vllm_dtype=bfloat16", "mismatch.token_is=true"],
    "bf16_tis_geo": ["rollout.vllm_dtype=bfloat16", "mismatch.token_is=true", "mismatch.mask_geometric=true"],
}
SERIES = ("mismatch_kl", "logprob_mismatch", "tis_capped", "seq_masked", "grad_norm", "approx_kl", "entropy")
COMMON = ["run.max_minutes=0", "run.progress=false", "checkpoint.resume=none"]


def _train(config: str, out: Path, extra: list[str]) -> float:
    t0 = time.time()
    proc = subprocess.run(
        [*CLI, "train", config, f"run.output_dir={out}", *COMMON, *extra], cwd=SRC, capture_output=True, text=True
    )
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{out.name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.time() - t0


def warm_start(args) -> Path:
    """The one supervised warm-up (seed 0, fp32 engine), saved as an HF folder every run starts from."""
    folder = Path(args.work) / "warm_hf"
    if not (folder / "model.safetensors").is_file():
        _train(
            args.config,
            Path(args.work) / "warm",
            ["run.seed=0", "run.steps=0", "rollout.vllm_dtype=float32", f"warmup.save_hf_dir={folder}"],
        )
    return folder


def fp32_eval(out: Path, args) -> float:
    """Greedy held-out accuracy of a run's final policy on an fp32 engine: convert its last checkpoint to HF, run 0
    RL steps from it (the run's own `init_eval`)."""
    ckpts = sorted(p for p in (out / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file())
    hf = out / "final_hf"
    if not (hf / "model.safetensors").is_file():
        proc = subprocess.run(
            [
                *CLI,
                "convert",
                "mcore-to-hf",
                str(ckpts[-1]),
                str(hf),
                "--hf-config",
                str(out / "hf_init" / "config.json"),
                "--no-progress",
                "--overwrite",
            ],
            cwd=SRC,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"convert {ckpts[-1]} failed:\n{proc.stderr[-3000:]}")
        for tok in Path(args.work, "warm_hf").glob("tokenizer*.json"):
            shutil.copy(tok, hf / tok.name)
    ev = out.parent / f"{out.name}_fp32eval"
    _train(
        args.config,
        ev,
        [
            f"model.hf_checkpoint={hf}",
            "warmup.enabled=false",
            "run.steps=0",
            "rollout.vllm_dtype=float32",
            f"run.eval_prompts={args.eval_prompts}",
        ],
    )
    return json.loads((ev / "summary.json").read_text())["accuracy_init"]


def run_one(seed: int, arm: str, args) -> dict:
    out = Path(args.work) / f"{arm}_{seed}"
    start = [f"model.hf_checkpoint={warm_start(args)}", "warmup.enabled=false"]
    extra = [f"run.seed={seed}", f"rollout.seed={seed}", f"run.steps={args.steps}", f"run.eval_every={args.eval_every}"]
    wall = _train(args.config, out, [*start, *extra, f"run.eval_prompts={args.eval_prompts}", *ARMS[arm]])
    return collect(out, seed, arm) | {"wall_s": wall}


def collect(out: Path, seed: int, arm: str) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r["phase"] == "train"]
    curve = [{"step": r["step"], "accuracy": r["accuracy"]} for r in records if r["phase"] == "eval"]
    series = {k: [r.get(k) for r in train] for k in SERIES}
    accs = [p["accuracy"] for p in curve]
    final, start, peak = accs[-1], accs[0], max(accs)

    def mean(k):
        v = [x for x in series[k] if x is not None]
        return statistics.mean(v) if v else None

    def top(k):
        v = [x for x in series[k] if x is not None]
        return max(v) if v else None

    ev = out.parent / f"{out.name}_fp32eval" / "summary.json"
    acc32 = json.loads(ev.read_text())["accuracy_init"] if ev.is_file() else None
    return {
        "seed": seed,
        "arm": arm,
        "steps": len(train),
        "curve": curve,
        "series": series,
        "accuracy_before_rl": start,
        "final_accuracy": final,
        "peak_accuracy": peak,
        "final_accuracy_fp32_engine": final if arm == "fp32" else acc32,
        "collapsed": final < start or final < peak - 0.10,
        "skipped_steps": int(train[-1].get("skipped_steps_total", 0)) if train else 0,
        **{f"{k}_mean": mean(k) for k in SERIES},
        **{f"{k}_max": top(k) for k in ("mismatch_kl", "logprob_mismatch", "tis_capped", "seq_masked", "grad_norm", "approx_kl")},
        "grad_norm_std": statistics.pstdev([x for x in series["grad_norm"] if x is not None]) if train else None,
    }


def _ms(vals: list[float], d: int = 3) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.{d}f}"
    return f"{statistics.mean(vals):.{d}f} ± {statistics.stdev(vals):.{d}f}"


def _g(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def snapshot(commit: str) -> None:
    """Run the committed code: extract HEAD into runs/src_<commit> and run the trainer from there."""
    global SRC
    SRC = REPO / "runs" / f"src_{commit}"
    if not (SRC / "dynamo_mega").is_dir():
        SRC.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(SRC)], input=archive, check=True)
    where = subprocess.run(
        [PYTHON, "-c", "import dynamo_mega; print(dynamo_mega.__file__)"], cwd=SRC, capture_output=True, text=True
    ).stdout.strip()
    if not where.startswith(str(SRC)):
        raise RuntimeError(f"the snapshot's package is not the one imported: {where}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--steps", type=int, default=30, help="RL steps of every run (the tiny config's own: 175)")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-prompts", type=int, default=500)
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    ap.add_argument("--work", default="runs/bench_mismatch_bf16", help="run folders (kept, for --collect)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--commit", default="HEAD", help="the committed code to run (a git archive of it)")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at once (each seed's arms in sequence)")
    ap.add_argument("--no-fp32-eval", action="store_true", help="skip re-evaluating bf16 runs on an fp32 engine")
    ap.add_argument("--collect", default=None, help="only tabulate finished runs found as DIR/<arm>_<seed>/")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.eval_prompts = [0], 2, 1, 100
        args.work = str(Path(args.work) / "quick")
    rev = ["git", "rev-parse", "--short"]
    head = subprocess.run([*rev, "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    commit = subprocess.run([*rev, args.commit], cwd=REPO, capture_output=True, text=True).stdout.strip()
    args.head_at_start = head
    args.work = str((REPO / args.work).resolve())
    if not args.collect:
        snapshot(commit)
    t0 = time.time()
    runs = []
    if args.collect:
        args.work = args.collect
        for seed in args.seeds:
            for arm in args.arms:
                if (Path(args.collect) / f"{arm}_{seed}" / "summary.json").is_file():
                    runs.append(collect(Path(args.collect) / f"{arm}_{seed}", seed, arm))
    else:
        warm_start(args)

        def one_seed(seed: int) -> list[dict]:
            done = []
            for arm in args.arms:
                done.append(run_one(seed, arm, args))
                keys = ("seed", "arm", "final_accuracy", "logprob_mismatch_mean", "grad_norm_max", "wall_s")
                print(json.dumps({k: done[-1][k] for k in keys}), flush=True)
            return done

        # --jobs seeds at once (each seed's arms in sequence): accuracy does not depend on it, wall times do.
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            runs = [r for rs in pool.map(one_seed, args.seeds) for r in rs]
    if not args.no_fp32_eval:  # after every training run, so a short session still has all the runs

        def reeval(r: dict) -> dict:
            out = Path(args.work) / f"{r['arm']}_{r['seed']}"
            if r["arm"] != "fp32" and not (out.parent / f"{out.name}_fp32eval" / "summary.json").is_file():
                fp32_eval(out, args)
            return collect(out, r["seed"], r["arm"]) | {k: r[k] for k in ("wall_s",) if k in r}

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            runs = list(pool.map(reeval, runs))
    report(args, runs, commit, time.time() - t0)


def report(args, runs: list[dict], commit: str, total_s: float) -> None:
    arms = [a for a in args.arms if any(r["arm"] == a for r in runs)]
    by_arm = {a: [r for r in runs if r["arm"] == a] for a in arms}
    summary = {}
    for arm, rs in by_arm.items():
        finals = [r["final_accuracy"] for r in rs]
        f32 = [r["final_accuracy_fp32_engine"] for r in rs]
        f32 = f32 if None not in f32 else []
        summary[arm] = {
            "final_accuracy_per_seed": finals,
            "final_accuracy_mean": statistics.mean(finals),
            "final_accuracy_std": statistics.stdev(finals) if len(finals) > 1 else None,
            "final_accuracy_fp32_engine_per_seed": f32,
            "final_accuracy_fp32_engine_mean": statistics.mean(f32) if f32 else None,
            "final_accuracy_fp32_engine_std": statistics.stdev(f32) if len(f32) > 1 else None,
            "peak_accuracy_mean": statistics.mean(r["peak_accuracy"] for r in rs),
            "collapsed_runs": sum(r["collapsed"] for r in rs),
            "skipped_steps": sum(r["skipped_steps"] for r in rs),
            "grad_norm_max": max(r["grad_norm_max"] for r in rs),
            "approx_kl_max": max(r["approx_kl_max"] for r in rs),
            "wall_s_mean": statistics.mean(r["wall_s"] for r in rs) if all("wall_s" in r for r in rs) else None,
            **{
                k: statistics.mean(r[k] for r in rs) if all(r[k] is not None for r in rs) else None
                for k in (
                    "mismatch_kl_mean",
                    "logprob_mismatch_mean",
                    "tis_capped_mean",
                    "seq_masked_mean",
                    "grad_norm_mean",
                    "grad_norm_std",
                    "entropy_mean",
                    "approx_kl_mean",
                )
            },
            **{
                k: max(r[k] for r in rs) if all(r[k] is not None for r in rs) else None
                for k in ("mismatch_kl_max", "logprob_mismatch_max", "tis_capped_max", "seq_masked_max")
            },
        }
    out = {
        "args": vars(args),
        "commit": commit,
        "code_under_test": f"git archive of {commit} (runs/src_{commit}), not the working tree",
        "total_wall_s": total_s,
        "loadavg_1min_at_end": os.getloadavg()[0],
        "summary": summary,
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"mismatch_bf16{suffix}.json").write_text(json.dumps(out, indent=1))
    md = markdown(args, out, by_arm)
    (RESULTS / f"mismatch_bf16{suffix}.md").write_text(md + "\n")
    print(md)


def markdown(args, out: dict, by_arm: dict) -> str:
    s = out["summary"]
    lines = [
        f"# bf16 engine under the fp32 trainer: mismatch correction on and off ({len(args.seeds)} seeds x "
        f"{len(by_arm)} arms, commit {out['commit']})",
        "",
        f"Task: {args.config} (0.8M-parameter policy, single-digit chains), {args.steps} RL steps per run (the config's "
        f"LR schedule spans run.steps), held-out greedy accuracy on {args.eval_prompts} prompts every {args.eval_every} "
        "steps. Every run starts from one shared supervised warm-up (seed 0, fp32 engine, saved with "
        "warmup.save_hf_dir, loaded with model.hf_checkpoint + warmup.enabled=false); seeds set run.seed and "
        "rollout.seed. Trainer fp32 throughout. In-run accuracy is decoded by the run's own engine (bf16 for the bf16 "
        "arms); the fp32-engine column re-evaluates each run's final checkpoint on an fp32 engine.",
        "",
        f"Code under test: {out.get('code_under_test', out['commit'])}; HEAD when the runs started: "
        f"{getattr(args, 'head_at_start', out['commit'])}.",
        "",
        "| arm | final acc (run's engine), mean ± std | per seed | final acc (fp32 engine) | peak acc | "
        "logprob_mismatch | mismatch_kl | tis_capped | seq_masked | grad norm mean / max | approx KL max | "
        "skipped steps | collapsed runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, rs in by_arm.items():
        x = s[arm]
        per = ", ".join(f"{r['final_accuracy']:.3f}" for r in rs)
        f32 = x["final_accuracy_fp32_engine_per_seed"]
        lines.append(
            f"| {arm} | {_ms(x['final_accuracy_per_seed'])} | {per} | {_ms(f32) if f32 else '-'} | "
            f"{x['peak_accuracy_mean']:.3f} | {_g(x['logprob_mismatch_mean'])} | {_g(x['mismatch_kl_mean'])} | "
            f"{_g(x['tis_capped_mean'])} | {_g(x['seq_masked_mean'])} | {x['grad_norm_mean']:.2f} / "
            f"{x['grad_norm_max']:.2f} | {_g(x['approx_kl_max'])} | {x['skipped_steps']} | "
            f"{x['collapsed_runs']}/{len(rs)} |"
        )
    lines += [
        "",
        "Per-step metrics are means over steps and seeds (tis_capped, seq_masked: '-' where the correction is off; "
        "their largest per-step value over all runs of the arm: "
        + "; ".join(f"{a} {_g(s[a]['tis_capped_max'])} / {_g(s[a]['seq_masked_max'])}" for a in by_arm)
        + "). Largest per-step logprob_mismatch: "
        + "; ".join(f"{a} {_g(s[a]['logprob_mismatch_max'])}" for a in by_arm)
        + ". collapsed: final accuracy below the pre-RL accuracy or more than 0.10 below the run's peak.",
        "",
        "## Held-out accuracy (run's engine) against RL steps, mean over seeds",
        "",
    ]
    steps = [p["step"] for p in next(iter(by_arm.values()))[0]["curve"]]
    lines += ["| step | " + " | ".join(by_arm) + " |", "|---|" + "---|" * len(by_arm)]
    for i, st in enumerate(steps):
        cells = []
        for rs in by_arm.values():
            pts = [r["curve"][i]["accuracy"] for r in rs if len(r["curve"]) > i]
            cells.append(_ms(pts) if pts else "-")
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    walls = [r["wall_s"] for r in out["runs"] if "wall_s" in r]
    if walls:
        lines += [
            "",
            f"Wall time (2 CPU cores shared with other agents' work, so contention varies): {out['total_wall_s'] / 60:.1f} "
            f"min in all; one run {min(walls):.0f}-{max(walls):.0f} s ("
            + ", ".join(f"{a} {s[a]['wall_s_mean']:.0f} s" for a in by_arm if s[a]["wall_s_mean"] is not None)
            + f" mean); 1-min load average at the end {out['loadavg_1min_at_end']:.1f}.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
