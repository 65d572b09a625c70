"""GPU only (skipped without CUDA): the policy step through Megatron's DDP buffers and its mixed-precision,
distributed AdamW (parallel/megatron_optimizer.py), checked against the CPU path's semantics.

- bf16 params + fp32 master weights track an fp32 torch-AdamW reference over several steps (bf16 tolerance);
- a non-finite gradient skips the update and is reported; the LR schedule advances either way;
- a checkpoint (model + Megatron optimizer state + schedule) resumes bit-exactly.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="Megatron's DDP/distributed optimizer path needs CUDA")

N, S = 16, 24


@pytest.fixture()
def groups():
    from dynamo_mega.parallel.groups import destroy_parallel, init_parallel

    g = init_parallel(1, seed=0)
    yield g
    destroy_parallel()


def _cfg(dtype: str):
    from dynamo_mega.config import ModelConfig

    return ModelConfig(
        vocab_size=256, hidden_size=128, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256,
        max_position_embeddings=64, params_dtype=dtype,
    )


def _micro(device):
    from dynamo_mega.parallel.train_step import split_micro_batches

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 256, (N, S), generator=g)
    mask = torch.zeros(N, S, dtype=torch.bool)
    mask[:, 6:] = True
    adv = torch.randn(N, generator=g)
    micro = split_micro_batches(ids, ids.roll(-1, 1), mask, adv, torch.zeros(N, S), 8)
    for mb in micro:
        for field in ("input_ids", "targets", "mask", "advantages", "rollout_logp"):
            setattr(mb, field, getattr(mb, field).to(device))
    return micro


def _step(model, opt, sched, groups):
    from dynamo_mega.config import AlgoConfig, ModulationConfig
    from dynamo_mega.parallel.train_step import policy_step

    return policy_step(model, opt, sched, _micro(groups.device), groups, algo=AlgoConfig(), temperature=1.0,
                       grad_clip=1.0, modulation=ModulationConfig())


def _optim_cfg():
    from dynamo_mega.config import OptimConfig

    return OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=2, lr_decay="cosine", min_lr=1e-4)


def _torch_adamw(model, cfg, total_steps: int):
    """The CPU path's optimizer (torch AdamW + LambdaLR), built as on a machine without CUDA."""
    import dynamo_mega.optim as optim

    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: False
    try:
        return optim.build_optimizer(model, cfg.lr, cfg, total_steps)
    finally:
        torch.cuda.is_available = available


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("distributed", [True, False])
def test_bf16_megatron_adam_tracks_fp32_torch_adamw(groups, distributed):
    from dynamo_mega.optim import build_optimizer
    from dynamo_mega.parallel.megatron_optimizer import MegatronAdam
    from dynamo_mega.parallel.policy import build_policy

    ref, _ = build_policy(_cfg("float32"), groups, seed=5)
    model, _ = build_policy(_cfg("bfloat16"), groups, seed=5)
    with torch.no_grad():
        for (_, p), (_, r) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
            p.copy_(r)
    cfg = _optim_cfg()
    opt, sched = build_optimizer(model, cfg.lr, cfg, total_steps=6, distributed=distributed)
    assert isinstance(opt, MegatronAdam)
    ref_opt, ref_sched = _torch_adamw(ref, cfg, total_steps=6)  # the CPU path's optimizer, on the GPU in fp32
    start = _params(model)
    for step in range(4):
        ref_stats = _step(ref, ref_opt, ref_sched, groups)  # the CPU path's torch AdamW, on the GPU in fp32
        stats = _step(model, opt, sched, groups)
        assert stats["skipped_step"] == 0.0
        assert stats["grad_norm"] == pytest.approx(ref_stats["grad_norm"], rel=5e-2)
        assert sched.get_last_lr()[0] == pytest.approx(ref_sched.get_last_lr()[0], rel=1e-6), step
    got, want = _params(model), _params(ref)
    # Adam's early steps are ~lr * sign(grad): bf16 round-off flips the sign of near-zero gradients, so single
    # weights may differ by 2 lr per step. The update as a whole must be the same one: direction and size.
    d_got = torch.cat([(got[k] - start[k]).flatten() for k in want])
    d_want = torch.cat([(want[k] - start[k]).flatten() for k in want])
    cosine = torch.nn.functional.cosine_similarity(d_got, d_want, dim=0)
    assert cosine > 0.95, f"bf16 Megatron update vs fp32 torch AdamW update: cosine {cosine:.4f}"
    assert d_got.norm() == pytest.approx(d_want.norm(), rel=0.05)


def test_non_finite_gradient_skips_the_megatron_step(groups):
    from dynamo_mega.optim import build_optimizer
    from dynamo_mega.parallel.policy import build_policy

    model, _ = build_policy(_cfg("bfloat16"), groups, seed=5)
    cfg = _optim_cfg()
    opt, sched = build_optimizer(model, cfg.lr, cfg, total_steps=6)
    before = _params(model)
    hook = next(model.parameters()).register_hook(lambda g: torch.full_like(g, float("nan")))
    stats = _step(model, opt, sched, groups)
    assert stats["skipped_step"] == 1.0
    for name, value in _params(model).items():
        assert torch.equal(value, before[name]), name
    hook.remove()
    assert _step(model, opt, sched, groups)["skipped_step"] == 0.0  # the next clean step goes through
    assert opt.steps_taken == 2


@pytest.mark.parametrize(
    "distributed,fmt", [(True, "fully_reshardable"), (True, "dp_reshardable"), (False, "fully_reshardable")]
)
def test_checkpoint_with_megatron_optimizer_resumes_exactly(groups, tmp_path, distributed, fmt):
    from dynamo_mega.checkpoint import load_checkpoint, save_checkpoint
    from dynamo_mega.optim import build_optimizer
    from dynamo_mega.parallel.policy import build_policy

    cfg = _optim_cfg()
    model, _ = build_policy(_cfg("bfloat16"), groups, seed=5)
    opt, sched = build_optimizer(model, cfg.lr, cfg, total_steps=8, distributed=distributed)
    opt.checkpoint_format = fmt
    for _ in range(2):
        _step(model, opt, sched, groups)
    path = save_checkpoint(tmp_path, 2, model, opt, {"scheduler": sched.state_dict()}, groups)

    other, _ = build_policy(_cfg("bfloat16"), groups, seed=99)
    other_opt, other_sched = build_optimizer(other, cfg.lr, cfg, total_steps=8, distributed=distributed)
    other_opt.checkpoint_format = fmt
    state = load_checkpoint(path, other, other_opt, groups)
    other_sched.load_state_dict(state["scheduler"])
    assert other_sched.get_last_lr() == sched.get_last_lr()
    for (name, a), (_, b) in zip(model.named_parameters(), other.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    a_stats, b_stats = _step(model, opt, sched, groups), _step(other, other_opt, other_sched, groups)
    assert a_stats["loss"] == b_stats["loss"] and a_stats["grad_norm"] == b_stats["grad_norm"]
    for (name, a), (_, b) in zip(model.named_parameters(), other.named_parameters(), strict=True):
        assert torch.equal(a, b), name  # the fp32 master weights and Adam moments came back too
