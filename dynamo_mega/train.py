"""The RL loop, top to bottom. Run with `dynamo-mega train CONFIG [key=value ...]` (one process) or under
torchrun (several gloo/NCCL ranks). Rank 0, the driver, owns the rollout engine, the reward pool and the run
directory; every rank holds one Megatron shard of the policy.

    evaluate -> [supervised warm-up] -> for each step:
        sample prompts -> rollouts (vLLM) -> math-verify rewards -> group advantages
        -> policy step (old log-probs, DynaMO token modulation, clipped loss, AdamW) -> weight sync -> log
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dynamo_mega import config as config_mod
from dynamo_mega.config import Config
from dynamo_mega.data import EpochSampler, Prompt, load_splits
from dynamo_mega.metrics import MetricsLogger, plot_run
from dynamo_mega.models.qwen import hf_config_dict
from dynamo_mega.parallel import train_step
from dynamo_mega.parallel.groups import ParallelGroups, destroy_parallel, init_parallel
from dynamo_mega.parallel.policy import build_policy, export_hf_state
from dynamo_mega.rl.advantage import group_advantages
from dynamo_mega.rl.allocation import allocate, allocation_metrics
from dynamo_mega.rl.prompt_stats import PromptStats
from dynamo_mega.rl.reward import MathVerifyReward
from dynamo_mega.rl.rollout import RolloutBatch, generate_rollouts, response_texts, to_token_batch
from dynamo_mega.tasks import arithmetic


@dataclass
class Trainer:
    """Everything the loop touches, built once by `setup`."""

    cfg: Config
    groups: ParallelGroups
    run_dir: Path
    tokenizer: object
    train_set: list[Prompt]
    eval_set: list[Prompt]
    model: torch.nn.Module
    arch: object
    engine: object | None  # driver only
    reward: MathVerifyReward | None  # driver only
    logger: MetricsLogger | None  # driver only
    stats: PromptStats | None = None  # per-prompt outcome history (identical on every rank)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object | None = None
    version: int = 0  # policy version: optimizer steps whose weights reached the engine


def setup(cfg: Config) -> Trainer:
    groups = init_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, seed=cfg.run.seed)
    config_mod.validate(cfg, groups.world_size)
    run_dir = Path(cfg.run.output_dir)
    train_set, eval_set = load_splits(cfg.data)
    model, arch = build_policy(cfg.model, groups, seed=cfg.run.seed)
    engine = reward = logger = tokenizer = None
    if groups.is_driver:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_mod.to_yaml(cfg))
        tokenizer = arithmetic.save_tokenizer(run_dir / "tokenizer")
        _check_vocab(tokenizer, arch.vocab_size)
        engine = _start_engine(cfg, run_dir, export_hf_state(model, arch, groups), arch, tokenizer)
        reward = MathVerifyReward(cfg.algo.reward_workers, cfg.algo.reward_timeout_s, cfg.algo.wrong_reward)
        logger = MetricsLogger(run_dir, tensorboard=cfg.run.tensorboard, progress_total=cfg.run.steps, progress=cfg.run.progress)
    else:
        export_hf_state(model, arch, groups)  # collective: the driver's export gathers TP shards
        tokenizer = arithmetic.build_tokenizer()
    return Trainer(cfg, groups, run_dir, tokenizer, train_set, eval_set, model, arch, engine, reward, logger)


def _check_vocab(tokenizer, vocab_size: int) -> None:
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size={vocab_size}; raise model.vocab_size")


def _start_engine(cfg: Config, run_dir: Path, hf_state: dict, arch, tokenizer):
    from safetensors.torch import save_file

    from dynamo_mega.rl.engines.vllm_engine import VLLMEngine

    init_dir = run_dir / "hf_init"
    init_dir.mkdir(exist_ok=True)
    (init_dir / "config.json").write_text(
        json.dumps(hf_config_dict(arch, cfg.model.params_dtype, tokenizer.eos_token_id), indent=1)
    )
    save_file(hf_state, str(init_dir / "model.safetensors"))
    r = cfg.rollout
    return VLLMEngine(
        init_dir,
        dtype=r.vllm_dtype,
        seed=r.seed,
        max_model_len=arch.max_position_embeddings,
        kv_cache_gib=r.vllm_kv_cache_gib,
        gpu_memory_utilization=r.vllm_gpu_memory_utilization,
        max_num_seqs=r.vllm_max_num_seqs,
    )


def broadcast(obj, groups: ParallelGroups):
    """Driver -> all ranks (pickled; rollouts are small next to the model)."""
    if groups.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_weights(t: Trainer) -> None:
    """Push the trainer's weights into the engine (collective over TP; the driver loads)."""
    hf_state = export_hf_state(t.model, t.arch, t.groups)
    t.version += 1
    if t.groups.is_driver:
        t.engine.load_weights(hf_state, t.version)


def evaluate(t: Trainer, step: int, phase: str = "eval") -> float:
    """Greedy held-out accuracy (math-verify), computed on the driver and shared with all ranks."""
    acc = None
    if t.groups.is_driver:
        prompts = t.eval_set[: t.cfg.run.eval_prompts]
        batch = generate_rollouts(
            t.engine,
            t.tokenizer,
            prompts,
            [1] * len(prompts),
            max_new_tokens=t.cfg.rollout.max_new_tokens,
            temperature=0.0,
            top_p=1.0,
            seed=None,
        )
        correct = t.reward.correctness(response_texts(batch, t.tokenizer), batch.answers)
        acc = sum(correct) / max(len(correct), 1)
        t.logger.log(step, {"accuracy": acc, "num_prompts": len(prompts), "policy_version": t.version}, phase=phase)
    return broadcast(acc, t.groups)


def collect_rollouts(t: Trainer, prompts: list[Prompt], step: int) -> RolloutBatch:
    """Generate counts[i] samples per prompt and score each against ITS OWN prompt's answer (driver)."""
    batch = None
    if t.groups.is_driver:
        r = t.cfg.rollout
        al = t.cfg.allocation
        counts = allocate(
            [p.id for p in prompts],
            t.stats,
            budget=r.samples_per_prompt * len(prompts),
            n_low=al.n_low,
            n_high=al.n_high,
            mode=al.mode,
        )
        batch = generate_rollouts(
            t.engine,
            t.tokenizer,
            prompts,
            counts,
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            seed=r.seed + 1_000_003 * step,
        )
        texts = response_texts(batch, t.tokenizer)
        batch.rewards = t.reward(texts, batch.answers)
        _log_samples(t, step, batch, texts)
    batch = broadcast(batch, t.groups)
    # Outcomes are attributed by the prompt id carried by each sample, never by position.
    t.stats.update(batch.prompt_ids, [float(x > 0) for x in batch.rewards], [len(x) for x in batch.response_tokens])
    return batch


def _log_samples(t: Trainer, step: int, batch: RolloutBatch, texts: list[str]) -> None:
    """The first `run.log_samples` rollouts of the step, for reading what the policy writes."""
    keep = min(t.cfg.run.log_samples, len(batch))
    if keep == 0:
        return
    prompts = t.tokenizer.batch_decode(batch.prompt_tokens[:keep], skip_special_tokens=True)
    with (t.run_dir / "samples.jsonl").open("a") as f:
        for i in range(keep):
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "prompt_id": batch.prompt_ids[i],
                        "prompt": prompts[i],
                        "answer": batch.answers[i],
                        "response": texts[i],
                        "reward": batch.rewards[i],
                        "policy_version": batch.policy_version,
                    }
                )
                + "\n"
            )


def rl_step(t: Trainer, batch: RolloutBatch) -> dict[str, float]:
    """Advantages -> this DP rank's share of samples -> one policy step."""
    rewards = torch.tensor(batch.rewards, dtype=torch.float32)
    adv_N = group_advantages(rewards, batch.group_sizes)
    tokens = to_token_batch(batch.prompt_tokens, batch.response_tokens, batch.rollout_logprobs, t.tokenizer.pad_token_id)
    plans = []
    for idx in mini_batch_indices(batch.group_sizes, t.cfg.optim.mini_batches):
        mine = idx[t.groups.dp_rank :: t.groups.dp_size]  # samples strided over DP ranks
        plans.append(
            train_step.split_micro_batches(
                tokens.input_ids_NS[mine],
                tokens.targets_NS[mine],
                tokens.loss_mask_NS[mine],
                adv_N[mine],
                tokens.rollout_logp_NS[mine],
                t.cfg.optim.micro_batch_size,
            )
        )
    # With several optimizer steps per rollout batch, every behaviour log-prob is taken before the first one.
    olds = (
        [train_step.old_logprobs(t.model, micro, t.groups, t.cfg.rollout.temperature) for micro in plans]
        if len(plans) > 1
        else [None]
    )
    per_step = [
        train_step.policy_step(
            t.model,
            t.optimizer,
            t.scheduler,
            micro,
            t.groups,
            algo=t.cfg.algo,
            temperature=t.cfg.rollout.temperature,
            grad_clip=t.cfg.optim.grad_clip,
            modulation=t.cfg.modulation,
            old=old,
        )
        for micro, old in zip(plans, olds, strict=True)
    ]
    # Mean over the optimizer steps that report each key: a mini-batch without positive (or any nonzero)
    # advantages has no modulation factors to report.
    keys = dict.fromkeys(k for s in per_step for k in s)
    stats = {k: sum(s[k] for s in per_step if k in s) / sum(k in s for s in per_step) for k in keys}
    bounds = [0, *torch.tensor(batch.group_sizes).cumsum(0).tolist()]
    stats.update(allocation_metrics(batch.group_sizes, [batch.rewards[a:b] for a, b in zip(bounds, bounds[1:])]))
    stats.update(
        reward_mean=rewards.mean().item(),
        response_len_mean=sum(map(len, batch.response_tokens)) / len(batch),
        truncated_frac=1.0 - sum(batch.finished) / len(batch),  # cut at rollout.max_new_tokens
        samples=len(batch),
    )
    return stats


def mini_batch_indices(group_sizes: list[int], mini_batches: int) -> list[torch.Tensor]:
    """Sample indices of each PPO mini-batch: consecutive whole prompt groups, about equal prompt counts."""
    if mini_batches > len(group_sizes):
        raise ValueError(f"optim.mini_batches={mini_batches} exceeds the {len(group_sizes)} prompts per step")
    bounds = [0, *torch.tensor(group_sizes).cumsum(0).tolist()]
    cuts = [round(j * len(group_sizes) / mini_batches) for j in range(mini_batches + 1)]
    return [torch.arange(bounds[a], bounds[b]) for a, b in zip(cuts, cuts[1:])]


def build_optimizer(model, lr: float, optim_cfg, total_steps: int):
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2), weight_decay=optim_cfg.weight_decay
    )
    warmup = max(optim_cfg.warmup_steps, 0)

    def schedule(step: int) -> float:  # linear warm-up, then constant
        return min(1.0, (step + 1) / warmup) if warmup else 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def supervised_warmup(t: Trainer) -> int:
    """Teacher-forced warm-up on train answers until held-out accuracy reaches warmup.stop_accuracy."""
    w = t.cfg.warmup
    opt, sched = build_optimizer(t.model, w.lr, t.cfg.optim, w.max_steps)
    sampler = EpochSampler(len(t.train_set), t.cfg.run.seed + 1)
    for step in range(1, w.max_steps + 1):
        prompts = [t.train_set[i] for i in sampler.next_batch(w.batch_size)]
        p_tok = [t.tokenizer.encode(p.prompt, add_special_tokens=False) for p in prompts]
        r_tok = [
            t.tokenizer.encode(arithmetic.solution_text(p.prompt, p.answer, t.cfg.data.show_work), add_special_tokens=False)
            + [t.tokenizer.eos_token_id]
            for p in prompts
        ]
        tb = to_token_batch(p_tok, r_tok, None, t.tokenizer.pad_token_id)
        mine = slice(t.groups.dp_rank, None, t.groups.dp_size)
        micro = train_step.split_micro_batches(
            tb.input_ids_NS[mine],
            tb.targets_NS[mine],
            tb.loss_mask_NS[mine],
            torch.zeros(len(p_tok))[mine],
            tb.rollout_logp_NS[mine],
            t.cfg.optim.micro_batch_size,
        )
        stats = train_step.supervised_step(t.model, opt, sched, micro, t.groups, t.cfg.optim.grad_clip)
        if t.groups.is_driver:
            t.logger.log(step, stats, phase="warmup")
        if step % w.eval_every == 0:
            sync_weights(t)
            if evaluate(t, step, phase="warmup_eval") >= w.stop_accuracy:
                return step
    return w.max_steps


def train(cfg: Config) -> dict:
    """Run the whole job; returns a summary (held-out accuracy before/after, steps, wall time)."""
    t = setup(cfg)
    try:
        start = time.time()
        summary = {"accuracy_init": evaluate(t, 0, phase="init_eval")}
        if cfg.warmup.enabled:
            summary["warmup_steps"] = supervised_warmup(t)
            sync_weights(t)
        summary["accuracy_before_rl"] = evaluate(t, 0)
        t.optimizer, t.scheduler = build_optimizer(t.model, cfg.optim.lr, cfg.optim, cfg.run.steps)
        sampler = EpochSampler(len(t.train_set), cfg.run.seed)
        al = cfg.allocation
        t.stats = PromptStats(prior_alpha=al.prior_alpha, prior_beta=al.prior_beta, decay=al.decay)
        rl_start, step, epoch = time.time(), 0, -1
        for step in range(1, cfg.run.steps + 1):
            t0 = time.time()
            if sampler.epoch != epoch:  # the reference mode re-reads its history once per epoch
                epoch = sampler.epoch
                t.stats.refresh_priorities()
            prompts = [t.train_set[i] for i in sampler.next_batch(cfg.rollout.prompts_per_step)]
            batch = collect_rollouts(t, prompts, step)
            t1 = time.time()
            stats = rl_step(t, batch)
            t2 = time.time()
            sync_weights(t)
            stats.update(time_rollout_reward=t1 - t0, time_train=t2 - t1, time_sync=time.time() - t2, policy_version=t.version)
            if t.groups.is_driver:
                t.logger.log(step, stats)
            if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step != cfg.run.steps:
                evaluate(t, step)
            if cfg.run.max_minutes and time.time() - rl_start > 60 * cfg.run.max_minutes:
                break
        summary.update(accuracy_after_rl=evaluate(t, step), rl_steps=step, wall_s=time.time() - start)
        if t.groups.is_driver:
            (t.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            t.logger.close()
            plot_run(t.run_dir)
        return summary
    finally:
        if t.engine is not None:
            t.engine.close()
        if t.reward is not None:
            t.reward.close()
        destroy_parallel()
