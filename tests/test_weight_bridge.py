"""The bridge's export stream (parallel/weight_bridge.py) from TP=2 x PP=2, TP=2 x DP=2 and PP=2 x DP=2
megatron models (4 gloo processes, one spawn) equals the HF checkpoint the models were loaded from, bit for
bit; bucket edge cases: a tensor larger than the bucket, bucket boundaries inside a layer, tied embeddings
(never sent twice, also not from the last stage's copy at PP=2), DP replicas silent, one all_gather per bucket.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _gloo import run_gloo
from safetensors.torch import load_file

COMMON = dict(vocab_size=151, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
MODELS = {"tied": dict(COMMON, tie_word_embeddings=True), "untied": dict(COMMON, tie_word_embeddings=False)}
LAYOUTS = [(2, 2), (2, 1), (1, 2)]  # (TP, PP) on 4 ranks: DP = 4 / (TP x PP)
# fp32 sizes: qkv 32 KiB, o_proj 16 KiB, fc1 48 KiB, fc2 24 KiB, embedding 38 KiB (152 padded rows)
BUCKET_BYTES = 40 * 1024


def _bridge_worker(rank: int, world: int, root: str) -> dict:
    from pathlib import Path

    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from dynamo_mega.convert.live import load_hf_into_model
    from dynamo_mega.models import qwen
    from dynamo_mega.parallel import weight_bridge
    from dynamo_mega.parallel.groups import init_parallel

    gathers = []
    real_all_gather = weight_bridge._all_gather_flat
    weight_bridge._all_gather_flat = lambda *a, **k: (gathers.append(1), real_all_gather(*a, **k))[1]
    out = {}
    for tp, pp in LAYOUTS:
        groups = init_parallel(tp, pp, seed=0)
        for name in MODELS:
            arch = qwen.arch_from_hf_config(Path(root) / name)
            config = qwen.transformer_config(arch, tp=tp, pp=pp, params_dtype=torch.float32)
            config.init_model_with_meta_device = True  # skip megatron's CUDA-only tied-embedding copy; loaded below
            model = GPTModel(
                config=config,
                transformer_layer_spec=qwen.layer_spec(arch),
                vocab_size=qwen.padded_vocab_size(arch.vocab_size, tp),
                max_sequence_length=64,
                pre_process=ps.is_pipeline_first_stage(),
                post_process=ps.is_pipeline_last_stage(),
                share_embeddings_and_output_weights=arch.tie_word_embeddings,
                position_embedding_type="rope",
            )
            load_hf_into_model(model, Path(root) / name, arch, groups.tp_rank, tp)
            gathers.clear()
            stream = dict(tp_size=tp, tp_group=groups.tp_group, dp_rank=groups.dp_rank)
            buckets = [  # cloned as they come: the stream reuses its bucket buffer
                (dict((n, t.clone()) for n, t in b.tensors()), b.nbytes, b.flat.dtype, b.version)
                for b in weight_bridge.iter_buckets(model, arch, **stream, bucket_bytes=BUCKET_BYTES, version=7)
            ]
            n_gathers = len(gathers)
            one_bucket = [
                dict((n, t.clone()) for n, t in b.tensors()) for b in weight_bridge.iter_buckets(model, arch, **stream)
            ]
            gathers.clear()
            chunked = [  # the same whole-stage bucket, its gather split into async chunks
                dict((n, t.clone()) for n, t in b.tensors())
                for b in weight_bridge.iter_buckets(model, arch, **stream, gather_chunks=3)
            ]
            out[(tp, pp, name)] = {
                "chunked_equal": len(chunked) == len(one_bucket)
                and all(c.keys() == o.keys() and all(torch.equal(c[n], o[n]) for n in c) for c, o in zip(chunked, one_bucket)),
                "chunked_gathers": len(gathers),
                "dp_rank": groups.dp_rank,
                "buckets": buckets,
                "gathers": n_gathers,
                "one_bucket": len(one_bucket),
                "target_tp": {  # what vLLM's TP rank r of m holds, for m in {1, 2}
                    (m, r): {
                        n: t.clone()
                        for b in weight_bridge.iter_buckets(model, arch, **stream, bucket_bytes=BUCKET_BYTES, target_tp=(m, r))
                        for n, t in b.tensors()
                    }
                    for m in (1, 2)
                    for r in range(m)
                },
            }
        ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("bridge")
    for name, cfg in MODELS.items():
        torch.manual_seed(0)
        Qwen2ForCausalLM(Qwen2Config(**cfg, num_hidden_layers=4, max_position_embeddings=64)).save_pretrained(root / name)
    return root, run_gloo(_bridge_worker, 4, str(root))


@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("name", list(MODELS))
def test_bucket_stream_equals_hf_checkpoint(streamed, tp, pp, name):
    from dynamo_mega.parallel.weight_bridge import DEFAULT_GATHER_CHUNKS

    root, ranks = streamed
    src = load_file(root / name / "model.safetensors")
    received: dict[str, torch.Tensor] = {}
    for r in ranks:
        res = r[(tp, pp, name)]
        if res["dp_rank"] != 0:
            assert res["buckets"] == [] and res["gathers"] == 0, "a DP replica sent weights"
            continue
        sharded_buckets = 0
        for tensors, nbytes, dtype, version in res["buckets"]:
            assert version == 7 and dtype == torch.float32
            assert nbytes <= BUCKET_BYTES or len(tensors) <= 3, (list(tensors), nbytes)  # oversized: one megatron tensor
            sharded_buckets += tp > 1 and any("norm" not in n for n in tensors)  # norms are replicated: no gather
            for hf_name, tensor in tensors.items():
                if hf_name in received:  # the same tensor from another TP rank of the same stage
                    assert torch.equal(received[hf_name], tensor), hf_name
                received[hf_name] = tensor
        # one to DEFAULT_GATHER_CHUNKS all_gathers per bucket holding TP-sharded tensors (a lone tensor is not cut)
        assert sharded_buckets <= res["gathers"] <= DEFAULT_GATHER_CHUNKS * sharded_buckets
        assert res["one_bucket"] == 1  # the default 512 MiB holds a whole stage
        assert res["chunked_equal"]  # gathering in async chunks changes no bit
        assert res["chunked_gathers"] == (3 if tp > 1 else 0)  # a whole stage has more than 3 sharded tensors
    assert received.keys() == src.keys()
    for hf_name, tensor in src.items():
        assert torch.equal(received[hf_name], tensor), hf_name
    assert ("lm_head.weight" in received) == (name == "untied")


@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("name", list(MODELS))
def test_target_tp_slices_concatenate_to_the_hf_checkpoint(streamed, tp, pp, name):
    """target_tp=(m, r): each tensor is only vLLM rank r's block; the m blocks, concatenated along the split dim
    (rows for column-parallel, columns for o_proj / down_proj), are the HF tensor; norms come whole to every rank."""
    root, ranks = streamed
    src = load_file(root / name / "model.safetensors")
    for m in (1, 2):
        slices: dict[str, list[torch.Tensor]] = {}
        for res in (r[(tp, pp, name)] for r in ranks):
            for rank in range(m) if res["dp_rank"] == 0 else ():
                for hf_name, tensor in res["target_tp"][(m, rank)].items():
                    have = slices.setdefault(hf_name, [None] * m)
                    assert have[rank] is None or torch.equal(have[rank], tensor), hf_name  # TP peers agree
                    have[rank] = tensor
        assert slices.keys() == src.keys()
        for hf_name, full in src.items():
            parts = slices[hf_name]
            split = [d for d in range(full.dim()) if parts[0].shape[d] != full.shape[d]]
            if m == 1 or "norm" in hf_name:
                assert not split and all(torch.equal(p, full) for p in parts), hf_name
                continue
            want_dim = 1 if hf_name.endswith(("o_proj.weight", "down_proj.weight")) else 0
            assert split == [want_dim], (hf_name, split)
            assert torch.equal(torch.cat(parts, dim=want_dim), full), hf_name


def test_vllm_tp_box_follows_vllms_sharding():
    """Against vLLM's own rules: vocabulary padded to 64 then split evenly (real rows only); k/v heads replicated
    when TP exceeds the kv heads (rank r holds head r // (TP / kv_heads)); bad TP sizes are refused."""
    from vllm.model_executor.layers.vocab_parallel_embedding import pad_vocab_size, vocab_range_from_global_vocab_size

    from dynamo_mega.models import qwen_bridge_layout as bl
    from dynamo_mega.models import qwen_mapping as qm
    from dynamo_mega.models.qwen import QwenArch

    arch = QwenArch(vocab_size=151, hidden_size=64, num_layers=2, num_attention_heads=8, num_query_groups=2,
                    ffn_hidden_size=96, max_position_embeddings=64, rope_theta=1e4, rms_norm_eps=1e-6,
                    tie_word_embeddings=True, qkv_bias=True, qk_layernorm=False, head_dim=8)
    for tp in (1, 2, 4):
        for r in range(tp):
            start, end = vocab_range_from_global_vocab_size(pad_vocab_size(151, 64), r, tp)
            start, end = min(start, 151), min(end, 151)
            assert bl.vllm_tp_box(qm.HF_EMBED, arch, tp, r) == ((start, 0), (end - start, 64))
            k = bl.vllm_tp_box("model.layers.1.self_attn.k_proj.weight", arch, tp, r)
            head = r // max(1, tp // 2) if tp > 2 else None
            assert k == (((head * 8, 0), (8, 64)) if head is not None else ((r * 16 // tp, 0), (16 // tp, 64)))
            assert bl.vllm_tp_box("model.layers.1.mlp.down_proj.weight", arch, tp, r) == ((0, r * 96 // tp), (64, 96 // tp))
            assert bl.vllm_tp_box("model.layers.1.input_layernorm.weight", arch, tp, r) == ((0,), (64,))
    for bad, tp in ((replace(arch, num_attention_heads=12, num_query_groups=3), 2), (replace(arch, ffn_hidden_size=100), 8)):
        with pytest.raises(ValueError, match="cannot hold this model"):
            bl.vllm_tp_box("model.layers.0.self_attn.q_proj.weight", bad, tp, 0)


def test_buckets_split_inside_layers_and_isolate_oversized_tensors(streamed):
    _, ranks = streamed
    buckets = [b[0] for b in ranks[0][(2, 2, "untied")]["buckets"]]
    layer0 = [i for i, t in enumerate(buckets) if any(n.startswith("model.layers.0.") for n in t)]
    assert len(layer0) > 1  # a bucket boundary falls inside layer 0
    assert any(set(t) == {"model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"} for t in buckets)


def test_target_dtype_fills_buckets_across_the_models_own_dtypes():
    """megatron's local spec keeps norm weights in fp32 beside bf16 matrices: without a target dtype every dtype
    change closes a bucket; with the engine's dtype the stream is one dtype in full-size buckets and carries
    exactly the tensors the engine would have cast on load."""
    from dynamo_mega.config import ModelConfig
    from dynamo_mega.parallel.groups import destroy_parallel, init_parallel
    from dynamo_mega.parallel.policy import build_policy
    from dynamo_mega.parallel.weight_bridge import iter_buckets

    groups = init_parallel(1, seed=0)
    try:
        cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=3, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=128, max_position_embeddings=32, params_dtype="bfloat16")
        model, arch = build_policy(cfg, groups, seed=1)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}
        mixed = list(iter_buckets(model, arch, tp_size=1, bucket_bytes=1 << 20, fresh_buffers=True))
        single = list(iter_buckets(model, arch, tp_size=1, bucket_bytes=1 << 20, dtype=torch.bfloat16, fresh_buffers=True))
        assert len(single) == 1 and len(mixed) > 3 * arch.num_layers
        assert single[0].flat.dtype == torch.bfloat16
        want = {n: t.to(torch.bfloat16) for b in mixed for n, t in b.tensors()}
        got = dict(single[0].tensors())
        assert sorted(got) == sorted(want)
        for name, value in want.items():
            assert torch.equal(got[name], value), name
    finally:
        destroy_parallel()


def test_kept_buffers_serve_every_sync():
    """One BucketBuffers passed to successive syncs (weights changed in between) streams exactly what fresh
    buffers stream, and reuses its memory instead of allocating again."""
    from dynamo_mega.config import ModelConfig
    from dynamo_mega.parallel.groups import destroy_parallel, init_parallel
    from dynamo_mega.parallel.policy import build_policy
    from dynamo_mega.parallel.weight_bridge import BucketBuffers, iter_buckets

    groups = init_parallel(1, seed=0)
    try:
        cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=128, max_position_embeddings=32)
        model, arch = build_policy(cfg, groups, seed=1)
        kept = BucketBuffers()
        kw = dict(tp_size=1, bucket_bytes=48 << 10)
        for step in range(2):
            want = {n: t for b in iter_buckets(model, arch, **kw, fresh_buffers=True) for n, t in b.tensors()}
            got = {n: t.clone() for b in iter_buckets(model, arch, **kw, buffers=kept) for n, t in b.tensors()}
            assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
            if step == 0:
                storage = kept.buffers["bucket"].data_ptr()
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1.0)
        assert kept.buffers["bucket"].data_ptr() == storage
    finally:
        destroy_parallel()


def test_gather_chunks_cut_large_tensors_between_whole_row_granules():
    """TP gathers move chunks of about 1/gather_chunks of a bucket (what bounds the bridge's extra memory): a
    tensor larger than that is cut between rows, at whole query groups of qkv and whole gate/up halves of fc1;
    the chunks cover every tensor's rows once, in order. (Bit-exactness of cut tensors: the streams above, whose
    small chunks cut the embedding, qkv, fc1 and o_proj shards.)"""
    from dynamo_mega.config import ModelConfig
    from dynamo_mega.models import qwen_bridge_layout as bl
    from dynamo_mega.parallel.groups import destroy_parallel, init_parallel
    from dynamo_mega.parallel.policy import build_policy
    from dynamo_mega.parallel.weight_bridge import _plan_chunks, _stage_params

    groups = init_parallel(1, seed=0)
    try:
        cfg = ModelConfig(vocab_size=151, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=96, max_position_embeddings=32)
        model, arch = build_policy(cfg, groups, seed=1)
        params = [p for p in _stage_params(model, arch) if p.param.dim() == 2]  # as if every matrix were sharded
        target = 2000  # local elements: the embedding, qkv and fc1 exceed it
        chunks = _plan_chunks(params, arch, target)
        total = sum(p.param.numel() for p in params)
        assert len(chunks) <= -(-total // target)
        covered: dict[str, int] = {}
        for chunk in chunks:
            assert sum(s.numel for s in chunk[:-1]) < target  # closed as soon as it reaches the target
            for s in chunk:
                rows = s.param.param.shape[0]
                granule = bl.shard_row_granule(s.param.global_name, arch, rows)
                assert s.start == covered.get(s.param.global_name, 0) and s.start % granule == 0, s
                assert s.rows % granule == 0 or s.start + s.rows == rows, s
                covered[s.param.global_name] = s.start + s.rows
        assert covered == {p.global_name: p.param.shape[0] for p in params}
        cut = {s.param.global_name for chunk in chunks for s in chunk if s.rows < s.param.param.shape[0]}
        assert {"embedding.word_embeddings.weight", "decoder.layers.0.mlp.linear_fc1.weight"} <= cut
        assert any(".linear_qkv." in name for name in cut)
    finally:
        destroy_parallel()
