"""Per-GPU memory planner for a DynaMO run: does a TP/PP layout fit, and which one would?

Every number is an estimate from the model's shape, stated here so it can be checked by hand:

Training state (Megatron mixed precision, bf16 parameters):
    weights 2 B/param, main gradients 4 B/param (fp32), Adam 12 B/param (fp32 master copy + two moments).
    The distributed optimizer shards the 12 B over the DP ranks (Megatron's table: 6 + 12/DP bytes per param).
    Parameters per GPU are those of the largest pipeline stage: linear weights split over TP, norms replicated;
    the first stage adds the word embedding, the last the output layer (tied embeddings: both stages hold a
    copy when PP > 1) and the final norm.
Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"), bytes
per layer per micro-batch of b sequences of s tokens, hidden h, a heads, TP t, with sequence parallelism:
    recompute=none:      s*b*h*(34 + 5*a*s/h) / t   (the 5as/h term is the stored attention scores; flash
                                                     attention does not store them, so this overestimates)
    recompute=selective: s*b*h*34 / t               (attention core recomputed; also the flash-attention case)
    recompute=full:      s*b*h*2 / t per layer (its input) + one layer's s*b*h*34 / t while it is recomputed
    The constants are the paper's (GPT: multi-head attention, 4h GELU MLP, dropout): an approximation for Qwen
    (GQA, SwiGLU, no dropout). With 1F1B pipelining the first stage holds PP micro-batches of L/PP layers,
    i.e. L layers' worth; the last stage one micro-batch.
Logits (last stage): b*s*V/t elements, bf16 logits kept for backward (2 B) + their fp32 gradient (4 B).
vLLM (rollouts): weights 2 B/param / vLLM TP; vLLM takes `vllm_memory_fraction` of the GPU for weights + KV
    cache; KV bytes per token = 2 (K, V) * layers * max(groups / vLLM TP, 1) * head_dim * 2 B (bf16).
Colocated (vLLM shares the trainer's GPUs with sleep/wake): the rollout phase holds vLLM's share plus whatever
    training state stays resident (all of it, unless `offload` moves weights/grads/optimizer to host memory while
    vLLM generates); the training phase holds the training state plus activations and logits (vLLM asleep).
A fixed `overhead_gib` (CUDA context, NCCL buffers, allocator fragmentation) is added to both phases.
Rollout replicas (what the trainer starts): the W = `gpus` ranks form R = W / vLLM TP engines of TP = vLLM TP
    (replica r = ranks r*k .. r*k+k-1 for k = vLLM TP; the replica's first rank starts the engine), i.e.
    `gpus_per_node` / vLLM TP engines per node (8-GPU nodes unless the config says otherwise); every rank takes
    part in generation. Each GPU holds 1/vLLM TP of one engine, so the vLLM numbers above are per GPU of any
    replica: `kv_tokens` is what one engine's KV cache holds, R x `kv_tokens` in all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from dynamo_mega.models.qwen import QwenArch, padded_vocab_size

GIB = 1024**3
BYTES_WEIGHT, BYTES_GRAD, BYTES_ADAM = 2, 4, 12
ACT_CONST = 34  # bytes per s*b*h per layer (Korthikanti et al.), sequence parallel


@dataclass(frozen=True)
class PlanInputs:
    tp: int
    pp: int
    gpus: int  # GPUs of the training job (also vLLM's when colocated)
    gpu_mem_gib: float
    seq_len: int  # prompt + response tokens of the longest sequence
    micro_batch: int  # sequences per micro-batch
    recompute: str = "none"  # none | selective | full
    distributed_optimizer: bool = True
    vllm_tp: int = 1
    vllm_memory_fraction: float = 0.5
    colocated: bool = True
    rollout_gpus: int = 0  # disaggregated (colocated=False): GPUs that only generate, besides the `gpus` training ones
    offload: bool = False  # training state moved to host memory while vLLM generates
    overhead_gib: float = 2.0
    gpus_per_node: int = 8  # where the engines sit (the rollout line); the config's launch.procs_per_node

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def rollout_replicas(self) -> int:
        """R: vLLM engines the trainer starts, one per vllm_tp consecutive ranks (colocated) or rollout GPUs."""
        return (self.gpus if self.colocated else self.rollout_gpus) // self.vllm_tp

    @property
    def replicas_per_node(self) -> float:
        """Engines per node (a fraction when one engine spans several nodes)."""
        return min(self.gpus, self.gpus_per_node) / self.vllm_tp


@dataclass
class MemoryPlan:
    """Per-GPU GiB. `train_peak` and `rollout_peak` are the two phases; `fits` compares both with the GPU."""

    inputs: PlanInputs
    params_total: float  # parameters of the whole model (count, not bytes)
    params_per_gpu: float  # on the largest pipeline stage, per TP rank
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    vllm_weights: float
    kv_cache: float
    kv_tokens: int  # tokens the KV cache holds per vLLM engine
    train_peak: float
    rollout_peak: float
    fits: bool
    notes: list[str] = field(default_factory=list)


def layer_params(arch: QwenArch) -> tuple[int, int]:
    """(TP-split parameters, replicated parameters) of one transformer layer."""
    h, d, nh, g = arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_query_groups
    qkv = h * (nh + 2 * g) * d + ((nh + 2 * g) * d if arch.qkv_bias else 0)
    split = qkv + nh * d * h + 3 * h * arch.ffn_hidden_size  # qkv, o_proj, SwiGLU gate/up/down
    replicated = 2 * h + (2 * d if arch.qk_layernorm else 0)  # two RMSNorms (+ q/k norms in Qwen3)
    return split, replicated


def total_params(arch: QwenArch) -> int:
    split, replicated = layer_params(arch)
    embed = arch.vocab_size * arch.hidden_size
    head = 0 if arch.tie_word_embeddings else embed
    return arch.num_layers * (split + replicated) + embed + head + arch.hidden_size


def _stage_params(arch: QwenArch, tp: int, pp: int) -> tuple[float, float]:
    """Parameters per GPU on the first and on the last pipeline stage."""
    split, replicated = layer_params(arch)
    per_stage_layers = arch.num_layers // pp * (split / tp + replicated)
    vocab_rows = padded_vocab_size(arch.vocab_size, tp) / tp * arch.hidden_size
    first = per_stage_layers + vocab_rows
    if pp == 1:
        return first + (0 if arch.tie_word_embeddings else vocab_rows) + arch.hidden_size, 0.0
    last = per_stage_layers + vocab_rows + arch.hidden_size  # output layer (a tied copy when tied) + final norm
    return first, last


def activation_bytes_per_layer(arch: QwenArch, p: PlanInputs) -> tuple[float, float]:
    """(bytes kept per layer per micro-batch, bytes of one layer's working set during recompute)."""
    s, b, h, a, t = p.seq_len, p.micro_batch, arch.hidden_size, arch.num_attention_heads, p.tp
    if p.recompute == "none":
        return s * b * h * (ACT_CONST + 5 * a * s / h) / t, 0.0
    if p.recompute == "selective":
        return s * b * h * ACT_CONST / t, 0.0
    if p.recompute == "full":
        return 2 * s * b * h / t, s * b * h * ACT_CONST / t
    raise ValueError(f"recompute={p.recompute!r}: use none, selective or full")


def plan_memory(arch: QwenArch, p: PlanInputs) -> MemoryPlan:
    """Estimate per-GPU memory of training and rollouts for one layout (see the module docstring)."""
    first, last = _stage_params(arch, p.tp, p.pp)
    kept, working = activation_bytes_per_layer(arch, p)
    layers = arch.num_layers
    logits = p.micro_batch * p.seq_len * padded_vocab_size(arch.vocab_size, p.tp) / p.tp * (2 + 4)
    # Stage 0: PP micro-batches of L/PP layers in flight (= L layers); last stage: one micro-batch, plus logits.
    stages = [(first, kept * layers + working, 0.0 if p.pp > 1 else logits)]
    if p.pp > 1:
        stages.append((last, kept * layers / p.pp + working, logits))
    optimizer_share = 1 / p.dp if p.distributed_optimizer else 1.0

    def state_bytes(params: float) -> tuple[float, float, float]:
        return params * BYTES_WEIGHT, params * BYTES_GRAD, params * BYTES_ADAM * optimizer_share

    worst = max(stages, key=lambda st: sum(state_bytes(st[0])) + st[1] + st[2])
    weights, grads, optimizer = state_bytes(worst[0])
    train_peak = (weights + grads + optimizer + worst[1] + worst[2]) / GIB + p.overhead_gib

    n = total_params(arch)
    vllm_weights = n * BYTES_WEIGHT / p.vllm_tp / GIB
    vllm_pool = p.vllm_memory_fraction * p.gpu_mem_gib
    kv_cache = max(vllm_pool - vllm_weights, 0.0)
    kv_per_token = 2 * layers * max(arch.num_query_groups // p.vllm_tp, 1) * arch.head_dim * 2
    kv_tokens = int(kv_cache * GIB // kv_per_token)
    resident = 0.0 if (p.offload or not p.colocated) else (weights + grads + optimizer) / GIB
    rollout_peak = vllm_pool + resident + p.overhead_gib

    notes = []
    if kv_tokens < p.seq_len:
        notes.append(f"vLLM KV cache holds {kv_tokens} tokens, less than one {p.seq_len}-token sequence")
    if train_peak > p.gpu_mem_gib:
        notes.append(f"training phase needs {train_peak:.1f} GiB > {p.gpu_mem_gib:g} GiB")
    if rollout_peak > p.gpu_mem_gib:
        notes.append(f"rollout phase needs {rollout_peak:.1f} GiB > {p.gpu_mem_gib:g} GiB")
    fits = not notes
    return MemoryPlan(
        inputs=p,
        params_total=float(n),
        params_per_gpu=worst[0],
        weights=weights / GIB,
        grads=grads / GIB,
        optimizer=optimizer / GIB,
        activations=worst[1] / GIB,
        logits=worst[2] / GIB,
        vllm_weights=vllm_weights,
        kv_cache=kv_cache,
        kv_tokens=kv_tokens,
        train_peak=train_peak,
        rollout_peak=rollout_peak,
        fits=fits,
        notes=notes,
    )


def layout_problems(arch: QwenArch, tp: int, pp: int, gpus: int, vllm_tp: int = 1, colocated: bool = True) -> list[str]:
    """Why a TP/PP/vLLM-TP layout cannot run this model on `gpus` training GPUs (empty: it can)."""
    problems = []
    for what, value in (("num_attention_heads", arch.num_attention_heads), ("num_query_groups", arch.num_query_groups)):
        if value % tp:
            problems.append(f"tensor_parallel={tp} does not divide {what}={value}")
    if arch.ffn_hidden_size % tp:
        problems.append(f"tensor_parallel={tp} does not divide ffn_hidden_size={arch.ffn_hidden_size}")
    if arch.num_layers % pp:
        problems.append(f"pipeline_parallel={pp} does not divide num_layers={arch.num_layers}")
    if gpus % (tp * pp):
        problems.append(f"{gpus} GPUs are not a multiple of tensor_parallel x pipeline_parallel = {tp * pp}")
    if arch.num_attention_heads % vllm_tp:
        problems.append(f"vllm_tensor_parallel={vllm_tp} does not divide num_attention_heads={arch.num_attention_heads}")
    if colocated and gpus % vllm_tp:  # disaggregated engines split the rollout GPUs (config.py checks those)
        problems.append(f"{gpus} GPUs are not a multiple of vllm_tensor_parallel={vllm_tp}")
    if padded_vocab_size(arch.vocab_size, tp) != arch.vocab_size:
        problems.append(
            f"vocab_size={arch.vocab_size} needs padding to a multiple of tensor_parallel={tp}: the trainer's softmax "
            "would have rows the rollout engine lacks"
        )
    return problems


def suggest_layouts(arch: QwenArch, base: PlanInputs, gpus_per_node: int = 8) -> list[MemoryPlan]:
    """Layouts that fit, fewest model-parallel GPUs first (most data parallelism), then least PP (no bubble).
    TP stays within a node (its all-reduces need NVLink); vLLM TP keeps the base setting."""
    fitting = []
    for tp in (t for t in (1, 2, 4, 8, 16) if t <= gpus_per_node):
        for pp in (q for q in range(1, arch.num_layers + 1) if arch.num_layers % q == 0):
            if layout_problems(arch, tp, pp, base.gpus, base.vllm_tp, base.colocated):
                continue
            plan = plan_memory(arch, replace(base, tp=tp, pp=pp))
            if plan.fits:
                fitting.append(plan)
    return sorted(fitting, key=lambda m: (m.inputs.tp * m.inputs.pp, m.inputs.pp, m.inputs.tp))


def rollout_layout(plan: MemoryPlan) -> str:
    """One line: the rollout replicas a layout gets (the module docstring's "Rollout replicas")."""
    p = plan.inputs
    r, k, node = p.rollout_replicas, p.vllm_tp, min(p.gpus, p.gpus_per_node)
    if not p.colocated:
        nodes = max(p.gpus // p.gpus_per_node, 1)
        return (
            f"Rollout: {r} vLLM replica{'' if r == 1 else 's'} of TP={k} on {p.rollout_gpus} GPUs of their own "
            f"({p.rollout_gpus // nodes} per node beside {min(p.gpus, p.gpus_per_node)} training GPUs), disaggregated: "
            f"the engines keep their memory while the trainer trains; KV cache {plan.kv_tokens:,} tokens per engine"
        )
    if node % k == 0:
        where = f"{node // k} per {node}-GPU node"
    elif k % node == 0:
        where = f"each spanning {k // node} {node}-GPU nodes"
    else:
        where = f"engines straddle {node}-GPU nodes"
    ranks = "the one rank generates" if p.gpus == 1 else f"all {p.gpus} ranks generate"
    share = "each GPU runs its own engine" if k == 1 else f"each GPU holds 1/{k} of one engine"
    return (
        f"Rollout: {r} vLLM replica{'' if r == 1 else 's'} of TP={k} ({where}), {ranks} ({share}); "
        f"KV cache {plan.kv_tokens:,} tokens per engine"
    )


def format_plan(plan: MemoryPlan, title: str = "") -> str:
    p = plan.inputs
    rows = [
        ("weights (bf16)", plan.weights),
        ("gradients (fp32)", plan.grads),
        ("optimizer (fp32 master + Adam)" + (f", sharded over DP={p.dp}" if p.distributed_optimizer else ""), plan.optimizer),
        (f"activations (recompute={p.recompute}, micro-batch {p.micro_batch} x {p.seq_len} tokens)", plan.activations),
        ("logits (bf16 + fp32 grad)", plan.logits),
        ("overhead (CUDA context, NCCL, fragmentation)", p.overhead_gib),
        ("= training phase", plan.train_peak),
        (f"vLLM weights (1/{p.vllm_tp} of a TP={p.vllm_tp} engine)", plan.vllm_weights),
        (f"vLLM KV cache ({plan.kv_tokens:,} tokens per engine = {plan.kv_tokens // p.seq_len} full sequences)", plan.kv_cache),
        ("= rollout phase" + (" (training state offloaded)" if p.offload else ""), plan.rollout_peak),
    ]
    if not p.colocated:  # two kinds of GPU: the rollout rows are a rollout GPU's, the training rows a training GPU's
        rows[-1] = ("= rollout GPU (vLLM alone)", plan.rollout_peak)
        rows[6] = ("= training GPU", plan.train_peak)
    gpus = f"{p.gpus} GPUs" if p.colocated else f"{p.gpus} training + {p.rollout_gpus} rollout GPUs"
    head = (
        f"{title}{plan.params_total / 1e9:.2f}B parameters on {gpus} x {p.gpu_mem_gib:g} GiB: "
        f"TP={p.tp} PP={p.pp} DP={p.dp}, vLLM TP={p.vllm_tp} ({p.vllm_memory_fraction:g} of each GPU), "
        f"{'colocated' if p.colocated else 'disaggregated'}"
    )
    lines = [head, rollout_layout(plan), "", "| per GPU | GiB |", "|---|---|"] + [f"| {name} | {gib:.2f} |" for name, gib in rows]
    verdict = "FITS" if plan.fits else "DOES NOT FIT: " + "; ".join(plan.notes)
    return "\n".join(lines + ["", verdict])


def inputs_from_config(cfg, gpus: int, gpu_mem_gib: float, *, offload: bool = False) -> PlanInputs:
    """The planner's view of a run config (dynamo_mega.config.Config) on `gpus` GPUs of `gpu_mem_gib` each."""
    r = cfg.rollout
    return PlanInputs(
        tp=cfg.parallel.tensor_parallel,
        pp=cfg.parallel.pipeline_parallel,
        gpus=gpus,
        gpu_mem_gib=gpu_mem_gib,
        seq_len=r.max_prompt_tokens + r.max_new_tokens,
        micro_batch=cfg.optim.micro_batch_size,
        recompute=cfg.parallel.recompute,
        distributed_optimizer=cfg.parallel.distributed_optimizer,
        vllm_tp=r.vllm_tensor_parallel,
        vllm_memory_fraction=r.vllm_gpu_memory_utilization,
        colocated=r.colocated,
        rollout_gpus=0 if r.colocated else r.dedicated_gpus_per_node * max(gpus // cfg.launch.procs_per_node, 1),
        offload=offload,
        gpus_per_node=cfg.launch.procs_per_node,
    )
