"""Submit a recipe to Slurm through nemo-run (sbatch + pyxis container + torchrun on every node), from Python.

Same as `dynamo-mega launch configs/qwen2.5_32b.yaml launch.account=ACCOUNT launch.partition=PARTITION`.
Run it on a login node (sbatch on PATH) or set launch.ssh_host=LOGIN_NODE launch.ssh_user=USER to submit over SSH;
launch.job_dir must be on a filesystem the compute nodes see. nemo-run ships the repository at HEAD with the job.

    python examples/launch_slurm.py configs/qwen2.5_32b.yaml launch.account=rl launch.partition=batch --dry-run
"""

from __future__ import annotations

import sys

from dynamo_mega.config import load_config
from dynamo_mega.launch import dry_run, launch


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    config, overrides = argv[0], [a for a in argv[1:] if a != "--dry-run"]
    cfg = load_config(config, overrides + ["launch.executor=slurm"], training=False)
    if "--dry-run" in argv:
        print(dry_run(cfg, config, overrides))
        return 0
    result = launch(cfg, config, overrides)
    print(f"experiment {result.experiment_id}: {result.state}; job records under {result.job_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
