"""`dynamo-mega convert hf-to-mcore|mcore-to-hf SRC DST ...`: argument parsing shared by dynamo_mega/cli.py and
tools/checkpoint_convert/convert.py. Bad input exits with code 2 and one line naming what was wrong."""

from __future__ import annotations

import argparse
import json
import re
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("direction", choices=("hf-to-mcore", "mcore-to-hf"))
    p.add_argument("src", help="HF checkpoint folder (hf-to-mcore) or megatron distributed checkpoint (mcore-to-hf)")
    p.add_argument("dst", nargs="?", help="output folder (created atomically; not needed with --dry-run)")
    p.add_argument("--tp", type=int, default=1, help="target tensor parallel size (checked, sets vocab padding)")
    p.add_argument("--pp", type=int, default=1, help="target pipeline parallel size (checked)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="cast tensors (default: keep the source dtype)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=1, help="pad vocab rows to a multiple of this x TP")
    p.add_argument("--hf-config", help="mcore-to-hf: config.json to use when SRC has no hf/ folder")
    p.add_argument(
        "--max-shard-size",
        default="2GB",
        help="mcore-to-hf: largest safetensors shard, e.g. 500MB, 2GB (shards end between layers, as even as that allows)",
    )
    p.add_argument(
        "--write-group-size", default="1GiB", help="hf-to-mcore: source bytes written per megatron save (memory vs speed)"
    )
    p.add_argument("--dry-run", action="store_true", help="check names/shapes from config.json and headers only")
    p.add_argument("--overwrite", action="store_true", help="replace a DST that holds a previous conversion")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"{flag} {text!r}: expected a size like 500MB or 2GB")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dynamo_mega.convert.run import hf_to_mcore, mcore_to_hf

    try:
        if args.dst is None and not args.dry_run:
            raise ValueError("DST is required unless --dry-run is given")
        common = dict(dtype=args.dtype, overwrite=args.overwrite, dry_run=args.dry_run, progress=not args.no_progress)
        if args.direction == "hf-to-mcore":
            summary = hf_to_mcore(
                Path(args.src), Path(args.dst or "."), tp=args.tp, pp=args.pp,
                vocab_divisible_by=args.make_vocab_size_divisible_by,
                write_group_bytes=parse_size(args.write_group_size, "--write-group-size"), **common,
            )  # fmt: skip
        else:
            summary = mcore_to_hf(
                Path(args.src), Path(args.dst or "."), hf_config=args.hf_config,
                max_shard_bytes=parse_size(args.max_shard_size), **common,
            )  # fmt: skip
    except ValueError as exc:
        print(f"dynamo-mega convert: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="checkpoint_convert", description="HF <-> Megatron checkpoint conversion")
    add_arguments(p)
    return run(p.parse_args(argv))
