"""Reliability probes of the main job, as a demanding user would try them, on the code as committed.

    .venv/bin/python bench/reliability.py      # ~20 min alone on 2 cores -> bench/results/reliability.{json,md}

Each probe drives `dynamo-mega train configs/tiny_cpu.yaml` (shortened as in tests/test_resume.py) or the API a
user calls, then checks four things: it SURVIVED (the run ends as documented: resumed, fell back, or refused
with exit 2), no SILENT WRONG result (a resumed run's per-step records equal an uninterrupted run's bit for bit;
a refused input is refused, not trained on), no ORPHAN (every process of the run's session has exited within
60 s), no LATE data error (refused before the run folder is written). The tests under tests/ check each failure
mode one by one (named in the table); this script runs them together as a table for docs/operations.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "tokenizers" / "qwen2.5-math-1.5b"
STEPS = 6
COMPARED = ("loss", "reward_mean", "grad_norm", "approx_kl", "policy_version", "n_std", "n_max")
SHORT = [
    f"run.steps={STEPS}", "run.eval_every=0", "run.eval_prompts=32", "run.progress=false", "run.max_minutes=0",
    "rollout.prompts_per_step=16", "rollout.samples_per_prompt=4", "warmup.max_steps=40", "warmup.eval_every=40",
    "warmup.stop_accuracy=1.0", "data.num_train=32", "allocation.n_low=2", "allocation.n_high=8", "data.num_eval=32",
    "checkpoint.interval=1", "checkpoint.keep_last=10",
]  # fmt: skip


def cli(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dynamo_mega.cli", "train", "configs/tiny_cpu.yaml", f"run.output_dir={run_dir}", *SHORT,
            *extra]  # fmt: skip


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    return subprocess.Popen(cli(run_dir, *extra), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def session_left(session: int, timeout: float = 60) -> int:
    """How many processes of the session are still alive after `timeout` s (then killed: this script's leftovers)."""
    deadline = time.time() + timeout
    while True:
        left = []
        for p in psutil.process_iter(["status"]):
            try:
                if os.getsid(p.pid) == session and p.info["status"] != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except (ProcessLookupError, psutil.Error):
                pass
        if not left or time.time() > deadline:
            for p in left:
                p.kill()
            return len(left)
        time.sleep(0.5)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 900) -> bool:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.2)
    return True


def finish(proc: subprocess.Popen, timeout: float = 900) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return -9


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in (json.loads(x) for x in lines if x.strip()) if r["phase"] == "train"]


def same_as_reference(run_dir: Path, reference: dict[int, dict]) -> tuple[bool, str]:
    """Every step logged exactly once, with the uninterrupted run's values bit for bit."""
    recs = records(run_dir)
    steps = [r["step"] for r in recs]
    if steps != list(range(1, STEPS + 1)):
        return False, f"steps logged {steps}"
    for r in recs:
        for key in COMPARED:
            if r[key] != reference[r["step"]][key]:
                return False, f"step {r['step']} {key}: {r[key]} != {reference[r['step']][key]}"
    samples = [json.loads(x)["step"] for x in (run_dir / "samples.jsonl").read_text().splitlines() if x.strip()]
    if sorted(set(samples)) != steps or len(samples) != len(steps) * samples.count(1):
        return False, "samples.jsonl repeats or misses a step"
    return True, "every step once, equal to the uninterrupted run"


def probe(name: str, category: str, survived: bool, *, silent_wrong=False, orphans=0, late=False, detail="", test=""):
    row = dict(name=name, category=category, survived=bool(survived), silent_wrong=bool(silent_wrong), orphans=orphans,
               late_error=bool(late), detail=detail, test=test)  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def crash_chain(work: Path, reference: dict[int, dict], rng: random.Random) -> list[dict]:
    """One run killed again and again (SIGKILL of the trainer alone at three kinds of point, then SIGTERM), resumed
    each time, compared with the uninterrupted run at the end."""
    run_dir, rows, orphans = work / "chain", [], []
    # Early enough that a step is still ahead for the SIGTERM below (the newest checkpoint is at most step 4 of 6).
    points = [("during start-up / warm-up", None, rng.uniform(8, 30)),
              ("right after a checkpoint", rng.randint(1, 2), 0.0),
              ("mid-step, after a checkpoint", rng.randint(2, 3), rng.uniform(0.5, 4.0))]  # fmt: skip
    for where, after_step, delay in points:
        proc = start(run_dir)
        if after_step is not None:
            wait_for(run_dir / "checkpoints" / f"step_{after_step:08d}" / "COMPLETE", proc)
        time.sleep(delay)
        alive = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        left = session_left(proc.pid)
        orphans.append(left)
        rows.append(probe(f"SIGKILL {where}" + ("" if alive else " (run had ended)"), "crash", True, orphans=left,
                          detail=f"delay {delay:.1f} s", test="tests/test_resume.py"))  # fmt: skip
    proc = start(run_dir)
    newest = max((int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")), default=0)
    assert newest + 1 < STEPS, f"kill points left no step to SIGTERM in (newest checkpoint {newest})"
    reached = wait_for(run_dir / "checkpoints" / f"step_{newest + 1:08d}" / "COMPLETE", proc)
    assert reached and proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {newest + 1} was saved"
    os.kill(proc.pid, signal.SIGTERM)
    rc = finish(proc)
    rows.append(probe("SIGTERM during RL (save, exit 0)", "crash", rc == 0, orphans=session_left(proc.pid),
                      detail=f"exit {rc}", test="tests/test_resume.py"))  # fmt: skip
    proc = start(run_dir)
    rc = finish(proc)
    ok, why = same_as_reference(run_dir, reference) if rc == 0 else (False, f"final resume exit {rc}")
    rows.append(probe("resume after all of the above", "crash", rc == 0, silent_wrong=rc == 0 and not ok,
                      orphans=session_left(proc.pid), detail=why, test="tests/test_resume.py"))  # fmt: skip
    return rows


def start_up_signals(work: Path) -> list[dict]:
    rows = []
    for sig, want in ((signal.SIGKILL, None), (signal.SIGTERM, 143)):
        run_dir = work / f"start_up_{sig.name}"
        proc = start(run_dir)
        wait_for(run_dir / "hf_init" / "model.safetensors", proc)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and not psutil.Process(proc.pid).children(recursive=True):
            time.sleep(0.2)
        time.sleep(2)  # vLLM is starting
        os.kill(proc.pid, sig)
        rc = finish(proc, timeout=120)
        log = (work / f"{run_dir.name}.log").read_text()
        ok = want is None or (rc == want and "SIGTERM during start-up" in log and "Traceback" not in log)
        rows.append(probe(f"{sig.name} during vLLM start-up", "orphans", ok, orphans=session_left(proc.pid),
                          detail=f"exit {rc}", test="tests/test_resume.py, tests/test_vllm_engine.py"))  # fmt: skip
    return rows


def _distcp(ckpt: Path) -> Path:
    return sorted(ckpt.rglob("*.distcp"))[0]


DAMAGE = {
    "truncated .distcp": lambda c: os.truncate(_distcp(c), _distcp(c).stat().st_size // 2),
    "deleted metadata.json": lambda c: (c / "metadata.json").unlink(),
    "garbage trainer_state.pt": lambda c: (c / "trainer_state.pt").write_bytes(b"\x80\x04garbage" * 100),
    "4 KiB of 0x7f in .distcp": lambda c: _overwrite(_distcp(c), 4096),
    "garbage COMPLETE": lambda c: (c / "COMPLETE").write_text("{not json"),
    "deleted COMPLETE": lambda c: (c / "COMPLETE").unlink(),
}


def _overwrite(path: Path, n: int) -> None:
    with path.open("r+b") as f:
        f.seek(max(path.stat().st_size // 2 - n // 2, 0))
        f.write(b"\x7f" * n)


def damaged_checkpoints(work: Path, reference_dir: Path, reference: dict[int, dict]) -> list[dict]:
    """The newest checkpoint damaged, the run rerun: it must fall back to the previous one and redo the last step."""
    rows = []
    for name, damage in DAMAGE.items():
        run_dir = work / ("damage_" + name.replace(" ", "_").replace("/", ""))
        shutil.copytree(reference_dir, run_dir)
        damage(run_dir / "checkpoints" / f"step_{STEPS:08d}")
        proc = start(run_dir)
        rc = finish(proc)
        log = (work / f"{run_dir.name}.log").read_text()
        fell_back = f"step_{STEPS - 1:08d}" in log and "resumed from" in log
        ok, why = same_as_reference(run_dir, reference) if rc == 0 else (False, f"exit {rc}: {log.strip()[-200:]}")
        rows.append(probe(f"damaged newest checkpoint: {name}", "checkpoint", rc == 0 and fell_back,
                          silent_wrong=rc == 0 and not ok, orphans=session_left(proc.pid), detail=why,
                          test="tests/test_checkpoint_verify.py"))  # fmt: skip
    return rows


def refused_inputs(work: Path) -> list[dict]:
    """Bad configs and bad data: exit 2, one line, nothing written."""
    data_dir = work / "bad_data"
    data_dir.mkdir()
    good = {"id": "a", "problem": "What is 2+3?", "answer": "5"}
    files = {
        "null prompt": [{**good, "problem": None}],
        "1 MB prompt": [good, {**good, "id": "b", "problem": "1+" * 500_000 + "1"}],
        "empty file": [],
    }
    cases = {name: [f"data.train_path={_jsonl(data_dir / f'{i}.jsonl', rows)}"] for i, (name, rows) in enumerate(files.items())}
    latin = data_dir / "latin1.jsonl"
    latin.write_bytes(b'{"id": "a", "problem": "caf\xe9?", "answer": "1"}\n')
    cases["non-UTF-8 bytes"] = [f"data.train_path={latin}"]
    file_data = [f"model.hf_checkpoint={TOKENIZER}", "data.source=file", "data.prompt_key=problem", "warmup.enabled=false",
                 "model.max_position_embeddings=4096"]  # fmt: skip
    configs = {
        "unknown key": ["run.unknown_key=1"], "wrong type": ["run.steps=abc"],
        "TP not dividing heads": ["parallel.tensor_parallel=3"],
        "PP not dividing layers": ["parallel.pipeline_parallel=2"], "bad choice": ["allocation.mode=greedy"],
        "no room to reallocate": ["allocation.mode=optimal", "allocation.n_low=4", "rollout.samples_per_prompt=4"],
        "prompts_per_step > train set": ["rollout.prompts_per_step=64"], "bad level": ["data.levels=[3x9,two]"],
        "missing resume path": [f"checkpoint.resume={work}/nope"], "dapo rounds 0": ["allocation.dapo_max_rounds=0"],
        "no override value": ["run.steps"],
    }  # fmt: skip
    rows = []
    for kind, table, extra in (("data", cases, file_data), ("config", configs, [])):
        for name, overrides in table.items():
            run_dir = work / "refused"
            t0 = time.time()
            proc = subprocess.run(cli(run_dir, *extra, *overrides), cwd=REPO, capture_output=True, text=True, timeout=600)
            lines = [x for x in proc.stderr.splitlines() if x.startswith("dynamo-mega: error:")]
            ok = proc.returncode == 2 and len(lines) == 1
            rows.append(probe(f"{kind}: {name}", kind, ok, silent_wrong=proc.returncode == 0, late=run_dir.exists(),
                              detail=f"exit {proc.returncode} in {time.time() - t0:.1f} s: {(lines or [''])[0][:160]}",
                              test="tests/test_data_validation.py" if kind == "data" else "tests/test_config.py"))  # fmt: skip
            shutil.rmtree(run_dir, ignore_errors=True)
    return rows


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def adversarial_rewards() -> list[dict]:
    from dynamo_mega.rl.reward import MathVerifyReward

    reward = MathVerifyReward(workers=2, timeout_s=2.0)
    try:
        reward.correctness(["\\boxed{1}"], ["1"])  # the pool up, as in a run
        responses = [f"\\boxed{{{i}}}" for i in range(40)] + ["9**9**9**9", "\\boxed{(10^{100})!}", "\\boxed{10^{10^{8}}}"]
        answers = [str(i) for i in range(40)] + ["8"] * 3
        rows = []
        for call in ("first call", "second call (cache)"):
            t0 = time.time()
            verdicts = reward.correctness(responses, answers)
            took = time.time() - t0
            right = sum(verdicts[:40])
            rows.append(probe(f"rewards: 40 correct + 3 adversarial, {call}", "rewards", right == 40,
                              silent_wrong=right != 40, detail=f"{right}/40 correct, {took:.1f} s",
                              test="tests/test_reward_timeouts.py"))  # fmt: skip
        return rows
    finally:
        reward.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="picks the kill points")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "reliability"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "dynamo_mega"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip())  # fmt: skip
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="reliability_") as tmp:
        work = Path(tmp)
        ref_dir = work / "reference"
        rc = finish(start(ref_dir))
        assert rc == 0, (work / "reference.log").read_text()[-3000:]
        reference = {r["step"]: r for r in records(ref_dir)}
        rows = adversarial_rewards() + refused_inputs(work) + start_up_signals(work)
        rows += damaged_checkpoints(work, ref_dir, reference) + crash_chain(work, reference, rng)
    result = dict(commit=commit, dynamo_mega_modified=dirty, seed=args.seed, minutes=round((time.time() - t0) / 60, 1),
                  probes=rows)  # fmt: skip
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    Path(args.out + ".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    rows = result["probes"]
    cats = sorted({r["category"] for r in rows}, key=[r["category"] for r in rows].index)
    out = [f"# Reliability probes (bench/reliability.py, commit {result['commit']}"
           + (", dynamo_mega/ modified" if result["dynamo_mega_modified"] else "") + f", {result['minutes']} min)", "",
           "| probes | tried | survived | silent wrong | orphans | late data errors |", "|---|---|---|---|---|---|"]  # fmt: skip
    for c in cats:
        rs = [r for r in rows if r["category"] == c]
        out.append(f"| {c} | {len(rs)} | {sum(r['survived'] for r in rs)} | {sum(r['silent_wrong'] for r in rs)} | "
                   f"{sum(r['orphans'] for r in rs)} | {sum(r['late_error'] for r in rs)} |")  # fmt: skip
    out += ["", "| probe | survived | silent wrong | orphans | late | what happened | test |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {'yes' if r['survived'] else '**no**'} | {r['silent_wrong']} | {r['orphans']} | "
                   f"{r['late_error']} | {r['detail'].replace('|', '/')} | {r['test']} |")  # fmt: skip
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
