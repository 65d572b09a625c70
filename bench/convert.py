"""Checkpoint conversion throughput and peak host memory vs the I/O floor, side by side in one run.

Checkpoint: random weights in the published Qwen2.5-Math-1.5B architecture (1.54B parameters, bf16, tied
embeddings), written by transformers' save_pretrained in 500 MB shards. Each measurement runs in a fresh
process after os.sync(), with its source files read into the page cache (see _read_into_page_cache) and the
same amount of host memory freshly touched and freed right before the clock starts (see _warm_host_memory),
so no step inherits a warmer page cache or warmer memory than another (peak RSS = that process's VmHWM
from then on; time and CPU time = the call itself, imports excluded). The steps run once untimed (the first
run of each after a bench starts was slower), then --repeat times, interleaved; the table gives each step's
median and every timed run:
  floor           safetensors load_file + save_file of every shard, no conversion (the I/O floor)
  floor, durable  the same plus an fsync of each file written (what durable writes cost the floor)
  hf-to-mcore     dynamo_mega.convert.run.hf_to_mcore at TP=2, PP=2 (sha256 manifest, every file fsynced)
  mcore-to-hf     dynamo_mega.convert.run.mcore_to_hf of that checkpoint (likewise)
  ... without fsync: both again with os.fsync a no-op (context only: what durability costs the conversion)
Writes bench/results/convert.json and bench/results/convert.md.

    PYTHONPATH=. python bench/convert.py [--config PATH/config.json] [--work /tmp/convert_bench] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dynamo_mega.durable import fsync_path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT.parent / "shared" / "data" / "qwen2.5-math-1.5b" / "config.json"
WARM_GIB = 5  # more than any step writes (3.1 GB) plus what it allocates
_NO_FSYNC = "without-fsync"


def _rss_gib() -> float:
    """Peak resident memory of this process image (VmHWM; ru_maxrss would carry the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB -> GiB
    raise RuntimeError("no VmHWM in /proc/self/status")


def make_checkpoint(config_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path.parent)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="500MB")


def run_floor(src: Path, dst: Path, durable: bool = False) -> dict:
    """load_file + save_file of every shard; durable: each file written is also fsynced (and the folder)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    start, cpu, steal = time.perf_counter(), _cpu_seconds(), _host_steal_seconds()
    for shard in sorted(src.glob("*.safetensors")):
        save_file(load_file(shard), dst / shard.name, metadata={"format": "pt"})
        if durable:
            fsync_path(dst / shard.name)
    if durable:
        fsync_path(dst)
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": _cpu_seconds() - cpu,
        "host_steal_seconds": _host_steal_seconds() - steal,
    }


def _host_steal_seconds() -> float:
    """CPU time the hypervisor gave to others while this VM wanted it (all vCPUs; /proc/stat `steal`, in
    USER_HZ = 1/100 s): other tenants' load on the host, which slows a step that keeps both cores busy."""
    return int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[8]) / 100


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (less sensitive to a busy host than wall time)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _warm_host_memory(gib: int) -> None:
    """Touch and free `gib` GiB, then reset this process's peak RSS.

    On this VM, memory the guest freed a few seconds ago is handed back to the host: the next first touch of it
    (a new page-cache page for a file written, a new tensor) runs at ~0.5 GB/s instead of ~5 GB/s (measured:
    2 GiB touched right after a free at 5.6 GB/s, after 10 s idle at 0.47 GB/s). Every step writes ~3 GB of new
    files, and the conversions import megatron (seconds) before their clock starts while the floor imports
    safetensors only, so without this the floor would find warm memory and the conversions cold memory."""
    import numpy as np

    block = np.ones(gib << 30, dtype=np.uint8)  # large: mmap-backed, so freed straight back to the kernel
    del block
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def _read_into_page_cache(folder: Path) -> None:
    """Read every file under `folder` once, so each step starts with its source in the page cache.

    This host pages out file data nobody touched for about a minute (a DAMON `pageout` scheme: age >= 12
    aggregation intervals of 5 s, at up to 128 MB/s), so without this a step whose source was last read a
    minute ago would read part of it from disk and another step would not."""
    buffer = memoryview(bytearray(16 << 20))
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def run_child(task: str, src: str, dst: str) -> None:
    """Executed in a fresh process: one measurement, printed as JSON on the last line."""
    base_rss = _rss_gib()
    _read_into_page_cache(Path(src))
    if task in ("floor", "floor+fsync"):
        _warm_host_memory(WARM_GIB)
        result = run_floor(Path(src), Path(dst), durable=task == "floor+fsync")
    else:
        from dynamo_mega.convert import run

        run.hf_to_mcore  # noqa: B018  (import megatron-facing modules before the clock starts)
        import megatron.core  # noqa: F401
        import megatron.core.dist_checkpointing  # noqa: F401
        import megatron.core.models.gpt  # noqa: F401  (imported by the conversion's first call otherwise)
        import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401  (likewise: ~0.1 s, torch.compile's rules)

        task, _, variant = task.partition(":")
        if variant == _NO_FSYNC:  # context only: what durability costs
            os.fsync = lambda fd: None
        base_rss = _rss_gib()
        _read_into_page_cache(Path(src))  # again: the imports took seconds
        _warm_host_memory(WARM_GIB)
        start, cpu, steal = time.perf_counter(), _cpu_seconds(), _host_steal_seconds()
        if task == "hf-to-mcore":
            run.hf_to_mcore(Path(src), Path(dst), tp=2, pp=2, progress=False)
        else:
            run.mcore_to_hf(Path(src), Path(dst), progress=False)
        result = {
            "seconds": time.perf_counter() - start,
            "cpu_seconds": _cpu_seconds() - cpu,
            "host_steal_seconds": _host_steal_seconds() - steal,
        }
    result.update(peak_rss_gib=_rss_gib(), rss_after_imports_gib=base_rss)
    print(json.dumps(result))


def measure(task: str, src: Path, dst: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    os.sync()  # the previous step's dirty pages are flushed now, not charged to this step's writes
    cmd = [sys.executable, __file__, "--child", task, str(src), str(dst)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{task} failed:\n{proc.stderr[-3000:]}")
    if task != "hf-to-mcore":  # only that output is read again (by mcore-to-hf); the rest would crowd the page cache
        shutil.rmtree(dst, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_row(runs: list[dict]) -> dict:
    """Per field, the median over runs."""
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def _commit() -> str:
    """The commit measured, with "+changes" when the converter or this bench differs from it in the working tree."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()  # noqa: E731
    dirty = git("status", "--porcelain", "--", "dynamo_mega/convert", "bench/convert.py")
    return git("rev-parse", "--short", "HEAD") + ("+changes" if dirty else "")


def _loads(loadavg: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.1f}" for x in loadavg)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--work", type=Path, default=Path("/tmp/convert_bench"))
    p.add_argument("--repeat", type=int, default=3, help="runs of each step, interleaved; the table has the medians")
    p.add_argument("--note", default="", help="a line for the markdown, e.g. what else ran on the host meanwhile")
    p.add_argument("--child", nargs=3, metavar=("TASK", "SRC", "DST"))
    args = p.parse_args()
    if args.child:
        return run_child(*args.child)
    hf = args.work / "hf"
    if not (hf / "model.safetensors.index.json").is_file():
        shutil.rmtree(hf, ignore_errors=True)
        make_checkpoint(args.config, hf)
    src_bytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    load_before = os.getloadavg()  # the host is shared: say how busy it was
    steps = {
        "floor (load+save, hf)": ("floor", hf, args.work / "floor"),
        "floor, durable (load+save+fsync)": ("floor+fsync", hf, args.work / "floor"),
        "hf-to-mcore TP=2 PP=2": ("hf-to-mcore", hf, args.work / "mcore"),
        "mcore-to-hf": ("mcore-to-hf", args.work / "mcore", args.work / "hf_back"),
        "hf-to-mcore without fsync (context)": (f"hf-to-mcore:{_NO_FSYNC}", hf, args.work / "mcore_nofsync"),
        "mcore-to-hf without fsync (context)": (f"mcore-to-hf:{_NO_FSYNC}", args.work / "mcore", args.work / "hf_back"),
    }
    for step in steps.values():  # one discarded round: the first run of a step after a bench starts is slower
        measure(*step)
    runs = {name: [] for name in steps}
    for _ in range(args.repeat):
        for name, step in steps.items():
            runs[name].append(measure(*step))
    rows = {name: _median_row(r) for name, r in runs.items()}
    floor, durable_floor = rows["floor (load+save, hf)"], rows["floor, durable (load+save+fsync)"]
    for name, row in rows.items():
        row["vs_floor"] = row["seconds"] / floor["seconds"]
        row["vs_durable_floor"] = row["seconds"] / durable_floor["seconds"]
        row["cpu_vs_floor"] = row["cpu_seconds"] / floor["cpu_seconds"]
        row["GB_per_s"] = src_bytes / row["seconds"] / 1e9
        row["runs"] = runs[name]
    load_after = os.getloadavg()
    out = {
        "checkpoint_bytes": src_bytes,
        "config": str(args.config),
        "cpus": os.cpu_count(),
        "commit": _commit(),
        "note": args.note,
        "loadavg_1_5_15_before": load_before,
        "loadavg_1_5_15_after": load_after,
        "rows": rows,
    }
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "convert.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        f"Checkpoint: {src_bytes / 1e9:.2f} GB bf16 ({args.config.parent.name} architecture, random weights)",
        f"Host: {os.cpu_count()} CPUs, load average (1/5/15 min) {_loads(load_before)} before, {_loads(load_after)} after",
        f"Commit: {_commit()}; every conversion output file and folder fsynced before the rename, sha256 with hashlib",
        *([args.note] if args.note else []),
        "",
        f"Medians of {args.repeat} interleaved runs per step; every run's seconds in the last column.",
        "",
        "| step | seconds | x floor | x durable floor | CPU seconds | x floor CPU | host steal s | GB/s | peak RSS GiB "
        "| RSS after imports GiB | runs (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        every = ", ".join(f"{run['seconds']:.1f}" for run in r["runs"])
        lines.append(
            f"| {name} | {r['seconds']:.1f} | {r['vs_floor']:.2f} | {r['vs_durable_floor']:.2f} | {r['cpu_seconds']:.1f} | "
            f"{r['cpu_vs_floor']:.2f} | "
            f"{r['host_steal_seconds']:.2f} | {r['GB_per_s']:.2f} | {r['peak_rss_gib']:.2f} | "
            f"{r['rss_after_imports_gib']:.2f} | {every} |"
        )
    (results / "convert.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
