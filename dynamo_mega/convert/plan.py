"""Checks before any byte is written (and the whole of a dry run): architecture, TP/PP split, every tensor's
name and shape on both sides, and what each model-parallel rank will hold.

Reads only config.json, safetensors headers and the distributed checkpoint's metadata. Per-rank shapes are
produced by running the real mapping (models/qwen_mapping.py) on meta tensors, so the dry run exercises the
same code as the conversion without data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dynamo_mega.convert.hf_files import TensorHeader, read_headers
from dynamo_mega.models import qwen_mapping as qm
from dynamo_mega.models.qwen import QwenArch, arch_from_hf_config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Plan:
    arch: QwenArch
    tp: int
    pp: int
    padded_rows: int
    dtype: torch.dtype
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]  # source tensors to read: name -> (shape, dtype)
    notes: list[str] = field(default_factory=list)

    @property
    def source_bytes(self) -> int:
        return sum(_numel(shape) * dtype.itemsize for shape, dtype in self.tensors.values())

    def rank_bytes(self) -> dict[str, int]:
        """'pp{s}/tp{r}' -> bytes of parameters that rank holds at the target dtype (mapping run on meta)."""
        out = {}
        meta_hf = {s: torch.empty(shape, device="meta") for s, shape in qm.hf_layer_shapes(self.arch).items()}
        layer = qm.hf_layer_to_mcore(meta_hf, self.arch)
        emb = torch.empty(self.padded_rows, self.arch.hidden_size, device="meta")
        for stage in range(self.pp):
            for rank in range(self.tp):
                numel = len(qm.stage_layers(self.arch.num_layers, self.pp, stage)) * sum(
                    qm.tp_shard(s, t, self.tp, rank).numel() for s, t in layer.items()
                )
                vocab_rows = qm.tp_shard(qm.EMBED, emb, self.tp, rank).numel()
                numel += vocab_rows if stage == 0 else 0
                last_has_output = not self.arch.tie_word_embeddings or self.pp > 1
                numel += vocab_rows + self.arch.hidden_size if stage == self.pp - 1 and last_has_output else 0
                out[f"pp{stage}/tp{rank}"] = numel * self.dtype.itemsize
        return out

    def largest_layer_bytes(self) -> int:
        return _numel_sum(qm.hf_layer_shapes(self.arch).values()) * self.dtype.itemsize

    def summary(self) -> dict:
        a = self.arch
        return {
            "model_type": a.model_type,
            "layers": a.num_layers,
            "hidden": a.hidden_size,
            "heads": a.num_attention_heads,
            "query_groups": a.num_query_groups,
            "vocab": a.vocab_size,
            "padded_vocab": self.padded_rows,
            "tied_embeddings": a.tie_word_embeddings,
            "tp": self.tp,
            "pp": self.pp,
            "dtype": str(self.dtype).removeprefix("torch."),
            "tensors": len(self.tensors),
            "source_bytes": self.source_bytes,
            "largest_layer_bytes": self.largest_layer_bytes(),
            "rank_bytes": self.rank_bytes(),
            "notes": self.notes,
        }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _numel_sum(shapes) -> int:
    return sum(_numel(s) for s in shapes)


def _resolve_dtype(dtype: str | None, fallback: torch.dtype) -> torch.dtype:
    if dtype is None:
        return fallback
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def check_names_and_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise ValueError naming the first missing, unexpected or mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{where}: missing tensor {missing[0]}{more}, which config.json implies")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"{where}: unexpected tensor {unexpected[0]}{more}; not part of the model config.json describes")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise ValueError(f"{where}: tensor {name} has shape {tuple(found[name])}, config.json implies {tuple(shape)}")


def plan_hf_to_mcore(src: Path, tp: int, pp: int, dtype: str | None = None, vocab_divisible_by: int = 1) -> Plan:
    """Validate an HF folder for conversion at TP=tp, PP=pp from its config.json and safetensors headers."""
    arch = arch_from_hf_config(src)
    qm.check_parallel_layout(arch, tp, pp)
    headers: dict[str, TensorHeader] = read_headers(src)
    notes = []
    if arch.tie_word_embeddings and qm.HF_LM_HEAD in headers:
        headers = {k: v for k, v in headers.items() if k != qm.HF_LM_HEAD}
        notes.append("tie_word_embeddings is set: lm_head.weight in the source is ignored (the embedding is the output layer)")
    check_names_and_shapes({k: h.shape for k, h in headers.items()}, qm.hf_shapes(arch), str(src))
    fallback = headers[qm.HF_EMBED].dtype
    mixed = sorted({str(h.dtype).removeprefix("torch.") for h in headers.values()})
    if len(mixed) > 1 and dtype is None:
        notes.append(f"source tensors have dtypes {mixed}: all are written as {str(fallback).removeprefix('torch.')}")
    return Plan(
        arch=arch,
        tp=tp,
        pp=pp,
        padded_rows=qm.padded_vocab(arch, tp, vocab_divisible_by),
        dtype=_resolve_dtype(dtype, fallback),
        tensors={k: (h.shape, h.dtype) for k, h in headers.items()},
        notes=notes,
    )


def expected_stored(layout: dict, num_layers: int) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> global shape that megatron's layout (mcore_files.layout_state_dict) stores."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    out = {}
    for key, entry in layout.items():
        if isinstance(entry, ShardedObject):
            continue
        shape = tuple(entry.data.shape)
        stacked = entry.prepend_axis_num if isinstance(entry, ShardedTensor) else key.startswith(qm.MCORE_LAYER_PREFIX)
        out[entry.key] = (num_layers, *shape) if stacked else shape
    return out


def plan_mcore_to_hf(src: Path, hf_config: Path | None, dtype: str | None, stored: dict) -> Plan:
    """Validate a megatron distributed checkpoint's metadata (`stored`: key -> (shape, dtype)) against config.json."""
    config = hf_config or src / "hf" / "config.json"
    if not Path(config).exists():
        raise ValueError(f"{src} has no hf/config.json (not written by this converter): pass --hf-config PATH/config.json")
    arch = arch_from_hf_config(config)
    if qm.EMBED not in stored:
        raise ValueError(f"{src}: missing tensor {qm.EMBED}; not a GPT model checkpoint")
    padded_rows = stored[qm.EMBED][0][0]
    if padded_rows < arch.vocab_size:
        raise ValueError(f"{src}: {qm.EMBED} has {padded_rows} rows, fewer than vocab_size={arch.vocab_size} in {config}")
    return Plan(
        arch=arch,
        tp=1,
        pp=1,
        padded_rows=padded_rows,
        dtype=_resolve_dtype(dtype, stored[qm.EMBED][1]),
        tensors={k: v for k, v in stored.items()},
    )
