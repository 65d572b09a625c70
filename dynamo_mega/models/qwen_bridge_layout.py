"""Where each TP shard of a megatron tensor lands in the HF tensors, and which block of an HF tensor a vLLM TP
rank holds: what the weight bridge (parallel/weight_bridge.py) needs to fill a bucket with one copy per byte,
without building any whole tensor. Names and shapes come from models/qwen_mapping.py.

A megatron tensor becomes one or more HF tensors, laid out consecutively in a bucket and copied through
"units": one HF tensor, or several of the same shape side by side, viewed so that every TP shard's block and
every vLLM rank's slice is a box (one index range per dim), so each is ONE strided copy:
- q / k / v (weight and bias): [query groups, rows per group, ...]: a TP shard holds whole groups and a
  group's q heads are contiguous rows of HF q, so a shard is one box per projection (not one per group);
- gate + up, side by side: [2, F, H]: a shard [gate_r; up_r] is the box [:, r*F_r : (r+1)*F_r];
- everything else: the HF shape (row-parallel shards are column blocks, vocabulary shards row blocks).
Fewer, larger copies matter on CPU: each parallel copy pays a thread wake-up (milliseconds on a loaded host).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynamo_mega.models import qwen_mapping as qm
from dynamo_mega.models.qwen import QwenArch

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (origin, shape)
VLLM_VOCAB_PADDING = 64  # vLLM pads the vocabulary to a multiple of this, then splits it evenly over TP


@dataclass(frozen=True)
class Unit:
    """HF tensors `hf_names` (each of `hf_shape`), consecutive in a bucket, viewed together as `view_shape`."""

    hf_names: tuple[str, ...]
    hf_shape: tuple[int, ...]
    view_shape: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Piece:
    """A view `src` of a TP shard covering the box [origin, origin + src.shape) of unit `unit`'s view."""

    unit: int
    origin: tuple[int, ...]
    src: torch.Tensor


def _key(name: str) -> tuple[int | None, str]:
    split = qm.split_layer_name(name, qm.MCORE_LAYER_PREFIX)
    return (None, name) if split is None else split


def units(name: str, arch: QwenArch) -> list[Unit]:
    """The units megatron tensor `name` (global layer id) becomes, in bucket order; [] for a tied output layer
    (a tied HF model has no lm_head.weight)."""
    layer, key = _key(name)
    if layer is None:
        if key == qm.OUTPUT and arch.tie_word_embeddings:
            return []
        shape = (arch.hidden_size,) if key == qm.FINAL_NORM else (arch.vocab_size, arch.hidden_size)
        return [Unit((qm.GLOBAL_HF_NAME[key],), shape, shape)]
    shapes = qm.hf_layer_shapes(arch)
    hf = [(qm.hf_layer_name(layer, s), shapes[s]) for s in qm.MCORE_TO_HF_LAYER_SUFFIXES[key]]
    if key.startswith("self_attention.linear_qkv."):
        g = arch.num_query_groups
        return [Unit((n,), shape, (g, shape[0] // g, *shape[1:])) for n, shape in hf]
    if key == "mlp.linear_fc1.weight":
        (gate, shape), (up, _) = hf
        return [Unit((gate, up), shape, (2, *shape))]
    return [Unit((n,), shape, shape) for n, shape in hf]


def shard_row_granule(name: str, arch: QwenArch, local_rows: int) -> int:
    """The fewest dim-0 rows of a TP shard of megatron tensor `name` (`local_rows` rows in all) that
    `shard_pieces` can place on their own: whole query groups of qkv, whole gate or up halves of fc1, single
    rows otherwise. The bridge cuts its gathers only at multiples of this."""
    _, key = _key(name)
    if key == "mlp.linear_fc1.weight":
        return local_rows // 2
    if key.startswith("self_attention.linear_qkv."):
        return (arch.heads_per_group + 2) * arch.head_dim
    return 1


def shard_pieces(
    name: str, shard: torch.Tensor, arch: QwenArch, rank: int, start: int = 0, rows: int | None = None
) -> list[Piece]:
    """Where TP rank `rank`'s shard of megatron tensor `name` (its local shape) lands in `units(name)`: views of
    `shard`, no copies. A replicated tensor is one piece covering its unit whatever the rank (take it from one
    rank); padded vocabulary rows are left out; a tied output layer gives nothing.

    qkv [g_r*(q+2)*d, ...] (g_r query groups per rank, each q heads then k then v) and fc1 [2*F_r, H].
    start, rows: `shard` is only dim-0 rows [start, start + len) of the rank's shard of `rows` rows (None: the
    whole shard); `start` and the length must be multiples of `shard_row_granule`."""
    if not units(name, arch):
        return []
    _, key = _key(name)
    dim = qm.partition_dim(key)
    if dim is None:
        assert start == 0 and rows in (None, shard.shape[0]), name  # replicated tensors are never gathered in parts
        return [Piece(0, (0,) * shard.dim(), shard)]
    rows = shard.shape[0] if rows is None else rows
    granule = shard_row_granule(name, arch, rows)
    assert start % granule == 0 and shard.shape[0] % granule == 0, (name, start, shard.shape, granule)
    if key in (qm.EMBED, qm.OUTPUT):
        first = rank * rows + start  # the vocabulary row of shard[0]
        keep = max(0, min(shard.shape[0], arch.vocab_size - first))  # trim the vocabulary padding
        return [Piece(0, (first, 0), shard[:keep])] if keep else []
    if key == "mlp.linear_fc1.weight":
        f_r = rows // 2  # = granule: the gate half then the up half
        return [Piece(0, (start // f_r, rank * f_r, 0), shard.view(-1, f_r, shard.shape[1]))]
    if key.startswith("self_attention.linear_qkv."):
        q, d, rest = arch.heads_per_group, arch.head_dim, tuple(shard.shape[1:])
        grouped = shard.view(-1, q + 2, d, *rest)  # [g, q + 2, d, ...]: g whole query groups
        g = grouped.shape[0]
        origin = (rank * (rows // granule) + start // granule, 0, *(0,) * len(rest))
        return [
            Piece(0, origin, grouped[:, :q].reshape(g, q * d, *rest)),  # a view: q and d are adjacent
            Piece(1, origin, grouped[:, q]),
            Piece(2, origin, grouped[:, q + 1]),
        ]
    assert dim == 1, key  # row-parallel: o_proj, down_proj; dim-0 rows are the HF tensor's rows
    return [Piece(0, (start, rank * shard.shape[1]), shard)]


def view_box(unit: Unit, hf_box: Box) -> Box:
    """A box of one of the unit's HF tensors (the same for each) -> the box of the unit's view it covers."""
    (origin, shape), full = hf_box, unit.hf_shape
    if len(unit.hf_names) > 1:
        return (0, *origin), (len(unit.hf_names), *shape)
    if unit.view_shape == full:
        return hf_box
    assert all(o == 0 for o in origin[1:]) and tuple(shape[1:]) == tuple(full[1:]), (unit, hf_box)  # rows only
    per, start, rows, rest = unit.view_shape[1], origin[0], shape[0], tuple(full[1:])
    zeros = (0,) * len(rest)
    if start % per == 0 and rows % per == 0:  # whole groups
        return (start // per, 0, *zeros), (rows // per, per, *rest)
    if start % per + rows <= per:  # within one group
        return (start // per, start % per, *zeros), (1, rows, *rest)
    raise ValueError(f"rows [{start}, {start + rows}) of {unit.hf_names[0]} straddle query groups")


# ---------------------------------------------------------------- what a vLLM TP rank holds


def check_vllm_tp(arch: QwenArch, tp: int) -> None:
    """Raise ValueError when vLLM cannot split `arch` over TP=tp."""
    g = arch.num_query_groups
    if tp < 1 or arch.num_attention_heads % tp or arch.ffn_hidden_size % tp or (g % tp and tp % g):
        raise ValueError(
            f"a vLLM engine with TP={tp} cannot hold this model: TP must divide num_attention_heads="
            f"{arch.num_attention_heads} and intermediate_size={arch.ffn_hidden_size}, and divide or be a multiple "
            f"of num_key_value_heads={g}"
        )


def vllm_tp_box(hf_name: str, arch: QwenArch, tp: int, rank: int) -> Box:
    """(origin, shape) of the block of HF tensor `hf_name` that vLLM's TP rank `rank` of `tp` holds.

    Column-parallel (q/k/v weights and biases, gate/up, embedding and lm_head rows) split dim 0; row-parallel
    (o_proj, down_proj) split dim 1; norms are replicated. k/v with fewer kv heads than TP ranks: each rank
    holds one whole kv head, shared by tp / num_kv_heads ranks. Vocabulary rows: vLLM pads V to a multiple of
    VLLM_VOCAB_PADDING, gives each rank an equal share and loads only the real rows of it."""
    check_vllm_tp(arch, tp)
    if not 0 <= rank < tp:
        raise ValueError(f"target TP rank {rank} is outside TP={tp}")
    if hf_name in (qm.HF_EMBED, qm.HF_LM_HEAD):
        per = -(-arch.vocab_size // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING // tp
        start, end = min(rank * per, arch.vocab_size), min((rank + 1) * per, arch.vocab_size)
        return (start, 0), (end - start, arch.hidden_size)
    if hf_name == qm.HF_NORM:
        return (0,), (arch.hidden_size,)
    _, suffix = qm.split_layer_name(hf_name, qm.HF_LAYER_PREFIX)
    shape = qm.hf_layer_shapes(arch)[suffix]
    zeros = (0,) * len(shape)
    if "norm" in suffix:
        return zeros, shape
    if suffix in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        cols = shape[1] // tp
        return (0, rank * cols), (shape[0], cols)
    rows = shape[0] // tp
    start = rank * rows
    if suffix.startswith(("self_attn.k_proj.", "self_attn.v_proj.")) and tp > arch.num_query_groups:
        rows = arch.head_dim
        start = rank // (tp // arch.num_query_groups) * rows  # one kv head, replicated over tp / g ranks
    return (start, *zeros[1:]), (rows, *shape[1:])
