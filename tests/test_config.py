"""Config loading: YAML + dotted overrides into typed dataclasses, and one-line errors for user mistakes.
The CLI turns them into exit code 2 with nothing written to the run directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_mega.config import Config, ConfigError, load_config, to_yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def test_tiny_config_loads_with_overrides():
    cfg = load_config(TINY, ["run.steps=5", "rollout.temperature=0.5", "parallel.tensor_parallel=2"])
    assert isinstance(cfg, Config)
    assert cfg.run.steps == 5 and cfg.rollout.temperature == 0.5 and cfg.parallel.tensor_parallel == 2
    assert cfg.model.hidden_size == 128  # from the YAML file
    assert cfg.algo.eps_high == 0.28  # documented default (clip-higher)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TINY, ["run.steps=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["run.stepz=3"], "stepz"),
        (["nosection.x=1"], "nosection"),
        (["run.steps=many"], "run.steps"),
        (["rollout.temperature=hot"], "rollout.temperature"),
        (["parallel.tensor_parallel=3"], "does not divide model.num_attention_heads"),
        (["parallel.pipeline_parallel=2"], "parallel.pipeline_parallel=2 does not divide model.num_layers=3"),
        (["parallel.pipeline_parallel=0"], "parallel.pipeline_parallel=0 must be >= 1"),
        (["modulation.scope=everywhere"], "modulation.scope"),
        (["run.steps"], "section.key=value"),
        # a budget at a bound forces every n_i to it: allocation would silently be uniform GRPO
        (["allocation.mode=optimal", "allocation.n_low=8", "rollout.samples_per_prompt=8"], "no room to reallocate"),
        (["allocation.mode=probing", "allocation.n_high=8", "rollout.samples_per_prompt=8"], "no room to reallocate"),
        (["allocation.mode=greedy"], "allocation.mode"),
        (["allocation.dapo_max_rounds=0"], "dapo_max_rounds"),
        (["data.levels=[3x9,two]"], "data.levels entry 'two'"),
    ],
)
def test_bad_overrides_name_the_problem(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_pipeline_parallel_that_divides_the_layers_is_accepted():
    assert load_config(TINY, ["parallel.pipeline_parallel=2", "model.num_layers=4"]).parallel.pipeline_parallel == 2


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(typo)


@pytest.mark.parametrize(
    "args",
    [
        ["missing.yaml"],
        [str(TINY), "run.unknown_key=1"],
        [str(TINY), "run.steps=abc"],
        [str(TINY), "parallel.tensor_parallel=3"],
    ],
)
def test_cli_exits_2_and_writes_nothing(tmp_path, args):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "dynamo_mega.cli", "train", *args, f"run.output_dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dynamo-mega: error:")]
    assert len(lines) == 1, proc.stderr
    assert not run_dir.exists()


def test_ipc_weight_transport_needs_a_gpu():
    import torch

    from dynamo_mega.config import ConfigError, load_config

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="rollout.weight_transport=ipc shares GPU memory, so it needs a GPU"):
        load_config(None, ["rollout.weight_transport=ipc"])
    expected = r"rollout.weight_transport: Invalid value 'nfs', expected one of \[rpc, ipc, broadcast\]"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["rollout.weight_transport=nfs"])


def test_built_in_defaults_leave_room_to_reallocate():
    """The defaults alone must not make allocation a no-op (samples_per_prompt strictly inside the bounds)."""
    cfg = load_config(None, [])
    al, r = cfg.allocation, cfg.rollout
    assert al.mode != "uniform" and al.n_low < r.samples_per_prompt < al.n_high


@pytest.mark.parametrize(
    ("world", "overrides", "needle"),
    [
        (2, ["rollout.vllm_tensor_parallel=4"], "rollout.vllm_tensor_parallel=4 must divide the 2 ranks"),
        (6, ["rollout.vllm_tensor_parallel=4"], "use one of [1, 2, 3, 6]"),
        (2, ["rollout.weight_transport=broadcast"], "this layout makes 2 rollout replicas: use weight_transport=rpc"),
        (2, ["rollout.colocated=false"], "rollout.colocated=false needs rollout.dedicated_gpus_per_node"),
        (2, ["rollout.dedicated_gpus_per_node=2"], "rollout.dedicated_gpus_per_node=2 needs rollout.colocated=false"),
        (2, ["rollout.colocated=false", "rollout.dedicated_gpus_per_node=6", "rollout.vllm_tensor_parallel=2"],
         "makes 3 engines per node, each led by one of the node's 2 training ranks: use at most 4"),
        (2, ["rollout.colocated=false", "rollout.dedicated_gpus_per_node=2", "rollout.weight_transport=broadcast"],
         "this layout makes 2 rollout replicas"),
        (2, ["rollout.colocated=false", "rollout.dedicated_gpus_per_node=1", "rollout.vllm_sleep_level=1"],
         "rollout.vllm_sleep_level=1 frees shared GPU memory"),
        (2, ["rollout.max_staleness=2"], "rollout.max_staleness=2: use 0 (synchronous) or 1"),
        (2, ["rollout.max_staleness=1", "rollout.vllm_sleep_level=1"], "colocated engines cannot sleep"),
    ],
)
def test_rollout_replica_layout_is_checked_against_the_world(world, overrides, needle):
    from dynamo_mega.config import validate

    with pytest.raises(ConfigError) as err:  # at load (one section's rule) or against the world
        validate(load_config(TINY, overrides), world)
    assert needle in str(err.value)


def test_engine_tensor_parallel_must_divide_the_heads():
    with pytest.raises(ConfigError, match=r"rollout.vllm_tensor_parallel=3 does not divide model.num_attention_heads=4"):
        load_config(TINY, ["rollout.vllm_tensor_parallel=3"])


def test_rollout_replica_layouts_that_divide_the_world_are_accepted():
    from dynamo_mega.config import validate

    validate(load_config(TINY, ["rollout.vllm_tensor_parallel=2", "rollout.weight_transport=broadcast"]), 2)
    validate(load_config(TINY, ["rollout.vllm_tensor_parallel=1"]), 2)
    # disaggregated: one engine on a GPU of its own for two training ranks, fed by the broadcast transport
    one = ["rollout.colocated=false", "rollout.dedicated_gpus_per_node=1", "rollout.weight_transport=broadcast"]
    validate(load_config(TINY, [*one, "rollout.max_staleness=1"]), 2)
