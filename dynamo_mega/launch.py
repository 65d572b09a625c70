"""`dynamo-mega launch`: run `dynamo-mega train CONFIG ...` under torchrun through a nemo-run experiment.

The `launch` section of the config picks the executor:
- local: nemo-run's LocalExecutor with its torchrun launcher, `procs_per_node` processes on this machine;
  waits for the job and returns its final state.
- slurm: nemo-run's SlurmExecutor (nodes, GPUs per node, container image + mounts, time limit, env), submitted
  with sbatch on this machine (LocalTunnel) or through SSH to a login node; the repository at HEAD travels with
  the job (nemo-run's GitArchivePackager) and the job runs in it. Returns once the job is queued.

nemo-run's launcher does not fail when the job fails, so the final state is read back from the experiment's
record (`Experiment.from_id(...).status()`) and a failed job is a failed launch (the CLI exits 1).
`dry_run` renders the exact commands (the torchrun command line, or the whole sbatch script) without running.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from dataclasses import dataclass

from dynamo_mega.config import Config, LaunchConfig

# Environment every rank gets on top of launch.env: our CPU fallbacks keep threads polite on shared nodes.
BASE_ENV = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


@dataclass
class LaunchResult:
    experiment_id: str
    state: str  # nemo-run/torchx AppState name: SUCCEEDED, FAILED, PENDING, RUNNING, ...
    job_dir: str  # where nemo-run keeps this job's logs and records

    @property
    def succeeded(self) -> bool:
        return self.state == "SUCCEEDED"


def build_executor(la: LaunchConfig, rollout_gpus_per_node: int = 0):
    """The nemo-run executor the `launch` section describes (torchrun launcher in both cases): one torchrun process
    per training GPU, and on Slurm `rollout_gpus_per_node` more GPUs per node for disaggregated engines."""
    import nemo_run as run

    env = {**BASE_ENV, **la.env}
    if la.executor == "local":
        return run.LocalExecutor(ntasks_per_node=la.procs_per_node, nodes=1, launcher="torchrun", env_vars=env)
    if la.ssh_host:
        tunnel = run.SSHTunnel(host=la.ssh_host, user=la.ssh_user or "", job_dir=la.job_dir)
    else:
        tunnel = run.LocalTunnel(job_dir=la.job_dir)
    return run.SlurmExecutor(
        account=la.account or "",
        partition=la.partition,
        nodes=la.nodes,
        ntasks_per_node=la.procs_per_node,
        gpus_per_node=la.procs_per_node + rollout_gpus_per_node,
        time=la.time,
        container_image=la.container_image,
        container_mounts=list(la.container_mounts),
        env_vars=env,
        tunnel=tunnel,
        launcher="torchrun",
        packager=run.GitArchivePackager(),
    )


def train_script(config_path: str, overrides: list[str]):
    """`python -m dynamo_mega.cli train CONFIG OVERRIDES...` as a nemo-run Script (torchrun prepends itself)."""
    import nemo_run as run

    return run.Script(path="dynamo_mega.cli", m=True, entrypoint="python", args=["train", config_path, *overrides])


def _experiment(cfg: Config, config_path: str, overrides: list[str], quiet: bool = False):
    import nemo_run as run

    rollout_gpus = 0 if cfg.rollout.colocated else cfg.rollout.dedicated_gpus_per_node
    executor = build_executor(cfg.launch, rollout_gpus)
    exp = run.Experiment(cfg.launch.experiment, executor=executor, log_level="ERROR" if quiet else "WARN", clean_mode=quiet)
    return exp, train_script(config_path, overrides)


def dry_run(cfg: Config, config_path: str, overrides: list[str]) -> str:
    """The exact commands nemo-run would run: the local torchrun command line, or the Slurm sbatch script."""
    # stdout carries only the commands: nemo-run's console notes go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        exp, script = _experiment(cfg, config_path, overrides, quiet=True)
        with exp:
            exp.add(script, name="train")
            exp.dryrun(log=False)
            # nemo-run keeps the scheduler request of a dry run on the job (no public accessor in 0.11).
            request = exp.jobs[0]._dryrun_info.request
    if hasattr(request, "materialize"):  # Slurm: the sbatch script
        return request.materialize()
    ours = {**BASE_ENV, **cfg.launch.env}
    lines = []
    for replicas in request.role_params.values():
        for replica in replicas:
            env = [f"{k}={shlex.quote(v)}" for k, v in sorted(replica.env.items()) if k in ours]
            lines.append(" ".join([f"cd {shlex.quote(replica.cwd or '.')} &&", *env, shlex.join(replica.args)]))
    return "\n".join(lines)


def launch(cfg: Config, config_path: str, overrides: list[str]) -> LaunchResult:
    """Run (local: to completion) or submit (slurm) the training job; the state comes from nemo-run's record."""
    import nemo_run as run

    exp, script = _experiment(cfg, config_path, overrides)
    with exp:
        exp.add(script, name="train")
        exp.run(detach=cfg.launch.executor == "slurm")
        exp_id = exp._id
    status = run.Experiment.from_id(exp_id).status(return_dict=True) or {}
    if "train" not in status:
        raise RuntimeError(f"nemo-run has no record of the job in experiment {exp_id}")
    job = status["train"]
    return LaunchResult(exp_id, _state_name(job["status"]), job["local_dir"])


def _state_name(state) -> str:
    """torchx AppState (an enum whose str() is e.g. 'FAILED') or its string."""
    return getattr(state, "name", str(state)).split(" ")[0]
