"""`dynamo-mega launch` through nemo-run: a real 2-process torchrun launch of the tiny run on this machine, a
failing job that must surface as a failed launch (nemo-run's own launcher exits 0 either way), the local dry
run, and the Slurm sbatch script against a checked-in golden file.

Slurm is tested with a golden script, not a live cluster: a single-node slurmctld + slurmd + munge needs root
(munge key ownership, slurmd's cgroup/privilege setup) and the Debian packages, neither available to tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_mega.config import load_config

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "slurm_qwen2.5_32b.sbatch"
TINY_JOB = [
    "launch.executor=local",
    "launch.procs_per_node=2",
    "parallel.tensor_parallel=2",
    "run.steps=2",
    "run.eval_every=0",
    "run.eval_prompts=32",
    "run.progress=false",
    "rollout.prompts_per_step=8",
    "rollout.samples_per_prompt=4",
    "allocation.n_low=2",
    "warmup.enabled=false",
    "data.num_train=100",
    "data.num_eval=32",
]


def _launch_cli(args: list[str], nemorun_home: Path) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process (nemo-run's git packager reads stdin: give it none)."""
    env = dict(os.environ, NEMORUN_HOME=str(nemorun_home), PYTHONPATH=str(REPO))
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # torchrun from this environment
    cmd = [sys.executable, "-m", "dynamo_mega.cli", "launch", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)


def test_local_launch_trains_the_tiny_run_on_two_ranks(tmp_path):
    out = tmp_path / "run"
    proc = _launch_cli(["configs/tiny_cpu.yaml", *TINY_JOB, f"run.output_dir={out}"], tmp_path / "nemo_run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["state"] == "SUCCEEDED"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rl_steps"] == 2
    # torchrun kept one log folder per local rank: .../torchelastic/<role>/<run>/attempt_0/{0,1}/
    rank_dirs = {p.parent.name for p in Path(result["job_dir"]).rglob("attempt_0/*/stdout.log")}
    assert rank_dirs == {"0", "1"}


def test_failed_job_is_a_failed_launch(tmp_path):
    # Loads for launching, but PP=2 does not divide the tiny model's 3 layers: every rank exits 2, so must the launch.
    proc = _launch_cli(["configs/tiny_cpu.yaml", *TINY_JOB, "parallel.pipeline_parallel=2"], tmp_path / "nemo_run")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["state"] == "FAILED"
    assert "the job FAILED" in proc.stderr


@pytest.fixture
def nemorun_home(tmp_path):
    import nemo_run.config

    before = nemo_run.config.get_nemorun_home()
    nemo_run.config.set_nemorun_home(str(tmp_path / "nemo_run"))
    yield tmp_path
    nemo_run.config.set_nemorun_home(before)


def test_local_dry_run_prints_the_torchrun_command(nemorun_home):
    from dynamo_mega.launch import dry_run

    cfg = load_config("configs/tiny_cpu.yaml", TINY_JOB, training=False)
    text = dry_run(cfg, "configs/tiny_cpu.yaml", TINY_JOB)
    assert re.search(r"torchrun .*--nnodes 1 --nproc-per-node 2 .*-m dynamo_mega\.cli train configs/tiny_cpu\.yaml", text)
    assert "launch.procs_per_node=2 parallel.tensor_parallel=2" in text and "TOKENIZERS_PARALLELISM=false" in text


def _normalise(script: str, job_dir: Path) -> str:
    script = script.replace(str(job_dir), "<JOB_DIR>")
    script = re.sub(r"dynamo-mega_\d+", "<EXPERIMENT_ID>", script)
    return re.sub(r"--rdzv-id \d+", "--rdzv-id <RDZV_ID>", script)


def test_slurm_sbatch_script_matches_golden(tmp_path):
    job_dir = tmp_path / "slurm_jobs"
    overrides = ["launch.account=rl", "launch.partition=batch", f"launch.job_dir={job_dir}"]
    proc = _launch_cli(["configs/qwen2.5_32b.yaml", *overrides, "--dry-run"], tmp_path / "nemo_run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = _normalise(proc.stdout, job_dir)
    if os.environ.get("DYNAMO_MEGA_UPDATE_GOLDEN"):
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text(), "sbatch script changed; rerun with DYNAMO_MEGA_UPDATE_GOLDEN=1 if intended"
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --time=96:00:00", "export VLLM_USE_V1=1"):
        assert line in script
    assert "--container-image nvcr.io/nvidia/pytorch:25.06-py3" in script and "--container-mounts /lustre:/lustre" in script
    assert "torchrun --rdzv-backend c10d" in script and "--nnodes 4 --nproc-per-node 8" in script
    assert "-m dynamo_mega.cli train configs/qwen2.5_32b.yaml launch.account=rl" in script


def test_slurm_asks_for_the_rollout_gpus_of_a_disaggregated_run(tmp_path):
    job_dir = tmp_path / "slurm_jobs"
    overrides = ["launch.account=rl", "launch.partition=batch", f"launch.job_dir={job_dir}"]
    overrides += ["rollout.colocated=false", "rollout.dedicated_gpus_per_node=4"]
    proc = _launch_cli(["configs/qwen2.5_32b.yaml", *overrides, "--dry-run"], tmp_path / "nemo_run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "#SBATCH --gpus-per-node=12" in proc.stdout and "--nproc-per-node 8" in proc.stdout
