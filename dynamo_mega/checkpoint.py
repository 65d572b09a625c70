"""Training checkpoints: save the whole run state atomically, find the newest complete one, resume from it.

Layout of one checkpoint, ROOT/step_00000012/:
    model and optimizer shards    megatron dist_checkpointing (torch_dist format): every tensor is stored with its
                                  global shape and offsets, so a checkpoint written at one TP/PP layout (and
                                  any DP size) loads at another (PP=2 -> PP=1, PP=2: tests/test_checkpoint_pipeline.py)
    trainer_state.pt              step, policy version, prompt statistics, data cursor, LR schedule, RNG states
    COMPLETE                      written last (JSON: step, layout, and the size and sha256 of every other file
                                  in the folder); the directory is then renamed from ROOT/.tmp.step_00000012

A directory without COMPLETE, or still under its temporary name, is never selected (`latest_checkpoint`), so a
crash in the middle of a save leaves the previous checkpoint as the one to resume from. A complete one whose
files no longer match COMPLETE's digests (bytes overwritten, truncated, appended, deleted) is damaged:
`resolve_resume` checks them on the driver before any rank loads, and resume=auto falls back to the newest
intact checkpoint, saying which one it skipped and why (`verify_checkpoint`).

AdamW moments are saved as sharded tensors that mirror their parameter's sharding (megatron's
`optim_state_to_sharding_state`), so they reshard with the model. That is the CPU/plain-optimizer path; on GPU
Megatron's optimizer saves its moments and fp32 master weights through its own sharded_state_dict
(parallel/megatron_optimizer.py: the distributed optimizer in Megatron's dp_reshardable layout).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dynamo_mega.config import ConfigError
from dynamo_mega.durable import fsync_path
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


def resolve_resume(resume: str, root: str | Path, *, older_than: Path | None = None) -> Path | None:
    """`checkpoint.resume`: "none" -> None; "auto" -> the newest complete checkpoint in root that passes
    `verify_checkpoint` (None if root holds no complete checkpoint; `older_than`: only those before that checkpoint);
    anything else is a checkpoint directory that must be complete and intact. Driver only (it reads every
    byte of the candidates). Each damaged checkpoint skipped is reported in one line on stderr.

    Raises ConfigError (one line) for a broken explicit path, or when every complete checkpoint is damaged:
    starting afresh would silently drop the run's logs, so that takes checkpoint.resume=none."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"checkpoint.resume={resume}: no such directory; pass a step_XXXXXXXX directory "
                              "written by a finished save, or checkpoint.resume=auto")
        if not (path / COMPLETE_MARKER).is_file():
            raise ConfigError(
                f"checkpoint.resume={resume}: not a complete checkpoint (no {COMPLETE_MARKER} file); "
                f"pass a step_XXXXXXXX directory written by a finished save, or checkpoint.resume=auto"
            )
        problem = verify_checkpoint(path)
        if problem:
            raise ConfigError(f"checkpoint.resume={resume}: damaged checkpoint ({problem}); pass another "
                              "step_XXXXXXXX directory, or checkpoint.resume=auto for the newest intact one")
        return path
    candidates = complete_checkpoints(root)
    if older_than is not None:
        candidates = candidates[: candidates.index(older_than)] if older_than in candidates else []
    damaged = []
    for path in reversed(candidates):
        problem = verify_checkpoint(path)
        if problem is None:
            for bad, why in damaged:
                report_damage(bad, why, path)
            return path
        damaged.append((path, problem))
    if damaged:
        raise ConfigError(
            f"every complete checkpoint under {root} is damaged ("
            + "; ".join(f"{p.name}: {why}" for p, why in damaged)
            + "); pass checkpoint.resume=none to start afresh (the run's logs are then rewritten)"
        )
    return None


def report_damage(bad: Path, why: str, instead: Path) -> None:
    print(f"dynamo-mega: checkpoint {bad} is damaged ({why}): resuming from {instead}", file=sys.stderr, flush=True)


def verify_checkpoint(path: str | Path) -> str | None:
    """None if the complete checkpoint at `path` is intact, else one line saying what is wrong (naming the file).

    Every file listed in COMPLETE must exist with the size and sha256 the save recorded (a checkpoint written
    before digests existed is checked for its marker only). Cost: sizes first (free), then every byte is read
    once, one thread per file: milliseconds for the tiny CPU model; for a 7B run with fp32 Adam state (~100 GB)
    expect about a minute at a few GB/s of filesystem bandwidth (sha256 itself runs ~1-2 GB/s per core)."""
    path = Path(path)
    try:
        meta = json.loads((path / COMPLETE_MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{COMPLETE_MARKER} is unreadable or not JSON: {_first_line(exc)}"
    if not isinstance(meta, dict):
        return f"{COMPLETE_MARKER} is not a JSON object"
    files = meta.get("files")
    if files is None:
        return None  # written before digests existed: nothing to compare against
    well_formed = isinstance(files, dict) and all(
        isinstance(w, dict) and isinstance(w.get("size"), int) and isinstance(w.get("sha256"), str) for w in files.values()
    )
    if not well_formed or not isinstance(meta.get("step"), int):
        return f"{COMPLETE_MARKER} is malformed (no step, or a file list without sizes and digests)"
    problems = []
    for name, want in files.items():
        try:
            size = (path / name).stat().st_size
        except OSError:
            problems.append(f"{name} is missing")
            continue
        if size != want["size"]:
            problems.append(f"{name} has {size} bytes, the save wrote {want['size']}")
    if not problems:
        names = sorted(files)
        for name, digest in zip(names, _digests(path, names), strict=True):
            if digest != files[name]["sha256"]:
                problems.append(f"{name} fails its sha256 check: its bytes changed after the save")
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(8 << 20):  # hashlib releases the GIL on large buffers: threads hash in parallel
            h.update(chunk)
    return h.hexdigest()


def _digests(folder: Path, names: list[str]) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        return list(pool.map(lambda n: _sha256(folder / n), names))


def _file_manifest(folder: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file under `folder` (the save's own files and every rank's shards)."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    return {n: {"size": (folder / n).stat().st_size, "sha256": d} for n, d in zip(names, _digests(folder, names), strict=True)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


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
        # Every rank's shards are closed before the barrier above, so (shared filesystem) the driver sees them all.
        # Hashing reads the checkpoint back once: the other ranks wait for it at the barrier below.
        meta["files"] = _file_manifest(tmp)
        _write_synced(tmp / COMPLETE_MARKER, json.dumps(meta))
        if final.exists():  # an older save of the same step (e.g. a re-run after resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(root)
        if keep_last > 0:
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(groups)
    return final


def load_checkpoint(path: str | Path, model, optimizer: torch.optim.Optimizer, groups: ParallelGroups) -> dict:
    """Collective: fill `model` and `optimizer` in place from `path` (written at any TP layout); returns the
    trainer state (RNG already restored). Digests are not checked here: `resolve_resume` did, on the driver."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    trainer_state = load_trainer_state(path)  # first: a bad file fails on every rank before any collective
    model_sharded = _model_sharded_state(model)
    megatron_optimizer = hasattr(optimizer, "sharded_state_dict")
    if megatron_optimizer:
        optim_sharded = optimizer.sharded_state_dict(model_sharded, is_loading=True)
    else:
        optim_sharded, _ = _optimizer_sharded_state(model_sharded, optimizer)
    loaded = dist_checkpointing.load({"model": model_sharded, "optimizer": optim_sharded}, str(path))
    model.load_state_dict(loaded["model"], strict=False)
    if megatron_optimizer:
        optimizer.load_sharded(loaded["optimizer"])
    else:
        _load_optimizer(optimizer, loaded["optimizer"], trainer_state["adam_step"])
    set_rng_state(trainer_state["rng"])
    return trainer_state


def _numpy_rng_globals() -> list:
    """What np.random.get_state() pickles to (a uint32 array): allowed for torch's weights-only unpickler."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_trainer_state(path: str | Path) -> dict:
    """trainer_state.pt, unpickled as plain data only (weights_only=True: a damaged or foreign file cannot run
    code); raises ValueError naming the file when it does not load."""
    file = Path(path) / TRAINER_STATE
    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            state = torch.load(file, weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's message advises weights_only=False: not for a damaged file
        detail = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()
        raise ValueError(f"{file} is not a trainer state ({detail[0] if detail else 'unpickling failed'})") from None
    except (OSError, EOFError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{file} is not a trainer state ({_first_line(exc)})") from None
    if not isinstance(state, dict) or "rng" not in state:
        raise ValueError(f"{file} is not a trainer state (no RNG states)")
    return state


def try_load_checkpoint(path: str | Path, model, optimizer, groups: ParallelGroups) -> tuple[dict | None, str | None]:
    """Collective `load_checkpoint` that every rank either passes or fails together: (trainer state, None), or
    (None, one line saying which rank failed how). Any exception counts (megatron's CheckpointException derives
    from BaseException). A failed load may have filled the model and optimizer in part: load another checkpoint.

    A rank that fails while the others wait inside one of the load's collectives leaves them there until the
    process group's timeout; `resolve_resume` verified every byte on the driver first, so such failures are
    rare (a checkpoint without digests, or one that does not match the model: e.g. another architecture)."""
    state, why = None, None
    try:
        state = load_checkpoint(path, model, optimizer, groups)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        why = str(exc).splitlines()[0][:300] if isinstance(exc, ValueError) else _first_line(exc)
    if groups.world_size > 1:
        whys = [None] * groups.world_size
        dist.all_gather_object(whys, why)
        failed = [(r, w) for r, w in enumerate(whys) if w is not None]
        why = f"rank {failed[0][0]}: {failed[0][1]}" if failed else None
    return (None, why) if why is not None else (state, None)


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


def checkpoint_root(cfg) -> Path:
    """Where the run's checkpoints live: checkpoint.dir, or OUTPUT_DIR/checkpoints (cfg: config.Config)."""
    return Path(cfg.checkpoint.dir or Path(cfg.run.output_dir) / "checkpoints")
