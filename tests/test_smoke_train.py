"""A few steps of the real main job (Megatron policy, vLLM rollouts, math-verify rewards) through the CLI.

Checks the run directory's contents, that the policy version advances with every weight sync, and that every
logged rollout was rewarded against ITS OWN prompt's answer, using an independent oracle (Python evaluates
the prompt's expression; the response's boxed integer is compared with it). The same run survives the death of
its vLLM engine: the engine-core process is SIGKILLed after step 1, and the run restarts it and pushes the current
weights into it before sampling again (one run serves both checks: each CLI launch costs ~1 min of CI)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynamo_mega.rl.reward import score_pairs
from dynamo_mega.rl.reward_plugins import load_reward_fn

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    cmd = [
        sys.executable,
        "-m",
        "dynamo_mega.cli",
        "train",
        "configs/tiny_cpu.yaml",
        f"run.output_dir={out}",
        "run.steps=3",
        "run.eval_every=2",
        "run.eval_prompts=64",
        "run.log_samples=1000",
        "run.progress=false",
        "rollout.prompts_per_step=16",
        "rollout.samples_per_prompt=4",
        # Enough warm-up to move the weights well away from the initial export a restarted engine starts from.
        "warmup.max_steps=10",
        "warmup.eval_every=5",
        "warmup.stop_accuracy=1.0",
        # Chains of 2 and 3 single-digit operands: held-out accuracy is also logged per level.
        "data.levels=[2x9,3x9]",
        "data.num_train=200",
        "data.num_eval=64",
        # In-step probing: 2 probes per prompt, scored, then the rest of the step's budget where they disagree.
        "allocation.mode=probing",
        "allocation.n_low=2",
        f"warmup.save_hf_dir={out.parent / 'warm_hf'}",
        # The disaggregated transport (gloo broadcast to the engine's worker); the other CLI tests use rpc.
        "rollout.weight_transport=broadcast",
    ]
    log = out.parent / "run.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _kill_engine_after_step_1(proc, out / "metrics.jsonl")
            assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    return out


def _kill_engine_after_step_1(proc: subprocess.Popen, metrics: Path) -> None:
    import psutil

    deadline = time.time() + 600
    while not (metrics.is_file() and '"phase": "train", "step": 1,' in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before RL step 1"
        time.sleep(0.2)
    engines = [c for c in psutil.Process(proc.pid).children(recursive=True) if "EngineCore" in c.name() + " ".join(c.cmdline())]
    assert engines, "no vLLM engine-core process found"
    for p in engines:
        p.kill()


def test_run_directory_contents(run_dir):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "plot.png", "samples.jsonl", "tokenizer/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard" / "rl").glob("events.out.tfevents.*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rl_steps"] == 3 and 0.0 <= summary["accuracy_after_rl"] <= 1.0


def test_terminal_shows_the_trainer_not_the_libraries(run_dir):
    """Without run.verbose the CLI's stdout + stderr hold the trainer's own lines; vLLM (this process, its engine
    core and worker, the engine restarted after the kill), megatron and Python warnings are in the run's log
    (dynamo_mega/console.py; the routing itself: tests/test_terminal.py)."""
    terminal = (run_dir.parent / "run.log").read_text()
    library = (run_dir / "logs" / "third_party.log").read_text()
    for noise in ("INFO", "WARNING", "Warning", "(EngineCore", "(Worker", "warnings.warn"):
        assert noise not in terminal, (noise, terminal[-4000:])
    for noise in ("(MainProcess", "(EngineCore", "(Worker", "UserWarning"):
        assert noise in library, noise
    assert "dynamo-mega: held-out accuracy" in terminal and "dynamo-mega: done in" in terminal, terminal[-4000:]


def test_metrics_per_step(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["phase"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    versions = [r["policy_version"] for r in train]
    assert versions == sorted(versions) and len(set(versions)) == 3  # one weight sync per step (by broadcast)
    assert train[-1]["engine_restarts"] == 1  # the engine killed after step 1
    for r in train:
        assert r["samples"] == 64 and 0.0 <= r["reward_mean"] <= 1.0
        # vLLM and Megatron agree on the sampled tokens (fp32). After the restart this shows the trained weights
        # reached the new engine (it starts from the initial export) before it sampled.
        assert r["logprob_mismatch"] < 1e-3
    assert sum(r["phase"] == "warmup_eval" for r in records) == 2
    for r in train:  # probing: every probe is trained on, so generated == trained, in two rounds
        assert r["rollouts_generated"] == r["samples"] == 64 and r["generation_rounds"] in (1.0, 2.0)
        assert r["tokens_generated"] == r["response_len_mean"] * r["samples"]
        assert 0.0 <= r["probe_frac_zero_variance"] <= 1.0
    evals = [r for r in records if r["phase"] == "eval"]
    assert all({"accuracy_level_2x9", "accuracy_level_3x9"} <= r.keys() for r in evals)


def test_dapo_run_from_the_saved_warm_start(run_dir, tmp_path):
    """The smoke run's warmed-up policy, saved as an HF folder, starts a DAPO dynamic-sampling run: same weights
    (same greedy held-out accuracy before RL), and every generated rollout counted, dropped groups included. The
    run adds a user reward term (examples/format_reward.py, docs/rewards.md): every sample's reward is math-verify's
    verdict + 0.1 x the format reward."""
    warm = run_dir.parent / "warm_hf"
    assert (warm / "model.safetensors").is_file() and not (warm.parent / "warm_hf.partial").exists()
    out = tmp_path / "dapo"
    cmd = [sys.executable, "-m", "dynamo_mega.cli", "train", "configs/tiny_cpu.yaml", f"run.output_dir={out}",
           "run.steps=2", "run.eval_every=0", "run.eval_prompts=64", "run.progress=false", "rollout.prompts_per_step=16",
           "rollout.samples_per_prompt=4", "data.levels=[2x9,3x9]", "data.num_train=200",
           "data.num_eval=64", f"model.hf_checkpoint={warm}", "warmup.enabled=false", "allocation.mode=dapo",
           "run.log_samples=1000", "algo.reward=[{fn: math_verify}, {fn: examples/format_reward.py:format_reward, weight: 0.1}]"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    mine = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    smoke = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    before = [r["accuracy"] for r in mine if r["phase"] == "eval" and r["step"] == 0]
    assert before == [r["accuracy"] for r in smoke if r["phase"] == "eval" and r["step"] == 0]
    for r in (r for r in mine if r["phase"] == "train"):
        kept = r["dapo_groups_kept"]
        assert r["samples"] == 4 * max(kept, 4) and r["rollouts_generated"] == 4 * r["dapo_prompts_drawn"]
        assert r["rollouts_generated"] >= r["samples"] and 1 <= r["generation_rounds"] <= 3
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    fmt = load_reward_fn("examples/format_reward.py:format_reward")([s["response"] for s in samples])
    verdicts = score_pairs([(s["response"], s["answer"]) for s in samples])
    assert 0.0 < sum(fmt) and len(samples) == sum(r["samples"] for r in mine if r["phase"] == "train")
    assert [s["reward"] for s in samples] == pytest.approx([float(v) + 0.1 * f for v, f in zip(verdicts, fmt)])


def test_rewards_use_each_prompts_own_answer(run_dir):
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 64
    assert len({s["prompt_id"] for s in samples}) > 1
    truths = []
    for s in samples:
        expression, mark = re.fullmatch(r"(\d+(?:[+-]\d+)+)=(\??)", s["prompt"]).groups()
        value = str(eval(expression))  # noqa: S307 - digits and +/- only, checked by the regex
        truths.append(value[::-1] if mark == "?" else value)  # "=?": the sum written ones digit first
        assert s["answer"] == truths[-1]
    # Re-score every response against the truth of its own prompt (math-verify is lenient about format,
    # e.g. it accepts "=04}" for 4, so the verdict, not a regex, is the reference).
    verdicts = score_pairs([(s["response"], truth) for s, truth in zip(samples, truths)])
    assert [s["reward"] for s in samples] == [float(v) for v in verdicts]
    exact = [(s, truth) for s, truth in zip(samples, truths) if s["response"] == f"\\boxed{{{truth}}}"]
    assert all(s["reward"] == 1.0 for s, _ in exact)


def _torchrun(out: Path, *overrides: str, during=None) -> list[dict]:
    """One 2-rank CLI run; during(proc) runs while it does (e.g. to kill an engine)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "dynamo_mega.cli", "train",
           "configs/tiny_cpu.yaml", f"run.output_dir={out}", "run.eval_every=0", "run.eval_prompts=32", "run.progress=false",
           "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "warmup.enabled=false", "data.num_train=100",
           "data.num_eval=32", "allocation.n_low=2", *overrides]
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    with open(log, "a") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            if during is not None:
                during(proc)
            assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _engine_cores(proc: subprocess.Popen) -> dict[int, list[int]]:
    """Each trainer rank's vLLM engine-core process ids, by the rank's RANK (processes that end meanwhile are
    left out)."""
    import psutil

    ranks = {}
    for child in psutil.Process(proc.pid).children():
        try:
            rank = int(child.environ().get("RANK", -1))
            ranks[rank] = [
                c.pid for c in child.children(recursive=True) if "EngineCore" in c.name() + " ".join(c.cmdline())
            ]
        except psutil.Error:  # ended (or a zombie) since it was listed
            continue
    return ranks


def test_two_replicas_train_restart_one_resume_and_reshard(tmp_path):
    """2 gloo ranks, the rollout side as world / k replicas:
    1. trainer TP=2 -> two vLLM engines of TP=1 (one per rank), packed micro-batches, held-out evaluation on
       both replicas every step; after step 1 replica 1's engine core is SIGKILLed: that replica alone is
       restarted and refitted (replica 0's engine is the same process throughout) and the step completes;
    2. resumed as DP=2 -> one engine of TP=2 spanning both ranks (rpc refit);
    3. resumed as PP=2 -> one engine of TP=2 fed by each stage's own broadcast (rollout.weight_transport=broadcast).
    In every step vLLM's log-probs of the sampled tokens equal the trainer's: every replica holds the trained
    weights, whichever trainer layout streamed them."""
    out = tmp_path / "run"
    layers = "model.num_layers=4"  # the tiny model's 3 layers do not split into 2 stages
    seen: dict = {}

    def kill_replica_1_after_step_1(proc):
        deadline = time.time() + 600
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and '"phase": "train", "step": 1,' in metrics.read_text()):
            assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before RL step 1"
            time.sleep(0.2)
        cores = _engine_cores(proc)
        assert cores.get(0) and cores.get(1), f"expected one engine per rank, found {cores}"
        seen["replica0"], seen["replica0_later"] = cores[0], set()
        for pid in cores[1]:
            os.kill(pid, signal.SIGKILL)
        while proc.poll() is None:  # replica 0's engine survives the whole run
            seen["replica0_later"].update(_engine_cores(proc).get(0, []))
            time.sleep(0.5)

    records = _torchrun(out, layers, "parallel.tensor_parallel=2", "optim.pack_row_tokens=32", "run.steps=3",
                        "run.eval_every=1", during=kill_replica_1_after_step_1)
    train = [r for r in records if r["phase"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert train[-1]["engine_restarts"] == 1 and train[0]["engine_restarts"] == 0
    assert seen["replica0_later"] <= set(seen["replica0"]), "replica 0's engine was restarted too"
    for r in train:
        assert r["rollout_replicas"] == 2 and r["replica0/samples"] + r["replica1/samples"] == r["samples"] == 32
        assert r["replica0/refit_s"] > 0 and r["replica1/refit_s"] > 0
        assert r["logprob_mismatch"] < 1e-3
    assert [r["step"] for r in records if r["phase"] == "eval"] == [0, 1, 2, 3]
    assert (out / "checkpoints" / "step_00000003" / "COMPLETE").is_file()

    records = _torchrun(out, layers, "parallel.tensor_parallel=1", "rollout.vllm_tensor_parallel=2", "run.steps=4")
    train = [r for r in records if r["phase"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["resumed_from_step"] for r in records if r["phase"] == "resume"] == [3]
    assert train[3]["rollout_replicas"] == 1 and train[3]["replica0/samples"] == 32
    assert train[3]["policy_version"] == train[2]["policy_version"] + 1 and train[3]["logprob_mismatch"] < 1e-3

    records = _torchrun(out, layers, "parallel.pipeline_parallel=2", "rollout.vllm_tensor_parallel=2", "run.steps=5",
                        "rollout.weight_transport=broadcast")
    train = [r for r in records if r["phase"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert [r["resumed_from_step"] for r in records if r["phase"] == "resume"] == [3, 4]
    assert train[4]["policy_version"] == train[3]["policy_version"] + 1 and train[4]["logprob_mismatch"] < 1e-3
