"""Training checkpoints: save the whole run state atomically, find the newest complete one, resume from it.

Layout of one checkpoint, ROOT/step_00000012/:
    model and optimizer shards    megatron dist_checkpointing (torch_dist format): every tensor is stored with its
                                  global shape and offsets, so a checkpoint written at one TP/PP layout (and
                                  any DP size) loads at another (PP=2 -> PP=1, PP=2: tests/test_checkpoint_pipeline.py)
    trainer_state.pt              step, policy version, prompt statistics, data cursor, LR schedule, RNG states
    COMPLETE                      written last; the directory is then renamed from ROOT/.tmp.step_00000012

A directory without COMPLETE, or still under its temporary name, is never selected (`latest_checkpoint`), so a
crash in the middle of a save leaves the previous checkpoint as the one to resume from.

AdamW moments are saved as sharded tensors that mirror their parameter's sharding (megatron's
`optim_state_to_sharding_state`), so they reshard with the model. That is the CPU/plain-optimizer path; on GPU
Megatron's optimizer saves its moments and fp32 master weights through its own sharded_state_dict
(parallel/megatron_optimizer.py: the distributed optimizer in Megatron's dp_reshardable layout).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dynamo_mega.parallel.groups import ParallelGroups

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
_PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (partial and temporary directories are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(_PREFIX) and path.name[len(_PREFIX) :].isdigit():
            if (path / COMPLETE_MARKER).is_file() and (path / TRAINER_STATE).is_file():
                found.append(path)
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def checkpoint_step(path: str | Path) -> int:
    """The RL step a complete checkpoint was saved after."""
    return int(json.loads((Path(path) / COMPLETE_MARKER).read_text())["step"])


def latest_checkpoint(root: str | Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """`checkpoint.resume`: "none" -> None; "auto" -> the newest complete checkpoint in root (or None);
    anything else is a checkpoint directory that must be complete."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(
            f"checkpoint.resume={resume}: not a complete checkpoint (no {COMPLETE_MARKER} file); "
            f"pass a step_XXXXXXXX directory written by a finished save, or checkpoint.resume=auto"
        )
    return path


def _model_sharded_state(model) -> dict:
    return model.sharded_state_dict()


def _ensure_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter AdamW state tensors (zeros) so a load has tensors to fill in. A fresh optimizer
    has none until its first step."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _optimizer_sharded_state(model_sharded: dict, optimizer: torch.optim.Optimizer) -> tuple[dict, float]:
    """(sharded optimizer state, adam step count). The per-parameter scalar `step` is identical for every
    parameter (one optimizer, every parameter updated each step), so it travels as one number."""
    from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map, optim_state_to_sharding_state

    _ensure_adam_state(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    steps = {float(optimizer.state[p]["step"]) for p in params}
    assert len(steps) == 1, f"parameters disagree on the AdamW step count: {sorted(steps)}"
    state = optimizer.state_dict()
    id_map = get_param_id_to_sharded_param_map(model_sharded, params)
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    return state, steps.pop()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(
    root: str | Path,
    step: int,
    model,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    groups: ParallelGroups,
    *,
    keep_last: int = 0,
) -> Path:
    """Collective (every rank): write ROOT/step_XXXXXXXX atomically and prune to the newest `keep_last`
    (0 keeps all). `trainer_state` must be identical on every rank; rank 0 writes it."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp.{checkpoint_name(step)}"
    if groups.is_driver:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that crashed
        tmp.mkdir()
    _barrier(groups)
    model_sharded = _model_sharded_state(model)
    if hasattr(optimizer, "sharded_state_dict"):  # GPU: Megatron's optimizer (its own step counts inside)
        optim_sharded, adam_step = optimizer.sharded_state_dict(model_sharded), None
    else:
        optim_sharded, adam_step = _optimizer_sharded_state(model_sharded, optimizer)
    dist_checkpointing.save({"model": model_sharded, "optimizer": optim_sharded}, str(tmp))
    _barrier(groups)
    if groups.is_driver:
        torch.save({**trainer_state, "adam_step": adam_step, "rng": rng_state()}, tmp / TRAINER_STATE)
        meta = {"step": step, "saved_at": time.time(), "tensor_parallel": groups.tp_size, "pipeline_parallel": groups.pp_size}
        meta["world_size"] = groups.world_size
        _write_synced(tmp / COMPLETE_MARKER, json.dumps(meta))
        if final.exists():  # an older save of the same step (e.g. a re-run after resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        if keep_last > 0:
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(groups)
    return final


def load_checkpoint(path: str | Path, model, optimizer: torch.optim.Optimizer, groups: ParallelGroups) -> dict:
    """Collective: fill `model` and `optimizer` in place from `path` (written at any TP layout); returns the
    trainer state (RNG already restored)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    model_sharded = _model_sharded_state(model)
    megatron_optimizer = hasattr(optimizer, "sharded_state_dict")
    if megatron_optimizer:
        optim_sharded = optimizer.sharded_state_dict(model_sharded, is_loading=True)
    else:
        optim_sharded, _ = _optimizer_sharded_state(model_sharded, optimizer)
    loaded = dist_checkpointing.load({"model": model_sharded, "optimizer": optim_sharded}, str(path))
    model.load_state_dict(loaded["model"], strict=False)
    trainer_state = torch.load(path / TRAINER_STATE, weights_only=False)
    if megatron_optimizer:
        optimizer.load_sharded(loaded["optimizer"])
    else:
        _load_optimizer(optimizer, loaded["optimizer"], trainer_state["adam_step"])
    set_rng_state(trainer_state["rng"])
    return trainer_state


def _load_optimizer(optimizer: torch.optim.Optimizer, loaded: dict, adam_step: float) -> None:
    """Copy loaded moments into the optimizer's existing state tensors (by parameter id, in group order)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, p in enumerate(params):
        state = optimizer.state[p]
        for key, value in loaded["state"][pid].items():
            state[key].copy_(value)
        state["step"].fill_(adam_step)
    for group, saved in zip(optimizer.param_groups, loaded["param_groups"], strict=True):
        for key, value in saved.items():
            if key != "params":
                group[key] = value


def _barrier(groups: ParallelGroups) -> None:
    if groups.world_size > 1:
        dist.barrier()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_root(cfg) -> Path:
    """Where the run's checkpoints live: checkpoint.dir, or OUTPUT_DIR/checkpoints (cfg: config.Config)."""
    return Path(cfg.checkpoint.dir or Path(cfg.run.output_dir) / "checkpoints")
