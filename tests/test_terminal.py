"""The terminal a person reads (dynamo_mega/console.py, metrics.ProgressLine, cli): third-party output goes to the
run's log file unless run.verbose, the trainer's lines, tracebacks and errors stay on the terminal. Routing moves file
descriptors, so each case runs in a fresh interpreter. A real run's terminal is checked in test_smoke_train.py
(test_terminal_shows_the_trainer_not_the_libraries), on the smoke run the suite already pays for."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Writes through every channel a library uses: C-level descriptors, Python warnings, logging (megatron's style and
# transformers' own handler), the original streams, a child process; before and after the run folder exists.
_NOISY = textwrap.dedent(
    """
    import logging, os, subprocess, sys, warnings
    from pathlib import Path
    from dynamo_mega import console

    def noise(tag):
        os.write(1, f"c-level stdout {tag}\\n".encode())
        os.write(2, f"c-level stderr {tag}\\n".encode())
        warnings.warn(f"python warning {tag}")
        logging.getLogger("megatron.core.test").warning(f"megatron warning {tag}")
        from transformers.utils import logging as hf_logging
        hf_logging.get_logger("transformers.test").warning(f"transformers warning {tag}")
        print(f"original stdout {tag}", file=sys.__stdout__, flush=True)
        subprocess.run([sys.executable, "-c", f"import sys; print('child {tag}'); print('child err {tag}', file=sys.stderr)"])

    run_dir, enabled = Path(sys.argv[1]), sys.argv[2] == "route"
    with console.third_party_to_log(enabled) as routed:
        print("trainer before")
        noise("before")
        buffer = routed.path if routed else None
        console.move_to_run_dir(run_dir, 0)
        assert buffer is None or not buffer.exists(), "the temporary buffer outlived the move"
        noise("after")
        print("trainer after")
        print("trainer error line", file=sys.stderr)
    print("trainer restored", flush=True)
    os.write(1, b"c-level restored\\n")
    """
)

NOISE = [
    "c-level stdout",
    "c-level stderr",
    "python warning",
    "megatron warning",
    "transformers warning",
    "original stdout",
    "child",
    "child err",
]


def _run(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the routing's temporary buffer lands where the test can see it
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_library_output_goes_to_the_run_log_and_the_trainer_keeps_the_terminal(tmp_path):
    proc = _run(_NOISY, str(tmp_path / "run"), "route", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["trainer before", "trainer after", "trainer restored", "c-level restored"]
    assert proc.stderr.splitlines() == ["trainer error line"]
    log = (tmp_path / "run" / "logs" / "third_party.log").read_text()
    for noise in NOISE:
        for tag in ("before", "after"):  # buffered before the run folder existed, then written there directly
            assert f"{noise} {tag}" in log, (noise, tag, log)
    assert not list(tmp_path.glob("dynamo-mega-*.log")), "the temporary buffer was left behind"


def test_verbose_changes_nothing(tmp_path):
    proc = _run(_NOISY, str(tmp_path / "run"), "verbose", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    both = proc.stdout + proc.stderr
    for line in (
        "c-level stdout before",
        "python warning after",
        "megatron warning before",
        "child err after",
        "transformers warning after",
        "trainer after",
    ):
        assert line in both, (line, both)
    assert not (tmp_path / "run" / "logs").exists()


# The CLI with a stand-in for train(): noise, then the failure named by argv[1], before or after the run folder.
_CLI = textwrap.dedent(
    """
    import os, sys, types, warnings
    from dynamo_mega import console
    from dynamo_mega.cli import main

    def fake_train(cfg):
        os.write(2, b"library noise before\\n")
        warnings.warn("library warning")
        if sys.argv[1].endswith("after"):
            console.move_to_run_dir(cfg.run.output_dir, 0)
            os.write(2, b"library noise after\\n")
        if sys.argv[1].startswith("crash"):
            raise RuntimeError("boom in the trainer")
        raise ValueError("data.train_path=x.jsonl: line 3: empty prompt")

    sys.modules["dynamo_mega.train"] = types.SimpleNamespace(train=fake_train)  # the CLI imports it while routed
    sys.exit(main(["train", "configs/tiny_cpu.yaml", f"run.output_dir={sys.argv[2]}"]))
    """
)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_crash_reaches_the_terminal_with_the_log_path(tmp_path, when):
    run_dir = tmp_path / "run"
    proc = _run(_CLI, f"crash_{when}", str(run_dir), tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "library noise" not in proc.stdout + proc.stderr and "library warning" not in proc.stdout + proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr and "RuntimeError: boom in the trainer" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dynamo-mega: failed; the libraries' output of this run is in "), proc.stderr
    log = Path(last.rsplit(" ", 1)[1])
    # Before the run folder existed the buffer is kept where it is; afterwards the log is in the run folder.
    if when == "after":
        assert log == run_dir / "logs" / "third_party.log"
    else:
        assert log.parent == tmp_path and not run_dir.exists()
    assert "library noise before" in log.read_text() and "library warning" in log.read_text()


def test_a_user_error_is_one_line_and_leaves_no_buffer(tmp_path):
    proc = _run(_CLI, "user_before", str(tmp_path / "run"), tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["dynamo-mega: error: data.train_path=x.jsonl: line 3: empty prompt"]
    assert not list(tmp_path.glob("dynamo-mega-*.log")) and not (tmp_path / "run").exists()


def test_progress_line_reads_warmup_then_rl(capsys):
    from dynamo_mega.metrics import ProgressLine, milestone

    line = ProgressLine(rl_steps=175, warmup_steps=600, warmup_target=0.13)
    try:
        line.update("init_eval", 0, {"accuracy": 0.01})
        line.update("warmup", 5, {"sft_loss": 1.9, "grad_norm": 2.0})
        task = line._progress.tasks[0]
        assert (task.description, task.total, task.completed) == ("warm-up", None, 5)  # it may stop early: no ETA
        eta = next(c for c in line._progress.columns if type(c).__name__ == "_EtaColumn")
        assert eta.render(task).plain == ""
        assert line.info() == "loss 1.900  held-out 0.010, stops at 0.130 or step 600"
        line.update("eval", 0, {"accuracy": 0.144})  # before RL: the bar now counts RL steps
        line.update(
            "train", 3, {"reward_mean": 0.25, "time_rollout": 1.0, "time_reward": 0.25, "time_train": 2.0, "time_sync": 0.5}
        )
        task = line._progress.tasks[0]
        assert (task.description, task.total, task.completed) == ("RL", 175, 3)
        assert eta.render(task).plain.startswith("eta ")
        assert line.info() == "reward 0.250  held-out 0.144  3.8 s/step: gen 1.0, reward 0.2, train 2.0, refit 0.5"
    finally:
        line.close()
    # Without a terminal (pytest captures stdout) the bar's text comes as lines, one per RL step and warm-up eval.
    assert capsys.readouterr().out.splitlines() == [
        "dynamo-mega: RL step 3/175: reward 0.250  held-out 0.144  3.8 s/step: gen 1.0, reward 0.2, train 2.0, refit 0.5"
    ]
    assert milestone("eval", 0, {"accuracy": 0.144}) == "dynamo-mega: held-out accuracy 0.144 before RL"
    assert milestone("eval", 10, {"accuracy": 0.2}) == "dynamo-mega: held-out accuracy 0.200 at RL step 10"
    assert milestone("warmup_eval", 5, {"accuracy": 0.2}) is None and milestone("train", 3, {"reward_mean": 1}) is None


def test_summary_line():
    from dynamo_mega.cli import summary_line
    from dynamo_mega.config import RunConfig

    run = RunConfig(output_dir="runs/tiny_cpu", steps=175, max_minutes=8)
    summary = {"accuracy_before_rl": 0.144, "accuracy_after_rl": 0.48, "rl_steps": 175, "wall_s": 252.4}
    assert summary_line(summary, run) == (
        "dynamo-mega: done in 4m12s: held-out accuracy 0.144 -> 0.480 after 175 RL steps; plot: runs/tiny_cpu/plot.png"
    )
    assert "after 83 RL steps of 175 (run.max_minutes=8 reached);" in summary_line({**summary, "rl_steps": 83}, run)
    stopped = summary_line({**summary, "rl_steps": 83, "stopped_by": "SIGTERM"}, run)
    assert "after 83 RL steps (stopped by SIGTERM);" in stopped
