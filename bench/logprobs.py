"""Benchmark: per-token log-prob (with grad) + entropy (no grad) over vocab-parallel logits.

Methods, forward + backward, side by side in one run:
  naive     torch log_softmax on the full vocabulary + entropy from it (TP=1 only: at TP=2 it would
            all-gather the full [T, V] on every rank, which does not fit this machine twice over);
  megatron  the common Megatron path: entropy in a separate no-grad vocab-parallel pass, then clone
            the logits (vocab_parallel_cross_entropy works in place on fp32 input) and take
            -vocab_parallel_cross_entropy;
  ours      dynamo_mega.parallel.logprobs.vocab_parallel_logprobs_entropy.

Memory: every measurement runs in fresh processes (one per rank). After the logits exist, the
kernel's peak-RSS counter is reset (/proc/self/clear_refs "5"), one fwd+bwd runs, and
extra = VmHWM - VmRSS(before) - bytes(grad of the logits): the peak beyond the logits and their
gradient, which every method must hold. Big tensors are mmap'd by glibc, so RSS follows them
exactly. TP=2 reports the larger rank. Time: wall clock of a fwd+bwd (min over --reps runs; each run
allocates afresh, there is no allocator cache on CPU), the slower rank at TP=2.

    python bench/logprobs.py            # writes bench/results/logprobs.{json,md}
    python bench/logprobs.py --quick    # T=256, smoke test of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _entropy_no_grad(x_TV: torch.Tensor, group) -> torch.Tensor:
    """The separate entropy pass of the Megatron path, as commonly written (no grad)."""
    with torch.no_grad():
        z = x_TV.float()
        m = z.amax(dim=-1, keepdim=True)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(z - m)
        sums = torch.stack([e.sum(-1), (e * z).sum(-1)])
        dist.all_reduce(sums, group=group)
        return m.squeeze(-1) + torch.log(sums[0]) - sums[1] / sums[0]


def _run_naive(x, targets, g, group, chunk):
    """Forward only; returns the scalar to backpropagate (0 * entropy keeps the entropy alive
    until backward, as a trainer that modulates with it would)."""
    assert dist.get_world_size(group) == 1, "naive needs the full vocabulary"
    logsm = torch.log_softmax(x.float(), dim=-1)
    logp = logsm.gather(-1, targets[:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logsm.exp() * logsm).sum(-1)
    return (logp * g).sum() + 0 * entropy.sum()


def _run_megatron(x, targets, g, group, chunk):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    entropy = _entropy_no_grad(x, group)
    logp = -vocab_parallel_cross_entropy(x.clone(), targets, tp_group=group)
    return (logp * g).sum() + 0 * entropy.sum()


def _run_ours(x, targets, g, group, chunk):
    from dynamo_mega.parallel.logprobs import vocab_parallel_logprobs_entropy

    tp_group = group if dist.get_world_size(group) > 1 else None
    logp, entropy = vocab_parallel_logprobs_entropy(x, targets, tp_group, chunk_size=chunk)
    return (logp * g).sum() + 0 * entropy.sum()


METHODS = {"naive": _run_naive, "megatron": _run_megatron, "ours": _run_ours}


def _measure(job: dict, x, targets, g) -> tuple[int, int, float]:
    """One fwd+bwd: (peak beyond the logits during forward, peak beyond logits + grad, seconds)."""
    x.grad = None
    _reset_peak_rss()
    before = _status("VmRSS")
    t0 = time.perf_counter()
    loss = METHODS[job["method"]](x, targets, g, dist.group.WORLD, job["chunk"])
    fwd_extra = _status("VmHWM") - before
    loss.backward()
    seconds = time.perf_counter() - t0
    extra = _status("VmHWM") - before - x.grad.numel() * x.grad.element_size()
    return fwd_extra, extra, seconds


def _rank_main(job: dict, rank: int, port: int) -> dict:
    """One rank of one measurement, in a fresh process: peak extra memory and fwd+bwd time."""
    world = job["tp"]
    torch.set_num_threads(max(1, 2 // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if job["method"] == "megatron":
        import megatron.core.tensor_parallel  # noqa: F401  (import before the baseline RSS)
    else:
        import dynamo_mega.parallel.logprobs  # noqa: F401
    dtype = getattr(torch, job["dtype"])
    gen = torch.Generator().manual_seed(rank)
    # 64 random rows tiled to T: the values do not change the cost, and a [T, V] RNG fill would
    # take longer than the measurement on 2 cores.
    block = torch.empty(64, job["V"] // world, dtype=dtype).uniform_(-8.0, 8.0, generator=gen)
    x = block.repeat(-(-job["T"] // 64), 1)[: job["T"]].contiguous().requires_grad_()
    targets = torch.randint(0, job["V"], (job["T"],), generator=gen)
    g = torch.randn(job["T"], generator=gen)
    runs = []
    for _ in range(job["reps"]):
        dist.barrier()
        runs.append(_measure(job, x, targets, g))
    dist.destroy_process_group()
    # Memory from the first run (the later ones allocate the same); time: the fastest run.
    return {"extra_fwd_bytes": runs[0][0], "extra_bytes": runs[0][1], "time_s": min(r[2] for r in runs)}


def _launch(job: dict) -> dict:
    """Run one measurement on job['tp'] fresh processes (one per rank); the worst rank's numbers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--job", json.dumps(job), "--rank", str(rank), "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(job["tp"])
    ]
    ranks = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"job {job} failed:\n{err[-3000:]}")
        ranks.append(json.loads(out.strip().splitlines()[-1]))
    return {key: max(r[key] for r in ranks) for key in ranks[0]}


def _jobs(T: int, V: int, default_chunk: int, sweep: list[int], reps: int) -> list[dict]:
    jobs, base = [], {"T": T, "V": V, "reps": reps}
    for dtype in ("bfloat16", "float32"):
        for tp in (1, 2):
            for method in ("naive", "megatron", "ours"):
                if method == "naive" and tp > 1:
                    continue
                jobs.append({**base, "method": method, "dtype": dtype, "tp": tp, "chunk": default_chunk})
    for chunk in sweep:
        jobs.append({**base, "method": "ours", "dtype": "bfloat16", "tp": 1, "chunk": chunk, "sweep": True})
    return jobs


def _run_all(jobs: list[dict]) -> list[dict]:
    rows = []
    for job in jobs:
        t0 = time.perf_counter()
        row = {**job, **_launch(job), "load_avg_1min": os.getloadavg()[0]}
        row["wall_s"] = time.perf_counter() - t0
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.3f}" if b and b > 0 else "-"


def _fmt_table(rows: list[dict]) -> list[str]:
    lines = [
        "| dtype | TP | method | extra memory (GiB) | x naive | x megatron | forward-only extra (GiB)"
        " | fwd+bwd (s) | x naive time | x megatron time | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    main = [r for r in rows if not r.get("sweep")]
    naive = {r["dtype"]: r for r in main if r["method"] == "naive"}
    megatron = {(r["dtype"], r["tp"]): r for r in main if r["method"] == "megatron"}
    for r in main:
        nv, mg = naive.get(r["dtype"]), megatron[(r["dtype"], r["tp"])]
        lines.append(
            f"| {r['dtype']} | {r['tp']} | {r['method']}"
            + (f" (chunk {r['chunk']})" if r["method"] == "ours" else "")
            + f" | {r['extra_bytes'] / GIB:.3f} | {_ratio(r['extra_bytes'], nv['extra_bytes'])}"
            + f" | {_ratio(r['extra_bytes'], mg['extra_bytes'])} | {r['extra_fwd_bytes'] / GIB:.3f}"
            + f" | {r['time_s']:.2f} | {_ratio(r['time_s'], nv['time_s'])}"
            + f" | {_ratio(r['time_s'], mg['time_s'])} | {r['load_avg_1min']:.1f} |"
        )
    return lines


def _write(rows: list[dict], meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "logprobs.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    T, V = meta["T"], meta["V"]
    sweep = sorted(
        (
            r
            for r in rows
            if r.get("sweep") or (r["method"] == "ours" and r["dtype"] == "bfloat16" and r["tp"] == 1)
        ),
        key=lambda r: r["chunk"],
    )
    lines = [
        f"# Fused vocab-parallel log-prob + entropy: T={T}, V={V}, fwd+bwd",
        "",
        f"Machine: {meta['machine']}. torch {meta['torch']}. Total run {meta['total_s']:.0f} s.",
        "Extra memory = peak RSS beyond the logits and their gradient (kernel VmHWM after a reset via",
        "/proc/self/clear_refs, fresh processes per measurement, worst rank). Forward-only extra = peak beyond",
        "the logits during the forward, the part that coexists with the model's activations (ours: the chunk",
        "buffers; with fp32 logits our backward works inside the gradient's own rows, so the forward buffer",
        "is all there is). Time = wall clock of fwd+bwd, fastest of --reps runs, slowest rank;",
        "the machine's 2 cores were shared with other jobs ('load' = 1-minute load average after the row), so",
        "times are noisy: compare rows of similar load. Naive at TP=2 is",
        "not run: it needs the full [T, V] on every rank (an all-gather), over this machine's RAM twice; the",
        "TP=2 rows' 'x naive' compare with TP=1 naive, a lower bound on what naive-with-all-gather costs a rank.",
        "",
        *_fmt_table(rows),
        "",
        "## Chunk size (ours, bf16, TP=1)",
        "",
        "| chunk | extra memory (GiB) | forward-only extra (GiB) | fwd+bwd (s) | chunk x V x 4 B (GiB) | load |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['chunk']} | {r['extra_bytes'] / GIB:.3f} | {r['extra_fwd_bytes'] / GIB:.3f} | {r['time_s']:.2f}"
            f" | {min(r['chunk'], T) * V * 4 / GIB:.3f} | {r['load_avg_1min']:.1f} |"
            for r in sweep
        ],
        "",
        "## What a fused hidden-states -> (log-prob, entropy) pass would save on top",
        "",
        "It would never materialise the logits or their gradient (it recomputes them per chunk from the",
        "hidden states and the output-layer shard): per rank, T x V/tp x 2 tensors x dtype bytes =",
        *[
            f"- {dt}, TP={tp}: {T * V // tp * 2 * (2 if dt == 'bfloat16' else 4) / GIB:.2f} GiB"
            for dt in ("bfloat16", "float32")
            for tp in (1, 2)
        ],
    ]
    (RESULTS / "logprobs.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=2, help="timed runs per measurement (min is kept)")
    parser.add_argument("--quick", action="store_true", help="T=256: check the script, not the numbers")
    parser.add_argument("--chunk", type=int, default=512, help="chunk size of the main table")
    parser.add_argument("--sweep", type=int, nargs="*", default=[128, 1024, 4096], help="extra chunk sizes")
    args = parser.parse_args()
    if args.job:
        print(json.dumps(_rank_main(json.loads(args.job), args.rank, args.port)))
        return
    T, V = (256, 151936) if args.quick else (4096, 151936)
    t0 = time.perf_counter()
    rows = _run_all(_jobs(T, V, args.chunk, args.sweep, args.reps))
    meta = {
        "T": T,
        "V": V,
        "torch": torch.__version__,
        "machine": f"{os.cpu_count()} CPU cores, load average at start {os.getloadavg()[0]:.2f}",
        "total_s": time.perf_counter() - t0,
    }
    _write(rows, meta)
    print((RESULTS / "logprobs.md").read_text())


if __name__ == "__main__":
    main()
