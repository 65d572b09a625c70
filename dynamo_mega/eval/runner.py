"""Evaluate a policy on the math benchmarks: render chat prompts, sample with vLLM, score with math-verify,
report pass@1 and pass@k as JSON + a markdown table.

Two entry points, both collective over the ranks of the job:
- `evaluate_benchmarks(rollout, tokenizer, eval_cfg, step=..., output_dir=...)`: on the running rollout service's
  replicas (the training loop calls it every `eval.interval` steps);
- `run_eval(model_dir, cfg, output_dir)`: `dynamo-mega eval`, starts its own replicas on an HF checkpoint
  (one process, or under torchrun world / rollout.vllm_tensor_parallel replicas).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dynamo_mega.config import Config, EvalConfig
from dynamo_mega.eval.benchmarks import Problem, load_benchmark
from dynamo_mega.eval.passk import mean_pass_at_k
from dynamo_mega.rl.rollout import stop_token_ids


@dataclass
class BenchmarkResult:
    benchmark: str
    problems: int
    samples: int  # per problem (n)
    pass_at_k: dict[str, float]  # "pass@1" -> value
    mean_response_tokens: float
    truncated_frac: float  # responses cut at eval.max_new_tokens
    correct_counts: list[int]  # per problem, in file order


def render_prompts(tokenizer, problems: list[Problem], system_prompt: str | None) -> list[list[int]]:
    """Token ids of each problem as one chat turn (the tokenizer's own chat template), ready for generation."""
    out = []
    for p in problems:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": p.question}
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def _check_lengths(problems: list[Problem], prompts: list[list[int]], max_model_len: int | None) -> None:
    if max_model_len is None:
        return
    too_long = [(p.id, len(ids)) for p, ids in zip(problems, prompts) if len(ids) >= max_model_len]
    if too_long:
        raise ValueError(
            f"{len(too_long)} prompts do not fit the engine's max_model_len={max_model_len} (e.g. {too_long[0][0]} has "
            f"{too_long[0][1]} tokens): raise rollout.max_prompt_tokens, or set eval.max_problems / eval.benchmarks"
        )


def longest_prompt(tokenizer, cfg: EvalConfig) -> int:
    """Tokens of the longest rendered prompt over the configured benchmarks (sizes the engine's context)."""
    return max(
        len(ids)
        for name in cfg.benchmarks
        for ids in render_prompts(tokenizer, load_benchmark(name, cfg.data_dir, cfg.max_problems), cfg.system_prompt)
    )


def _score_benchmark(rollout, tokenizer, problems, prompts, cfg: EvalConfig, seed: int):
    """prompts[i]: token ids of problems[i]. Returns (BenchmarkResult, sample records)."""
    answers = [p.answer for p in problems for _ in range(cfg.samples)]
    groups = rollout.generate(
        prompts,
        [cfg.samples] * len(problems),
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop_token_ids=stop_token_ids(tokenizer),
        seed=None if cfg.temperature == 0 else seed,
        answers=[p.answer for p in problems],  # scored on the replica that generated each sample
    )
    completions = [c for group in groups for c in group]
    texts = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    correct = [bool(c.correct) for c in completions]  # math-verify's verdict (no reward_kwargs: math-verify only)
    counts = [sum(correct[i * cfg.samples : (i + 1) * cfg.samples]) for i in range(len(problems))]
    result = BenchmarkResult(
        benchmark=problems[0].benchmark,
        problems=len(problems),
        samples=cfg.samples,
        pass_at_k={f"pass@{k}": mean_pass_at_k(cfg.samples, counts, k) for k in sorted(set(cfg.k))},
        mean_response_tokens=sum(len(c.token_ids) for c in completions) / len(completions),
        truncated_frac=sum(not c.finished for c in completions) / len(completions),
        correct_counts=counts,
    )
    records = [
        {"id": problems[i // cfg.samples].id, "answer": answers[i], "response": texts[i], "correct": correct[i]}
        for i in range(len(completions))
    ]
    return result, records


def evaluate_benchmarks(
    rollout,
    tokenizer,
    cfg: EvalConfig,
    *,
    step: int,
    output_dir: str | Path,
    max_model_len: int | None = None,
    write: bool = True,
) -> dict[str, float]:
    """Evaluate every benchmark of `cfg` with the replicas' current weights (collective).

    rollout: a RolloutService (generates and scores on its replicas); tokenizer: the policy's HF tokenizer (chat
    template); max_model_len: the engines' context, when known, so a prompt that cannot fit fails with a message
    before any generation; write: this rank writes OUTPUT_DIR/step_{step:06d}.json, .md and _samples.jsonl (the
    driver). Returns flat metrics {"aime24/pass@1": ..., "mean/pass@1": ...} for the logger, on every rank."""
    output_dir = Path(output_dir)
    results, samples, start = [], [], time.time()
    prepared = []
    for name in cfg.benchmarks:  # every prompt is checked before the first generation
        problems = load_benchmark(name, cfg.data_dir, cfg.max_problems)
        prompts = render_prompts(tokenizer, problems, cfg.system_prompt)
        _check_lengths(problems, prompts, max_model_len)
        prepared.append((problems, prompts))
    for problems, prompts in prepared:
        result, records = _score_benchmark(rollout, tokenizer, problems, prompts, cfg, cfg.seed + step)
        results.append(result)
        samples.extend(records)
    metrics = {f"{r.benchmark}/{key}": value for r in results for key, value in r.pass_at_k.items()}
    metrics.update({f"mean/{key}": value for key, value in _mean_row(results).items()})
    if not write:
        return metrics
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = output_dir / f"step_{step:06d}"
    summary = {
        "step": step,
        "wall_s": time.time() - start,
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("data_dir", "tokenizer")},
        "mean": _mean_row(results),
        "benchmarks": [asdict(r) for r in results],
    }
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    stem.with_suffix(".md").write_text(markdown_table(results, step))
    with open(f"{stem}_samples.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in samples)
    return metrics


def _mean_row(results: list[BenchmarkResult]) -> dict[str, float]:
    """Unweighted mean over benchmarks (each benchmark counts once, as papers report the average)."""
    keys = results[0].pass_at_k.keys()
    return {key: sum(r.pass_at_k[key] for r in results) / len(results) for key in keys}


def markdown_table(results: list[BenchmarkResult], step: int) -> str:
    keys = list(results[0].pass_at_k)
    lines = [
        f"Benchmark evaluation at step {step} ({results[0].samples} samples per problem)",
        "",
        "| benchmark | problems | " + " | ".join(keys) + " | mean response tokens | truncated |",
        "|---|---|" + "---|" * len(keys) + "---|---|",
    ]
    for r in results:
        cells = " | ".join(f"{r.pass_at_k[k]:.4f}" for k in keys)
        lines.append(f"| {r.benchmark} | {r.problems} | {cells} | {r.mean_response_tokens:.1f} | {r.truncated_frac:.3f} |")
    mean = _mean_row(results)
    lines.append("| **mean** | | " + " | ".join(f"{mean[k]:.4f}" for k in keys) + " | | |")
    return "\n".join(lines) + "\n"


def run_eval(model_dir: str | Path, cfg: Config, output_dir: str | Path) -> dict[str, float]:
    """`dynamo-mega eval`: rollout replicas on the HF checkpoint in `model_dir`, then evaluate (step 0). Under
    torchrun every rank takes part (world / rollout.vllm_tensor_parallel replicas); rank 0 writes the results."""
    import os

    import torch.distributed as dist
    from transformers import AutoTokenizer

    from dynamo_mega import console
    from dynamo_mega.models.qwen import arch_from_hf_config
    from dynamo_mega.rl.rollout_service import start_vllm_replicas

    model_dir = Path(model_dir)
    arch = arch_from_hf_config(model_dir)  # ValueError with the fix when the folder is not a Qwen checkpoint
    tokenizer = AutoTokenizer.from_pretrained(cfg.eval.tokenizer or str(model_dir))
    # Room for the longest prompt of the run (OlympiadBench reaches ~1,300 tokens with Qwen's template) + the answer.
    max_len = min(arch.max_position_embeddings, longest_prompt(tokenizer, cfg.eval) + cfg.eval.max_new_tokens)
    # The inputs passed their checks (checkpoint, tokenizer, every benchmark file): the output folder may be written.
    console.move_to_run_dir(output_dir, int(os.environ.get("RANK", "0")), command="eval")
    own_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo")  # the replicas' small collectives (plans, samples)
    rollout = None
    try:
        rollout = start_vllm_replicas(cfg, model_dir, max_len=max_len, tokenizer=tokenizer, seed=cfg.eval.seed)
        write = not dist.is_initialized() or dist.get_rank() == 0
        return evaluate_benchmarks(
            rollout, tokenizer, cfg.eval, step=0, output_dir=output_dir, max_model_len=max_len, write=write
        )
    finally:
        if rollout is not None:
            rollout.close()
        if own_group:
            dist.destroy_process_group()
