"""Rollouts: (prompt, n_i) requests -> a flat, group-ordered batch of samples with rewards.

Every per-sample field (prompt id, answer, prompt tokens) is repeated with the SAME counts as the responses,
in the same order, from the same list: the paper's reference code repeated metadata uniformly while
responses were repeated n_i times, scoring responses against other prompts' answers (ALGORITHM.md defect 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from dynamo_mega.data import Prompt
from dynamo_mega.rl.engines.vllm_engine import Completion


class Generator(Protocol):
    """What `generate_rollouts` needs: a VLLMEngine, or the RolloutService (which also takes `answers=` to score
    on its replicas and `expected_lengths=` to balance them)."""

    version: int  # policy version of the weights generating

    def generate(
        self,
        prompts: list[list[int]],
        counts: list[int],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        stop_token_ids: list[int] | None = None,
        seed: int | None = None,
        **service_options,
    ) -> list[list[Completion]]: ...


@dataclass
class RolloutBatch:
    """Samples laid out group after group; group i (prompt i) holds group_sizes[i] samples."""

    prompt_ids: list[str]
    answers: list[str]
    prompt_tokens: list[list[int]]
    response_tokens: list[list[int]]
    rollout_logprobs: list[list[float]]
    finished: list[bool]
    group_sizes: list[int]
    policy_version: int
    rewards: list[float] = field(default_factory=list)
    # success per sample (math-verify's verdict; rl/reward_plugins.py): what prompt statistics and accuracy count,
    # apart from the reward, which may add user terms (algo.reward)
    correct: list[bool] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # per sample: the policy version that generated it

    def __len__(self) -> int:
        return len(self.response_tokens)


def stop_token_ids(tokenizer) -> list[int]:
    """End-of-turn ids: the tokenizer's eos plus Qwen's <|im_end|> / <|endoftext|> when the vocabulary has them."""
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab)
    return sorted(i for i in ids if i is not None)


def generate_rollouts(
    engine: Generator,
    tokenizer,
    prompts: list[Prompt],
    counts: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    score: bool = False,
    expected_lengths: list[float] | None = None,
    recover: bool = True,
) -> RolloutBatch:
    """Ask the engine for counts[i] samples of prompts[i] and flatten them with aligned metadata. score: the
    engine (the rollout service) scores each sample against its own prompt's answer (user reward terms also get the
    prompt's dataset columns, Prompt.reward_kwargs); the batch carries rewards and successes (`correct`).
    expected_lengths: tokens per response of each prompt, for the service's balancing across replicas."""
    prompt_tokens = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in prompts]
    extra = {}
    if score:
        extra["answers"] = [p.answer for p in prompts]
        extra["reward_kwargs"] = [p.reward_kwargs() for p in prompts]
    if expected_lengths is not None:
        extra["expected_lengths"] = expected_lengths
    if not recover:  # generating ahead of training: a dead engine is the caller's to restart (EnginesDied)
        extra["recover"] = False
    groups = engine.generate(
        prompt_tokens,
        counts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop_token_ids=stop_token_ids(tokenizer),
        seed=seed,
        **extra,
    )
    batch = RolloutBatch([], [], [], [], [], [], [], engine.version)
    for prompt, tokens, n, completions in zip(prompts, prompt_tokens, counts, groups, strict=True):
        if len(completions) != n:
            raise RuntimeError(f"engine returned {len(completions)} samples for prompt {prompt.id}, expected {n}")
        batch.group_sizes.append(n)
        for c in completions:
            batch.prompt_ids.append(prompt.id)
            batch.answers.append(prompt.answer)
            batch.prompt_tokens.append(tokens)
            batch.response_tokens.append(c.token_ids)
            batch.rollout_logprobs.append(c.logprobs)
            batch.finished.append(c.finished)
            batch.versions.append(batch.policy_version)
            if score:
                batch.rewards.append(c.reward)
                batch.correct.append(c.correct)
    return batch


def response_texts(batch: RolloutBatch, tokenizer) -> list[str]:
    return tokenizer.batch_decode(batch.response_tokens, skip_special_tokens=True)


@dataclass
class TokenBatch:
    """Right-padded training tensors. Position t holds input token t and predicts targets[t] = token t+1."""

    input_ids_NS: torch.Tensor
    targets_NS: torch.Tensor
    loss_mask_NS: torch.Tensor  # True where targets[t] is a response token
    rollout_logp_NS: torch.Tensor  # the engine's log-prob of targets[t] (0 off the mask)


def to_token_batch(
    prompt_tokens: list[list[int]], response_tokens: list[list[int]], rollout_logprobs: list[list[float]] | None, pad_id: int
) -> TokenBatch:
    """Concatenate prompt + response per sample and pad to the longest sequence."""
    seqs = [p + r for p, r in zip(prompt_tokens, response_tokens, strict=True)]
    n, s = len(seqs), max(len(x) for x in seqs)
    input_ids = torch.full((n, s), pad_id, dtype=torch.long)
    targets = torch.full((n, s), pad_id, dtype=torch.long)
    mask = torch.zeros((n, s), dtype=torch.bool)
    rollout_logp = torch.zeros((n, s), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_tokens, response_tokens)):
        seq = torch.tensor(p + r, dtype=torch.long)
        input_ids[i, : len(seq)] = seq
        targets[i, : len(seq) - 1] = seq[1:]
        first = len(p) - 1  # position whose target is the first response token
        mask[i, first : first + len(r)] = True
        if rollout_logprobs is not None and r:
            rollout_logp[i, first : first + len(r)] = torch.tensor(rollout_logprobs[i], dtype=torch.float32)
    return TokenBatch(input_ids, targets, mask, rollout_logp)


def regroup(batches: list[RolloutBatch], groups: list[list[tuple[int, int]]]) -> RolloutBatch:
    """A new batch whose group g concatenates the groups (b, i) = (batch b, its group i) listed in groups[g].

    Used to join a step's rounds of generation (in-step probes and the rest of the budget, or DAPO's refill
    rounds) into one group-ordered batch; every per-sample field moves with its sample, rewards included."""
    versions = {b.policy_version for b in batches}
    assert len(versions) == 1, f"internal error: one step's rollouts come from policy versions {sorted(versions)}"
    starts = [[0, *torch.tensor(b.group_sizes, dtype=torch.long).cumsum(0).tolist()] for b in batches]
    out = RolloutBatch([], [], [], [], [], [], [], versions.pop())
    per_sample = ("prompt_ids", "answers", "prompt_tokens", "response_tokens", "rollout_logprobs", "finished")
    per_sample += ("rewards", "correct", "versions")
    for members in groups:
        size = 0
        for b, i in members:
            src, lo, hi = batches[b], starts[b][i], starts[b][i + 1]
            scored = len(src.rewards) == len(src.correct) == len(src.versions) == len(src)
            assert scored, "internal error: regroup needs scored batches"
            for name in per_sample:
                getattr(out, name).extend(getattr(src, name)[lo:hi])
            size += hi - lo
        out.group_sizes.append(size)
    return out
