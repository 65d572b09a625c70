"""Run metrics: one JSON line per record in metrics.jsonl, TensorBoard scalars, optionally W&B, a rich progress
bar, and a PNG dashboard per step (`plot_run`). Only the driver rank logs."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

# Phases logged before RL starts; their step counters are their own, so a resume never rewinds them.
PRE_RL_PHASES = ("warmup", "warmup_eval", "init_eval")


def truncate_jsonl(path: Path, keep) -> None:
    """Rewrite a JSONL file keeping the records for which keep(record) is true (atomically)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class MetricsLogger:
    """`resume_step`: None starts the files afresh; an RL step number keeps what was logged up to that step
    (records of a crashed run's later steps are dropped, so a resumed run's log reads like an uninterrupted one)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard: bool = True,
        progress_total: int | None = None,
        warmup_total: int = 0,
        warmup_target: float = 1.0,
        progress: bool = True,
        resume_step: int | None = None,
        wandb=None,
    ):
        """`progress_total` / `warmup_total`: RL / most supervised warm-up steps of the progress bar (`progress`),
        `warmup_target`: the held-out accuracy that ends the warm-up early;
        `wandb`: an optional sink with log(step, phase, record) and close() (dynamo_mega/wandb_sink.py)."""
        self._wandb = wandb
        self.path = run_dir / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        else:
            truncate_jsonl(self.path, lambda r: r["phase"] in PRE_RL_PHASES or r["step"] <= resume_step)
        self._file = self.path.open("a")
        self._tb = {}
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Two writers, so that purging RL steps after a resume cannot touch the warm-up curves.
            purge = None if resume_step is None else resume_step + 1
            self._tb = {
                "pre_rl": SummaryWriter(str(run_dir / "tensorboard" / "warmup")),
                "rl": SummaryWriter(str(run_dir / "tensorboard" / "rl"), purge_step=purge),
            }
        self._progress = ProgressLine(progress_total, warmup_total, warmup_target) if progress and progress_total else None

    def log(self, step: int, record: dict, *, phase: str = "train") -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in record.items()}
        self._file.write(json.dumps({"phase": phase, "step": step, "time": time.time(), **clean}) + "\n")
        self._file.flush()
        if self._tb:
            writer = self._tb["pre_rl" if phase in PRE_RL_PHASES else "rl"]
            for key, value in clean.items():
                if isinstance(value, float) and math.isfinite(value):
                    writer.add_scalar(f"{phase}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log(step, phase, clean)
        line = milestone(phase, step, clean)
        if line is not None:
            print(line, flush=True)  # above the progress bar (rich redirects stdout while it draws)
        if self._progress is not None:
            self._progress.update(phase, step, clean)

    def close(self) -> None:
        """Idempotent: the trainer closes the logger at the end of a run and again, harmlessly, on its way out."""
        if self._file.closed:
            return
        if self._progress is not None:
            self._progress.close()
        for writer in self._tb.values():
            writer.close()
        if self._wandb is not None:
            self._wandb.close()
        self._file.close()


def milestone(phase: str, step: int, record: dict) -> str | None:
    """The trainer's line for a record worth keeping on the terminal after the bar has moved on: held-out
    accuracy at the start, before RL and at each RL evaluation. None for every other record."""
    if "accuracy" not in record:
        return None
    if phase == "init_eval":
        return f"dynamo-mega: held-out accuracy {record['accuracy']:.3f} at the start"
    if phase == "eval":
        when = "before RL" if step == 0 else f"at RL step {step}"
        return f"dynamo-mega: held-out accuracy {record['accuracy']:.3f} {when}"
    return None


class ProgressLine:
    """The run as one rich progress bar: supervised warm-up steps while the warm-up runs, then RL steps, with the
    latest train reward, held-out accuracy and the last step's time split (generate, reward, train, refit).
    Drawn by the driver only (MetricsLogger). Without a terminal (output piped to a file, a Slurm log) a redrawn
    bar has no meaning: the same text is printed as one line per RL step and per warm-up evaluation instead."""

    def __init__(self, rl_steps: int, warmup_steps: int = 0, warmup_target: float = 1.0):
        """warmup_steps: the warm-up's most steps (0: no warm-up); it stops early at held-out `warmup_target`, so
        its bar has no total (an ETA to the most steps would mislead)."""
        self._rl_steps, self._in_rl = rl_steps, warmup_steps == 0
        self._warmup_steps, self._warmup_target = warmup_steps, warmup_target
        self._held_out: float | None = None  # the latest held-out accuracy, whichever phase measured it
        self._warmup_loss: float | None = None
        self._rl_record: dict | None = None  # the latest RL step's metrics
        self._plain = not Console().is_terminal
        self._progress = Progress(  # fits 120 columns: the run's wall time is in the final line instead
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=12),
            MofNCompleteColumn(),
            _EtaColumn(),
            TextColumn("{task.fields[info]}", markup=False),
            disable=self._plain,
        )
        self._progress.start()
        self._task = self._progress.add_task("RL" if self._in_rl else "warm-up", total=rl_steps if self._in_rl else None, info="")

    def update(self, phase: str, step: int, record: dict) -> None:
        if phase in ("init_eval", "warmup_eval", "eval") and "accuracy" in record:
            self._held_out = record["accuracy"]
        if phase in ("eval", "train", "resume") and not self._in_rl:  # the warm-up is over: the bar counts RL steps
            self._in_rl = True
            self._progress.reset(self._task, total=self._rl_steps, description="RL")
        completed = step if phase in ("warmup", "train", "resume") else None
        if phase == "warmup":
            self._warmup_loss = record.get("sft_loss", self._warmup_loss)
        elif phase == "train":
            self._rl_record = record
        self._progress.update(self._task, completed=completed, info=self.info())
        if self._plain and phase in ("train", "warmup_eval"):
            of = f"/{self._rl_steps}" if self._in_rl else ""
            print(f"dynamo-mega: {'RL' if self._in_rl else 'warm-up'} step {step}{of}: {self.info()}", flush=True)

    def info(self) -> str:
        """The text after the bar."""
        held_out = "held-out -" if self._held_out is None else f"held-out {self._held_out:.3f}"
        if not self._in_rl:
            until = f"stops at {self._warmup_target:.3f} or step {self._warmup_steps}"
            return f"{held_out}, {until}" if self._warmup_loss is None else f"loss {self._warmup_loss:.3f}  {held_out}, {until}"
        if self._rl_record is None:
            return held_out
        r = self._rl_record
        split = [(label, r.get(key, 0.0)) for label, key in _TIME_SPLIT]
        seconds = ", ".join(f"{label} {s:.1f}" for label, s in split)
        return f"reward {r.get('reward_mean', float('nan')):.3f}  {held_out}  {sum(s for _, s in split):.1f} s/step: {seconds}"

    def close(self) -> None:
        self._progress.stop()


class _EtaColumn(TimeRemainingColumn):
    """ "eta 0:03:10", or nothing while the total is unknown (the warm-up, which may stop early)."""

    def render(self, task) -> Text:
        return Text("") if task.total is None else Text.assemble("eta ", super().render(task))


_TIME_SPLIT = (("gen", "time_rollout"), ("reward", "time_reward"), ("train", "time_train"), ("refit", "time_sync"))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# (title, [(metric key, label)]) per panel of the run dashboard; train-phase metrics unless the key says eval.
_PANELS = [
    ("reward and held-out accuracy", [("reward_mean", "train reward (mean)"), ("eval:accuracy", "held-out accuracy (greedy)")]),
    ("policy", [("entropy", "entropy"), ("approx_kl", "KL(old || new), k3"), ("logprob_mismatch", "|trainer - vLLM| log-prob")]),
    ("clipping", [("clipfrac_low", "clip low"), ("clipfrac_high", "clip high"), ("clipfrac_dual", "dual clip")]),
    ("optimizer", [("grad_norm", "grad norm (before clipping)"), ("skipped_steps_total", "skipped steps")]),
    (
        "time per step (s)",
        [("time_rollout", "rollout"), ("time_reward", "reward"), ("time_train", "train"), ("time_sync", "sync")],
    ),
    (
        "allocation",
        [
            ("n_min", "n min"),
            ("n_median", "n median"),
            ("n_max", "n max"),
            ("frac_budget_all_wrong", "budget share all-wrong"),
            ("frac_budget_all_correct", "budget share all-correct"),
        ],
    ),
]


def plot_run(run_dir: Path) -> Path:
    """Render the run dashboard (reward/accuracy, policy, clipping, optimizer, time split, allocation) per RL
    step into RUN_DIR/plot.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    by_phase = {"train": [r for r in records if r["phase"] == "train"], "eval": [r for r in records if r["phase"] == "eval"]}
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for ax, (title, series) in zip(axes.flat, _PANELS, strict=True):
        for key, label in series:
            phase, _, name = key.rpartition(":")
            rows = [r for r in by_phase[phase or "train"] if name in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[name] for r in rows], "o-" if phase else "-", label=label, ms=3)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    axes.flat[0].set_ylim(-0.02, 1.02)
    fig.suptitle(f"{Path(run_dir).name}")
    out = Path(run_dir) / "plot.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
