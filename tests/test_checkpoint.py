"""Training checkpoints: model + AdamW state written at TP=2 (2 gloo processes) load exactly at TP=1 and TP=2,
training continues identically after a load, old checkpoints are pruned, partial ones are never selected."""

from __future__ import annotations

import json

import pytest
import torch
from _gloo import run_gloo

from dynamo_mega import checkpoint as ckpt
from dynamo_mega.config import ModelConfig

CFG = ModelConfig(
    vocab_size=32, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
    max_position_embeddings=32,
)


def _step(model, opt, groups, seed: int) -> None:
    from dynamo_mega.parallel.logprobs import vocab_parallel_logprobs_entropy
    from dynamo_mega.parallel.policy import forward_logits
    from dynamo_mega.parallel.train_step import sync_and_step

    ids = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(seed))
    tp_group = groups.tp_group if groups.tp_size > 1 else None
    logp, _ = vocab_parallel_logprobs_entropy(forward_logits(model, ids), ids.roll(-1, 1), tp_group)
    (-logp.mean()).backward()
    sync_and_step(model, opt, None, groups, grad_clip=1.0)


def _full_state(model, opt, arch, groups) -> dict:
    """HF-named weights and AdamW moments with TP shards gathered (comparable across layouts)."""
    import torch.distributed as dist

    from dynamo_mega.models.qwen_mapping import megatron_to_hf

    out = {}
    for key in ("param", "exp_avg", "exp_avg_sq"):
        full = {}
        for name, p in model.named_parameters():
            t = (p if key == "param" else opt.state[p][key]).detach().contiguous()
            if getattr(p, "tensor_model_parallel", False) and groups.tp_size > 1:
                parts = [torch.empty_like(t) for _ in range(groups.tp_size)]
                dist.all_gather(parts, t, group=groups.tp_group)
                t = torch.cat(parts, dim=p.partition_dim)
            full[name] = t.clone()
        out[key] = megatron_to_hf(full, arch, groups.tp_size)
    out["adam_step"] = {float(s["step"]) for s in opt.state.values()}
    out["lr"] = opt.param_groups[0]["lr"]
    return out


def _build(tp: int, seed: int):
    from dynamo_mega.parallel.groups import init_parallel
    from dynamo_mega.parallel.policy import build_policy

    groups = init_parallel(tp, seed=0)
    model, arch = build_policy(CFG, groups, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    return groups, model, arch, opt


def _train_and_save(rank: int, world: int, root: str) -> dict:
    from megatron.core import parallel_state

    groups, model, arch, opt = _build(world, seed=7)
    for step in (1, 2, 3):
        _step(model, opt, groups, seed=step)
        ckpt.save_checkpoint(root, step, model, opt, {"step": step, "note": "hello"}, groups, keep_last=2)
    saved = _full_state(model, opt, arch, groups)
    _step(model, opt, groups, seed=4)
    after = _full_state(model, opt, arch, groups)
    parallel_state.destroy_model_parallel()
    return {"saved": saved, "after": after}


def _load_and_continue(rank: int, world: int, path: str) -> dict:
    from megatron.core import parallel_state

    groups, model, arch, opt = _build(world, seed=99)  # different init: everything must come from the file
    state = ckpt.load_checkpoint(path, model, opt, groups)
    loaded = _full_state(model, opt, arch, groups)
    _step(model, opt, groups, seed=4)
    after = _full_state(model, opt, arch, groups)
    parallel_state.destroy_model_parallel()
    state.pop("rng")  # numpy arrays: not loadable by the parent's weights-only torch.load
    return {"state": state, "loaded": loaded, "after": after}


@pytest.fixture(scope="module")
def saved_tp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return root, run_gloo(_train_and_save, 2, str(root))[0]


def _assert_equal(a: dict, b: dict, exact: bool) -> None:
    for key in ("param", "exp_avg", "exp_avg_sq"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            if exact:
                assert torch.equal(a[key][name], b[key][name]), (key, name)
            else:
                torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
    assert a["adam_step"] == b["adam_step"] and a["lr"] == b["lr"]


def test_keep_last_prunes_and_marks_complete(saved_tp2):
    root, _ = saved_tp2
    names = [p.name for p in ckpt.complete_checkpoints(root)]
    assert names == ["step_00000002", "step_00000003"]
    meta = json.loads((root / "step_00000003" / ckpt.COMPLETE_MARKER).read_text())
    assert meta["step"] == 3 and meta["tensor_parallel"] == 2
    assert not list(root.glob(".tmp.*"))


@pytest.mark.parametrize("tp", [1, 2])
def test_tp2_checkpoint_loads_at_any_tp_and_training_continues(saved_tp2, tp):
    root, ref = saved_tp2
    out = run_gloo(_load_and_continue, tp, str(root / "step_00000003"))[0]
    assert out["state"]["step"] == 3 and out["state"]["note"] == "hello"
    _assert_equal(out["loaded"], ref["saved"], exact=True)  # storage is layout-free: bit-exact at any TP
    # The next step at the saving layout repeats bit for bit; at TP=1 only the reduction order differs.
    _assert_equal(out["after"], ref["after"], exact=(tp == 2))


def test_partial_checkpoints_are_never_selected(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None
    good = tmp_path / ckpt.checkpoint_name(5)
    good.mkdir()
    (good / ckpt.TRAINER_STATE).write_bytes(b"x")
    (good / ckpt.COMPLETE_MARKER).write_text("{}")
    newer_without_marker = tmp_path / ckpt.checkpoint_name(9)
    newer_without_marker.mkdir()
    (newer_without_marker / ckpt.TRAINER_STATE).write_bytes(b"x")
    (tmp_path / f".tmp.{ckpt.checkpoint_name(12)}").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert ckpt.resolve_resume("auto", tmp_path) == good
    assert ckpt.resolve_resume("none", tmp_path) is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(newer_without_marker), tmp_path)


def test_training_checkpoint_converts_to_hf(saved_tp2, tmp_path):
    """What users leave with: a TP=2 training checkpoint (model + optimizer) -> HF safetensors, bit-exact."""
    from safetensors.torch import load_file

    from dynamo_mega.cli import main
    from dynamo_mega.models.qwen import arch_from_model_config, hf_config_dict

    root, ref = saved_tp2
    config = tmp_path / "config.json"
    config.write_text(json.dumps(hf_config_dict(arch_from_model_config(CFG), "float32", 1)))
    args = ["convert", "mcore-to-hf", str(root / "step_00000003"), str(tmp_path / "hf"), "--hf-config", str(config)]
    assert main([*args, "--no-progress"]) == 0
    exported = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        exported.update(load_file(str(f)))
    assert exported.keys() == ref["saved"]["param"].keys()
    for name, value in ref["saved"]["param"].items():
        assert torch.equal(exported[name], value), name
