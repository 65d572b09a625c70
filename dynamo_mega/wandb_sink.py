"""Weights & Biases as an optional third metrics sink (next to metrics.jsonl and TensorBoard).

On when `run.wandb_project` is set. `run.wandb_mode=offline` writes the run under RUN_DIR/wandb for a later
`wandb sync` (clusters without internet). The W&B run id is kept in RUN_DIR/wandb_run_id, so a resumed
training run continues the same W&B run. W&B cannot take back points already sent: after a crash, the steps
between the last checkpoint and the crash are logged again by the resumed run and W&B keeps its first values
for them (metrics.jsonl and TensorBoard are rewound exactly; they are the record of truth).
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path


class WandbSink:
    @classmethod
    def from_config(cls, cfg, run_dir: Path) -> WandbSink | None:
        """The sink of a training run's config, or None when run.wandb_project is unset."""
        if not cfg.run.wandb_project:
            return None
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.structured(cfg))
        return cls(run_dir, project=cfg.run.wandb_project, mode=cfg.run.wandb_mode, config=config)

    def __init__(self, run_dir: Path, *, project: str, mode: str, config: dict, name: str | None = None):
        try:
            import wandb
        except ImportError:
            raise RuntimeError(
                "run.wandb_project is set but wandb is not installed: `pip install -e .[wandb]` (or unset run.wandb_project)"
            ) from None
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id)
        self._run = wandb.init(
            project=project, name=name or run_dir.name, id=run_id, resume="allow", dir=str(run_dir), mode=mode, config=config
        )
        self._phases: set[str] = set()

    def log(self, step: int, phase: str, record: dict) -> None:
        # Each phase has its own step counter (warm-up steps, RL steps), so each gets its own x axis instead of
        # W&B's global step, which must only grow.
        if phase not in self._phases:
            self._run.define_metric(f"{phase}/step")
            self._run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
            self._phases.add(phase)
        scalars = {f"{phase}/{k}": v for k, v in record.items() if isinstance(v, float) and math.isfinite(v)}
        self._run.log({**scalars, f"{phase}/step": step})

    def close(self) -> None:
        self._run.finish()
