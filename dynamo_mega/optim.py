"""AdamW and its learning-rate schedule: linear warm-up, then constant, linear or cosine decay to min_lr.

The scheduler steps once per optimizer step, so a run's schedule spans run.steps x optim.mini_batches steps.
On GPU the optimizer is Megatron's (parallel/megatron_optimizer.py) with this same schedule; on CPU torch AdamW.
"""

from __future__ import annotations

import torch

from dynamo_mega.lr_schedule import lr_factor


def build_optimizer(model, lr: float, optim_cfg, total_steps: int, decay: str | None = None, distributed: bool = False):
    """(optimizer, LR schedule) for the policy; `decay` overrides optim_cfg.lr_decay (the supervised warm-up
    runs at a constant lr until its accuracy stop); `distributed`: parallel.distributed_optimizer (GPU only).

    GPU: Megatron's DDP + mixed-precision/distributed AdamW (parallel/megatron_optimizer.py). CPU: torch AdamW
    and a LambdaLR with `lr_factor`; gradients are reduced and clipped by parallel/train_step.sync_and_step."""
    if next(model.parameters()).device.type == "cuda":  # built on ParallelGroups.device (parallel/policy.py)
        from dynamo_mega.parallel.megatron_optimizer import MegatronAdam

        opt = MegatronAdam(model, optim_cfg, lr=lr, total_steps=total_steps, decay=decay, distributed=distributed)
        return opt, opt.schedule
    # No weight decay on biases and norm weights (every 1-D parameter), as Megatron's optimizer does on GPU.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": optim_cfg.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2))
    kwargs = dict(
        warmup_steps=max(optim_cfg.warmup_steps, 0),
        total_steps=total_steps,
        decay=decay or optim_cfg.lr_decay,
        min_ratio=optim_cfg.min_lr / lr,
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, **kwargs))
