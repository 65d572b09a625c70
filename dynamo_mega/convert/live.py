"""HF weights into / out of a running TP/PP megatron GPTModel shard, without an intermediate file.

Parallelism is passed in explicitly (tp_rank, tp_size, tp_group); the pipeline stage is read from the model
itself: its decoder layers carry their global `layer_number` (1-based), and `pre_process` / `post_process`
say whether it holds the embedding / the final norm and output layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from dynamo_mega.convert.hf_files import HFReader, read_headers
from dynamo_mega.models import qwen_mapping as qm
from dynamo_mega.models.qwen import QwenArch


def _layers(model) -> Iterator[tuple[int, str, torch.nn.Module]]:
    """(global layer id, parameter-name prefix, module) of every decoder layer this stage holds."""
    for local, layer in enumerate(model.decoder.layers):
        yield layer.layer_number - 1, f"{qm.MCORE_LAYER_PREFIX}{local}.", layer


@torch.no_grad()
def load_hf_into_model(model, hf_dir: Path, arch: QwenArch, tp_rank: int, tp_size: int) -> None:
    """Copy an HF checkpoint into this rank's shard of `model` (reads one layer at a time, all of it)."""
    reader = HFReader(Path(hf_dir), read_headers(Path(hf_dir)))
    params = dict(model.named_parameters())
    for global_id, prefix, _ in _layers(model):
        hf_layer = {s: reader.get(qm.hf_layer_name(global_id, s)) for s in qm.hf_layer_shapes(arch)}
        for suffix, full in qm.hf_layer_to_mcore(hf_layer, arch).items():
            params[prefix + suffix].copy_(qm.tp_shard(suffix, full, tp_size, tp_rank))
    hf_names = {qm.EMBED: qm.HF_EMBED, qm.OUTPUT: qm.HF_EMBED if arch.tie_word_embeddings else qm.HF_LM_HEAD}
    for name in (qm.EMBED, qm.OUTPUT, qm.FINAL_NORM):
        if name not in params:  # other stage, or a tied output layer sharing the embedding
            continue
        if name == qm.FINAL_NORM:
            full = reader.get(qm.HF_NORM)
        else:
            full = qm.pad_vocab(reader.get(hf_names[name]), model.vocab_size)
        params[name].copy_(qm.tp_shard(name, full, tp_size, tp_rank))


@torch.no_grad()
def _gather_tp(param: torch.Tensor, suffix: str, tp_size: int, tp_group) -> torch.Tensor:
    """TP shards concatenated in rank order along the partition dim (fc1 keeps the per-rank gate/up order)."""
    dim = qm.partition_dim(suffix)
    if dim is None or tp_size == 1:
        return param.detach()
    shards = [torch.empty_like(param) for _ in range(tp_size)]
    dist.all_gather(shards, param.detach().contiguous(), group=tp_group)
    return torch.cat(shards, dim=dim)


def iter_hf_layers(model, arch: QwenArch, tp_size: int, tp_group=None) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield ("globals" | "layer{i}", HF name -> full tensor) for what this pipeline stage holds, one layer
    at a time (collective over the TP group: every TP rank must iterate). Vocab padding is trimmed; a tied
    output layer is never emitted."""
    params = dict(model.named_parameters())
    for global_id, prefix, _ in _layers(model):
        mcore = {
            name[len(prefix) :]: _gather_tp(p, name[len(prefix) :], tp_size, tp_group)
            for name, p in params.items()
            if name.startswith(prefix)
        }
        hf = qm.mcore_layer_to_hf(mcore, arch, tp_size)
        yield f"layer{global_id}", {qm.hf_layer_name(global_id, s): t.contiguous() for s, t in hf.items()}
    rest = {n: _gather_tp(params[n], n, tp_size, tp_group) for n in (qm.EMBED, qm.OUTPUT, qm.FINAL_NORM) if n in params}
    if rest:
        yield "globals", {k: v.contiguous() for k, v in qm.mcore_to_hf_globals(rest, arch).items()}
