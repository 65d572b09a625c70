"""A rollout-engine test double that samples the policy itself, for golden values of whole RL steps.

vLLM's sampling is not reproducible across CPUs and builds (its kernels, its batching, its random streams), so a
test pinning the values of an RL run cannot use it. This engine has VLLMEngine's constructor and the part of its
interface the rollout service uses (generate, push, version, restart, sleep, close): it loads the HF folder the
trainer writes (hf_init) into transformers' model of the architecture, takes every weight refit, and samples with
a torch generator seeded per request as the service seeds it, so rewards, advantages and held-out accuracy follow
the policy being trained, deterministically. Plain ancestral sampling (top_p 1), no KV cache: tiny models only.
"""

from __future__ import annotations

from itertools import pairwise

import torch

from dynamo_mega.rl.engines.vllm_engine import Completion


class PolicySampler:
    def __init__(self, model_dir, **engine_options):
        """Called as VLLMEngine(model_dir, dtype=..., seed=..., tensor_parallel=..., ...): those options configure
        vLLM and have no meaning here (the sampling seeds come with each generate call)."""
        self.model_dir = str(model_dir)
        self.version = 0
        self.model = self._load()

    def _load(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def generate(self, prompts, counts, *, max_new_tokens, temperature, top_p=1.0, stop_token_ids=None, seed=None):
        """counts[i] samples of prompts[i] (token ids), request i drawn from its own generator, seeded like
        VLLMEngine: seed[i], seed + i, or 0 when None (greedy decoding, temperature 0, draws nothing). Requests
        whose prompts have one length are decoded side by side, in one forward per token."""
        assert top_p == 1.0, "the double samples the full distribution only"
        seeds = [0 if seed is None else seed[i] if isinstance(seed, list) else seed + i for i in range(len(prompts))]
        by_length: dict[int, list[int]] = {}
        for i, (prompt, n) in enumerate(zip(prompts, counts, strict=True)):
            if n:
                by_length.setdefault(len(prompt), []).append(i)
        groups = [[] for _ in prompts]
        for requests in by_length.values():
            sampled = self._sample(
                [prompts[i] for i in requests],
                [counts[i] for i in requests],
                [seeds[i] for i in requests],
                max_new_tokens,
                temperature,
                set(stop_token_ids or []),
            )
            for i, group in zip(requests, sampled, strict=True):
                groups[i] = group
        return groups

    def _sample(self, prompts, counts, seeds, max_new_tokens, temperature, stops) -> list[list[Completion]]:
        """counts[j] continuations of each prompts[j] (all of one length), rows of request j drawn from seeds[j]."""
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        bounds = [0, *torch.tensor(counts).cumsum(0).tolist()]
        ids_NT = torch.tensor([p for p, n in zip(prompts, counts, strict=True) for _ in range(n)])
        logps = []
        for _ in range(max_new_tokens):
            logits_NV = self.model(ids_NT).logits[:, -1].double()
            logp_NV = torch.log_softmax(logits_NV / (temperature or 1.0), -1)
            if temperature == 0:
                tok_N = logp_NV.argmax(-1)
            else:
                probs_NV = logp_NV.exp()
                tok_N = torch.cat(
                    [
                        torch.multinomial(probs_NV[lo:hi], 1, generator=g)[:, 0]
                        for g, (lo, hi) in zip(gens, pairwise(bounds), strict=True)
                    ]
                )
            logps.append(logp_NV.gather(1, tok_N[:, None])[:, 0])
            ids_NT = torch.cat([ids_NT, tok_N[:, None]], dim=1)
        rows = zip(ids_NT[:, len(prompts[0]) :].tolist(), torch.stack(logps, 1).tolist(), strict=True)
        completions = []
        for row, lp in rows:
            end = next((j + 1 for j, t in enumerate(row) if t in stops), None)  # the stop token is kept, as vLLM does
            completions.append(Completion(row[:end], lp[:end], end is not None))
        return [completions[lo:hi] for lo, hi in pairwise(bounds)]

    @torch.no_grad()
    def push(self, buckets, version: int) -> int:
        """A full refit from weight-bridge buckets (HF-named full tensors); returns the bytes received."""
        state = self.model.state_dict()
        received, nbytes = set(), 0
        for b in buckets:
            for name, tensor in b.tensors():
                state[name].copy_(tensor)
                received.add(name)
            nbytes += b.flat.numel() * b.flat.element_size()
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        assert received == set(state) - tied, f"a refit must bring every weight: missing {set(state) - tied - received}"
        self.version = version
        return nbytes

    def restart(self) -> None:
        self.model, self.version = self._load(), 0

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        pass


class DyingSampler(PolicySampler):
    """Its engine process "dies" (vLLM's EngineDeadError) at generate call number DIES_AT of this process, counted
    over every engine (restarts included), and stays dead until restarted, as a real engine."""

    DIES_AT = 0
    calls = 0

    def __init__(self, model_dir, **engine_options):
        super().__init__(model_dir, **engine_options)
        self.dead = False

    def generate(self, *args, **kwargs):
        from vllm.v1.engine.exceptions import EngineDeadError

        DyingSampler.calls += 1
        if DyingSampler.calls == DyingSampler.DIES_AT:
            self.dead = True
        if self.dead:
            raise EngineDeadError("engine core died (test)")
        return super().generate(*args, **kwargs)

    def push(self, buckets, version: int) -> int:
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.dead:
            raise EngineDeadError("engine core died (test)")
        return super().push(buckets, version)

    def restart(self) -> None:
        super().restart()
        self.dead = False


def _train_with_policy_sampler(overrides: list[str], dies_at: int = 0) -> None:
    """Spawned process: configs/tiny_cpu.yaml with `overrides` through train.train, every rollout replica's vLLM
    engine replaced by PolicySampler (what rollout_service.start_vllm_replicas builds); the rest as in a real run."""
    from pathlib import Path

    from dynamo_mega import train
    from dynamo_mega.config import load_config
    from dynamo_mega.rl.engines import vllm_engine

    DyingSampler.DIES_AT = dies_at
    vllm_engine.VLLMEngine = DyingSampler if dies_at else PolicySampler
    train.train(load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml", overrides))


def run_tiny_train(run_dir, overrides: list[str], dies_at: int = 0) -> list[dict]:
    """The tiny run in a process of its own (train.train takes the default process group down on its way out);
    returns its metrics.jsonl records. dies_at > 0: the engine dies at that generate call (DyingSampler)."""
    import json
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(
        target=_train_with_policy_sampler, args=([*overrides, f"run.output_dir={run_dir}"], dies_at)
    )
    proc.start()
    proc.join(timeout=600)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    assert proc.exitcode == 0, f"the run failed (exit code {proc.exitcode}): see its output above and {run_dir}"
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
