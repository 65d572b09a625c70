"""GPU optimizer path: Megatron's DDP gradient buffers and its mixed-precision (optionally distributed) AdamW.

On GPU the policy trains in bf16 with fp32 master weights and fp32 gradient accumulation; with
`parallel.distributed_optimizer` the master weights and Adam moments are sharded over the DP ranks (ZeRO-1),
which is what lets a 7B-32B policy fit next to a colocated rollout engine. CPU runs (gloo, CI, the quick start)
keep the plain torch AdamW path in parallel/train_step.py with the same semantics: SUM of gradients over DP (the
loss is already a global token mean), global-norm clipping, the same LR schedule (dynamo_mega/optim.py), and a
non-finite gradient skipping the update.

The policy module stays the bare GPTModel everywhere else (forward, export, checkpoint names): Megatron's DDP
wrapper registers its gradient hooks on the parameters themselves, so backward through the bare module fills
the wrapper's buffers; the wrapper is only used to reduce them (`finish_grad_sync`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dynamo_mega.lr_schedule import lr_factor


class MegatronLRSchedule:
    """The LR schedule of a MegatronAdam, with the part of torch's LRScheduler interface the trainer uses
    (`get_last_lr`, `state_dict`, `load_state_dict`). MegatronAdam.step advances it; `step()` is a no-op."""

    def __init__(self, optimizer: MegatronAdam):
        self._optimizer = optimizer

    def step(self) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return [self._optimizer.current_lr()]

    def state_dict(self) -> dict:
        return {"steps_taken": self._optimizer.steps_taken}

    def load_state_dict(self, state: dict) -> None:
        self._optimizer.steps_taken = int(state["steps_taken"])
        self._optimizer._set_lr()


class MegatronAdam:
    """AdamW over a GPTModel through Megatron's optimizer: `step() -> (grad_norm, stepped)`, `zero_grad()`,
    `param_groups`, `schedule` (the LR schedule), and `sharded_state_dict(model_sharded)` / `load_sharded`
    for checkpoints."""

    def __init__(
        self, model, optim_cfg, *, lr: float, total_steps: int, decay: str | None = None, distributed: bool = False
    ):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self._device = next(model.parameters()).device  # ParallelGroups.device (parallel/policy.py builds it there)
        if self._device.type != "cuda":
            raise RuntimeError("MegatronAdam needs CUDA; CPU runs use torch AdamW (dynamo_mega/optim.py)")
        config = model.config
        # The loss is already the global token mean (parallel/train_step.py): DDP must SUM gradients over DP. Megatron
        # scales them by 1 / DP unless the config says the loss is per token (parallel/policy.py sets it).
        assert config.calculate_per_token_loss, "Megatron DDP would average the gradients over DP"
        # One DDP wrapper per model: its gradient hooks live on the parameters, so a second wrapper (a second
        # optimizer, e.g. RL after the supervised warm-up) would accumulate every gradient twice.
        self.ddp = getattr(model, "_dynamo_mega_ddp", None)
        if self.ddp is None:
            self.ddp = DistributedDataParallel(
                config=config,
                ddp_config=DistributedDataParallelConfig(
                    grad_reduce_in_fp32=True,  # bf16 gradients summed over DP in fp32
                    use_distributed_optimizer=distributed,
                    overlap_grad_reduce=False,  # one reduce after all micro-batches; the step owns the sync point
                    check_for_nan_in_grad=False,  # non-finite gradients skip the step (below) instead of raising
                ),
                module=model,
            )
            # Not as a submodule (the wrapper contains the model: a cycle for .train()/.to()).
            object.__setattr__(model, "_dynamo_mega_ddp", self.ddp)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=lr,
                min_lr=optim_cfg.min_lr,
                weight_decay=optim_cfg.weight_decay,
                adam_beta1=optim_cfg.adam_beta1,
                adam_beta2=optim_cfg.adam_beta2,
                clip_grad=optim_cfg.grad_clip,
                bf16=config.bf16,
                params_dtype=config.params_dtype,
                use_distributed_optimizer=distributed,
            ),
            [self.ddp],
        )
        self._schedule = dict(
            warmup_steps=max(optim_cfg.warmup_steps, 0),
            total_steps=total_steps,
            decay=decay or optim_cfg.lr_decay,
            min_ratio=optim_cfg.min_lr / lr,
        )
        self.base_lr = lr
        # Megatron's own default layout. "fully_reshardable" failed to save on an H100 (megatron-core 0.19.2, torch
        # AdamW fallback: a size mismatch inside get_parameter_state_dp_zero), see docs/gpu.md.
        self.checkpoint_format = "dp_reshardable" if distributed else "fully_reshardable"
        self.steps_taken = 0  # optimizer steps attempted (skipped ones included): the LR schedule's position
        self.schedule = MegatronLRSchedule(self)
        self._set_lr()

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def _set_lr(self) -> None:
        lr = self.base_lr * lr_factor(self.steps_taken, **self._schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    @torch.no_grad()
    def step(self) -> tuple[float, bool]:
        """Reduce gradients over DP, and unless any rank holds a non-finite gradient: clip by the global norm
        and update. Then advance the LR schedule. Returns (grad norm before clipping, whether it stepped)."""
        self.ddp.finish_grad_sync()
        finite = torch.tensor(
            [float(all(bool(torch.isfinite(b.grad_data).all()) for b in self.ddp.buffers + self.ddp.expert_parallel_buffers))],
            device=self._device,
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank skips or none does
        if finite.item() < 1:
            norm, stepped = float("nan"), False
        else:
            stepped, norm, _ = self.optimizer.step()
            norm = float(norm) if norm is not None else float("nan")
        self.zero_grad()
        self.steps_taken += 1
        self._set_lr()
        return norm, bool(stepped)

    def sharded_state_dict(self, model_sharded: dict, is_loading: bool = False) -> dict:
        """Adam moments and fp32 master weights as dist_checkpointing sharded objects in `checkpoint_format`:
        "fully_reshardable" (one state tensor per parameter with global offsets: a save at one TP/DP resumes at
        another) or "dp_reshardable" (Megatron's flat buffer shards: resumes at another DP size only).
        `is_loading`: the template to load into (Megatron builds it differently from the one it saves)."""
        metadata = {"distrib_optim_sharding_type": self.checkpoint_format, "chained_optim_avoid_prefix": True}
        return self.optimizer.sharded_state_dict(model_sharded, is_loading=is_loading, metadata=metadata)

    def load_sharded(self, loaded: dict) -> None:
        self.optimizer.load_state_dict(loaded)
        self._set_lr()
