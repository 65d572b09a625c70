"""HF weights into a running TP/PP megatron GPTModel shard, without an intermediate file (the way out of a
running model is the weight bridge's bucket stream, parallel/weight_bridge.py).

Parallelism is passed in explicitly (tp_rank, tp_size); the pipeline stage is read from the model
itself: its decoder layers carry their global `layer_number` (1-based), and `pre_process` / `post_process`
say whether it holds the embedding / the final norm and output layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

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
