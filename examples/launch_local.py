"""Launch the tiny CPU run on 2 local torchrun processes (tensor parallel 2) through nemo-run, from Python.

Same as `dynamo-mega launch configs/tiny_cpu.yaml launch.executor=local launch.procs_per_node=2
parallel.tensor_parallel=2`. torchrun must be on PATH (activate the virtual environment first); nemo-run keeps
its records under $NEMORUN_HOME (default ~/.nemo_run).

    python examples/launch_local.py [--dry-run] [extra.key=value ...]
"""

from __future__ import annotations

import sys

from dynamo_mega.config import load_config
from dynamo_mega.launch import dry_run, launch

CONFIG = "configs/tiny_cpu.yaml"
OVERRIDES = ["launch.executor=local", "launch.procs_per_node=2", "parallel.tensor_parallel=2", "run.output_dir=runs/tiny_cpu_tp2"]


def main(argv: list[str]) -> int:
    extra = [a for a in argv if a != "--dry-run"]
    overrides = OVERRIDES + extra
    cfg = load_config(CONFIG, overrides, training=False)
    if "--dry-run" in argv:
        print(dry_run(cfg, CONFIG, overrides))
        return 0
    result = launch(cfg, CONFIG, overrides)
    print(f"experiment {result.experiment_id}: {result.state} (logs under {result.job_dir})")
    return 0 if result.succeeded else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
