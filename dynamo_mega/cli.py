"""`dynamo-mega train | plot | convert`: parse, call. User mistakes exit with code 2 and one line on stderr."""

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
    from dynamo_mega.convert.cli import add_arguments as add_convert_arguments

    add_convert_arguments(sub.add_parser("convert", help="HF <-> Megatron checkpoint conversion (any TP/PP)"))
    return p


def _fail(message: str) -> int:
    print(f"dynamo-mega: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "convert":
        from dynamo_mega.convert.cli import run as run_convert

        return run_convert(args)
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
