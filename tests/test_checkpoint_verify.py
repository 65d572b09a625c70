"""Damaged checkpoints are found, named and skipped: every file's sha256 is recorded in COMPLETE at save time;
resume=auto checks them on the driver and falls back to the newest intact checkpoint, an explicit
checkpoint.resume path that is missing or damaged is a one-line ConfigError (exit 2 before anything starts),
and a load failure is agreed by every rank."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _gloo import run_gloo
from test_checkpoint import _build, _step

from dynamo_mega import checkpoint as ckpt
from dynamo_mega.config import ConfigError

pytestmark = pytest.mark.reliability  # the failure probes of docs/operations.md: pytest -m reliability

REPO = Path(__file__).resolve().parents[1]
OLD, NEW = ckpt.checkpoint_name(1), ckpt.checkpoint_name(2)


def _trainer_state(step: int) -> dict:
    """What train.trainer_state holds, with stand-in values."""
    plain = {"prompt_stats": {}, "sampler": {}, "scheduler": {}, "policy_version": step, "skipped_steps": 0}
    return {"step": step, "note": "hello", "epoch": 0, "summary": {}, "rl_seconds": 1.0, "engine_restarts": 0, **plain}


def _save_two(rank: int, world: int, root: str) -> None:
    groups, model, _, opt = _build(world, seed=7)
    for step in (1, 2):
        _step(model, opt, groups, seed=step)
        ckpt.save_checkpoint(root, step, model, opt, _trainer_state(step), groups)


def _start_rl_after_load_failure(rank: int, world: int, root: str, run_dir: str) -> tuple[int, str]:
    """train.start_rl on a Trainer whose resume point (chosen by setup) then fails to load on every rank."""
    from types import SimpleNamespace as NS

    from dynamo_mega.metrics import MetricsLogger
    from dynamo_mega.train import start_rl

    groups, model, _, opt = _build(world, seed=99)
    cfg = NS(checkpoint=NS(resume="auto", dir=root), run=NS(output_dir=run_dir))
    logger = MetricsLogger(Path(run_dir), tensorboard=False, progress=False, resume_step=2) if groups.is_driver else None
    ignore = NS(load_state_dict=lambda state: None)
    rollout = NS(push=lambda version: None, restarts=0, take_metrics=dict)
    t = NS(cfg=cfg, groups=groups, model=model, optimizer=opt, resume_path=Path(root) / NEW, logger=logger,
           run_dir=Path(run_dir), stats=ignore, scheduler=ignore, rollout=rollout, version=0, skipped_steps=0)
    step, *_ = start_rl(t, ignore)
    if logger is not None:
        logger.close()
    return step, str(t.resume_path)


def _try_load(rank: int, world: int, path: str) -> tuple[bool, str | None]:
    groups, model, _, opt = _build(world, seed=99)
    state, why = ckpt.try_load_checkpoint(path, model, opt, groups)
    return state is not None, why


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Two complete checkpoints written by 2 gloo ranks at TP=2 (one .distcp shard file per rank)."""
    root = tmp_path_factory.mktemp("verify") / "checkpoints"
    run_gloo(_save_two, 2, str(root))
    return root


@pytest.fixture
def root(saved, tmp_path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(saved, tmp_path / "checkpoints"))


def _overwrite_4k(path: Path) -> None:
    shard = sorted(path.glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 2)
        f.write(b"\x7f" * 4096)


def _truncate(path: Path) -> None:
    shard = sorted(path.glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)


def _append(path: Path) -> None:
    with open(sorted(path.glob("*.distcp"))[0], "ab") as f:
        f.write(b"\x00" * 16)


DAMAGE = {
    "4KiB_of_0x7f_in_distcp": (_overwrite_4k, "__0_0.distcp fails its sha256 check"),
    "truncated_distcp": (_truncate, "__0_0.distcp has"),
    "bytes_appended_to_distcp": (_append, "__0_0.distcp has"),
    "deleted_metadata_json": (lambda p: (p / "metadata.json").unlink(), "metadata.json is missing"),
    "garbage_trainer_state": (lambda p: (p / ckpt.TRAINER_STATE).write_bytes(b"\x7f" * 4096), "trainer_state.pt"),
    "garbage_complete": (lambda p: (p / ckpt.COMPLETE_MARKER).write_bytes(b"\x7f" * 64), "COMPLETE is unreadable"),
}


def test_save_records_a_digest_of_every_file(saved):
    for name in (OLD, NEW):
        meta = json.loads((saved / name / ckpt.COMPLETE_MARKER).read_text())
        on_disk = {p.name for p in (saved / name).iterdir() if p.name != ckpt.COMPLETE_MARKER}
        assert set(meta["files"]) == on_disk and {"__0_0.distcp", "__1_0.distcp", "metadata.json"} <= on_disk
        assert ckpt.verify_checkpoint(saved / name) is None


def test_verification_cost_on_the_tiny_checkpoint(saved):
    start = time.perf_counter()
    assert ckpt.verify_checkpoint(saved / NEW) is None
    elapsed = time.perf_counter() - start
    size = sum(p.stat().st_size for p in (saved / NEW).iterdir())
    print(f"verified {size / 2**20:.2f} MiB in {elapsed * 1e3:.1f} ms")
    assert elapsed < 5.0


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(root, damage, capsys):
    spoil, expected = DAMAGE[damage]
    spoil(root / NEW)
    assert ckpt.resolve_resume("auto", root) == root / OLD
    lines = capsys.readouterr().err.strip().splitlines()
    problem = ckpt.verify_checkpoint(root / NEW)
    assert problem is not None and expected in problem and "\n" not in problem
    assert lines == [f"dynamo-mega: checkpoint {root / NEW} is damaged ({problem}): resuming from {root / OLD}"]
    assert "weights_only=False" not in lines[0]


def test_every_checkpoint_damaged_is_one_line_config_error(root):
    _overwrite_4k(root / NEW)
    (root / OLD / "metadata.json").unlink()
    with pytest.raises(ConfigError) as err:
        ckpt.resolve_resume("auto", root)
    assert "\n" not in str(err.value) and OLD in str(err.value) and NEW in str(err.value)
    assert "checkpoint.resume=none" in str(err.value)


@pytest.mark.parametrize("damage", ["missing", "no_complete", "4KiB_of_0x7f_in_distcp", "garbage_complete"])
def test_broken_explicit_resume_path_is_one_line_config_error(root, damage):
    path = root / NEW
    if damage == "missing":
        path = root / "step_00000099"
    elif damage == "no_complete":
        (path / ckpt.COMPLETE_MARKER).unlink()
    else:
        DAMAGE[damage][0](path)
    with pytest.raises(ConfigError) as err:
        ckpt.resolve_resume(str(path), root)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"checkpoint.resume={path}: ")
    if damage == "4KiB_of_0x7f_in_distcp":
        assert "__0_0.distcp" in message  # the mismatch names the file


def test_garbage_trainer_state_fails_to_load_on_every_rank_without_unsafe_advice(root):
    """A checkpoint without digests (written before they existed) cannot be verified up front: its load
    failure is caught on every rank and reported as damage, never as torch's weights_only=False hint."""
    path = root / NEW
    meta = json.loads((path / ckpt.COMPLETE_MARKER).read_text())
    del meta["files"]
    (path / ckpt.COMPLETE_MARKER).write_text(json.dumps(meta))
    (path / ckpt.TRAINER_STATE).write_bytes(b"\x7f" * 4096)
    assert ckpt.verify_checkpoint(path) is None  # nothing to check it against
    results = run_gloo(_try_load, 2, str(path))
    for ok, why in results:
        assert not ok and "trainer_state.pt is not a trainer state" in why
        assert "weights_only" not in why and "\n" not in why
    assert run_gloo(_try_load, 2, str(root / OLD)) == [(True, None), (True, None)]


def test_older_than_skips_the_failed_checkpoint(saved):
    assert ckpt.resolve_resume("auto", saved, older_than=saved / NEW) == saved / OLD
    assert ckpt.resolve_resume("auto", saved, older_than=saved / OLD) is None


def test_start_rl_falls_back_together_when_the_chosen_checkpoint_fails_to_load(root, tmp_path):
    """The newest checkpoint passes verification (no digests: written before they existed) but its trainer
    state does not load: both ranks agree, resume from the previous one, and the driver cuts the logs there."""
    path = root / NEW
    meta = json.loads((path / ckpt.COMPLETE_MARKER).read_text())
    del meta["files"]
    (path / ckpt.COMPLETE_MARKER).write_text(json.dumps(meta))
    (path / ckpt.TRAINER_STATE).write_bytes(b"\x7f" * 4096)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [{"phase": "train", "step": s, "time": 0.0} for s in (1, 2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    results = run_gloo(_start_rl_after_load_failure, 2, str(root), str(run_dir))
    assert results == [(1, str(root / OLD))] * 2
    kept = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in kept] == [("train", 1), ("resume", 1)]


def test_cli_damaged_explicit_resume_exits_2_before_writing_the_run_folder(root, tmp_path):
    _overwrite_4k(root / NEW)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "dynamo_mega.cli", "train", "configs/tiny_cpu.yaml", f"run.output_dir={run_dir}",
           f"checkpoint.resume={root / NEW}", "run.progress=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dynamo-mega: error:")]
    assert len(errors) == 1 and "__0_0.distcp fails its sha256 check" in errors[0], proc.stderr[-3000:]
    assert not run_dir.exists()


def test_weights_only_trainer_state_keeps_the_rng_states(saved):
    state = ckpt.load_trainer_state(saved / NEW)
    assert state["step"] == 2 and state["note"] == "hello"
    assert isinstance(state["rng"]["torch"], torch.Tensor) and state["rng"]["numpy"][0] == "MT19937"
