"""Benchmark: the RL training step on CPU (gloo), tokens/s at TP=1 vs TP=2 vs PP=2, for the tiny quick-start
model and a ~100M-parameter Qwen2-shaped model, with a time split.

The step is the trainer's own `policy_step` over 4 micro-batches (a no-grad pass for the old log-probs, then
forward + backward per micro-batch; fused vocab-parallel log-prob + entropy; DynaMO modulation, global scope;
clipped loss; gradient clipping over TP/PP; AdamW); at PP=2 both passes run through Megatron's 1F1B schedule.
Split, each the median of --reps runs in the same processes (TP rows only: at PP=2 a stage has no logits):
  forward   no-grad forward + fused log-prob/entropy of one micro-batch x 4 (the old-log-prob pass),
  fwd+bwd   forward + loss + backward of every micro-batch,
  step      the whole policy_step; "optimizer + rest" = step - forward - fwd+bwd.
Two processes run with 1 thread each; one process with 2 threads (the same 2 cores). The tiny model has 3
layers, so it has no PP=2 row.

--modulation: the cost of DynaMO modulation with several PPO mini-batches (ALGORITHM.md section 5), as the
quick start runs it (configs/tiny_cpu.yaml: the tiny model, 64 prompts x 8 samples, 4 mini-batches, temperature
0.7; one process): the whole RL update of a rollout batch (behaviour log-probs of every mini-batch, then one
policy_step per mini-batch) with modulation off, with the factors of the pre-update policy (the trainer's old
behaviour, rebuilt here only: modulated once from the behaviour pass, then stepped without modulation) and
from the policy being updated (the trainer's), for micro-batches as large as a mini-batch (the quick start:
the training forward is reused) and half as large (global scope then needs a no-grad pass of the current policy).

    python bench/train_step.py                # writes bench/results/train_step.{json,md}
    python bench/train_step.py --quick        # tiny model only, 1 rep: a smoke test of the script
    python bench/train_step.py --modulation   # adds the modulation comparison to the same files
    python bench/train_step.py --variants     # adds the policy-step variants (below) to the same files

--variants: train.rl_step itself (advantages, the rank's micro-batches, behaviour log-probs, one policy_step per
mini-batch) on one rollout batch of the quick start's shape (configs/tiny_cpu.yaml: its model, 64 prompts x 8
samples of its task's prompts, responses of 3-6 tokens, 4 mini-batches, temperature 0.7; one process, --threads),
with 40% of the prompt groups all-equal in reward (zero advantage: the issue measured 30-45% early in the quick
start's RL), under each setting of packing (optim.pack_row_tokens), zero-advantage skipping
(optim.skip_zero_advantage), the behaviour log-prob source (optim.behaviour_logprobs) and DynaMO modulation.
Variants run interleaved, rep after rep, so that other work on a shared machine hits them alike; the ratios
against `before` (the old defaults: no packing, no skipping, recomputed behaviour log-probs) are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _timing import free_port, median_time  # bench/ is on sys.path when run as a script

RESULTS = Path(__file__).resolve().parent / "results"

MODELS = {
    "tiny-0.8M": dict(vocab_size=32, hidden_size=128, num_layers=3, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=512, max_position_embeddings=64, batch=(512, 16)),
    "qwen2-100M": dict(vocab_size=32000, hidden_size=768, num_layers=12, num_attention_heads=12, num_query_groups=4,
                       ffn_hidden_size=2048, max_position_embeddings=256, batch=(8, 128)),
}




MICRO_BATCHES = 4


def _worker(rank: int, world: int, port: int, out_dir: str, model_kw: dict, reps: int, pp: int) -> None:
    torch.set_num_threads(2 // world)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from dynamo_mega.config import AlgoConfig, ModelConfig, ModulationConfig
    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy
    from dynamo_mega.parallel.train_step import policy_step, split_micro_batches, token_logprobs

    kw = dict(model_kw)
    n, s = kw.pop("batch")
    groups = init_parallel(world // pp, pp, seed=0)
    model, _ = build_policy(ModelConfig(**kw), groups, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, kw["vocab_size"], (n, s), generator=g)
    mask = torch.ones(n, s, dtype=torch.bool)
    mask[:, : s // 4] = False  # the prompt part
    micro = split_micro_batches(
        ids, ids.roll(-1, 1), mask, torch.randn(n, generator=g), torch.zeros(n, s), n // MICRO_BATCHES
    )

    def forward():
        with torch.no_grad():
            for mb in micro:
                token_logprobs(model, mb, groups, 1.0)

    def fwd_bwd():
        for mb in micro:
            logp, _ = token_logprobs(model, mb, groups, 1.0)
            (-(logp * mb.advantages).sum() / mask.sum()).backward()
        model.zero_grad(set_to_none=True)

    def step():
        policy_step(model, opt, None, micro, groups, algo=AlgoConfig(), temperature=1.0, grad_clip=1.0,
                    modulation=ModulationConfig())

    step()  # warm-up: allocations, AdamW state
    nan = float("nan")
    result = {
        "forward": median_time(forward, reps) if pp == 1 else nan,
        "fwd_bwd": median_time(fwd_bwd, reps) if pp == 1 else nan,
        "step": median_time(step, reps),
    }
    result["tokens"] = int(mask.sum())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def measure(model_kw: dict, tp: int, pp: int, reps: int) -> dict:
    world = tp * pp
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, free_port(), out, model_kw, reps, pp), nprocs=world, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    slowest = {k: max(r[k] for r in ranks) for k in ("forward", "fwd_bwd", "step")}
    return {**slowest, "tokens": ranks[0]["tokens"], "tokens_per_s": ranks[0]["tokens"] / slowest["step"]}


MODULATION_MODES = ("off", "stale", "current")
QUICK_START = dict(samples=64 * 8, seq=16, mini_batches=4, temperature=0.7, micro_batch_sizes=(512, 64))


def _modulation_worker(rank: int, world: int, port: int, out_dir: str, reps: int) -> None:
    torch.set_num_threads(2)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from dynamo_mega.config import AlgoConfig, ModelConfig
    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy
    from dynamo_mega.parallel.train_step import split_micro_batches

    q = QUICK_START
    kw = {k: v for k, v in MODELS["tiny-0.8M"].items() if k != "batch"} | {"max_position_embeddings": 32}
    groups = init_parallel(1, seed=0)
    model, _ = build_policy(ModelConfig(**kw), groups, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    n, s = q["samples"], q["seq"]
    ids = torch.randint(0, kw["vocab_size"], (n, s), generator=g)
    mask = torch.ones(n, s, dtype=torch.bool)
    mask[:, : s // 4] = False  # the prompt part
    fields = (ids, ids.roll(-1, 1), mask, torch.randn(n, generator=g), torch.zeros(n, s))
    per_mini = n // q["mini_batches"]
    result = {}
    for size in q["micro_batch_sizes"]:
        plans = [split_micro_batches(*(f[lo : lo + per_mini] for f in fields), size) for lo in range(0, n, per_mini)]
        times = {mode: [] for mode in MODULATION_MODES}
        for rep in range(reps + 1):  # rep 0 warms up; modes interleaved so that load drift hits them alike
            for mode in MODULATION_MODES:
                t0 = time.perf_counter()
                _rl_update(model, opt, plans, groups, AlgoConfig(), q["temperature"], mode)
                if rep:
                    times[mode].append(time.perf_counter() - t0)
        # The minimum as well as the median: on a shared 2-core machine other work only ever adds time.
        result[str(size)] = {m: min(t) for m, t in times.items()}
        result[str(size)] |= {f"{m}_median": sorted(t)[len(t) // 2] for m, t in times.items()}
        result[str(size)]["micro_batches_per_mini_batch"] = len(plans[0])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def _rl_update(model, opt, plans, groups, algo, temperature: float, mode: str) -> None:
    """train.rl_step's update: behaviour log-probs of every mini-batch first, then one policy_step each."""
    from dynamo_mega.config import ModulationConfig
    from dynamo_mega.parallel.train_step import old_logprobs, policy_step
    from dynamo_mega.rl.modulation import modulate_micro_batches

    olds = [old_logprobs(model, micro, groups, temperature) for micro in plans]
    for micro, old in zip(plans, olds, strict=True):
        modulation = ModulationConfig(enabled=mode == "current")
        if mode == "stale":  # the factors of the behaviour policy: logp = logp_old (r_t = 1), its entropy
            advs, _ = modulate_micro_batches(
                [mb.advantages for mb in micro], old[0], old[0], old[1], [mb.mask for mb in micro],
                eps_low=algo.eps_low, eps_high=algo.eps_high,
            )
            micro = [replace(mb, advantages=a) for mb, a in zip(micro, advs, strict=True)]
        policy_step(model, opt, None, micro, groups, algo=algo, temperature=temperature, grad_clip=1.0,
                    modulation=modulation, old=old)


def measure_modulation(reps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_modulation_worker, args=(1, free_port(), out, reps), nprocs=1, join=True)
        by_size = json.loads(Path(out, "rank0.json").read_text())
    rows = []
    for size, r in by_size.items():
        rows.append({"micro_batch_size": int(size), **r, "stale_vs_off": r["stale"] / r["off"],
                     "current_vs_off": r["current"] / r["off"], "current_vs_stale": r["current"] / r["stale"]})
        print(json.dumps(rows[-1]), flush=True)
    return {"setting": QUICK_START, "reps": reps, "rows": rows, "loadavg_1min_at_end": os.getloadavg()[0]}


# name: overrides of configs/tiny_cpu.yaml. `before` is the trainer's defaults before parallel/work_skipping.py.
VARIANTS = {
    "before": ["optim.skip_zero_advantage=false", "optim.behaviour_logprobs=recompute"],
    "before, modulation off": ["optim.skip_zero_advantage=false", "optim.behaviour_logprobs=recompute",
                               "modulation.enabled=false"],
    "before + packing 64": ["optim.skip_zero_advantage=false", "optim.behaviour_logprobs=recompute",
                            "optim.pack_row_tokens=64"],
    "before + packing 256": ["optim.skip_zero_advantage=false", "optim.behaviour_logprobs=recompute",
                             "optim.pack_row_tokens=256"],
    "before + skipping": ["optim.behaviour_logprobs=recompute"],
    "before + engine log-probs": ["optim.skip_zero_advantage=false"],
    "after": [],  # skipping + engine log-probs (auto), the config's packing
    "after, modulation off": ["modulation.enabled=false"],
    "after, entropy range over nonzero advantages": ["modulation.entropy_range=nonzero_advantage"],
}
ZERO_ADV_GROUP_FRAC = 0.4


def _variants_worker(rank: int, world: int, port: int, out_dir: str, reps: int, threads: int) -> None:
    from types import SimpleNamespace

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from dynamo_mega import train
    from dynamo_mega.config import load_config
    from dynamo_mega.data import load_data
    from dynamo_mega.optim import build_optimizer
    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy
    from dynamo_mega.parallel.train_step import old_logprobs, split_micro_batches
    from dynamo_mega.rl.rollout import RolloutBatch, to_token_batch

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    cfgs = {name: load_config(config, overrides) for name, overrides in VARIANTS.items()}
    base = cfgs["after"]
    groups = init_parallel(1, seed=0)
    model, _ = build_policy(base.model, groups, seed=0)
    train_set, _, tokenizer, _ = load_data(base)
    g = torch.Generator().manual_seed(0)
    r = base.rollout
    prompts = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in train_set[: r.prompts_per_step]]
    n = r.samples_per_prompt
    responses = [
        torch.randint(2, base.model.vocab_size, (int(torch.randint(2, r.max_new_tokens, (), generator=g)),), generator=g).tolist()
        + [tokenizer.eos_token_id]
        for _ in range(len(prompts) * n)
    ]
    rewards = []
    for i in range(len(prompts)):
        if i < ZERO_ADV_GROUP_FRAC * len(prompts):
            rewards += [float(i % 2)] * n  # all wrong or all right: zero advantage
        else:
            rewards += [1.0] + [0.0] + torch.randint(0, 2, (n - 2,), generator=g).float().tolist()
    p_tok = [p for p in prompts for _ in range(n)]
    tb = to_token_batch(p_tok, responses, None, tokenizer.pad_token_id)
    micro = split_micro_batches(tb.input_ids_NS, tb.targets_NS, tb.loss_mask_NS, torch.zeros(len(p_tok)),
                                tb.rollout_logp_NS, len(p_tok))
    (logp,), _ = old_logprobs(model, micro, groups, r.temperature)  # what an fp32 engine records (to ~1e-7)
    logprobs = [logp[i, len(p) - 1 : len(p) - 1 + len(resp)].tolist() for i, (p, resp) in enumerate(zip(p_tok, responses))]
    batch = RolloutBatch([str(i // n) for i in range(len(p_tok))], ["0"] * len(p_tok), p_tok, responses, logprobs,
                         [True] * len(p_tok), [n] * len(prompts), 0, rewards=rewards, correct=[x > 0 for x in rewards])
    optimizer, scheduler = build_optimizer(model, 1e-6, base.optim, 10_000)
    trainer = SimpleNamespace(model=model, optimizer=optimizer, scheduler=scheduler, groups=groups,
                              tokenizer=tokenizer, version=0)
    times = {name: [] for name in VARIANTS}
    cpu = {name: [] for name in VARIANTS}
    stats = {}
    for rep in range(reps + 1):  # rep 0 warms up; variants interleaved
        for name, cfg in cfgs.items():
            trainer.cfg = cfg
            t0, c0 = time.perf_counter(), time.process_time()
            stats[name] = train.rl_step(trainer, batch)
            if rep:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    result = {name: {"min": min(t), "median": sorted(t)[len(t) // 2], "cpu_median": sorted(cpu[name])[len(t) // 2],
                     "skipped_zero_adv_frac": stats[name].get("skipped_zero_adv_frac", 0.0),
                     "behaviour_from_engine": stats[name].get("behaviour_from_engine", 0.0),
                     "pack_row_tokens": cfgs[name].optim.pack_row_tokens, "modulation": cfgs[name].modulation.enabled}
              for name, t in times.items()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def measure_variants(reps: int, threads: int) -> dict:
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_variants_worker, args=(1, free_port(), out, reps, threads), nprocs=1, join=True)
        by_name = json.loads(Path(out, "rank0.json").read_text())
    before = by_name["before"]
    for name, r in by_name.items():
        for key in ("min", "median", "cpu_median"):
            r[f"vs_before_{key}"] = r[key] / before[key]
        print(json.dumps({"variant": name, **r}), flush=True)
    mod = {
        f"{which}_{key}": by_name[which][key] / by_name[f"{which}, modulation off"][key]
        for which in ("before", "after") for key in ("median", "cpu_median")
    }
    nonzero = by_name["after, entropy range over nonzero advantages"]
    mod.update({f"nonzero_range_{key}": nonzero[key] / by_name["after, modulation off"][key] for key in ("median", "cpu_median")})
    return {"variants": by_name, "reps": reps, "threads": threads, "modulation_cost": mod,
            "zero_adv_group_frac": ZERO_ADV_GROUP_FRAC, "loadavg_1min_at_start": load_start,
            "loadavg_1min_at_end": os.getloadavg()[0], "cores": os.cpu_count()}


def _variants_table(v: dict) -> list[str]:
    lines = [
        "\n## Policy-step variants at the quick start's shape (`--variants`)\n",
        "train.rl_step on one rollout batch of configs/tiny_cpu.yaml's shape (64 prompts x 8 samples, responses of "
        f"3-6 tokens, 4 mini-batches; {v['zero_adv_group_frac']:.0%} of the groups all-equal in reward), one "
        f"process, {v['threads']} thread(s), the variants interleaved rep after rep. `before`: the old defaults (no "
        "packing, no zero-advantage skipping, behaviour log-probs recomputed); `after`: the new defaults. Ratios < 1 "
        "are faster than `before`. CPU time (the process's own, time.process_time) is what other work on a shared "
        "machine disturbs least; wall time is the number on a quiet one.\n",
        "| variant | packing (row tokens) | modulation | skipped samples | behaviour log-probs | CPU median (s) "
        "| wall median (s) | wall fastest (s) | CPU vs before | wall median vs before |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in v["variants"].items():
        lines.append(
            f"| {name} | {r['pack_row_tokens'] or 'off'} | {'on' if r['modulation'] else 'off'} | "
            f"{r['skipped_zero_adv_frac']:.0%} | {'engine' if r['behaviour_from_engine'] else 'recomputed'} | "
            f"{r['cpu_median']:.3f} | {r['median']:.3f} | {r['min']:.3f} | {r['vs_before_cpu_median']:.3f}x | "
            f"{r['vs_before_median']:.3f}x |"
        )
    m = v["modulation_cost"]
    lines.append(
        f"\nModulation's cost (with / without, CPU time): {m['before_cpu_median'] - 1:+.1%} of the step with the old "
        f"defaults, {m['after_cpu_median'] - 1:+.1%} with the new ones (wall: {m['before_median'] - 1:+.1%}, "
        f"{m['after_median'] - 1:+.1%}); with the new defaults and modulation.entropy_range=nonzero_advantage (the "
        f"skipped samples need no entropy pass) {m['nonzero_range_cpu_median'] - 1:+.1%} "
        f"(wall {m['nonzero_range_median'] - 1:+.1%}). Median of {v['reps']} reps; 1-minute load average "
        f"{v['loadavg_1min_at_start']:.1f} at the start, {v['loadavg_1min_at_end']:.1f} at the end, on {v['cores']} cores."
    )
    return lines


def _step_table(out: dict) -> list[str]:
    lines = [
        "| model | TP | PP | tokens/step | old-logprob pass (s) | fwd+bwd (s) | step (s) | optimizer+rest (s) | tokens/s "
        "| step time vs TP=1 PP=1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        rest = r["step"] - r["forward"] - r["fwd_bwd"]
        fmt = lambda v: "-" if v != v else f"{v:.3f}"  # noqa: E731 - NaN: not measurable at PP > 1
        lines.append(
            f"| {r['model']} | {r['tp']} | {r['pp']} | {r['tokens']} | {fmt(r['forward'])} | {fmt(r['fwd_bwd'])} | "
            f"{r['step']:.3f} | {fmt(rest)} | {r['tokens_per_s']:.0f} | {r['step_time_vs_tp1']:.2f}x |"
        )
    load = out["loadavg_1min_at_end"]
    lines.append(f"\nMedian of {out['reps']} runs; 1-minute load average at the end: {load:.1f} on {out['cores']} cores.")
    return lines


def _modulation_table(mod: dict) -> list[str]:
    q = mod["setting"]
    lines = [
        "\n## Modulation with several PPO mini-batches (`--modulation`)\n",
        f"The RL update of one rollout batch as the quick start runs it: tiny model, {q['samples']} samples x "
        f"{q['seq']} tokens, {q['mini_batches']} mini-batches (behaviour log-probs of all, then one policy_step "
        "each), one process, 2 threads. off: no modulation; stale: factors of the pre-update policy (r_t = 1, the "
        "trainer before it used the current policy); current: factors from the policy being updated (global scope). "
        "With one micro-batch per mini-batch (the quick start) the training forward gives the current factors, so "
        "current costs only the modulation arithmetic; with two, global scope adds one no-grad forward of each "
        "mini-batch. The machine is shared: the fastest run is the least disturbed one.\n",
        "| micro-batch size | micro-batches per mini-batch | off (s) | stale (s) | current (s) | stale / off "
        "| current / off | current / stale |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in mod["rows"]:
        lines.append(
            f"| {r['micro_batch_size']} | {r['micro_batches_per_mini_batch']} | {r['off']:.3f} | {r['stale']:.3f} | "
            f"{r['current']:.3f} | {r['stale_vs_off']:.3f}x | {r['current_vs_off']:.3f}x | {r['current_vs_stale']:.3f}x |"
        )
    load = mod["loadavg_1min_at_end"]
    lines.append(f"\nFastest of {mod['reps']} runs (medians in the JSON); 1-minute load average at the end: {load:.1f}.")
    return lines


def write_results(name: str, **update) -> None:
    """Merge `update` into bench/results/<name>.json (a --modulation run keeps the step rows and vice versa) and
    render <name>.md from it."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    out.update(update)
    path.write_text(json.dumps(out, indent=1))
    lines = _step_table(out) if "rows" in out else []
    if "modulation" in out:
        lines += _modulation_table(out["modulation"])
    if "variants" in out:
        lines += _variants_table(out["variants"])
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--modulation", action="store_true", help="only the modulation-cost comparison (tiny model)")
    ap.add_argument("--variants", action="store_true", help="only the policy-step variants (quick-start shape)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="--variants: torch threads (1 on a busy machine)")
    args = ap.parse_args()
    if args.variants:
        write_results("train_step", variants=measure_variants(args.reps, args.threads))
        return
    if args.modulation:
        write_results("train_step", modulation=measure_modulation(args.reps))
        return
    models = {"tiny-0.8M": MODELS["tiny-0.8M"]} if args.quick else MODELS
    reps = 1 if args.quick else args.reps
    rows = []
    for name, kw in models.items():
        base = None
        layouts = [(1, 1), (2, 1)] + ([(1, 2)] if kw["num_layers"] % 2 == 0 else [])
        for tp, pp in layouts:
            r = measure(kw, tp, pp, reps)
            base = base or r
            rows.append({"model": name, "tp": tp, "pp": pp, **r, "step_time_vs_tp1": r["step"] / base["step"]})
            print(json.dumps(rows[-1]), flush=True)
    write_results(
        "train_step_quick" if args.quick else "train_step", rows=rows, reps=reps,
        loadavg_1min_at_end=os.getloadavg()[0], cores=os.cpu_count(), torch=torch.__version__,
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
