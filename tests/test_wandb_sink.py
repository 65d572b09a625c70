"""The optional W&B sink, in offline mode (nothing leaves the machine): metrics reach the W&B run with one x
axis per phase, a resumed run continues the same W&B run id, and a missing wandb install is a clear error."""

from __future__ import annotations

import sys

import pytest

from dynamo_mega.metrics import MetricsLogger


def test_metrics_reach_the_wandb_run_and_resume_keeps_its_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from dynamo_mega.wandb_sink import WandbSink

    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = WandbSink(tmp_path, project="dynamo-mega-test", mode="offline", config={"optim": {"lr": 1e-4}})
    logger = MetricsLogger(tmp_path, tensorboard=False, progress=False, wandb=sink)
    logger.log(1, {"sft_loss": 2.0}, phase="warmup")
    logger.log(1, {"loss": 0.5, "reward_mean": 0.25, "note": "text is not a metric"}, phase="train")
    logger.log(2, {"loss": 0.25, "reward_mean": float("nan")}, phase="train")
    summary = dict(sink._run.summary)
    run_id = sink._run.id
    assert sink._run.config["optim"]["lr"] == 1e-4
    logger.close()
    assert summary["train/loss"] == 0.25 and summary["train/step"] == 2 and summary["warmup/sft_loss"] == 2.0
    assert summary["train/reward_mean"] == 0.25  # the non-finite value was not sent
    assert "train/note" not in summary
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}")), "no offline run directory for `wandb sync`"

    resumed = WandbSink(tmp_path, project="dynamo-mega-test", mode="offline", config={})
    assert resumed._run.id == run_id
    resumed.close()


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    from dynamo_mega.wandb_sink import WandbSink

    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if it were not installed
    with pytest.raises(RuntimeError, match=r"pip install -e \.\[wandb\]"):
        WandbSink(tmp_path, project="p", mode="offline", config={})


def test_config_rejects_an_unknown_wandb_mode():
    from dynamo_mega.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"run.wandb_mode: Invalid value 'cloud', expected one of \[online, offline\]"):
        load_config(None, ["run.wandb_mode=cloud"])
