"""Generation one step ahead of training (rollout.max_staleness=1) through train.train, with the deterministic
policy-sampling engine of tests/_policy_sampler.py: version tags, the staleness bound, the allocator's lag, and
an exact resume from a checkpoint saved while the next step's rollouts were in flight."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests._policy_sampler import run_tiny_train
from tests.test_golden_step import RL_OVERRIDES

STEPS = [*RL_OVERRIDES, "run.steps=4", "run.log_samples=64"]
ASYNC = [*STEPS, "rollout.max_staleness=1"]
EXACT = ("reward_mean", "samples", "staleness", "policy_version", "rollouts_generated")  # counts: exact
# Floats to round-off: torch's CPU kernels may split a reduction differently while the generating thread runs.
CLOSE = ("loss", "grad_norm")


def _same_step(got: dict, want: dict) -> None:
    assert {k: got[k] for k in EXACT} == {k: want[k] for k in EXACT}, want["step"]
    for key in CLOSE:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-8), (want["step"], key)


def _train_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r["phase"] == "train"]


def _samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("async")
    out = {}
    for name, overrides in (("sync", STEPS), ("async", [*ASYNC, "checkpoint.interval=2"])):
        out[name] = {"records": _train_records(run_tiny_train(root / name, overrides)), "dir": root / name}
    return out


def test_each_sample_is_tagged_with_its_version_and_never_older_than_the_bound(runs):
    sync, ahead = runs["sync"]["records"], runs["async"]["records"]
    assert [r["staleness"] for r in sync] == [0, 0, 0, 0]
    # Step 1's rollouts are generated before it trains; every later step trains on rollouts made one version back.
    assert [r["staleness"] for r in ahead] == [0, 1, 1, 1]
    _same_step(ahead[0], sync[0])  # the same first batch on the same weights
    for name in ("sync", "async"):
        trained_version = {r["step"]: r["policy_version"] - 1 for r in runs[name]["records"]}  # before the sync
        staleness = {r["step"]: r["staleness"] for r in runs[name]["records"]}
        samples = _samples(runs[name]["dir"])
        assert {s["step"] for s in samples} == {1, 2, 3, 4}
        for s in samples:
            assert s["policy_version"] == trained_version[s["step"]] - staleness[s["step"]], (name, s["step"])


def test_the_allocator_lags_one_more_version_behind_the_trainer_when_ahead(runs):
    """The allocation of step k+1 is planned from the outcomes of the batches collected so far (through step k's),
    made by the version that generated step k's batch. Synchronous: that version is one behind both the generator
    and the trainer of step k+1. Ahead: one behind its generator, two behind its trainer (from step 3; step 2's
    batch is made by the same weights as step 1's)."""
    sync, ahead = runs["sync"]["records"], runs["async"]["records"]
    assert "allocation_lag_generator" not in sync[0]  # nothing was known when step 1 was planned
    assert [(r["allocation_lag_generator"], r["allocation_lag_trainer"]) for r in sync[1:]] == [(1, 1)] * 3
    assert [(r["allocation_lag_generator"], r["allocation_lag_trainer"]) for r in ahead[1:]] == [(0, 1), (1, 2), (1, 2)]
    assert all(r["rollout_hidden_s"] >= 0 for r in ahead[:3]) and "rollout_hidden_s" not in ahead[3]
    for r in sync + ahead:  # the step's wall time covers what it waited for and what it ran
        assert r["time_step"] >= r["time_rollout_wait"] + r["time_train"] + r["time_sync"]


def test_resume_with_rollouts_in_flight_reproduces_the_uninterrupted_run(runs, tmp_path):
    """The step-2 checkpoint holds step 3's rollouts (generated during step 2): a run resumed from it trains on
    them, none lost, none drawn again, and reproduces steps 3 and 4 exactly."""
    full = runs["async"]
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full["dir"], resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_00000004")
    records = run_tiny_train(resumed_dir, [*ASYNC, "checkpoint.interval=2"])
    assert [r for r in records if r["phase"] == "resume"][0]["resumed_from_step"] == 2
    got = {r["step"]: r for r in _train_records(records)}
    for want in full["records"][2:]:
        _same_step(got[want["step"]], want)
    steps_3_4 = [(s["step"], s["prompt_id"], s["response"]) for s in _samples(resumed_dir) if s["step"] >= 3]
    assert steps_3_4 == [(s["step"], s["prompt_id"], s["response"]) for s in _samples(full["dir"]) if s["step"] >= 3]
    summary = json.loads((resumed_dir / "summary.json").read_text())
    assert summary["accuracy_after_rl"] == json.loads((full["dir"] / "summary.json").read_text())["accuracy_after_rl"]


def test_a_resume_with_a_lower_bound_drops_the_rollouts_generated_ahead(runs, tmp_path):
    """Resumed with rollout.max_staleness=0, the checkpoint's step-3 rollouts (one version old) are not trained
    on: step 3 generates afresh from the resumed weights."""
    resumed_dir = tmp_path / "resumed_sync"
    shutil.copytree(runs["async"]["dir"], resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_00000004")
    records = _train_records(run_tiny_train(resumed_dir, [*STEPS, "checkpoint.interval=2"]))
    assert [r["staleness"] for r in records if r["step"] >= 3] == [0, 0]


def test_an_engine_that_dies_while_generating_ahead_is_restarted_and_its_batch_generated_again(runs, tmp_path):
    """Generate calls: the two held-out evaluations before RL, step 1's batch, step 2's (during step 1), then step
    3's, generated during step 2: the engine dies there. Step 2 still trains and syncs (the sync restarts the
    engine), step 3's batch is generated again after it from the same prompts (synchronously: staleness 0), and the
    run goes on ahead from step 4."""
    records = _train_records(run_tiny_train(tmp_path / "dies", ASYNC, dies_at=5))
    assert [r["staleness"] for r in records] == [0, 1, 0, 1]
    assert [r["engine_restarts"] for r in records] == [0, 1, 1, 1]
    full = {r["step"]: r for r in runs["async"]["records"]}
    for r in records[:2]:  # before the death: the same run
        _same_step(r, full[r["step"]])
    assert [r["samples"] for r in records] == [32, 32, 32, 32]
