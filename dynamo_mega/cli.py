"""`dynamo-mega train | plot | convert | eval | plan | launch`: parse, call. User mistakes exit with code 2 and one
line on stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynamo-mega", description="DynaMO RL trainer on megatron-core + vLLM")
    sub = p.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="run RL training from a YAML config")
    tr.add_argument("config", nargs="?", default="configs/tiny_cpu.yaml", help="YAML config (default: configs/tiny_cpu.yaml)")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.steps=5 parallel.tensor_parallel=2")
    pl = sub.add_parser("plot", help="render RUN_DIR/plot.png from RUN_DIR/metrics.jsonl")
    pl.add_argument("run_dir")
    from dynamo_mega.convert.cli import add_arguments as add_convert_arguments

    add_convert_arguments(sub.add_parser("convert", help="HF <-> Megatron checkpoint conversion (any TP/PP)"))
    ev = sub.add_parser("eval", help="pass@1 / pass@k of an HF checkpoint on the math benchmarks (vLLM + math-verify)")
    ev.add_argument("model_dir", help="HF checkpoint folder: config.json + *.safetensors (+ tokenizer, or set eval.tokenizer)")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.samples=16 eval.k=[1,16] eval.temperature=0.6")
    ev.add_argument("--config", default=None, help="YAML config whose eval/rollout sections apply (default: built-in defaults)")
    ev.add_argument("--output", default=None, help="results folder (default: runs/eval/<model folder name>)")
    pn = sub.add_parser("plan", help="per-GPU memory of a config's layout; fits or not, and layouts that fit")
    pn.add_argument("config")
    pn.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor_parallel=4")
    pn.add_argument("--gpus", type=int, default=None, help="GPUs in the job (default: launch.nodes x launch.procs_per_node)")
    pn.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    pn.add_argument("--offload", action="store_true", help="training state moved to host memory while vLLM generates")
    la = sub.add_parser("launch", help="run `train CONFIG` under torchrun through nemo-run (local or Slurm, per launch.*)")
    la.add_argument("config")
    la.add_argument("overrides", nargs="*", help="dotted overrides for the launch and the job, e.g. launch.executor=local")
    la.add_argument("--dry-run", action="store_true", help="print the exact commands (torchrun line or sbatch script)")
    return p


def _launch(args) -> int:
    from dynamo_mega.config import ConfigError, load_config
    from dynamo_mega.launch import dry_run, launch

    try:
        cfg = load_config(args.config, args.overrides, training=False)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.dry_run:
        print(dry_run(cfg, args.config, args.overrides))
        return 0
    result = launch(cfg, args.config, args.overrides)
    print(json.dumps({"experiment_id": result.experiment_id, "state": result.state, "job_dir": result.job_dir}))
    if cfg.launch.executor == "local" and not result.succeeded:
        print(f"dynamo-mega: the job {result.state}; logs under {result.job_dir}", file=sys.stderr)
        return 1
    return 0


def _plan(args) -> int:
    from dynamo_mega.config import ConfigError, load_config
    from dynamo_mega.models.qwen import arch_from_model_config
    from dynamo_mega.planner import format_plan, inputs_from_config, layout_problems, plan_memory, suggest_layouts

    try:
        cfg = load_config(args.config, args.overrides, training=False)
        arch = arch_from_model_config(cfg.model)
    except (ConfigError, ValueError) as exc:
        return _fail(str(exc))
    gpus = args.gpus or cfg.launch.nodes * cfg.launch.procs_per_node
    inputs = inputs_from_config(cfg, gpus, args.gpu_mem, offload=args.offload)
    problems = layout_problems(arch, inputs.tp, inputs.pp, gpus, inputs.vllm_tp, inputs.colocated)
    if problems:
        return _fail(f"{args.config}: " + "; ".join(problems))
    plan = plan_memory(arch, inputs)
    print(format_plan(plan))
    fitting = suggest_layouts(arch, inputs, gpus_per_node=min(cfg.launch.procs_per_node, gpus))
    if fitting:
        print(
            "\nLayouts that fit (fewest model-parallel GPUs first): "
            + ", ".join(f"TP={m.inputs.tp} PP={m.inputs.pp} ({max(m.train_peak, m.rollout_peak):.1f} GiB)" for m in fitting[:4])
        )
    else:
        print(
            "\nNo TP/PP layout fits on these GPUs: add GPUs, lower rollout.vllm_gpu_memory_utilization, "
            "use parallel.recompute=full, or pass --offload"
        )
    return 0 if plan.fits else 1


def _eval(args) -> int:
    from dynamo_mega.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides, training=False)
    except ConfigError as exc:
        return _fail(str(exc))
    out = Path(args.output or Path("runs/eval") / Path(args.model_dir).resolve().name)

    def evaluate() -> int:
        from dynamo_mega.eval.runner import run_eval

        try:
            metrics = run_eval(args.model_dir, cfg, out)
        except ValueError as exc:  # not a Qwen checkpoint, missing benchmark files, ...
            return _fail(str(exc))
        if _is_driver():  # under torchrun every rank evaluates; rank 0 wrote the results
            print((out / "step_000000.md").read_text())
            print(json.dumps(metrics))
        return 0

    return _routed(cfg.run.verbose, out, evaluate)


def _fail(message: str) -> int:
    print(f"dynamo-mega: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "convert":
        from dynamo_mega.convert.cli import run as run_convert

        return run_convert(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "plan":
        return _plan(args)
    if args.command == "launch":
        return _launch(args)
    if args.command == "plot":
        from dynamo_mega.metrics import plot_run

        if not (Path(args.run_dir) / "metrics.jsonl").is_file():
            return _fail(f"{args.run_dir}/metrics.jsonl not found: pass a run directory written by `dynamo-mega train`")
        print(plot_run(Path(args.run_dir)))
        return 0
    return _train(args)


def _train(args) -> int:
    from dynamo_mega.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        return _fail(str(exc))

    def run() -> int:
        from dynamo_mega.train import train

        try:
            summary = train(cfg)
        except (ConfigError, ValueError) as exc:  # user input found wrong after start-up (data, world size)
            return _fail(str(exc))
        if _is_driver():
            print(summary_line(summary, cfg.run))
        return 0

    return _routed(cfg.run.verbose, Path(cfg.run.output_dir), run)


def _is_driver() -> bool:
    return os.environ.get("RANK", "0") == "0"  # under torchrun every rank runs the command; rank 0 speaks for it


def _routed(verbose: bool, run_dir: Path, body: Callable[[], int]) -> int:
    """`body()` with the libraries' output routed to RUN_DIR/logs (console.py) unless `verbose`. A crash prints its
    traceback, then where the libraries' side of the story is, and exits 1; Ctrl-C and the like keep their status."""
    from dynamo_mega import console

    routed = None
    try:
        with console.third_party_to_log(not verbose) as routed:
            if routed is not None and _is_driver():
                log = run_dir / console.LOG_DIR / console.log_name(0)
                print(f"dynamo-mega: library output (vLLM, megatron, warnings) goes to {log}; run.verbose=true shows it here")
            return body()
    except BaseException as exc:
        if isinstance(exc, Exception):
            traceback.print_exc()
        if routed is not None:  # "failed" only for a crash: SIGTERM during start-up and Ctrl-C are not failures
            why = "failed; " if isinstance(exc, Exception) else ""
            print(f"dynamo-mega: {why}the libraries' output of this run is in {routed.path}", file=sys.stderr)
        if not isinstance(exc, Exception):
            raise
        return 1


def summary_line(summary: dict, run) -> str:
    """The run's outcome in one line for the person at the terminal (the full record: RUN_DIR/summary.json).
    `run`: the RunConfig, to say why a run ended before run.steps."""
    accuracy = f"{summary['accuracy_before_rl']:.3f} -> {summary['accuracy_after_rl']:.3f}"
    minutes, seconds = divmod(round(summary["wall_s"]), 60)
    steps = f"{summary['rl_steps']} RL steps"
    if "stopped_by" in summary:
        steps += f" (stopped by {summary['stopped_by']})"
    elif summary["rl_steps"] < run.steps:  # the only other early stop
        steps += f" of {run.steps} (run.max_minutes={run.max_minutes:g} reached)"
    plot = Path(run.output_dir) / "plot.png"
    return f"dynamo-mega: done in {minutes}m{seconds:02d}s: held-out accuracy {accuracy} after {steps}; plot: {plot}"


if __name__ == "__main__":
    sys.exit(main())
