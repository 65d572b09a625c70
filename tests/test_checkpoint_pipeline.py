"""Training checkpoints at PP=2 (2 gloo processes, tied embeddings): model + AdamW state saved after a pipeline
step load exactly at PP=1 and at PP=2, and the next step after the load matches the step taken before the save
(PP=1: up to reduction order)."""

from __future__ import annotations

import pytest
import torch
from _gloo import run_gloo

from dynamo_mega import checkpoint as ckpt
from dynamo_mega.config import ModelConfig

CFG = ModelConfig(
    vocab_size=32, hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
    max_position_embeddings=32, tie_word_embeddings=True,
)


def _build(pp: int, seed: int):
    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy

    groups = init_parallel(1, pp, seed=0)
    model, _ = build_policy(CFG, groups, seed=seed)
    return groups, model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def _step(model, opt, groups, seed: int) -> None:
    from dynamo_mega.parallel.train_step import split_micro_batches, supervised_step

    ids = torch.randint(1, 32, (6, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(6, 12, dtype=torch.bool)
    micro = split_micro_batches(ids, ids.roll(-1, 1), mask, torch.zeros(6), torch.zeros(6, 12), 2)
    supervised_step(model, opt, None, micro, groups, grad_clip=1.0)


def _full_state(model, opt) -> dict:
    """{(kind, megatron name with global layer id): tensor} of this stage (TP=1; the tied output copy left out)."""
    from dynamo_mega.models import qwen_mapping as qm

    global_ids = {local: layer.layer_number - 1 for local, layer in enumerate(model.decoder.layers)}
    out = {}
    for name, p in model.named_parameters():
        if getattr(p, "shared", False):
            continue
        split = qm.split_layer_name(name, qm.MCORE_LAYER_PREFIX)
        if split is not None:
            name = f"{qm.MCORE_LAYER_PREFIX}{global_ids[split[0]]}.{split[1]}"
        out[("param", name)] = p.detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[(key, name)] = opt.state[p][key].clone()
    return out


def _train_and_save(rank: int, world: int, root: str) -> dict:
    from megatron.core import parallel_state

    groups, model, opt = _build(2, seed=7)
    _step(model, opt, groups, seed=1)
    ckpt.save_checkpoint(root, 1, model, opt, {"step": 1}, groups)
    saved = _full_state(model, opt)
    _step(model, opt, groups, seed=2)
    after = _full_state(model, opt)
    parallel_state.destroy_model_parallel()
    return {"saved": saved, "after": after}


def _load_and_continue(rank: int, world: int, path: str) -> dict:
    from megatron.core import parallel_state

    groups, model, opt = _build(world, seed=99)  # different init: everything must come from the file
    ckpt.load_checkpoint(path, model, opt, groups)
    loaded = _full_state(model, opt)
    _step(model, opt, groups, seed=2)
    after = _full_state(model, opt)
    parallel_state.destroy_model_parallel()
    return {"loaded": loaded, "after": after}


def _merge(ranks: list[dict], key: str) -> dict:
    return {name: t for r in ranks for name, t in r[key].items()}


@pytest.fixture(scope="module")
def saved_pp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_pp")
    return root, run_gloo(_train_and_save, 2, str(root))


@pytest.mark.parametrize("pp", [1, 2])
def test_pp2_checkpoint_loads_at_pp1_and_pp2_and_training_continues(saved_pp2, pp):
    root, ranks = saved_pp2
    saved, ref_after = _merge(ranks, "saved"), _merge(ranks, "after")
    out = run_gloo(_load_and_continue, pp, str(root / "step_00000001"))
    loaded, after = _merge(out, "loaded"), _merge(out, "after")
    assert loaded.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), name  # storage is layout-free: bit-exact at any PP
    for name, value in ref_after.items():
        if pp == 2:
            assert torch.equal(after[name], value), name
        else:
            torch.testing.assert_close(after[name], value, rtol=1e-5, atol=1e-6, msg=str(name))
