"""The one HF <-> Megatron name and layout mapping for Qwen2 / Qwen2.5 / Qwen3 dense, per tensor and per layer.

Used by the checkpoint converter (dynamo_mega/convert/), the policy's HF export (parallel/policy.py) and the
weight bridge; everything that turns a Hugging Face tensor into a Megatron one (or back) goes through here.

Megatron layout facts (TP size t, query groups g, heads h, head dim d, q heads per group q = h/g, hidden H,
ffn F, vocab V padded to Vp):
- linear_qkv.weight is [g * (q + 2) * d, H]: for each query group, its q query heads, then its key head, then
  its value head (bias alike). TP shards whole groups, so chunking the full tensor along dim 0 gives rank r
  its groups [r*g/t, (r+1)*g/t).
- linear_fc1.weight is [2F/t, H] per rank: the rank's slice of gate_proj stacked over its slice of up_proj.
  "Full" fc1 below means the TP=1 layout [gate; up]; a TP-gathered fc1 (rank shards concatenated) is
  [gate_0; up_0; gate_1; up_1; ...] and is converted with `tp` given.
- the word embedding and output layer are split over the vocabulary (dim 0), padded to Vp rows.
- layer numbers here are global (0-based); a pipeline stage's module list restarts at 0 (see `stage_layers`).

The weight bridge does not build whole tensors with these functions: models/qwen_bridge_layout.py copies TP
shards straight into the HF layout, built on the names and shapes here.
"""

from __future__ import annotations

import torch

from dynamo_mega.models.qwen import QwenArch, padded_vocab_size

EMBED, OUTPUT, FINAL_NORM = "embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight"
HF_EMBED, HF_LM_HEAD, HF_NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
MCORE_LAYER_PREFIX, HF_LAYER_PREFIX = "decoder.layers.", "model.layers."
GLOBAL_HF_NAME = {EMBED: HF_EMBED, OUTPUT: HF_LM_HEAD, FINAL_NORM: HF_NORM}  # non-layer tensors

_SAME_LAYOUT = {  # megatron layer suffix -> HF layer suffix (identical tensors)
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
MCORE_TO_HF_LAYER_SUFFIXES = {  # megatron layer suffix -> the HF layer suffixes it becomes, in order
    **{m: (h,) for m, h in _SAME_LAYOUT.items()},
    "self_attention.linear_qkv.weight": tuple(f"self_attn.{p}_proj.weight" for p in "qkv"),
    "self_attention.linear_qkv.bias": tuple(f"self_attn.{p}_proj.bias" for p in "qkv"),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
# TP partition dim of each megatron tensor (None: replicated on every TP rank).
_PARTITION_DIM = {
    "input_layernorm.weight": None,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "self_attention.q_layernorm.weight": None,
    "self_attention.k_layernorm.weight": None,
    "self_attention.linear_proj.weight": 1,
    "pre_mlp_layernorm.weight": None,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc2.weight": 1,
    EMBED: 0,
    OUTPUT: 0,
    FINAL_NORM: None,
}


# ---------------------------------------------------------------- names and shapes


def hf_layer_shapes(arch: QwenArch) -> dict[str, tuple[int, ...]]:
    """HF suffix -> shape of one decoder layer's tensors (suffix after `model.layers.{i}.`)."""
    hd, h, g, d, f = arch.hidden_size, arch.num_attention_heads, arch.num_query_groups, arch.head_dim, arch.ffn_hidden_size
    shapes = {
        "input_layernorm.weight": (hd,),
        "self_attn.q_proj.weight": (h * d, hd),
        "self_attn.k_proj.weight": (g * d, hd),
        "self_attn.v_proj.weight": (g * d, hd),
        "self_attn.o_proj.weight": (hd, h * d),
        "post_attention_layernorm.weight": (hd,),
        "mlp.gate_proj.weight": (f, hd),
        "mlp.up_proj.weight": (f, hd),
        "mlp.down_proj.weight": (hd, f),
    }
    if arch.qkv_bias:
        shapes.update({"self_attn.q_proj.bias": (h * d,), "self_attn.k_proj.bias": (g * d,), "self_attn.v_proj.bias": (g * d,)})
    if arch.qk_layernorm:
        shapes.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    return shapes


def hf_shapes(arch: QwenArch) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of `arch` holds (no lm_head.weight when embeddings are tied)."""
    shapes = {HF_EMBED: (arch.vocab_size, arch.hidden_size), HF_NORM: (arch.hidden_size,)}
    if not arch.tie_word_embeddings:
        shapes[HF_LM_HEAD] = (arch.vocab_size, arch.hidden_size)
    for i in range(arch.num_layers):
        shapes.update({hf_layer_name(i, s): shape for s, shape in hf_layer_shapes(arch).items()})
    return shapes


def mcore_layer_shapes(arch: QwenArch) -> dict[str, tuple[int, ...]]:
    """Megatron layer suffix -> full (TP=1) shape."""
    hd, h, g, d, f = arch.hidden_size, arch.num_attention_heads, arch.num_query_groups, arch.head_dim, arch.ffn_hidden_size
    shapes = {
        "input_layernorm.weight": (hd,),
        "self_attention.linear_qkv.weight": ((h + 2 * g) * d, hd),
        "self_attention.linear_proj.weight": (hd, h * d),
        "pre_mlp_layernorm.weight": (hd,),
        "mlp.linear_fc1.weight": (2 * f, hd),
        "mlp.linear_fc2.weight": (hd, f),
    }
    if arch.qkv_bias:
        shapes["self_attention.linear_qkv.bias"] = ((h + 2 * g) * d,)
    if arch.qk_layernorm:
        shapes.update({"self_attention.q_layernorm.weight": (d,), "self_attention.k_layernorm.weight": (d,)})
    return shapes


def local_shape(suffix_or_name: str, full_shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The shape one TP rank holds of a megatron tensor whose full shape is `full_shape`."""
    dim = partition_dim(suffix_or_name)
    if dim is None:
        return full_shape
    return full_shape[:dim] + (full_shape[dim] // tp,) + full_shape[dim + 1 :]


def partition_dim(suffix_or_name: str) -> int | None:
    """TP partition dim of a megatron layer suffix or non-layer tensor name (None: replicated)."""
    return _PARTITION_DIM[suffix_or_name]


def hf_layer_name(layer: int, hf_suffix: str) -> str:
    return f"{HF_LAYER_PREFIX}{layer}.{hf_suffix}"


def split_layer_name(name: str, prefix: str) -> tuple[int, str] | None:
    """`prefix{i}.{suffix}` -> (i, suffix); None for names outside the decoder layers."""
    if not name.startswith(prefix):
        return None
    idx, suffix = name[len(prefix) :].split(".", 1)
    return int(idx), suffix


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """Global layer ids held by pipeline stage `stage` (even split, as megatron does without custom layouts)."""
    per_stage = num_layers // pp
    return range(stage * per_stage, (stage + 1) * per_stage)


# ---------------------------------------------------------------- layouts


def split_qkv(qkv: torch.Tensor, arch: QwenArch, by_group: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped [g*(q+2)*d, ...] -> q [h*d, ...], k [g*d, ...], v [g*d, ...]; works for weight and bias.

    by_group: views q [g, q, d, ...], k and v [g, d, ...] instead, whose elements in row-major order are the
    HF tensors' (a copy at g > 1 otherwise): for writers that stream bytes, one group's rows at a time."""
    g, q, d = arch.num_query_groups, arch.heads_per_group, arch.head_dim
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, q + 2, d, *rest)
    q_, k_, v_ = grouped[:, :q], grouped[:, q], grouped[:, q + 1]
    if by_group:
        return q_, k_, v_
    return q_.reshape(g * q * d, *rest), k_.reshape(g * d, *rest), v_.reshape(g * d, *rest)


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: QwenArch) -> torch.Tensor:
    """q [h*d, ...], k [g*d, ...], v [g*d, ...] -> grouped [g*(q+2)*d, ...]."""
    g, qh, d = arch.num_query_groups, arch.heads_per_group, arch.head_dim
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(g, qh, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest)], dim=1)
    return grouped.reshape(g * (qh + 2) * d, *rest)


def split_fc1(fc1: torch.Tensor, tp: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 gathered from `tp` ranks, each [gate_r; up_r] -> (gate, up) in HF order (tp=1: the full layout;
    views of `fc1` then, no copy)."""
    if tp == 1:
        gate, up = fc1.chunk(2, dim=0)
        return gate, up
    gates, ups = zip(*(s.chunk(2, dim=0) for s in fc1.chunk(tp, dim=0)))
    return torch.cat(gates, dim=0), torch.cat(ups, dim=0)


def merge_fc1(gate: torch.Tensor, up: torch.Tensor, tp: int = 1) -> torch.Tensor:
    """(gate [F, H], up [F, H]) -> [gate_0; up_0; gate_1; up_1; ...] for `tp` ranks ([gate; up] at tp=1)."""
    if tp == 1:
        return torch.cat([gate, up], dim=0)
    return torch.cat([torch.cat([g, u], dim=0) for g, u in zip(gate.chunk(tp, dim=0), up.chunk(tp, dim=0))], dim=0)


def hf_layer_to_mcore(hf: dict[str, torch.Tensor], arch: QwenArch) -> dict[str, torch.Tensor]:
    """One layer, HF suffix -> tensor  =>  megatron suffix -> full (TP=1 layout) tensor."""
    out = {m: hf[h] for m, h in _SAME_LAYOUT.items() if h in hf}
    attn = "self_attn."
    out["self_attention.linear_qkv.weight"] = merge_qkv(*(hf[f"{attn}{p}_proj.weight"] for p in "qkv"), arch)
    if arch.qkv_bias:
        out["self_attention.linear_qkv.bias"] = merge_qkv(*(hf[f"{attn}{p}_proj.bias"] for p in "qkv"), arch)
    out["mlp.linear_fc1.weight"] = merge_fc1(hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"])
    return out


def mcore_layer_to_hf(
    mcore: dict[str, torch.Tensor], arch: QwenArch, tp: int = 1, qkv_by_group: bool = False
) -> dict[str, torch.Tensor]:
    """One layer, megatron suffix -> full tensor (fc1 TP-gathered from `tp` ranks)  =>  HF suffix -> tensor.

    Tensors are views of the inputs where the layout allows (no copy); call .contiguous() before saving.
    qkv_by_group: q/k/v as split_qkv(by_group=True) views (HF element order, not HF shape)."""
    out: dict[str, torch.Tensor] = {}
    for suffix, tensor in mcore.items():
        if suffix in _SAME_LAYOUT:
            out[_SAME_LAYOUT[suffix]] = tensor
        elif suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = suffix.rsplit(".", 1)[1]
            for proj, t in zip("qkv", split_qkv(tensor, arch, qkv_by_group)):
                out[f"self_attn.{proj}_proj.{kind}"] = t
        elif suffix == "mlp.linear_fc1.weight":
            out["mlp.gate_proj.weight"], out["mlp.up_proj.weight"] = split_fc1(tensor, tp)
        elif not suffix.endswith("_extra_state"):
            raise KeyError(f"no HF mapping for megatron layer tensor {suffix}")
    return out


def pad_vocab(hf_tensor_VH: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Embedding / lm_head [V, H] -> [Vp, H] with zero rows appended (never sampled: the engine has V rows)."""
    extra = padded_rows - hf_tensor_VH.shape[0]
    if extra == 0:
        return hf_tensor_VH
    return torch.cat([hf_tensor_VH, hf_tensor_VH.new_zeros(extra, *hf_tensor_VH.shape[1:])], dim=0)


def hf_to_mcore_globals(hf: dict[str, torch.Tensor], arch: QwenArch, padded_rows: int) -> dict[str, torch.Tensor]:
    """Non-layer tensors (embedding, final norm, lm_head) HF -> megatron, vocab padded to `padded_rows`."""
    out = {}
    if HF_EMBED in hf:
        out[EMBED] = pad_vocab(hf[HF_EMBED], padded_rows)
    if HF_NORM in hf:
        out[FINAL_NORM] = hf[HF_NORM]
    if HF_LM_HEAD in hf and not arch.tie_word_embeddings:
        out[OUTPUT] = pad_vocab(hf[HF_LM_HEAD], padded_rows)
    return out


def mcore_to_hf_globals(mcore: dict[str, torch.Tensor], arch: QwenArch) -> dict[str, torch.Tensor]:
    """Non-layer tensors megatron -> HF: vocab padding trimmed; a tied output layer is never emitted."""
    out = {}
    if EMBED in mcore:
        out[HF_EMBED] = mcore[EMBED][: arch.vocab_size]
    if FINAL_NORM in mcore:
        out[HF_NORM] = mcore[FINAL_NORM]
    if OUTPUT in mcore and not arch.tie_word_embeddings:
        out[HF_LM_HEAD] = mcore[OUTPUT][: arch.vocab_size]
    return out


def megatron_to_hf(full: dict[str, torch.Tensor], arch: QwenArch, tp: int) -> dict[str, torch.Tensor]:
    """Whole model: megatron names (global layer ids, TP shards concatenated in rank order) -> HF names."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    rest = {}
    for name, tensor in full.items():
        split = split_layer_name(name, MCORE_LAYER_PREFIX)
        if split is not None:
            layers.setdefault(split[0], {})[split[1]] = tensor
        elif name in (EMBED, OUTPUT, FINAL_NORM):
            rest[name] = tensor
        elif not name.endswith("_extra_state"):
            raise KeyError(f"no HF mapping for megatron tensor {name}")
    hf = mcore_to_hf_globals(rest, arch)
    for i, layer in layers.items():
        hf.update({hf_layer_name(i, s): t for s, t in mcore_layer_to_hf(layer, arch, tp).items()})
    return {k: v.contiguous() for k, v in hf.items()}


# ---------------------------------------------------------------- tensor parallel shards


def tp_shard(suffix_or_name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s slice of a full (TP=1 layout, vocab already padded) megatron tensor."""
    dim = partition_dim(suffix_or_name)
    if dim is None or tp == 1:
        return full
    if suffix_or_name == "mlp.linear_fc1.weight":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    if full.shape[dim] % tp:
        raise ValueError(f"{suffix_or_name}: dim {dim} of size {full.shape[dim]} does not split over TP={tp}")
    return full.chunk(tp, dim=dim)[rank]


def check_parallel_layout(arch: QwenArch, tp: int, pp: int) -> None:
    """Raise ValueError naming the setting when `arch` cannot be split over TP=tp, PP=pp."""
    if tp < 1 or pp < 1:
        raise ValueError(f"--tp and --pp must be >= 1 (got TP={tp}, PP={pp})")
    checks = [
        ("num_attention_heads", arch.num_attention_heads, tp, "TP"),
        ("num_key_value_heads (query groups)", arch.num_query_groups, tp, "TP"),
        ("intermediate_size", arch.ffn_hidden_size, tp, "TP"),
        ("num_hidden_layers", arch.num_layers, pp, "PP"),
    ]
    for what, value, size, kind in checks:
        if value % size:
            divisors = [n for n in range(1, value + 1) if value % n == 0 and n <= 64]
            raise ValueError(f"{what}={value} is not divisible by {kind}={size}; choose {kind} from {divisors}")
    if arch.num_attention_heads % arch.num_query_groups:
        raise ValueError(
            f"num_attention_heads={arch.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={arch.num_query_groups}: not a valid GQA config"
        )


def padded_vocab(arch: QwenArch, tp: int, divisible_by: int = 1) -> int:
    return padded_vocab_size(arch.vocab_size, tp, divisible_by)
