"""`dynamo-mega train | plot | eval | plan | launch`: parse, call. User mistakes exit with code 2 and one line on stderr."""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynamo-mega", description="DynaMO RL trainer on megatron-core + vLLM")
    sub = p.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="run RL training from a YAML config")
    tr.add_argument("config", nargs="?", default="configs/tiny_cpu.yaml", help="YAML config (default: configs/tiny_cpu.yaml)")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.steps=5 parallel.tensor_parallel=2")
    pl = sub.add_parser("plot", help="render RUN_DIR/plot.png from RUN_DIR/metrics.jsonl")
    pl.add_argument("run_dir")
    ev = sub.add_parser("eval", help="pass@1 / pass@k of an HF checkpoint on the math benchmarks (vLLM + math-verify)")
    ev.add_argument("model_dir", help="HF checkpoint folder: config.json + *.safetensors (+ tokenizer, or set eval.tokenizer)")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.samples=16 eval.k=[1,16] eval.temperature=0.6")
    ev.add_argument("--config", default=None, help="YAML config whose eval/rollout sections apply (default: built-in defaults)")
    ev.add_argument("--output", default=None, help="results folder (default: runs/eval/<model folder name>)")
    return p


def _eval(args) -> int:
    from pathlib import Path

    from dynamo_mega.config import ConfigError, load_config
    from dynamo_mega.eval.runner import run_eval

    try:
        cfg = load_config(args.config, args.overrides, training=False)
    except ConfigError as exc:
        return _fail(str(exc))
    out = Path(args.output or Path("runs/eval") / Path(args.model_dir).resolve().name)
    try:
        metrics = run_eval(args.model_dir, cfg, out)
    except ValueError as exc:  # not a Qwen checkpoint, missing benchmark files, ...
        return _fail(str(exc))
    print((out / "step_000000.md").read_text())
    print(json.dumps(metrics))
    return 0


def _fail(message: str) -> int:
    print(f"dynamo-mega: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "eval":
        return _eval(args)
    if args.command == "plot":
        from pathlib import Path

        from dynamo_mega.metrics import plot_run

        if not (Path(args.run_dir) / "metrics.jsonl").is_file():
            return _fail(f"{args.run_dir}/metrics.jsonl not found: pass a run directory written by `dynamo-mega train`")
        print(plot_run(Path(args.run_dir)))
        return 0
    from dynamo_mega.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        return _fail(str(exc))
    from dynamo_mega.train import train

    try:
        summary = train(cfg)
    except (ConfigError, ValueError) as exc:  # user input found wrong after start-up (data, world size)
        return _fail(str(exc))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
