"""The RL loop, top to bottom. Run with `dynamo-mega train CONFIG [key=value ...]` (one process) or under
torchrun (several gloo/NCCL ranks). Every rank holds one Megatron shard of the policy and takes part in the
rollout service (rl/rollout_service.py): world / rollout.vllm_tensor_parallel vLLM engine replicas, each fed its
share of every step's allocation. Rank 0, the driver, owns the run directory and the logs.

    evaluate -> [supervised warm-up] -> for each step:
        sample prompts -> rollouts (vLLM) -> math-verify rewards -> group advantages
        -> policy step (old log-probs, DynaMO token modulation, clipped loss, AdamW) -> weight sync -> log

With rollout.max_staleness=1 the next step's "sample prompts -> rollouts -> rewards" runs in a background thread
while this step's policy step runs (`rl_iteration`, docs/async.md).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dynamo_mega import config as config_mod
from dynamo_mega import console
from dynamo_mega.ahead import Ahead
from dynamo_mega.checkpoint import checkpoint_root, checkpoint_step, resolve_resume, save_checkpoint
from dynamo_mega.config import Config
from dynamo_mega.convert.live import load_hf_into_model
from dynamo_mega.data import EpochSampler, Prompt, check_vocab, load_data
from dynamo_mega.guards import StopSignal, broadcast, sigterm_stops_start_up
from dynamo_mega.hf_folder import write_hf_folder
from dynamo_mega.lifeline import arm_spawned_children
from dynamo_mega.metrics import MetricsLogger, plot_run, truncate_jsonl
from dynamo_mega.models.qwen import hf_config_dict
from dynamo_mega.optim import build_optimizer
from dynamo_mega.parallel import packing, train_step, work_skipping
from dynamo_mega.parallel.groups import ParallelGroups, destroy_parallel, init_parallel
from dynamo_mega.parallel.policy import build_policy, export_hf_state
from dynamo_mega.rl import step_rollouts
from dynamo_mega.rl.advantage import equal_prompt_weights, group_advantages
from dynamo_mega.rl.allocation import allocation_metrics
from dynamo_mega.rl.prompt_stats import PromptStats
from dynamo_mega.rl.rollout import RolloutBatch, generate_rollouts, to_token_batch
from dynamo_mega.rl.rollout_service import EnginesDied, RolloutService, start_vllm_replicas
from dynamo_mega.tasks import arithmetic
from dynamo_mega.wandb_sink import WandbSink
from dynamo_mega.weight_push import WeightStream


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
    rollout: RolloutService  # the engine replicas, their rewards and weight refits (collective calls)
    logger: MetricsLogger | None  # driver only
    stats: PromptStats  # per-prompt outcome history (identical on every rank)
    optimizer: torch.optim.Optimizer
    scheduler: object
    version: int = 0  # policy version: optimizer steps whose weights reached the engine
    resume_path: Path | None = None  # checkpoint this run continues from (None: a fresh start)
    skipped_steps: int = 0  # optimizer steps dropped for a non-finite gradient norm
    epoch: int = -1  # the last sampler epoch whose start refreshed the reference-mode priorities
    outcomes_version: int = -1  # policy version that generated the newest outcomes in the prompt statistics


def setup(cfg: Config) -> Trainer:
    """Everything the loop needs, checked before the run folder is written: a user mistake found here leaves the
    disk untouched. What was started is closed again if a later part fails (or SIGTERM arrives)."""
    groups = init_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, seed=cfg.run.seed)
    config_mod.validate(cfg, groups.world_size)
    run_dir = Path(cfg.run.output_dir)
    train_set, eval_set, tokenizer, data_dropped = load_data(cfg)  # every data check, before anything is written
    if cfg.rollout.prompts_per_step > len(train_set):  # a step's prompts are distinct: say so before anything is written
        raise config_mod.ConfigError(
            f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} exceeds the {len(train_set)} training prompts; "
            "lower it or add training data"
        )
    model, arch = build_policy(cfg.model, groups, seed=cfg.run.seed, random_init=cfg.model.hf_checkpoint is None)
    check_vocab(tokenizer, arch.vocab_size)
    if cfg.model.hf_checkpoint is not None:
        load_hf_into_model(model, Path(cfg.model.hf_checkpoint), arch, groups.tp_rank, groups.tp_size)
    optimizer, scheduler = build_optimizer(
        model, cfg.optim.lr, cfg.optim, cfg.run.steps * cfg.optim.mini_batches, distributed=cfg.parallel.distributed_optimizer
    )
    al = cfg.allocation
    stats = PromptStats(prior_alpha=al.prior_alpha, prior_beta=al.prior_beta, decay=al.decay)
    resume_path = resume_point(cfg, groups)
    resume_step = checkpoint_step(resume_path) if resume_path is not None else None
    if groups.is_driver:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            (run_dir / "samples.jsonl").unlink(missing_ok=True)
        else:
            truncate_jsonl(run_dir / "samples.jsonl", lambda r: r["step"] <= resume_step)
        (run_dir / "config.yaml").write_text(config_mod.to_yaml(cfg))
        if cfg.model.hf_checkpoint is None:  # the synthetic task's tokenizer, saved with the run as before
            tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    hf_state = export_hf_state(model, arch, groups)  # collective: the driver's export gathers TP shards
    if groups.is_driver:  # what every engine starts (and restarts) from
        config = hf_config_dict(arch, cfg.model.params_dtype, tokenizer.eos_token_id)
        write_hf_folder(run_dir / "hf_init", hf_state, config)
    del hf_state
    broadcast(None, groups)  # every replica's engine starts from hf_init: wait until it is written
    console.move_to_run_dir(run_dir, groups.rank)  # the libraries' output, buffered so far, continues in RUN_DIR/logs
    weights = WeightStream(model, arch, groups, cfg.rollout)
    rollout = start_vllm_replicas(
        cfg, run_dir / "hf_init", max_len=arch.max_position_embeddings, tokenizer=tokenizer, weights=weights.stream,
        pp_size=groups.pp_size,
    )
    try:
        logger = None
        if groups.is_driver:
            logger = MetricsLogger(
                run_dir,
                tensorboard=cfg.run.tensorboard,
                progress_total=cfg.run.steps,
                warmup_total=cfg.warmup.max_steps if cfg.warmup.enabled else 0,
                warmup_target=cfg.warmup.stop_accuracy,
                progress=cfg.run.progress,
                resume_step=resume_step,
                wandb=WandbSink.from_config(cfg, run_dir),
            )
            if data_dropped and resume_step is None:
                logger.log(0, data_dropped, phase="data")
    except BaseException:
        rollout.close()
        raise
    return Trainer(
        cfg, groups, run_dir, tokenizer, train_set, eval_set, model, arch, rollout, logger, stats, optimizer, scheduler,
        resume_path=resume_path,
    )


def save_hf_snapshot(t: Trainer, directory: Path) -> None:
    """The current policy as an HF folder with its tokenizer, e.g. a warmed-up start several runs share through
    model.hf_checkpoint. Collective (the export gathers TP shards)."""
    hf_state = export_hf_state(t.model, t.arch, t.groups)
    if t.groups.is_driver:
        config = hf_config_dict(t.arch, t.cfg.model.params_dtype, t.tokenizer.eos_token_id)
        write_hf_folder(directory, hf_state, config, t.tokenizer)
        print(f"dynamo-mega: saved the warmed-up policy to {directory}", flush=True)


def sync_weights(t: Trainer) -> None:
    """After an optimizer step: a new policy version, refitted into every rollout replica."""
    t.version += 1
    t.rollout.push(t.version)


def evaluate(t: Trainer, step: int, phase: str = "eval") -> float:
    """Greedy held-out accuracy (math-verify) on the rollout replicas; the same on every rank."""
    prompts = t.eval_set[: t.cfg.run.eval_prompts]
    batch = generate_rollouts(
        t.rollout, t.tokenizer, prompts, [1] * len(prompts),
        max_new_tokens=t.cfg.rollout.max_new_tokens, temperature=0.0, top_p=1.0, seed=None, score=True,
    )
    t.rollout.take_metrics()  # the replicas' counters describe training steps only
    correct = batch.correct  # math-verify's verdict, whatever user terms algo.reward adds to the reward
    acc = sum(correct) / max(len(correct), 1)
    if t.groups.is_driver:
        record = {"accuracy": acc, "num_prompts": len(prompts), "policy_version": t.version}
        for level in sorted({p.difficulty for p in prompts} - {""}):  # held-out accuracy per difficulty label
            hits = [c for c, p in zip(correct, prompts, strict=True) if p.difficulty == level]
            record[f"accuracy_level_{level}"] = sum(hits) / len(hits)
        t.logger.log(step, record, phase=phase)
    return acc


def evaluate_on_benchmarks(t: Trainer, step: int) -> dict[str, float]:
    """pass@1 / pass@k on the configured math benchmarks (eval.*), files under RUN_DIR/eval, metrics logged."""
    from dynamo_mega.eval.runner import evaluate_benchmarks

    metrics = evaluate_benchmarks(
        t.rollout,
        t.tokenizer,
        t.cfg.eval,
        step=step,
        output_dir=t.run_dir / "eval",
        max_model_len=t.arch.max_position_embeddings,  # the engines' context (start_vllm_replicas)
        write=t.groups.is_driver,
    )
    t.rollout.take_metrics()
    if t.groups.is_driver:
        t.logger.log(step, {**metrics, "policy_version": t.version}, phase="benchmarks")
    return metrics


Collected = tuple[step_rollouts.StepRollouts, dict[str, float]]  # a step's rollouts and its generation metrics


def collect_rollouts(t: Trainer, sampler: EpochSampler, step: int, ahead: bool = False) -> Collected:
    """This step's prompts and rollouts by allocation.mode (rl/step_rollouts.py) from the rollout replicas, each
    sample scored against ITS OWN prompt's answer on the replica that generated it. Every rank runs this with
    identical statistics and sampler, so every rank draws the same prompts and allocation. Returns the rollouts
    with the step's generation metrics (time split, per-replica work, imbalance).

    ahead: called in a background thread while the previous step trains (rollout.max_staleness=1): it touches the
    sampler, the prompt statistics and the engines only, and a dead engine raises EnginesDied (`take_ahead`)."""
    r, al = t.cfg.rollout, t.cfg.allocation
    t0 = time.time()
    if sampler.epoch != t.epoch:  # the reference mode re-reads its history once per epoch
        t.epoch = sampler.epoch
        t.stats.refresh_priorities()

    def draw(k: int) -> list[Prompt]:
        return [t.train_set[i] for i in sampler.next_batch(k)]

    def generate_scored(prompts: list[Prompt], counts: list[int], round_no: int) -> RolloutBatch:
        return generate_rollouts(
            t.rollout, t.tokenizer, prompts, counts,
            max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
            seed=r.seed + 1_000_003 * step + 7_919 * round_no, score=True,
            expected_lengths=t.stats.expected_lengths([p.id for p in prompts]).tolist(), recover=not ahead,
        )

    prompts, budget = draw(r.prompts_per_step), r.prompts_per_step * r.samples_per_prompt
    bounds = dict(budget=budget, n_low=al.n_low, n_high=al.n_high)
    if al.mode == "probing":
        out = step_rollouts.probing(prompts, t.stats, generate_scored, **bounds)
    elif al.mode == "dapo":
        out = step_rollouts.dapo(
            prompts, draw, generate_scored, samples_per_prompt=r.samples_per_prompt,
            max_rounds=al.dapo_max_rounds, min_groups=t.cfg.optim.mini_batches,
        )
    else:
        out = step_rollouts.allocated(prompts, t.stats, generate_scored, mode=al.mode, **bounds)
    t.rollout.sleep()  # colocated on GPU: the trainer gets the memory until the weight sync wakes it
    metrics = t.rollout.take_metrics()
    replicas = range(t.rollout.num_replicas)
    reward_s = max(metrics.get(f"replica{i}/score_s", 0.0) for i in replicas)  # the slowest replica's scoring
    metrics.update(time_rollout=time.time() - t0 - reward_s, time_reward=reward_s)
    metrics.update(step_rollouts.step_metrics(t.stats, out))
    # What the allocation was planned from: the version that generated the newest outcomes it had (train.py's
    # allocation_lag_* metrics compare it with the versions generating and training on this batch).
    metrics["allocation_stats_version"] = float(t.outcomes_version)
    # Outcomes are attributed by the prompt id carried by each sample, never by position.
    b = out.batch
    t.stats.update(b.prompt_ids, [float(ok) for ok in b.correct], [len(x) for x in b.response_tokens])
    t.outcomes_version = b.policy_version
    return out, metrics


def start_ahead(t: Trainer, sampler: EpochSampler, step: int) -> tuple[Ahead[Collected], tuple]:
    """Step `step`'s rollouts, generated in a background thread while the current step trains, with what
    `take_ahead` restores if an engine dies on the way."""
    snapshot = copy.deepcopy((sampler.state_dict(), t.stats.state_dict(), t.epoch, t.outcomes_version))
    return Ahead(collect_rollouts, t, sampler, step, True), snapshot


def take_ahead(t: Trainer, ahead: Ahead[Collected], snapshot: tuple, sampler: EpochSampler) -> Collected | None:
    """The rollouts generated ahead, or None when an engine died on the way: then the sampler and the statistics are
    put back as they were, the next weight sync restarts the dead engine (RolloutService.push), and the step's
    rollouts are generated again, synchronously (that step is on-policy)."""
    try:
        return ahead.result()
    except EnginesDied as exc:
        sampler_state, stats_state, t.epoch, t.outcomes_version = snapshot
        sampler.load_state_dict(sampler_state)
        t.stats.load_state_dict(stats_state)
        t.rollout.take_metrics()  # the interrupted rounds' counters
        if t.groups.is_driver:
            print(f"dynamo-mega: {exc}; the next step's rollouts are generated again after the weight sync", flush=True)
        return None


def check_staleness(batch: RolloutBatch, version: int, max_staleness: int) -> int:
    """The batch's staleness (trainer version - the oldest generating version); never above the bound: the loop
    generates at most one step ahead and a resumed batch older than the bound is dropped (`start_rl`)."""
    staleness = version - min(batch.versions)
    assert 0 <= staleness <= max_staleness, f"internal error: training on samples {staleness} versions old"
    return staleness


def _log_samples(t: Trainer, step: int, batch: RolloutBatch) -> None:
    """The first `run.log_samples` rollouts of the step, for reading what the policy writes."""
    keep = min(t.cfg.run.log_samples, len(batch))
    if keep == 0:
        return
    texts = t.tokenizer.batch_decode(batch.response_tokens[:keep], skip_special_tokens=True)
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
                        "policy_version": batch.versions[i],
                    }
                )
                + "\n"
            )


def rl_step(t: Trainer, batch: RolloutBatch) -> dict[str, float]:
    """Advantages -> this DP rank's share of samples -> one policy step per PPO mini-batch."""
    rewards = torch.tensor(batch.rewards, dtype=torch.float32)
    adv_N = group_advantages(rewards, batch.group_sizes)
    if t.cfg.allocation.prompt_weight == "equal":
        adv_N = adv_N * equal_prompt_weights(batch.group_sizes)
    tokens = to_token_batch(batch.prompt_tokens, batch.response_tokens, batch.rollout_logprobs, t.tokenizer.pad_token_id)
    mini_batches = mini_batch_indices(batch.group_sizes, t.cfg.optim.mini_batches)
    # Samples with a zero advantage at every token carry no gradient: out of the forward/backward, still counted in
    # the token mean (optim.skip_zero_advantage, parallel/work_skipping.py).
    skip = work_skipping.skip_zero_advantage(t.cfg.optim, t.cfg.modulation)
    splits = [work_skipping.split_zero_advantage(idx, adv_N, skip) for idx in mini_batches]
    plans = [this_rank_micro_batches(t, tokens, adv_N, train) for train, _ in splits]
    skipped = [[mb for mb in this_rank_micro_batches(t, tokens, adv_N, zero) if mb.mask.any()] for _, zero in splits]
    # With several optimizer steps per rollout batch, every behaviour log-prob is taken before the first one. The
    # first mini-batch's are the current policy's: policy_step takes them itself (None), sparing a no-grad pass. The
    # others' are the engine's where those are the same numbers (optim.behaviour_logprobs), else a no-grad pass each.
    from_engine = work_skipping.engine_behaviour_logprobs(t.cfg, batch.versions, t.version)
    if from_engine:
        olds = [None] + [train_step.engine_logprobs(micro) for micro in plans[1:]]
    else:
        olds = [None] + [train_step.old_logprobs(t.model, micro, t.groups, t.cfg.rollout.temperature) for micro in plans[1:]]
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
            mismatch=t.cfg.mismatch,
            skipped=zero,
        )
        for micro, old, zero in zip(plans, olds, skipped, strict=True)
    ]
    for s in per_step[1:] if from_engine else ():  # behaviour == engine there by construction: mini-batch 1 measures it
        for key in work_skipping.MISMATCH_METRICS:
            s.pop(key, None)
    # Mean over the optimizer steps that report each key: a mini-batch without positive (or any nonzero)
    # advantages has no modulation factors to report.
    keys = dict.fromkeys(k for s in per_step for k in s)
    stats = {k: sum(s[k] for s in per_step if k in s) / sum(k in s for s in per_step) for k in keys}
    stats["skipped_step"] = sum(s["skipped_step"] for s in per_step)  # a count, not a mean
    stats["lr"] = t.scheduler.get_last_lr()[0]  # after this step's updates (the next step's lr)
    bounds = [0, *torch.tensor(batch.group_sizes).cumsum(0).tolist()]
    stats.update(allocation_metrics(batch.group_sizes, [batch.rewards[a:b] for a, b in zip(bounds, bounds[1:])]))
    stats.update(
        reward_mean=rewards.mean().item(),
        response_len_mean=sum(map(len, batch.response_tokens)) / len(batch),
        truncated_frac=1.0 - sum(batch.finished) / len(batch),  # cut at rollout.max_new_tokens
        samples=len(batch),
        skipped_zero_adv_frac=sum(len(zero) for _, zero in splits) / len(batch),  # left out of the forward/backward
        behaviour_from_engine=float(from_engine),
    )
    return stats


def this_rank_micro_batches(t: Trainer, tokens, adv_N: torch.Tensor, idx_M: torch.Tensor) -> list[train_step.MicroBatch]:
    """This DP rank's share of one mini-batch (sample indices idx_M) as micro-batches: padded rows of
    optim.micro_batch_size samples strided over ranks, or, with optim.pack_row_tokens > 0, packed rows
    balanced over ranks by tokens (optim.micro_batch_size rows per micro-batch). A rank without samples gets one
    all-padding micro-batch, which keeps it in the step's collectives."""
    o, g = t.cfg.optim, t.groups
    fields = (tokens.input_ids_NS, tokens.targets_NS, tokens.loss_mask_NS, adv_N, tokens.rollout_logp_NS)
    if o.pack_row_tokens == 0:
        mine = idx_M[g.dp_rank :: g.dp_size]
        if len(mine) == 0:
            return [train_step.empty_micro_batch()]
        return train_step.split_micro_batches(*(f[mine] for f in fields), o.micro_batch_size)
    if len(idx_M) == 0:
        return [train_step.empty_micro_batch()]
    lengths = packing.sample_lengths(tokens.loss_mask_NS[idx_M])
    # Rows no wider than needed to give every DP rank work, never narrower than the longest sample.
    width = min(o.pack_row_tokens, max(max(lengths), sum(lengths) // g.dp_size))
    rows = packing.balance_rows(packing.plan_rows(lengths, width), lengths, g.dp_size)[g.dp_rank]
    rows = [[int(idx_M[i]) for i in row] for row in rows]
    if not rows:  # fewer rows than ranks: an all-padding row keeps this rank in the step's collectives
        return [train_step.empty_micro_batch()]
    return packing.pack_micro_batches(rows, *fields, o.micro_batch_size)


def mini_batch_indices(group_sizes: list[int], mini_batches: int) -> list[torch.Tensor]:
    """Sample indices of each PPO mini-batch: consecutive whole prompt groups, about equal prompt counts."""
    if mini_batches > len(group_sizes):
        raise ValueError(f"optim.mini_batches={mini_batches} exceeds the {len(group_sizes)} prompts per step")
    bounds = [0, *torch.tensor(group_sizes).cumsum(0).tolist()]
    cuts = [round(j * len(group_sizes) / mini_batches) for j in range(mini_batches + 1)]
    return [torch.arange(bounds[a], bounds[b]) for a, b in zip(cuts, cuts[1:])]


def supervised_warmup(t: Trainer) -> int:
    """Teacher-forced warm-up on train answers until held-out accuracy reaches warmup.stop_accuracy."""
    w = t.cfg.warmup
    opt, sched = build_optimizer(
        t.model, w.lr, t.cfg.optim, w.max_steps, decay="constant", distributed=t.cfg.parallel.distributed_optimizer
    )
    sampler = EpochSampler(len(t.train_set), t.cfg.run.seed + 1)
    for step in range(1, w.max_steps + 1):
        # Supervised examples may repeat within a batch when the batch outgrows the training set.
        picks = [sampler.next_batch(min(w.batch_size - k, len(t.train_set))) for k in range(0, w.batch_size, len(t.train_set))]
        prompts = [t.train_set[i] for batch in picks for i in batch]
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


def trainer_state(
    t: Trainer, step: int, sampler: EpochSampler, summary: dict, rl_seconds: float, pending: Collected | None
) -> dict:
    """Everything besides model and optimizer that a resumed run needs to continue exactly (same on every rank),
    the next step's rollouts included when they were generated ahead (rollout.max_staleness=1): a resumed run
    trains on them rather than drawing their prompts again, so none is lost and none is trained twice."""
    return {
        "step": step,
        "policy_version": t.version,
        "prompt_stats": t.stats.state_dict(),
        "sampler": sampler.state_dict(),
        "epoch": t.epoch,  # the last epoch whose start refreshed the reference-mode priorities
        "outcomes_version": t.outcomes_version,
        "pending": None if pending is None else {"rollouts": pending[0].state_dict(), "metrics": pending[1]},
        "scheduler": t.scheduler.state_dict(),
        "summary": summary,
        "rl_seconds": rl_seconds,
        "engine_restarts": t.rollout.restarts,
        "skipped_steps": t.skipped_steps,
    }


def save(t: Trainer, step: int, state: dict) -> None:
    ck = t.cfg.checkpoint
    path = save_checkpoint(checkpoint_root(t.cfg), step, t.model, t.optimizer, state, t.groups, keep_last=ck.keep_last)
    if t.groups.is_driver:
        t.logger.log(step, {"checkpoint_step": step}, phase="checkpoint")
        print(f"dynamo-mega: saved checkpoint {path}", flush=True)


def resume_point(cfg: Config, groups: ParallelGroups) -> Path | None:
    """The checkpoint to resume from, chosen by the driver and shared (ranks must agree even if the shared
    filesystem is slow to show a new directory). The driver verifies the candidates' digests first, skipping
    damaged ones (resume=auto); a broken checkpoint.resume path raises ConfigError on every rank, before the
    run folder is written or vLLM starts (the CLI: exit 2, one line)."""
    choice = None
    if groups.is_driver:
        try:
            choice = resolve_resume(cfg.checkpoint.resume, checkpoint_root(cfg))
        except config_mod.ConfigError as exc:
            choice = exc  # told to every rank: raised on the driver alone it would leave the others waiting
    choice = broadcast(choice, groups)
    if isinstance(choice, config_mod.ConfigError):
        raise choice
    return choice


def start_rl(t: Trainer, sampler: EpochSampler) -> tuple[int, dict, float, Collected | None]:
    """Fresh start (evaluate, warm up) or resume; returns (last finished step, summary, RL seconds so far, the next
    step's rollouts if the checkpoint holds them)."""
    cfg, path = t.cfg, t.resume_path
    if path is None:
        summary = {"accuracy_init": evaluate(t, 0, phase="init_eval")}
        if cfg.warmup.enabled:
            summary["warmup_steps"] = supervised_warmup(t)
            sync_weights(t)
            if cfg.warmup.save_hf_dir:
                save_hf_snapshot(t, Path(cfg.warmup.save_hf_dir))
        summary["accuracy_before_rl"] = evaluate(t, 0)
        return 0, summary, 0.0, None
    from dynamo_mega.checkpoint import report_damage, try_load_checkpoint
    from dynamo_mega.metrics import PRE_RL_PHASES

    cfg_path = path
    state, why = try_load_checkpoint(path, t.model, t.optimizer, t.groups)
    while state is None:  # every rank saw the failure (try_load_checkpoint): fall back, or stop, together
        older = None
        if t.groups.is_driver:
            try:
                if cfg.checkpoint.resume != "auto":
                    raise config_mod.ConfigError(f"checkpoint.resume={cfg.checkpoint.resume}: does not load ({why})")
                older = resolve_resume("auto", checkpoint_root(cfg), older_than=path)
                if older is None:
                    raise config_mod.ConfigError(f"checkpoint {path} is damaged ({why}) and no older complete checkpoint "
                                                 "is left; pass checkpoint.resume=none to start afresh")
                report_damage(path, why, older)
            except config_mod.ConfigError as exc:
                older = exc
        older = broadcast(older, t.groups)
        if isinstance(older, config_mod.ConfigError):
            raise older
        path = t.resume_path = older
        state, why = try_load_checkpoint(path, t.model, t.optimizer, t.groups)
    if path != cfg_path and t.groups.is_driver:  # setup cut the logs at the damaged one's step: cut them at this one's
        kept = state["step"]
        truncate_jsonl(t.run_dir / "samples.jsonl", lambda r: r["step"] <= kept)
        t.logger._file.close()
        truncate_jsonl(t.logger.path, lambda r: r["phase"] in PRE_RL_PHASES or r["step"] <= kept)
        t.logger._file = t.logger.path.open("a")
    t.stats.load_state_dict(state["prompt_stats"])
    sampler.load_state_dict(state["sampler"])
    t.scheduler.load_state_dict(state["scheduler"])
    t.version = state["policy_version"]
    t.skipped_steps = state["skipped_steps"]
    t.epoch, t.outcomes_version = state["epoch"], state.get("outcomes_version", -1)
    pending = _resumed_pending(t, state.get("pending"))
    t.rollout.push(t.version)
    t.rollout.restarts = state["engine_restarts"]
    t.rollout.take_metrics()
    if t.groups.is_driver:
        t.logger.log(state["step"], {"resumed_from_step": state["step"], "policy_version": t.version}, phase="resume")
        print(f"dynamo-mega: resumed from {path}", flush=True)
    return state["step"], {**state["summary"], "resumed_from": str(path)}, state["rl_seconds"], pending


def _resumed_pending(t: Trainer, saved: dict | None) -> Collected | None:
    """The rollouts a checkpoint holds for its next step, unless they are older than rollout.max_staleness allows
    (the bound was lowered on resume): then they are dropped, said, and the step generates afresh. Their outcomes
    stay in the prompt statistics (they happened) and their prompts count as drawn."""
    if saved is None:
        return None
    rollouts = step_rollouts.StepRollouts.from_state_dict(saved["rollouts"], {p.id: p for p in t.train_set})
    staleness = t.version - min(rollouts.batch.versions)
    if staleness > t.cfg.rollout.max_staleness:
        if t.groups.is_driver:
            print(
                f"dynamo-mega: dropped the checkpoint's {len(rollouts.batch)} rollouts generated ahead: {staleness} "
                f"versions old, over rollout.max_staleness={t.cfg.rollout.max_staleness}",
                flush=True,
            )
        return None
    return rollouts, saved["metrics"]


def train(cfg: Config) -> dict:
    """Run the whole job; returns a summary (held-out accuracy before/after, steps, wall time)."""
    arm_spawned_children()  # no helper process (vLLM, checkpoint writer) outlives this one, even after a SIGKILL
    with sigterm_stops_start_up():
        t = setup(cfg)
    stop = StopSignal(cfg.checkpoint.save_on_sigterm)
    try:
        start = time.time()
        sampler = EpochSampler(len(t.train_set), cfg.run.seed)
        step, summary, rl_before, pending = start_rl(t, sampler)
        rl_start = time.time() - rl_before
        stopped = False
        while step < cfg.run.steps and not stopped:
            step += 1
            stats, pending = rl_iteration(t, sampler, step, pending)
            if t.groups.is_driver:
                t.logger.log(step, stats)
            if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step != cfg.run.steps:
                evaluate(t, step)
            if cfg.eval.interval and step % cfg.eval.interval == 0:
                evaluate_on_benchmarks(t, step)
            out_of_time = bool(cfg.run.max_minutes) and time.time() - rl_start > 60 * cfg.run.max_minutes
            stopped = stop.agreed(t.groups, also=out_of_time)
            interval = cfg.checkpoint.interval
            if (interval and step % interval == 0) or stopped or step == cfg.run.steps:
                save(t, step, trainer_state(t, step, sampler, summary, time.time() - rl_start, pending))
        if stop.requested:
            summary["stopped_by"] = "SIGTERM"
        summary.update(accuracy_after_rl=evaluate(t, step), rl_steps=step, wall_s=time.time() - start)
        if t.groups.is_driver:
            (t.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            t.logger.close()
            plot_run(t.run_dir)
        return summary
    finally:
        stop.restore()
        if t.logger is not None:  # on a crash too: the progress bar must not draw over the traceback
            t.logger.close()
        t.rollout.close()
        destroy_parallel()


def rl_iteration(t: Trainer, sampler: EpochSampler, step: int, pending: Collected | None) -> tuple[dict, Collected | None]:
    """One RL step: this step's rollouts (`pending` if generated ahead), the policy step, the weight sync. With
    rollout.max_staleness=1 the next step's rollouts are generated in a background thread while this step trains
    and returned; the weights reach the engines only once that generation is done, so every batch comes from one
    policy version. Returns the step's stats and those rollouts (None when synchronous or on the last step)."""
    cfg = t.cfg
    t0 = time.time()
    if pending is None:  # synchronous, or the first step, or generation ahead was interrupted
        pending = collect_rollouts(t, sampler, step)
    (rollouts, timing), pending = pending, None
    if t.groups.is_driver:  # before the thread starts: the tokenizer is not shared between threads
        _log_samples(t, step, rollouts.batch)
    staleness = check_staleness(rollouts.batch, t.version, cfg.rollout.max_staleness)
    t1 = time.time()
    ahead = None
    if cfg.rollout.max_staleness and step < cfg.run.steps:
        ahead, snapshot = start_ahead(t, sampler, step + 1)
    stats = rl_step(t, rollouts.batch)
    t2 = time.time()
    if ahead is not None:
        pending = take_ahead(t, ahead, snapshot, sampler)
    t3 = time.time()
    trained_version = t.version
    sync_weights(t)
    t.skipped_steps += int(stats["skipped_step"])  # non-finite loss/grad norm: update dropped, counted
    stats.update(timing, time_train=t2 - t1, time_sync=time.time() - t3, policy_version=t.version)
    waits = (t1 - t0, t3 - t2)  # for this step's rollouts (synchronous) and for the next step's (ahead)
    stats.update(_pipeline_metrics(rollouts.batch, timing, trained_version, staleness, waits, pending))
    stats.update(t.rollout.take_metrics())  # each replica's refit time
    stats.update(skipped_steps_total=t.skipped_steps, engine_restarts=t.rollout.restarts, rss_gib=_rss_gib())
    step_s = max(time.time() - t0, 1e-9)
    stats["time_step"] = step_s  # the step's wall time: waiting for rollouts, training, weight sync, bookkeeping
    stats["response_tokens_per_s"] = stats["response_len_mean"] * stats["samples"] / step_s
    return stats, pending


def _pipeline_metrics(
    batch: RolloutBatch, timing: dict, trained_version: int, staleness: int, waits: tuple, ahead: Collected | None
) -> dict[str, float]:
    """How far behind the trained policy the batch and its allocation were, and how much generation the training
    hid. time_rollout_wait: what the loop waited for rollouts this step (all of the generation when synchronous);
    rollout_hidden_s: the part of the next step's generation that ran during this step's training (ahead)."""
    out = {"staleness": float(staleness), "time_rollout_wait": sum(waits)}
    planned_from = timing.get("allocation_stats_version", -1.0)
    if planned_from >= 0:  # the statistics held outcomes when the allocation was planned
        out["allocation_lag_generator"] = batch.policy_version - planned_from
        out["allocation_lag_trainer"] = trained_version - planned_from
    if ahead is not None:
        generated_s = ahead[1]["time_rollout"] + ahead[1]["time_reward"]
        out["rollout_hidden_s"] = max(generated_s - waits[1], 0.0)
    return out


def _rss_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30
