"""HF -> Megatron distributed checkpoint -> HF is bit-exact; the checkpoint loads into megatron models at TP in
{1,2} x PP in {1,2} (gloo processes, per-stage models, megatron's own dist_checkpointing.load); their weight
bridge bucket stream gives back the same tensors, they compute transformers' logits (fp32, <= 1e-5), and
direct HF loading into the running TP/PP model gives the same weights as the checkpoint path.

Models (built from configs in code): Qwen2 untied (sharded safetensors), Qwen2 tied (single file),
Qwen3 (q/k norm, no qkv bias). Vocab 151 is odd, so the TP=2 conversion pads it to 152 and export trims it.
"""

from __future__ import annotations

import json

import pytest
import torch
from _gloo import run_gloo
from safetensors.torch import load_file

COMMON = dict(vocab_size=151, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
MODELS = {
    "qwen2_untied": ("qwen2", dict(COMMON, num_hidden_layers=4, tie_word_embeddings=False), "40KB"),
    "qwen2_tied": ("qwen2", dict(COMMON, num_hidden_layers=2, tie_word_embeddings=True), "10MB"),
    "qwen3": ("qwen3", dict(COMMON, num_hidden_layers=4, tie_word_embeddings=False), "60KB"),
}
IDS = torch.randint(0, 151, (2, 7), generator=torch.Generator().manual_seed(3))


def _hf_model(kind: str, cfg: dict):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)
    return model_cls(config_cls(**cfg, max_position_embeddings=64, rope_theta=10000.0))


def _read_hf(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _convert_all(rank: int, world: int, root: str) -> dict:
    """Convert every model there and back, then load at TP=1, PP=1 in the same (single) process."""
    from pathlib import Path

    from dynamo_mega.convert.run import hf_to_mcore, mcore_to_hf

    summaries = {}
    for name in MODELS:
        r = Path(root) / name
        # a write group of 3 fp32 layers (124 KB each): layers 0-2 and 3 are saved apart and merged
        summaries[name] = hf_to_mcore(r / "hf", r / "mcore", tp=2, pp=2, progress=False, write_group_bytes=380_000)
        mcore_to_hf(r / "mcore", r / "hf_back", max_shard_bytes=50_000, progress=False)
    return {"summaries": summaries, "loaded": _load_and_run(rank, world, root, [(1, 1)])}


def _stage_model(arch, tp: int, pp: int, padded_rows: int):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from dynamo_mega.models import qwen

    config = qwen.transformer_config(arch, tp=tp, pp=pp, params_dtype=torch.float32)
    # With tied embeddings and PP > 1 megatron copies the embedding to the last stage at construction through
    # `weight.data.cuda()` + all_reduce (CUDA-only); every weight is loaded right after, so skip that copy.
    config.init_model_with_meta_device = not torch.cuda.is_available()
    return GPTModel(
        config=config,
        transformer_layer_spec=qwen.layer_spec(arch),
        vocab_size=padded_rows,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
    )


def _pipeline_logits(model, tp: int) -> torch.Tensor | None:
    """Full-vocab logits [B, S, Vp] on the last stage (None elsewhere); hidden states sent stage to stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dynamo_mega.parallel.policy import forward_logits

    b, s = IDS.shape
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(s, b, model.config.hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = forward_logits(model, IDS)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    shards = [torch.empty_like(out) for _ in range(tp)]
    dist.all_gather(shards, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


def _load_and_run(rank: int, world: int, root: str, layouts: list[tuple[int, int]]) -> dict:
    """For each (TP, PP) layout on this world: load every model's checkpoint, export, run; keyed by layout."""
    return {layout: _load_and_run_layout(root, *layout) for layout in layouts}


def _load_and_run_layout(root: str, tp: int, pp: int) -> dict:
    from pathlib import Path

    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from dynamo_mega.convert.live import load_hf_into_model
    from dynamo_mega.models.qwen import arch_from_hf_config
    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.weight_bridge import iter_buckets

    groups = init_parallel(tp, pp, seed=0)
    results = {}
    for name in MODELS:
        r = Path(root) / name
        arch = arch_from_hf_config(r / "hf")
        padded = json.loads((r / "mcore" / "convert.json").read_text())["padded_vocab"]
        model = _stage_model(arch, tp, pp, padded)
        dist_checkpointing.load(model.sharded_state_dict(), str(r / "mcore"))
        exported = {}
        for bucket in iter_buckets(model, arch, tp_size=tp, tp_group=groups.tp_group):
            exported.update((name, t.clone()) for name, t in bucket.tensors())
        direct = _stage_model(arch, tp, pp, padded)
        load_hf_into_model(direct, r / "hf", arch, groups.tp_rank, tp)
        pairs = zip(model.state_dict().items(), direct.state_dict().items())
        same = all(ka == kb and torch.equal(a, b) for (ka, a), (kb, b) in pairs if torch.is_tensor(a))
        with torch.no_grad():
            logits = _pipeline_logits(model.eval(), tp)
        results[name] = {"exported": exported, "direct_equal": same, "logits": logits}
    ps.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(root, conversion summaries, {(tp, pp): [result of each rank]}): three spawns, imports paid once each."""
    root = tmp_path_factory.mktemp("convert")
    for name, (kind, cfg, shard) in MODELS.items():
        torch.manual_seed(0)
        _hf_model(kind, cfg).save_pretrained(root / name / "hf", max_shard_size=shard)
    (first,) = run_gloo(_convert_all, 1, str(root))
    loaded = {(1, 1): [first["loaded"][(1, 1)]]}
    for world, layouts in ((2, [(2, 1), (1, 2)]), (4, [(2, 2)])):
        ranks = run_gloo(_load_and_run, world, str(root), layouts)
        loaded.update({layout: [r[layout] for r in ranks] for layout in layouts})
    return root, first["summaries"], loaded


def test_sources_cover_single_file_and_sharded(converted):
    root, summaries, _ = converted
    assert (root / "qwen2_tied" / "hf" / "model.safetensors").is_file()
    assert (root / "qwen2_untied" / "hf" / "model.safetensors.index.json").is_file()
    assert all(s["padded_vocab"] == 152 for s in summaries.values())


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_mcore_hf_is_bit_exact_and_loads_in_transformers(converted, name):
    from transformers import AutoModelForCausalLM

    root, _, _ = converted
    src, back = _read_hf(root / name / "hf"), _read_hf(root / name / "hf_back")
    assert src.keys() == back.keys()
    for key in src:
        assert src[key].dtype == back[key].dtype and torch.equal(src[key], back[key]), key
    index = json.loads((root / name / "hf_back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src) and len(set(index["weight_map"].values())) > 1
    assert (name == "qwen2_tied") == ("lm_head.weight" not in back)
    reloaded = AutoModelForCausalLM.from_pretrained(root / name / "hf_back")
    assert type(reloaded).__name__ == ("Qwen3ForCausalLM" if name == "qwen3" else "Qwen2ForCausalLM")
    assert (root / name / "hf_back" / "generation_config.json").is_file()


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_checkpoint_loads_at_tp_pp_and_matches_transformers(converted, tp, pp):
    root, _, loaded = converted
    ranks = loaded[(tp, pp)]
    for name, (kind, cfg, _) in MODELS.items():
        src = _read_hf(root / name / "hf")
        exported = {}
        for r in ranks:
            assert r[name]["direct_equal"], f"{name}: direct HF load differs from the checkpoint load on a rank"
            exported.update(r[name]["exported"])
        assert exported.keys() == src.keys(), name
        for key in src:
            assert torch.equal(exported[key], src[key]), f"{name} {key} at TP={tp} PP={pp}"
        torch.manual_seed(0)
        hf_model = _hf_model(kind, cfg)
        hf_model.load_state_dict(src, strict=False)
        with torch.no_grad():
            want = hf_model.eval()(IDS).logits
        got = ranks[-1][name]["logits"][..., : cfg["vocab_size"]]
        assert (got - want).abs().max().item() <= 1e-5, f"{name} logits at TP={tp} PP={pp}"
